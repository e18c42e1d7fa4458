"""One run of lit_ptq, as a service: option checks, the calibration-batch policy, calibration,
the sensitivity measurement, the results record, the printed summary line and export.

The CLI (:mod:`lit_ptq.cli`) parses and hands over to it; the grid tool
(:mod:`lit_ptq.tools.table`) and the benchmarks call it without the CLI, so a run gives the
same record whichever way it starts. The Lightning hooks stay thin:
:class:`~lit_ptq.callbacks.CalibrationCallback` calls :func:`calibrate_module` before
validation, test or predict and keeps its :class:`CalibrationResult`. The layout follows
Lightning's advice that the CLI only wires and behaviour lives in components that can be
called without it (https://lightning.ai/docs/pytorch/stable/cli/lightning_cli_expert.html).

Importing this module imports :mod:`lit_ptq.export`, which registers the export and inference
backends (:mod:`lit_ptq.backends`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

from . import export as _registers_backends  # noqa: F401  (the onnx and onnxruntime backends)
from .backends import ExportBackend, export_backend
from .data import check_predict_root, check_test_split
from .errors import ConfigError
from .io import atomic_path, check_writable, write_text
from .predictions import check_predictions_output
from .quant import QuantizerStats, broadcast_quant_state, calibrate, load_quant_state, quant_report, save_quant_state
from .results import overrides_summary, run_label
from .sensitivity import SensitivityResult, SensitivitySettings, sensitivity_lines
from .tensorboard import log_run, name_logger

if TYPE_CHECKING:
    from pytorch_lightning import Trainer

    from .module import PTQModule

__all__ = [
    "DATA_LINKS",
    "NOT_CALIBRATED",
    "CalibrationResult",
    "Evaluation",
    "RunPlan",
    "calibrate_module",
    "check_export_output",
    "check_state_paths",
    "describe_export",
    "export_module",
    "linked_data_args",
    "plan_run",
    "prepare_export",
    "progress_bar",
    "quiet_lightning",
    "results_record",
    "summary_line",
]

log = logging.getLogger(__name__)

DATA_LINKS: tuple[tuple[str, str], ...] = (
    ("model_name", "model_name"),
    ("img_size", "img_size"),
    ("num_classes", "num_classes"),
)
"""``(model argument, data argument)``: what the data module takes from the model's options
(the CLI links them; :func:`linked_data_args` applies them without the CLI)."""


def linked_data_args(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """The data module's arguments linked from ``model_args`` (:data:`DATA_LINKS`; a missing one is None)."""
    return {data: model_args.get(model) for model, data in DATA_LINKS}


def quiet_lightning() -> None:
    """No Trainer start-up banners or Lightning deprecation chatter (the CLI's logging, and one
    Trainer per run of the grid tool and the benchmarks)."""
    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning's own


# --------------------------------------------------------------------------- option checks


def check_state_paths(save_state: Optional[str], load_state: Optional[str]) -> None:
    """Fail before any compute when a quantizer-state path is unusable.

    Raises:
        ConfigError: ``load_state`` does not exist, or ``save_state`` cannot be written.
    """
    if load_state is not None and not os.path.isfile(load_state):
        raise ConfigError(f"calibration.load_state={load_state} does not exist; calibrate once with save_state first")
    if save_state is not None:
        check_writable(save_state, "calibration.save_state")


@dataclass(frozen=True)
class RunPlan:
    """What :func:`plan_run` decided for a run.

    Attributes:
        calib_batches: the calibration batches the data module should read (0 when nothing is
            calibrated or measured: no calibration image is loaded).
        logger: whether the run keeps its trainer's logger (predict logs nothing).
    """

    calib_batches: int
    logger: bool = True


