"""The LightningCLI of lit_ptq: ``python main.py validate --config configs/...yaml``.

Subcommands: ``validate`` (``val/``), ``test`` (``test/``), ``predict`` (top-5 classes of
every image under ``--data.predict_root``, written to ``--output FILE.csv|.jsonl``) and
``export``, which calibrates as ``validate`` does and writes the model as ONNX (``--output
model.onnx``); ``--model.onnx model.onnx`` evaluates or predicts with such a file in
onnxruntime. Lightning's ``fit`` is not offered: lit_ptq does not train, and the Trainer
options that only training reads (:data:`TRAINING_ONLY`) and Lightning's ``--ckpt_path`` are
not options (naming one fails in one line, see :func:`refuse_training_options`).
"""

from __future__ import annotations

import sys
from typing import Any, Literal, Optional, Union

from jsonargparse import ArgumentError
from pytorch_lightning import Trainer
from pytorch_lightning.cli import LightningCLI

from .callbacks import CalibrationCallback
from .data import ImageNetDataModule
from .errors import ConfigError
from .module import PTQModule
from .run import DATA_LINKS, Evaluation, plan_run
from .sensitivity import SensitivitySettings
from .trainer import PTQTrainer

__all__ = ["LitPTQCLI", "TRAINING_ONLY", "cli_main", "refuse_fit", "refuse_training_options"]

EVALUATIONS = ("validate", "test", "predict")
"""Lightning's subcommands the CLI offers, in ``--help``'s order (``fit`` trains: not offered)."""

TRAINING_ONLY = frozenset({
    "fast_dev_run", "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches",
    "overfit_batches", "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps", "log_every_n_steps",
    "enable_checkpointing", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
    "detect_anomaly", "barebones", "sync_batchnorm", "reload_dataloaders_every_n_epochs", "use_distributed_sampler",
    "enable_autolog_hparams", "model_registry",
})  # fmt: skip
"""Trainer options the CLI leaves out: they only act on training (or on what lit_ptq does
itself: its data module has its own sampler, its run logs its own hparams and writes no
checkpoint; ``fast_dev_run`` and ``barebones`` would turn off the logger a run writes to)."""

TRAINER_FIXED: dict[str, Any] = {"enable_checkpointing": False}
"""Trainer arguments of every run (not options)."""

BATCH_LIMITS = {
    "limit_val_batches": "data.root/val (validate)",
    "limit_test_batches": "data.root/test (test)",
    "limit_predict_batches": "data.predict_root (predict)",
}
"""Trainer options re-declared with ``int`` before ``float``: from the Trainer's signature
(``Union[float, int]``) jsonargparse reads ``1`` as ``1.0``, all batches instead of one."""

CHECKPOINT_ARGS = {"ckpt_path", "weights_only"}
"""Lightning's arguments for resuming from a training checkpoint: lit_ptq reads ``model.checkpoint``."""

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "tb_logs", "name": "lit_ptq", "default_hp_metric": False},
    },
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
        datamodule come from the config), each without Lightning's checkpoint arguments
        (:data:`CHECKPOINT_ARGS`) and ``predict`` without ``return_predictions`` (the CLI
        writes them to ``--output``)."""
        lightning = LightningCLI.subcommands()
        skips = {name: lightning[name] | CHECKPOINT_ARGS for name in EVALUATIONS}
        skips["predict"].add("return_predictions")
        return {**skips, "export": {"model", "datamodule"}}

    def add_core_arguments_to_parser(self, parser: Any) -> None:
        """lit_ptq's options first (``model``, ``data``, ``calibration``, ``sensitivity``,
        ``results_path``), then the Trainer's without :data:`TRAINING_ONLY`; ``model.backend``
        (a Python object) is for the API only, ``--model.onnx`` names a file."""
        parser.add_class_arguments(
            PTQModule, "model", fail_untyped=False, instantiate=True, sub_configs=True, skip={"backend"}
        )
        parser.add_lightning_class_args(ImageNetDataModule, "data")
        parser.add_lightning_class_args(CalibrationCallback, "calibration")
        parser.add_class_arguments(SensitivitySettings, "sensitivity")
        parser.add_argument("--results_path", type=Optional[str], default=None, help="write the run's results as JSON here")
        parser.add_class_arguments(
            self.trainer_class, "trainer", fail_untyped=False, instantiate=False, sub_configs=True,
            skip={*TRAINING_ONLY, *BATCH_LIMITS},
        )  # fmt: skip
        for name, split in BATCH_LIMITS.items():
            parser.groups["trainer"].add_argument(
                f"--trainer.{name}",
                type=Optional[Union[int, float]],
                default=None,
                help=f"how much of {split} to run on, per device: an int is a number of batches, a "
                "float a fraction (default: all)",
            )
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})

    def add_arguments_to_parser(self, parser: Any) -> None:
        for model_arg, data_arg in DATA_LINKS:
            parser.link_arguments(f"model.{model_arg}", f"data.{data_arg}")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer of the config's options plus :data:`TRAINER_FIXED`."""
        return super().instantiate_trainer(**TRAINER_FIXED, **kwargs)

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


def refuse_training_options(args: list[str]) -> None:
    """Fail in one line on an option the CLI leaves out because it belongs to training:
    Lightning's ``--ckpt_path`` / ``--weights_only`` and ``--trainer.X`` for X in :data:`TRAINING_ONLY`.

    Raises:
        ConfigError: one of them is among ``args``.
    """
    for arg in args:
        option = arg.split("=", 1)[0]
        if option in ("--ckpt_path", "--weights_only"):
            raise ConfigError(
                f"{option} is Lightning's option for resuming from a training checkpoint, not an option of "
                "lit_ptq: pass the float weights to quantize as --model.checkpoint FILE (see --help)"
            )
        name = option.removeprefix("--trainer.")
        if option.startswith("--trainer.") and name in TRAINING_ONLY:
            raise ConfigError(
                f"--trainer.{name} only acts on training, and lit_ptq does not train: it is not an option "
                "(--trainer.limit_val_batches / limit_test_batches limit an evaluation; see --help)"
            )


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


def _hint_at_a_config(err: ArgumentError, args: list[str]) -> None:
    """Turn jsonargparse's "arguments are required: validate.data.root" into a sentence that
    names the option and suggests a config.

    Raises:
        ConfigError: ``err`` says that ``data.root`` is missing.
    """
    message = " ".join(str(err).split())
    if "required" in message and "data.root" in message:
        subcommand = next((a for a in args if a in (*EVALUATIONS, "export")), "validate")
        raise ConfigError(
            f"{subcommand} needs data.root (and a model): pass a config, e.g. "
            f"`main.py {subcommand} --config configs/demo.yaml`, or --data.root FOLDER"
        ) from err


def cli_main(args: Optional[list[str]] = None) -> LitPTQCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``).

    Raises:
        ConfigError: the subcommand is ``fit`` (see :func:`refuse_fit`), an option belongs to
            training (:func:`refuse_training_options`), ``data.root`` is missing (no
            config), or an option is wrong.
        ArgumentError: jsonargparse refused an option.
    """
    argv = sys.argv[1:] if args is None else list(args)
    refuse_fit(argv)
    refuse_training_options(argv)
    saved = sys.argv
    sys.argv = [saved[0], *argv]  # LightningCLI reads sys.argv; passing both makes it warn
    try:
        return LitPTQCLI()
    except ArgumentError as err:
        _hint_at_a_config(err, argv)
        raise
    finally:
        sys.argv = saved
