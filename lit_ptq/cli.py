"""The LightningCLI of lit_ptq: ``python main.py validate --config configs/...yaml``.

Subcommands: Lightning's (``validate``, ``test``, ...) and ``export``, which calibrates as
``validate`` does and writes the model as ONNX (``--output model.onnx``); ``validate
--model.onnx model.onnx`` evaluates such a file with onnxruntime.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Optional

import torch
from pytorch_lightning.cli import LightningCLI

from .callbacks import CalibrationCallback
from .data import ImageNetDataModule
from .errors import ConfigError
from .io import atomic_path, check_writable
from .module import PTQModule
from .quant import QuantizerStats
from .results import results_record
from .sensitivity import SensitivityCallback
from .tensorboard import log_run, name_logger
from .trainer import PTQTrainer, check_onnx_output

__all__ = ["LitPTQCLI", "cli_main"]

log = logging.getLogger(__name__)

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "tb_logs", "name": "lit_ptq", "default_hp_metric": False},
    },
    "enable_checkpointing": False,
}


class LitPTQCLI(LightningCLI):
    """LightningCLI over :class:`PTQModule` and :class:`ImageNetDataModule`.

    Adds the ``calibration`` callback options, ``--results_path`` (one JSON file per run,
    written atomically), the ``sensitivity`` callback options (per-layer sensitivity and a
    mixed-precision config, :class:`lit_ptq.sensitivity.SensitivityCallback`), links the model's
    name, input size and class count into the data module, names the TensorBoard run after its
    settings and logs hparams, metrics, the per-quantizer report and the sensitivity to it
    (:mod:`lit_ptq.tensorboard`).

    The ``export`` subcommand (:meth:`lit_ptq.trainer.PTQTrainer.export`) takes the same
    config plus ``--output FILE.onnx`` and ``--log_points {raise,float_ops}``;
    ``--results_path`` is ignored there.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_callback", None)
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})  # main.py prints parse errors in one line
        kwargs.setdefault("trainer_class", PTQTrainer)
        self._started = 0.0
        super().__init__(PTQModule, ImageNetDataModule, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus ``export`` (its model and datamodule come from the config)."""
        return {**LightningCLI.subcommands(), "export": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(CalibrationCallback, "calibration")
        parser.add_lightning_class_args(SensitivityCallback, "sensitivity")
        parser.link_arguments("model.model_name", "data.model_name")
        parser.link_arguments("model.img_size", "data.img_size")
        parser.link_arguments("model.num_classes", "data.num_classes")
        parser.add_argument("--results_path", type=Optional[str], default=None, help="write the run's results as JSON here")

    def _run_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._run_config()
        onnx = cfg.model.get("onnx")
        sensitivity = SensitivityCallback(**dict(cfg.sensitivity))
        sensitivity.check_options(
            cfg.model.get("method") is not None, onnx, cfg.data.calib_batches * cfg.data.calib_batch_size, self.subcommand
        )
        if self.subcommand == "export":
            if onnx:
                raise ConfigError(f"model.onnx={onnx} is for validate; export writes the PyTorch model: remove model.onnx")
            check_onnx_output(cfg.output, "--output")
        elif cfg.get("results_path"):
            check_writable(cfg.results_path, "--results_path")
        if onnx:
            for option in ("save_state", "load_state"):
                if cfg.calibration.get(option):
                    raise ConfigError(
                        f"calibration.{option} is set but model.onnx={onnx} is evaluated without calibrating; "
                        f"remove calibration.{option}"
                    )
            cfg.data.calib_batches = 0  # the file holds its quantization: no calibration images
            return
        CalibrationCallback(**dict(cfg.calibration)).check_paths()
        quantized = cfg.model.get("method") is not None
        if quantized and not cfg.calibration.get("load_state") and cfg.data.get("calib_batches") == 0:
            raise ConfigError(
                "data.calib_batches=0 but model.method is set: quantization needs calibration batches; "
                "set data.calib_batches >= 1, load a state with calibration.load_state, or set model.method=null"
            )
        if not quantized or (cfg.calibration.get("load_state") and not sensitivity.enabled):
            cfg.data.calib_batches = 0  # nothing is calibrated (or measured), so no calibration images are needed

    def _calibration(self) -> CalibrationCallback:
        return next(cb for cb in self.trainer.callbacks if isinstance(cb, CalibrationCallback))

    def _sensitivity(self) -> SensitivityCallback:
        return next(cb for cb in self.trainer.callbacks if isinstance(cb, SensitivityCallback))

    def before_validate(self) -> None:
        name_logger(self.trainer.logger, dict(self.model.run_summary(), backend=self.model.backend))
        self.datamodule.setup("validate")
        self._started = time.perf_counter()

    def after_validate(self) -> None:
        seconds = time.perf_counter() - self._started
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
        skipped = torch.tensor(float(len(self.datamodule.skipped_files)))
        skipped = int(self.trainer.strategy.reduce(skipped, reduce_op="sum"))
        calib = self._calibration()
        extra = dict(
            world_size=self.trainer.world_size,
            seconds=round(seconds, 3),
            skipped_files=skipped,
            seed=self._run_config().get("seed_everything"),
            device=str(self.model.device),
        )
        sensitivity = self._sensitivity()
        if sensitivity.result is not None:
            extra["sensitivity"] = sensitivity.result.record()
        record = results_record(self.model, metrics, calib, extra)
        if not self.trainer.is_global_zero:
            return
        if skipped:
            log.warning("skipped %d unreadable image(s) (data.skip_unreadable=true)", skipped)
        self._log_tensorboard(record, calib.report)
        path = self._run_config().get("results_path")
        if path:
            with atomic_path(path) as tmp, open(tmp, "w") as f:
                json.dump(record, f, indent=2, allow_nan=True)
            log.info("results written to %s", path)
        backend = " onnxruntime" if record.get("backend") == "onnxruntime" else ""
        print(
            f"{record['model']} {record['method']} {record['placement'] or ''} {record['bits']}{backend}: "
            f"acc1 {record['acc1']:.2f} acc5 {record['acc5']:.2f} loss {record['loss']:.4f} "
            f"on {record['num_images']} images ({seconds:.1f} s)"
        )

    def _log_tensorboard(self, record: dict[str, Any], report: list[QuantizerStats]) -> None:
        sensitivity = self._sensitivity()
        log_run(self.trainer.logger, record, report, sensitivity.result, sensitivity.top)


def cli_main(args: Optional[list[str]] = None) -> LitPTQCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``)."""
    if args is None:
        return LitPTQCLI()
    saved = sys.argv
    sys.argv = [saved[0], *args]  # LightningCLI reads sys.argv; passing both makes it warn
    try:
        return LitPTQCLI()
    finally:
        sys.argv = saved