def plan_run(
    subcommand: Optional[str],
    model: Mapping[str, Any],
    data: Mapping[str, Any],
    calibration: Mapping[str, Any],
    sensitivity: SensitivitySettings,
    output: Optional[str] = None,
    results_path: Optional[str] = None,
    export_format: str = "onnx",
) -> RunPlan:
    """Check a run's options before any compute and decide its calibration batches.

    Args:
        subcommand: ``validate``, ``test``, ``predict`` or ``export`` (None: validate).
        model: the :class:`~lit_ptq.module.PTQModule` arguments.
        data: the :class:`~lit_ptq.data.ImageNetDataModule` arguments.
        calibration: the :class:`~lit_ptq.callbacks.CalibrationCallback` arguments.
        sensitivity: the sensitivity options.
        output: ``--output`` of ``export`` and ``predict``.
        results_path: ``--results_path`` of ``validate`` and ``test``.
        export_format: ``--format`` of ``export``.

    Raises:
        ConfigError: an option cannot work (one sentence naming it).
    """
    onnx = model.get("onnx")
    quantized = model.get("method") is not None
    sensitivity.check_options(quantized, onnx, data["calib_batches"] * data["calib_batch_size"], subcommand)
    if model.get("compile"):
        if onnx:
            raise ConfigError(f"model.compile=true compiles the PyTorch model, but model.onnx={onnx} is run by onnxruntime; remove one")
        if subcommand == "export":
            raise ConfigError("model.compile=true is for evaluation (validate, test, predict); export traces the eager model: remove model.compile")
    if subcommand == "export":
        if onnx:
            raise ConfigError(f"model.onnx={onnx} is for validate; export writes the PyTorch model: remove model.onnx")
        check_export_output(output, export_format)
    elif subcommand == "predict":
        check_predictions_output(output, "--output")
        check_predict_root(data.get("predict_root"))
    elif results_path:
        check_writable(results_path, "--results_path")
    if subcommand == "test":
        check_test_split(data["root"])
    logger = subcommand != "predict"  # predict logs nothing: no empty TensorBoard version folders
    if onnx:
        for option in ("save_state", "load_state"):
            if calibration.get(option):
                raise ConfigError(
                    f"calibration.{option} is set but model.onnx={onnx} is evaluated without calibrating; "
                    f"remove calibration.{option}"
                )
        return RunPlan(0, logger)  # the file holds its quantization: no calibration images
    check_state_paths(calibration.get("save_state"), calibration.get("load_state"))
    if quantized and not calibration.get("load_state") and data.get("calib_batches") == 0:
        raise ConfigError(
            "data.calib_batches=0 but model.method is set: quantization needs calibration batches; "
            "set data.calib_batches >= 1, load a state with calibration.load_state, or set model.method=null"
        )
    if not quantized or (calibration.get("load_state") and not sensitivity.enabled):
        return RunPlan(0, logger)  # nothing is calibrated (or measured), so no calibration images are needed
    return RunPlan(data["calib_batches"], logger)


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class CalibrationResult:
    """What calibrating a module (or loading its quantizer state) did.

    Attributes:
        seconds: how long calibration (or loading) took.
        calib_images: how many images calibration saw (0 when loaded).
        report: the per-quantizer report measured on the last calibration batch (empty when loaded).
        loaded_from: the state file loaded instead of calibrating, or None.
        saved_to: the state file written (by this process), or None.
    """

    seconds: float = 0.0
    calib_images: int = 0
    report: list[QuantizerStats] = field(default_factory=list)
    loaded_from: Optional[str] = None
    saved_to: Optional[str] = None


NOT_CALIBRATED = CalibrationResult()
"""The result of a run that calibrated nothing (a float model, or another backend's)."""

Progress = Callable[[int], Any]
"""Makes a progress bar for ``total`` batches (with ``update(n)`` and ``close()``), or returns None."""


def progress_bar(trainer: Optional["Trainer"], total: int, description: str) -> Optional[Tqdm]:
    """A bar of ``total`` steps in the style of the trainer's validation bar (Lightning's
    ``Tqdm``, its bar format, on stdout, left on screen when done), or None when the trainer
    shows no bars (``enable_progress_bar=False``, another progress bar, a rank other than
    global rank 0) or there is no trainer.

    Args:
        trainer: the run's trainer.
        total: steps of the bar.
        description: what it counts, left of the bar (``Sensitivity``).
    """
    if trainer is None or not trainer.is_global_zero:
        return None
    bar = trainer.progress_bar_callback
    if not isinstance(bar, TQDMProgressBar) or bar.is_disabled:
        return None
    return Tqdm(
        total=total, desc=description, position=2 * bar.process_position, leave=True,
        dynamic_ncols=True, file=sys.stdout, bar_format=bar.BAR_FORMAT,
    )  # fmt: skip


def _state_meta(module: "PTQModule") -> dict[str, Any]:
    """What a state file is tied to besides the quantization config and the weights."""
    hp = module.hparams
    return dict(model=hp.model_name, num_classes=hp.num_classes, img_size=hp.get("img_size"), model_kwargs=dict(hp.get("model_kwargs") or {}))


