"""Predictions of ``main.py predict``: each image's top-5 classes, gathered over ranks, written as CSV or JSON Lines.

One row per image, in the order of the sorted paths (every image exactly once whatever the
number of processes; unreadable images skipped with ``data.skip_unreadable=true`` have no
row). The format follows the file's extension:

* ``.csv``: a header ``path,class_1,prob_1,...,class_5,prob_5``, then one line per image;
* ``.jsonl``: one object per line, ``{"path": ..., "classes": [5 names], "probs": [5 floats]}``.

Probabilities are the softmax of the logits, written with 6 decimals; with fewer than 5
classes there are as many columns as classes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from pytorch_lightning import Callback, LightningModule, Trainer

from .errors import ConfigError
from .io import atomic_path, check_writable
from .results import run_label

__all__ = ["FORMATS", "PredictionWriter", "check_predictions_output", "write_predictions"]

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".jsonl": "jsonl"}
"""File extension (lower case) -> format of the predictions file."""


def check_predictions_output(path: Optional[str], option: str = "--output") -> str:
    """Fail before any compute unless ``path`` is a writable ``.csv`` or ``.jsonl`` file path.

    Returns:
        The format: ``"csv"`` or ``"jsonl"``.

    Raises:
        ConfigError: ``path`` is None, ends in another extension, names a folder, or its
            folder is missing or not writable.
    """
    if not path:
        raise ConfigError(f"predict needs {option}: give the file to write, e.g. {option} predictions.csv (or .jsonl)")
    fmt = FORMATS.get(os.path.splitext(str(path))[1].lower())
    if fmt is None:
        raise ConfigError(f"{option}={path} must end in .csv or .jsonl (the extension chooses the format)")
    check_writable(path, option)
    return fmt


def write_predictions(
    path: str, paths: list[str], classes: torch.Tensor, probs: torch.Tensor, class_names: list[str]
) -> None:
    """Write one row per image to ``path`` (CSV or JSON Lines by its extension), atomically.

    Args:
        path: the ``.csv`` or ``.jsonl`` file.
        paths: the images' paths, in row order.
        classes: ``(N, k)`` class indices, best first.
        probs: ``(N, k)`` their probabilities.
        class_names: ``class_names[i]`` names class ``i``.
    """
    fmt = check_predictions_output(path)
    k = classes.shape[1] if classes.ndim == 2 else 0
    names = [[class_names[c] for c in row] for row in classes.tolist()]
    values = [[round(p, 6) for p in row] for row in probs.double().tolist()]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        if fmt == "csv":
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["path", *(f"{col}_{i + 1}" for i in range(k) for col in ("class", "prob"))])
            for image, row_names, row_probs in zip(paths, names, values):
                writer.writerow([image, *(x for pair in zip(row_names, (f"{p:.6f}" for p in row_probs)) for x in pair)])
        else:
            for image, row_names, row_probs in zip(paths, names, values):
                f.write(json.dumps({"path": image, "classes": row_names, "probs": row_probs}, ensure_ascii=False) + "\n")


class PredictionWriter(Callback):
    """Collects :meth:`~lit_ptq.module.PTQModule.predict_step`'s rows and writes the file at the end.

    Every rank keeps its own rows; at ``on_predict_end`` they are gathered on global rank 0
    (``torch.distributed.gather_object``), ordered by image index, one row per index (the sorted paths of
    :attr:`~lit_ptq.data.ImageNetDataModule.predict_dataset`) and written by rank 0 alone
    (:func:`write_predictions`), which then prints one line. Works with any launcher, since
    nothing is returned to the launching process. The trainer's datamodule must be an
    :class:`~lit_ptq.data.ImageNetDataModule` (its ``predict_dataset`` names the paths and
    classes).

    Args:
        output: the ``.csv`` or ``.jsonl`` file.

    Attributes:
        summary: after a run, on global rank 0: ``path``, ``images`` (rows written),
            ``skipped`` (images without a row), ``classes`` (class count) and ``seconds``.
    """

    def __init__(self, output: str) -> None:
        super().__init__()
        check_predictions_output(output)
        self.output = output
        self.summary: dict[str, Any] = {}
        self._rows: list[dict[str, torch.Tensor]] = []
        self._started = time.perf_counter()

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Forget the rows of an earlier run."""
        self._rows = []

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Keep a batch's rows (a dict of CPU tensors; None for an empty batch)."""
        if outputs is not None:
            self._rows.append({k: v.detach().cpu() for k, v in outputs.items()})

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Gather every rank's rows on global rank 0, write the file there and print one line."""
        dataset = trainer.datamodule.predict_dataset
        rows = _gather(self._rows, trainer.world_size)
        if not trainer.is_global_zero:
            return
        index = torch.cat([r["index"] for r in rows]) if rows else torch.empty(0, dtype=torch.int64)
        order = _first_of_each(index)
        k = min(5, len(dataset.classes))
        classes = torch.cat([r["classes"] for r in rows])[order] if rows else torch.empty(0, k, dtype=torch.int64)
        probs = torch.cat([r["probs"] for r in rows])[order] if rows else torch.empty(0, k)
        paths = [dataset.samples[i][0] for i in index[order].tolist()]
        write_predictions(self.output, paths, classes, probs, dataset.classes)
        seconds = time.perf_counter() - self._started
        skipped = len(dataset) - len(paths)
        self.summary = dict(path=self.output, images=len(paths), skipped=skipped, classes=len(dataset.classes), seconds=seconds)
        if skipped:
            log.warning("skipped %d unreadable image(s) (data.skip_unreadable=true): no row for them", skipped)
        label = run_label(dict(pl_module.run_summary(), backend=getattr(pl_module, "backend", "pytorch")))
        print(f"{label}: top-{k} classes of {len(paths)} images written to {self.output} ({seconds:.1f} s)")


def _first_of_each(index: torch.Tensor) -> torch.Tensor:
    """Positions that order ``index`` ascending, keeping the first row of each repeated index
    (a rank that had no image of its own predicted image 0 again; see ``fill_empty`` of
    :class:`~lit_ptq.data.UnpaddedDistributedSampler`)."""
    order = index.argsort(stable=True)
    ordered = index[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return order[first]


def _gather(rows: list[dict[str, torch.Tensor]], world_size: int) -> list[dict[str, torch.Tensor]]:
    """Every rank's rows on global rank 0 (the local rows in one process; an empty list on other ranks)."""
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return rows
    gathered: Optional[list[Any]] = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(rows, gathered, dst=0)
    return [row for part in gathered or [] for row in part]
