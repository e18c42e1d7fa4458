"""The LightningCLI of lit_ptq: ``python main.py validate --config configs/...yaml``.

Subcommands: ``validate`` (``val/``), ``test`` (``test/``), ``predict`` (top-5 classes of
every image under ``--data.predict_root``, written to ``--output FILE.csv|.jsonl``) and
``export``, which calibrates as ``validate`` does and writes the model as ONNX (``--output
model.onnx``); ``--model.onnx model.onnx`` evaluates or predicts with such a file in
onnxruntime. Lightning's ``fit`` is not offered: lit_ptq does not train.
"""

from __future__ import annotations

import sys
from typing import Any, Literal, Optional

from pytorch_lightning.cli import LightningCLI

from .callbacks import CalibrationCallback
from .data import ImageNetDataModule
from .errors import ConfigError
from .module import PTQModule
from .run import DATA_LINKS, Evaluation, plan_run
from .sensitivity import SensitivitySettings
from .trainer import PTQTrainer

__all__ = ["LitPTQCLI", "cli_main", "refuse_fit"]

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
    """LightningCLI over :class:`PTQModule` and :class:`ImageNetDataModule`; it parses and hands
    over to the run service (:mod:`lit_ptq.run`).

    Adds the ``calibration`` callback options, ``--results_path`` (one JSON file per run,
    written atomically), the ``sensitivity`` options (per-layer sensitivity and a
    mixed-precision config, :class:`lit_ptq.sensitivity.SensitivitySettings`) and links the
    model's name, input size and class count into the data module
    (:data:`lit_ptq.run.DATA_LINKS`). Before anything is built, :func:`lit_ptq.run.plan_run`
    checks the options and sets the calibration batches; a validate or test run is a
    :class:`lit_ptq.run.Evaluation` (the TensorBoard run named after its settings, hparams,
    metrics, the per-quantizer report and the sensitivity logged to it, the results JSON, the
    printed line).

    The ``export`` subcommand (:meth:`lit_ptq.trainer.PTQTrainer.export`) takes the same
    config plus ``--output FILE.onnx``, ``--log_points {raise,float_ops}`` and ``--format``
    (a registered export backend, ``onnx`` by default); ``--results_path`` is ignored there.
    ``test`` runs validate's pipeline on ``test/`` (its record has ``split: "test"``);
    ``predict`` (:meth:`lit_ptq.trainer.PTQTrainer.predict`) takes ``--data.predict_root
    FOLDER`` and ``--output FILE.csv|.jsonl`` and ignores ``--results_path``.
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
        self._evaluation: Optional[Evaluation] = None
        super().__init__(PTQModule, ImageNetDataModule, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's evaluation subcommands (not ``fit``) plus ``export`` (its model and
        datamodule come from the config)."""
        lightning = LightningCLI.subcommands()
        return {**{name: lightning[name] for name in EVALUATIONS}, "export": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(CalibrationCallback, "calibration")
        parser.add_class_arguments(SensitivitySettings, "sensitivity")
        for model_arg, data_arg in DATA_LINKS:
            parser.link_arguments(f"model.{model_arg}", f"data.{data_arg}")
        parser.add_argument("--results_path", type=Optional[str], default=None, help="write the run's results as JSON here")

    def _run_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._run_config()
        plan = plan_run(
            self.subcommand,
            cfg.model.as_dict(),
            cfg.data.as_dict(),
            cfg.calibration.as_dict(),
            SensitivitySettings(**dict(cfg.sensitivity)),
            output=cfg.get("output"),
            results_path=cfg.get("results_path"),
            export_format=cfg.get("format") or "onnx",
        )
        cfg.data.calib_batches = plan.calib_batches
        if not plan.logger:
            cfg.trainer.logger = False

    @property
    def calibration(self) -> CalibrationCallback:
        """The run's calibration callback (the ``calibration`` options; its ``result`` after the run)."""
        return self._get(self.config_init, "calibration")

    def _start(self, split: Literal["val", "test"]) -> None:
        """Start the run's :class:`~lit_ptq.run.Evaluation`."""
        self._evaluation = Evaluation(
            self.model,
            self.datamodule,
            self.trainer,
            split,
            seed=self._run_config().get("seed_everything"),
            results_path=self._run_config().get("results_path"),
            sensitivity=self._get(self.config_init, "sensitivity"),
        )
        self._evaluation.start()

    def _finish(self) -> None:
        """Finish the run with the calibration callback's result."""
        assert self._evaluation is not None
        self._evaluation.finish(self.calibration.result)

    def before_validate(self) -> None:
        self._start("val")

    def after_validate(self) -> None:
        self._finish()

    def before_test(self) -> None:
        self._start("test")

    def after_test(self) -> None:
        self._finish()

    def before_predict(self) -> None:
        self.datamodule.setup("predict")  # the folder, its images and the class names, before calibrating


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