def _calibrate(module: "PTQModule", datamodule: Any, progress: Optional[Progress]) -> tuple[int, list[QuantizerStats]]:
    """Calibrate on ``datamodule.calib_dataloader()``: the images seen and the report on the last batch."""
    loader = datamodule.calib_dataloader()
    last: list[torch.Tensor] = []
    seen = [0]
    bar = progress(len(loader)) if progress is not None else None

    def images() -> Iterator[torch.Tensor]:
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            seen[0] += x.shape[0]
            last[:] = [x]
            yield x.to(module.device)
            if bar is not None:
                bar.update(1)

    calibrate(module.model, images())
    if bar is not None:
        bar.close()
    return seen[0], quant_report(module.model, last[0].to(module.device))


def calibrate_module(
    module: "PTQModule",
    datamodule: Optional[Any] = None,
    save_state: Optional[str] = None,
    load_state: Optional[str] = None,
    is_global_zero: bool = True,
    progress: Optional[Progress] = None,
) -> Optional[CalibrationResult]:
    """Calibrate (or load) the quantizers of ``module``, broadcast them, save the state.

    The first ``calib_batches`` batches of ``datamodule.calib_dataloader()`` (or the state
    file ``load_state``, refused when made for another model, checkpoint or config), then rank
    0's quantizer state broadcast to every rank and, with ``save_state``, written by global
    rank 0 (atomically). The module must already be on the device to calibrate on.

    Args:
        module: a :class:`~lit_ptq.module.PTQModule` (anything with ``quantized``, ``model``,
            ``device`` and ``hparams``).
        datamodule: gives ``calib_dataloader()``; not needed with ``load_state``.
        save_state: write the calibrated quantizer state to this file.
        load_state: load the quantizer state from this file instead of calibrating.
        is_global_zero: whether this process writes ``save_state``.
        progress: makes the calibration progress bar.

    Returns:
        None when there is nothing to calibrate (a float model, or another backend's), else
        the :class:`CalibrationResult`.
    """
    if not getattr(module, "quantized", False):
        return None
    start = time.perf_counter()
    if load_state is not None:
        load_quant_state(module.model, load_state, _state_meta(module), option="calibration.load_state")
        images, report = 0, []
    else:
        if datamodule is None:
            raise ValueError("calibration needs a datamodule with calib_dataloader() (or load_state)")
        images, report = _calibrate(module, datamodule, progress)
    broadcast_quant_state(module.model)
    saved = None
    if save_state is not None and is_global_zero:
        save_quant_state(module.model, save_state, _state_meta(module))
        log.info("saved quantizer state to %s", save_state)
        saved = save_state
    seconds = time.perf_counter() - start
    log.info("calibration took %.2f s (%d images)", seconds, images)
    return CalibrationResult(seconds, images, report, load_state, saved)


# --------------------------------------------------------------------------- the record


def results_record(
    module: "PTQModule",
    metrics: Mapping[str, float],
    calib: Optional[CalibrationResult],
    extra: Mapping[str, Any],
    split: Literal["val", "test"] = "val",
) -> dict[str, Any]:
    """One run's result, as written to ``--results_path`` (acc1 / acc5 in percent).

    ``metrics`` are the trainer's callback metrics of the evaluated ``split`` (``val/acc1``
    or ``test/acc1``, ...; top-1 and top-5 in percent, as :class:`PTQModule` logs them); the
    record names the split (``split``: ``val`` for validate, ``test`` for test). ``backend``
    says what computed the logits (the inference backend's name, ``pytorch`` or
    ``onnxruntime``; see :attr:`PTQModule.backend`); an ONNX run's summary also names the
    file (``onnx``). ``calib`` is None for a run that calibrated nothing.
    """
    calib = calib or NOT_CALIBRATED
    return dict(
        **module.run_summary(),
        backend=getattr(module, "backend", "pytorch"),
        calib_images=calib.calib_images,
        calibration_seconds=round(calib.seconds, 3),
        acc1=round(metrics[f"{split}/acc1"], 4),  # logged in percent (lit_ptq.metrics.PercentAccuracy)
        acc5=round(metrics[f"{split}/acc5"], 4),
        loss=metrics[f"{split}/loss"],
        num_images=int(round(metrics[f"{split}/num_images"])),
        split=split,
        **extra,
    )


def summary_line(record: Mapping[str, Any], seconds: float, mixed: str = "") -> str:
    """The line a validate or test run prints:
    ``itpn_tiny minmax seed 8/8/8: acc1 91.53 acc5 99.66 loss 0.2553 on 59 images (4.2 s)``;
    with ``mixed`` (:func:`~lit_ptq.results.overrides_summary`), after the label:
    ``itpn_tiny omse seed 4/4/4 mixed: 8 points at 8 bits: acc1 ...``."""
    which = "test " if record["split"] == "test" else ""
    label = f"{run_label(record)} {mixed}" if mixed else run_label(record)
    return (
        f"{label}: {which}acc1 {record['acc1']:.2f} acc5 {record['acc5']:.2f} loss {record['loss']:.4f} "
        f"on {record['num_images']} images ({seconds:.1f} s)"
    )


