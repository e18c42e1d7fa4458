"""Calibration callback: calibrates the quantizers on the first N batches before validation, test or predict."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, Optional

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from pytorch_lightning.utilities import rank_zero_only

from .quant import QuantizerStats
from .run import NOT_CALIBRATED, CalibrationResult, calibrate_module, check_state_paths

__all__ = ["CalibrationCallback", "calibration_callback"]


class CalibrationCallback(Callback):
    """Calibrate before validation (and test, and predict): observers on, the first N batches, qparams, broadcast.

    The Lightning hook of :func:`lit_ptq.run.calibrate_module`: every rank runs the same
    calibration batches (``datamodule.calib_dataloader()``), then rank 0's quantizer buffers
    are broadcast so the state is identical everywhere. Instead of calibrating, a state file
    written by an earlier run can be loaded (calibrate once, evaluate many); it is refused when
    it was made for another model, checkpoint or config.

    Args:
        save_state: write the calibrated quantizer state to this file (atomically).
        load_state: load the quantizer state from this file instead of calibrating.

    Attributes:
        result: what the last :meth:`prepare` did (:class:`~lit_ptq.run.CalibrationResult`),
            None before one and when there was nothing to calibrate.
    """

    def __init__(self, save_state: Optional[str] = None, load_state: Optional[str] = None) -> None:
        super().__init__()
        self.save_state = save_state
        self.load_state = load_state
        self.result: Optional[CalibrationResult] = None

    @property
    def seconds(self) -> float:
        """How long calibration (or loading) took (0 before one)."""
        return (self.result or NOT_CALIBRATED).seconds

    @property
    def calib_images(self) -> int:
        """How many images calibration saw (0 when loaded, and before one)."""
        return (self.result or NOT_CALIBRATED).calib_images

    @property
    def report(self) -> list[QuantizerStats]:
        """The per-quantizer report measured on the last calibration batch (empty when loaded)."""
        return (self.result or NOT_CALIBRATED).report

    def check_paths(self) -> None:
        """Fail before any compute when a state path is unusable (:func:`lit_ptq.run.check_state_paths`)."""
        check_state_paths(self.save_state, self.load_state)

    def prepare(
        self, pl_module: LightningModule, datamodule: Optional[Any] = None, trainer: Optional[Trainer] = None
    ) -> bool:
        """Calibrate (or load) the quantizers of ``pl_module``, broadcast them, save the state.

        What :meth:`on_validation_start` does, usable without a running validation loop (the
        ``export`` subcommand); see :func:`lit_ptq.run.calibrate_module`. The module must
        already be on the device to calibrate on.

        Args:
            pl_module: a :class:`~lit_ptq.module.PTQModule` (anything with ``quantized`` and ``model``).
            datamodule: gives :meth:`~lit_ptq.data.ImageNetDataModule.calib_dataloader`; not
                needed with ``load_state``.
            trainer: for the progress bar and the rank (``None``: no bar, rank 0).

        Returns:
            False when there is nothing to calibrate (a float module, or another backend's), else True.
        """
        result = calibrate_module(
            pl_module,
            datamodule,
            save_state=self.save_state,
            load_state=self.load_state,
            is_global_zero=(trainer is None or trainer.is_global_zero) and rank_zero_only.rank == 0,
            progress=lambda total: _progress(trainer, total),
        )
        self.result = result
        return result is not None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Run :meth:`prepare` with the trainer's datamodule and log ``calibration/seconds``
        (rounded to 2 decimals, in float64 so that Lightning's table prints them as they are)."""
        if self.prepare(pl_module, trainer.datamodule, trainer):
            seconds = torch.tensor(round(self.seconds, 2), dtype=torch.float64, device=pl_module.device)
            pl_module.log("calibration/seconds", seconds, rank_zero_only=True)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """As :meth:`on_validation_start`, before ``main.py test``."""
        self.on_validation_start(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Run :meth:`prepare` before ``main.py predict`` (nothing is logged: Lightning does not log in predict)."""
        self.prepare(pl_module, trainer.datamodule, trainer)


def calibration_callback(callbacks: Iterable[Callback]) -> CalibrationCallback:
    """The :class:`CalibrationCallback` among a trainer's ``callbacks`` (the CLI adds one), or a
    default one (calibrate on the data module, no state file)."""
    return next((cb for cb in callbacks if isinstance(cb, CalibrationCallback)), CalibrationCallback())


def _progress(trainer: Optional[Trainer], total: int) -> Optional[Any]:
    """The calibration progress bar: the trainer's validation bar while it runs a loop, a bar
    of the same style outside one (``export``), None when the trainer shows no bars."""
    if trainer is None or not trainer.is_global_zero:
        return None
    bar = trainer.progress_bar_callback
    if not isinstance(bar, TQDMProgressBar) or bar.is_disabled:
        return None
    try:
        tqdm_bar = bar.init_validation_tqdm()
    except TypeError:  # not attached to a running trainer: no loop, so a bar of its own
        tqdm_bar = Tqdm(total=total, dynamic_ncols=True, file=sys.stdout, bar_format=bar.BAR_FORMAT, leave=False)
    tqdm_bar.reset(total=total)
    tqdm_bar.set_description("Calibration")
    return tqdm_bar
