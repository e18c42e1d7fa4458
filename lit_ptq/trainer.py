"""The Trainer of the CLI: Lightning's, plus ``export`` (calibrate as ``validate`` does, write ONNX)
and ``predict(output=...)`` (write every image's top-5 classes to a CSV or JSON Lines file)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from pytorch_lightning import LightningDataModule, LightningModule, Trainer

from .callbacks import CalibrationCallback
from .errors import ConfigError
from .io import atomic_path, check_writable
from .predictions import PredictionWriter

__all__ = ["PTQTrainer", "check_onnx_output"]

log = logging.getLogger(__name__)


def check_onnx_output(path: str, option: str = "--output") -> None:
    """Fail before any compute unless ``path`` is a writable ``.onnx`` file path.

    Raises:
        ConfigError: the name does not end in ``.onnx``, names a folder, or its folder is
            missing or not writable.
    """
    if not str(path).lower().endswith(".onnx"):
        raise ConfigError(f"{option}={path} must end in .onnx")
    check_writable(path, option)


class PTQTrainer(Trainer):
    """Lightning's :class:`~pytorch_lightning.Trainer` with an :meth:`export` method and a
    :meth:`predict` that writes a predictions file.

    ``LitPTQCLI`` uses it so that ``main.py export`` parses and runs like ``validate``
    (LightningCLI builds a subcommand's options from the trainer method of that name, and
    its help line from the method's docstring).
    """

    def test(
        self,
        model: Optional[LightningModule] = None,
        dataloaders: Any = None,
        ckpt_path: Optional[Union[str, Path]] = None,
        verbose: bool = True,
        datamodule: Optional[LightningDataModule] = None,
        weights_only: Optional[bool] = None,
    ) -> list[Any]:
        """Calibrate as validate does, then evaluate every image of data.root's test/ split.

        Lightning's :meth:`~pytorch_lightning.Trainer.test`; the trainer's
        :class:`~lit_ptq.callbacks.CalibrationCallback` calibrates at ``on_test_start``.

        Args:
            model: the :class:`~lit_ptq.module.PTQModule`.
            dataloaders: test dataloaders (the CLI uses the datamodule's ``test/``).
            ckpt_path: a Lightning checkpoint to load first (lit_ptq reads its weights from
                ``model.checkpoint`` instead).
            verbose: print Lightning's table of the test metrics.
            datamodule: the :class:`~lit_ptq.data.ImageNetDataModule`.
            weights_only: passed to ``torch.load`` for ``ckpt_path``.

        Returns:
            Lightning's list of metric dicts, one per dataloader.
        """
        return super().test(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def predict(
        self,
        model: Optional[LightningModule] = None,
        dataloaders: Any = None,
        datamodule: Optional[LightningDataModule] = None,
        return_predictions: Optional[bool] = None,
        ckpt_path: Optional[Union[str, Path]] = None,
        weights_only: Optional[bool] = None,
        output: Optional[str] = None,
    ) -> Optional[list[Any]]:
        """Calibrate as validate does, then write the top-5 classes of every image of data.predict_root.

        Lightning's :meth:`~pytorch_lightning.Trainer.predict`; the trainer's
        :class:`~lit_ptq.callbacks.CalibrationCallback` calibrates at ``on_predict_start``.
        With ``output``, a :class:`~lit_ptq.predictions.PredictionWriter` gathers every
        rank's rows and global rank 0 writes them to ``output`` (CSV or JSON Lines by its
        extension, atomically), one row per image in sorted-path order, and prints one line.

        Args:
            model: the :class:`~lit_ptq.module.PTQModule`.
            dataloaders: predict dataloaders (the CLI uses the datamodule's ``predict_root``).
            datamodule: the :class:`~lit_ptq.data.ImageNetDataModule`.
            return_predictions: also return the rows in memory (default: not with ``output``).
            ckpt_path: a Lightning checkpoint to load first (lit_ptq reads its weights from
                ``model.checkpoint`` instead).
            weights_only: passed to ``torch.load`` for ``ckpt_path``.
            output: the predictions file, ``.csv`` or ``.jsonl`` (required by ``main.py predict``);
                its folder must exist and be writable (checked before any compute).

        Returns:
            Lightning's predictions when ``return_predictions`` is true, else None.

        Raises:
            ConfigError: ``output`` does not end in ``.csv`` / ``.jsonl`` or cannot be written.
        """
        if output is None:
            return super().predict(model, dataloaders, datamodule, return_predictions, ckpt_path, weights_only)
        writer = PredictionWriter(output)
        self.callbacks.append(writer)
        try:
            return super().predict(model, dataloaders, datamodule, bool(return_predictions), ckpt_path, weights_only)
        finally:
            self.callbacks.remove(writer)

    def export(
        self,
        model: LightningModule,
        output: str,
        datamodule: Optional[LightningDataModule] = None,
        log_points: Literal["raise", "float_ops"] = "raise",
    ) -> dict[str, Any]:
        """Calibrate the model as validate does and write it to an ONNX file (QDQ when quantized).

        The calibration is :class:`~lit_ptq.callbacks.CalibrationCallback`'s (the trainer's
        instance, so ``calibration.load_state`` / ``save_state`` apply): the same batches on
        the same device as ``validate``, in one process. The model is then exported on the
        CPU by :func:`lit_ptq.export.export_onnx` (example input: two zero images of the
        model's input size; the batch dimension is dynamic) with a ``lit_ptq`` metadata entry
        describing the run (:mod:`lit_ptq.export.runtime`), to a temporary file renamed to
        ``output`` only when complete. One line is printed: the path, its size and what it is.

        Args:
            model: a :class:`~lit_ptq.module.PTQModule` (quantized or float, not ``onnx``).
            output: the ``.onnx`` file to write.
            datamodule: gives the calibration batches (not needed for a float model or with
                ``calibration.load_state``).
            log_points: ``raise`` refuses log quantizers and log-int-softmax; ``float_ops``
                exports them as float operators (see :func:`lit_ptq.export.qdq_export_mode`).

        Returns:
            The file's ``lit_ptq`` metadata, plus ``path`` and ``bytes``.

        Raises:
            ConfigError: ``model.onnx`` is set, or ``output`` is not a writable ``.onnx`` path.
            OnnxExportError: the model has a quant point QDQ cannot express (checked before
                calibrating); no file is written.
        """
        from .export import export_onnx
        from .export.onnx import OPSET
        from .export.runtime import check_exportable, embed_metadata

        if getattr(model, "onnx_info", None) is not None:
            raise ConfigError("model.onnx is set: export writes the PyTorch model; remove model.onnx")
        check_onnx_output(output)
        net = model.model
        quantized = bool(getattr(model, "quantized", False))
        if quantized:
            check_exportable(net, log_points)
        calibration = next((cb for cb in self.callbacks if isinstance(cb, CalibrationCallback)), None)
        calibration = calibration if calibration is not None else CalibrationCallback()
        model.to(self.strategy.root_device)
        model.eval()
        with torch.no_grad():
            calibration.prepare(model, datamodule, self)
        model.cpu()
        input_size = tuple(net.eval_cfg.input_size)
        metadata = dict(
            summary=model.run_summary(),
            calib_images=calibration.calib_images,
            load_state=calibration.load_state if quantized else None,
            log_points=log_points,
            format="qdq" if quantized else "float",
            input_size=list(input_size),
            opset=OPSET,
        )
        with atomic_path(output, suffix=".onnx") as tmp:
            export_onnx(net, tmp, torch.zeros(2, *input_size), log_points=log_points)
            embed_metadata(tmp, metadata)
        size = os.path.getsize(output)
        if self.is_global_zero:
            print(f"wrote {output} ({size / 1e6:.1f} MB): {_describe(metadata)}")
        return dict(metadata, path=output, bytes=size)


def _describe(metadata: dict[str, Any]) -> str:
    """``itpn_tiny minmax seed 8/8/8, QDQ ONNX, calibrated on 1000 images`` (or float / loaded)."""
    s = metadata["summary"]
    if metadata["format"] == "float":
        return f"{s['model']} fp32, float ONNX"
    if metadata.get("load_state"):
        source = f"quantizer state {metadata['load_state']}"
    else:
        source = f"calibrated on {metadata['calib_images']} images"
    flags = "".join(f" {k}" for k in ("ptf", "lis") if s.get(k)) + (f" {s['recipe']}" if s.get("recipe") else "")
    return f"{s['model']} {s['method']} {s['placement']}{flags} {s['bits']}, QDQ ONNX, {source}"