class Evaluation:
    """One validate or test run of a module on a data module with a trainer.

    :meth:`start` before ``trainer.validate`` / ``trainer.test``, :meth:`finish` after it;
    :meth:`run` does all three. :meth:`finish` reduces the skipped files over the ranks,
    measures the sensitivity (global rank 0, after that last collective, in one process or
    under DDP, with a progress bar over the quant points when the trainer shows bars), builds
    the record and, on global rank 0, logs it to TensorBoard, writes it to ``results_path``
    and prints :func:`summary_line` (saying what the overrides changed, when the config has
    any), then a sensitivity run's worst points and its YAML file (:func:`sensitivity_lines`).

    Args:
        module: the :class:`~lit_ptq.module.PTQModule`.
        datamodule: the :class:`~lit_ptq.data.ImageNetDataModule`.
        trainer: the Lightning trainer that evaluates.
        split: ``val`` (validate) or ``test``.
        seed: the run's seed, for the record.
        results_path: write the record here as JSON.
        sensitivity: the sensitivity options (None: not measured).
        announce: print the summary line.
    """

    def __init__(
        self,
        module: "PTQModule",
        datamodule: Any,
        trainer: "Trainer",
        split: Literal["val", "test"] = "val",
        seed: Optional[int] = None,
        results_path: Optional[str] = None,
        sensitivity: Optional[SensitivitySettings] = None,
        announce: bool = True,
    ) -> None:
        self.module, self.datamodule, self.trainer, self.split = module, datamodule, trainer, split
        self.seed, self.results_path, self.sensitivity, self.announce = seed, results_path, sensitivity, announce
        self._started = 0.0
        self._skipped_before = 0

    def start(self) -> None:
        """Name the TensorBoard run, set up the split's data and start the run's clock."""
        name_logger(self.trainer.logger, dict(self.module.run_summary(), backend=self.module.backend))
        self.datamodule.setup("validate" if self.split == "val" else "test")
        self._skipped_before = len(self.datamodule.skipped_files)
        self._started = time.perf_counter()

    def run(self, calibration: Callable[[], Optional[CalibrationResult]]) -> dict[str, Any]:
        """:meth:`start`, the trainer's validate or test, :meth:`finish`; returns the record.

        Args:
            calibration: gives the run's calibration result after the evaluation (the
                calibration callback's :attr:`~lit_ptq.callbacks.CalibrationCallback.result`).
        """
        self.start()
        evaluate = self.trainer.validate if self.split == "val" else self.trainer.test
        evaluate(self.module, datamodule=self.datamodule, verbose=False)
        return self.finish(calibration())

    def finish(self, calib: Optional[CalibrationResult]) -> dict[str, Any]:
        """The run's record (every rank); global rank 0 also logs, writes and prints it."""
        seconds = time.perf_counter() - self._started
        trainer, module = self.trainer, self.module
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        skipped = torch.tensor(float(len(self.datamodule.skipped_files) - self._skipped_before))
        skipped = int(trainer.strategy.reduce(skipped, reduce_op="sum"))
        extra: dict[str, Any] = dict(
            world_size=trainer.world_size,
            seconds=round(seconds, 3),
            skipped_files=skipped,
            seed=self.seed,
            device=str(module.device),
        )
        sensitivity = self._measure(calib)  # after the reduce: no rank waits on rank 0's measurement
        if sensitivity is not None:
            extra["sensitivity"] = sensitivity.record()
        record = results_record(module, metrics, calib, extra, self.split)
        if trainer.is_global_zero:
            self._publish(record, calib, sensitivity, skipped, seconds)
        return record

    def _measure(self, calib: Optional[CalibrationResult]) -> Optional[SensitivityResult]:
        """The sensitivity of the calibrated model on global rank 0, on the trainer's device."""
        settings, module = self.sensitivity, self.module
        if settings is None or not settings.enabled or not module.quantized or not self.trainer.is_global_zero:
            return None
        module.to(self.trainer.strategy.root_device)
        progress = partial(progress_bar, self.trainer, description="Sensitivity")
        return settings.measure(module, self.datamodule, (calib or NOT_CALIBRATED).report, progress)

    def _publish(
        self,
        record: dict[str, Any],
        calib: Optional[CalibrationResult],
        sensitivity: Optional[SensitivityResult],
        skipped: int,
        seconds: float,
    ) -> None:
        if skipped:
            log.warning("skipped %d unreadable image(s) (data.skip_unreadable=true)", skipped)
        top = self.sensitivity.top if self.sensitivity is not None else 20
        log_run(self.trainer.logger, record, (calib or NOT_CALIBRATED).report, sensitivity, top)
        if self.results_path:
            write_text(self.results_path, json.dumps(record, indent=2, allow_nan=True))
            log.info("results written to %s", self.results_path)
        if self.announce:
            mixed = overrides_summary(self.module.model) if self.module.model is not None else ""
            print(summary_line(record, seconds, mixed))
            if sensitivity is not None:
                print("\n".join(sensitivity_lines(sensitivity)))


