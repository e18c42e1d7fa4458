"""The LightningCLI of lit_ptq: ``python main.py validate --config configs/...yaml``.

Subcommands: ``validate`` (``val/``), ``test`` (``test/``), ``predict`` (top-5 classes of
every image under ``--data.predict_root``, written to ``--output FILE.csv|.jsonl``) and
``export``, which calibrates as ``validate`` does and writes the model as ONNX (``--output
model.onnx``); ``--model.onnx model.onnx`` evaluates or predicts with such a file in
onnxruntime. Lightning's ``fit`` is not offered: lit_ptq does not train.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal, Optional

import torch
from pytorch_lightning.cli import LightningCLI

from .callbacks import CalibrationCallback
from .data import ImageNetDataModule, check_predict_root, check_test_split
from .errors import ConfigError
from .io import check_writable, write_text
from .module import PTQModule
from .predictions import check_predictions_output
from .quant import QuantizerStats
from .results import results_record, run_label
from .sensitivity import SensitivityCallback
from .tensorboard import log_run, name_logger
from .trainer import PTQTrainer, check_onnx_output

__all__ = ["LitPTQCLI", "cli_main", "refuse_fit"]

log = logging.getLogger(__name__)

EVALUATIONS = ("validate", "test", "predict")
"""Lightning's subcommands the CLI offers, in ``--help``'s order (``fit`` trains: not offered)."""

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
    ``--results_path`` is ignored there. ``test`` runs validate's pipeline on ``test/``
    (its record has ``split: "test"``); ``predict`` (:meth:`lit_ptq.trainer.PTQTrainer.predict`)
    takes ``--data.predict_root FOLDER`` and ``--output FILE.csv|.jsonl`` and ignores
    ``--results_path``.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_callback", None)
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault(
            "parser_kwargs",
            {"exit_on_error": False, "description": "lit_ptq: post-training quantization of vision transformers (calibrate, evaluate, predict, export)"},
        )  # exit_on_error: main.py prints parse errors in one line
        kwargs.setdefault("trainer_class", PTQTrainer)
        self._started = 0.0
        super().__init__(PTQModule, ImageNetDataModule, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's evaluation subcommands (not ``fit``) plus ``export`` (its model and
        datamodule come from the config)."""
        lightning = LightningCLI.subcommands()
        return {**{name: lightning[name] for name in EVALUATIONS}, "export": {"model", "datamodule"}}

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
        elif self.subcommand == "predict":
            check_predictions_output(cfg.get("output"), "--output")
            check_predict_root(cfg.data.get("predict_root"))
            cfg.trainer.logger = False  # predict logs nothing: no empty TensorBoard version folders
        elif cfg.get("results_path"):
            check_writable(cfg.results_path, "--results_path")
        if self.subcommand == "test":
            check_test_split(cfg.data.root)
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

    def _start(self, stage: Literal["validate", "test"]) -> None:
        """Name the TensorBoard run, set up the split's data and start the run's clock."""
        name_logger(self.trainer.logger, dict(self.model.run_summary(), backend=self.model.backend))
        self.datamodule.setup(stage)
        self._started = time.perf_counter()

    def before_validate(self) -> None:
        self._start("validate")

    def after_validate(self) -> None:
        self._report("val")

    def before_test(self) -> None:
        self._start("test")

    def after_test(self) -> None:
        self._report("test")

    def before_predict(self) -> None:
        self.datamodule.setup("predict")  # the folder, its images and the class names, before calibrating

    def _report(self, split: Literal["val", "test"]) -> None:
        """Print the run's line and, on global rank 0, write the results JSON and the TensorBoard hparams."""
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
        if self.trainer.world_size > 1:
            sensitivity.run(self.trainer, self.model)  # after the reduce: no rank waits on rank 0's measurement
        if sensitivity.result is not None:
            extra["sensitivity"] = sensitivity.result.record()
        record = results_record(self.model, metrics, calib, extra, split)
        if not self.trainer.is_global_zero:
            return
        if skipped:
            log.warning("skipped %d unreadable image(s) (data.skip_unreadable=true)", skipped)
        self._log_tensorboard(record, calib.report)
        path = self._run_config().get("results_path")
        if path:
            write_text(path, json.dumps(record, indent=2, allow_nan=True))
            log.info("results written to %s", path)
        which = "test " if split == "test" else ""
        print(
            f"{run_label(record)}: {which}acc1 {record['acc1']:.2f} acc5 {record['acc5']:.2f} loss {record['loss']:.4f} "
            f"on {record['num_images']} images ({seconds:.1f} s)"
        )

    def _log_tensorboard(self, record: dict[str, Any], report: list[QuantizerStats]) -> None:
        sensitivity = self._sensitivity()
        log_run(self.trainer.logger, record, report, sensitivity.result, sensitivity.top)


def refuse_fit(args: list[str]) -> None:
    """Fail in one line when the subcommand is Lightning's ``fit``: lit_ptq quantizes, it does not train.

    The subcommand is the first argument that is neither an option nor the value of
    ``-c`` / ``--config``.

    Raises:
        ConfigError: the subcommand is ``fit``.
    """
    values = iter(args)
    for arg in values:
        if arg in ("-c", "--config"):
            next(values, None)
        elif not arg.startswith("-"):
            if arg == "fit":
                raise ConfigError(
                    "fit is not a subcommand of lit_ptq: it does not train, it quantizes an already trained "
                    "checkpoint (model.checkpoint); run `main.py validate --config CONFIG` to calibrate and "
                    "evaluate it (or test / predict), or `main.py export --config CONFIG --output model.onnx`"
                )
            return


def cli_main(args: Optional[list[str]] = None) -> LitPTQCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``).

    Raises:
        ConfigError: the subcommand is ``fit`` (see :func:`refuse_fit`), or an option is wrong.
    """
    refuse_fit(sys.argv[1:] if args is None else args)
    if args is None:
        return LitPTQCLI()
    saved = sys.argv
    sys.argv = [saved[0], *args]  # LightningCLI reads sys.argv; passing both makes it warn
    try:
        return LitPTQCLI()
    finally:
        sys.argv = saved