# --------------------------------------------------------------------------- export


def check_export_output(output: str, format: str = "onnx") -> type[ExportBackend]:
    """The export backend registered as ``format``, once ``output`` is a writable path with its suffix.

    Raises:
        ConfigError: ``format`` is not registered, or ``output`` does not end in the backend's
            suffix, names a folder, or its folder is missing or not writable.
    """
    backend = export_backend(format)
    if not str(output).lower().endswith(backend.suffix):
        raise ConfigError(f"--output={output} must end in {backend.suffix}")
    check_writable(output, "--output")
    return backend


def prepare_export(module: "PTQModule", output: str, format: str = "onnx", **options: Any) -> ExportBackend:
    """Check an export before calibration and make its backend.

    Args:
        module: a :class:`~lit_ptq.module.PTQModule` with a PyTorch model.
        output: the file to write; it must end in the backend's suffix and be writable.
        format: a registered export backend (:data:`lit_ptq.backends.EXPORT_BACKENDS`).
        options: the backend's options (``log_points`` for ONNX).

    Raises:
        ConfigError: the module has no PyTorch model (``model.onnx``), the format is not
            registered, or ``output`` is not a writable path with the backend's suffix.
        UserError: the backend cannot hold the model (:meth:`ExportBackend.check`).
    """
    if module.model is None:
        raise ConfigError("model.onnx is set: export writes the PyTorch model; remove model.onnx")
    backend = check_export_output(output, format)(**options)
    backend.check(module.model, module.quantized)
    return backend


def export_module(
    module: "PTQModule", backend: ExportBackend, output: str, calib: Optional[CalibrationResult], is_global_zero: bool = True
) -> dict[str, Any]:
    """Write the calibrated ``module`` with ``backend`` to ``output`` (on the CPU, via a temporary
    file renamed when complete) and print one line on global rank 0.

    The example input is two zero images of the model's input size; the metadata is the run's
    summary, the calibration images and the loaded state (the backend adds its own fields).

    Returns:
        The file's metadata, plus ``path`` and ``bytes``.
    """
    calib = calib or NOT_CALIBRATED
    net, quantized = module.model, module.quantized
    module.cpu()
    input_size = tuple(net.eval_cfg.input_size)
    metadata = dict(
        summary=module.run_summary(),
        calib_images=calib.calib_images,
        load_state=calib.loaded_from if quantized else None,
    )
    with atomic_path(output, suffix=backend.suffix) as tmp:
        metadata = backend.export(net, tmp, torch.zeros(2, *input_size), metadata)
    size = os.path.getsize(output)
    if is_global_zero:
        print(f"wrote {output} ({size / 1e6:.1f} MB): {describe_export(metadata, backend.describe(metadata), quantized)}")
    return dict(metadata, path=output, bytes=size)


def describe_export(metadata: Mapping[str, Any], kind: str, quantized: bool) -> str:
    """``itpn_tiny minmax seed 8/8/8, QDQ ONNX, calibrated on 1000 images`` (or float / loaded).

    Args:
        metadata: what the file records (``summary``, ``calib_images``, ``load_state``).
        kind: what the file is (:meth:`ExportBackend.describe`).
        quantized: whether the exported model carries quantizers.
    """
    s = metadata["summary"]
    if not quantized:
        return f"{s['model']} fp32, {kind}"
    if metadata.get("load_state"):
        source = f"quantizer state {metadata['load_state']}"
    else:
        source = f"calibrated on {metadata['calib_images']} images"
    flags = "".join(f" {k}" for k in ("ptf", "lis") if s.get(k)) + (f" {s['recipe']}" if s.get("recipe") else "")
    return f"{s['model']} {s['method']} {s['placement']}{flags} {s['bits']}, {kind}, {source}"
