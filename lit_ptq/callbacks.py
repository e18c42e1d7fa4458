"""Calibration callback: calibrates the quantizers on the first N batches before validation, test or predict."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, Optional

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from pytorch_lightning.utilities import rank_zero_only

from .errors import ConfigError
from .io import check_writable
from .quant import QuantizerStats, broadcast_quant_state, calibrate, load_quant_state, quant_report, save_quant_state

__all__ = ["CalibrationCallback"]

log = logging.getLogger(__name__)


class CalibrationCallback(Callback):
    """Calibrate before validation (and test, and predict): observers on, the first N batches, qparams, broadcast.

    Every rank runs the same calibration batches (``datamodule.calib_dataloader()``), then
    rank 0's quantizer buffers are broadcast so the state is identical everywhere. Instead of
    calibrating, a state file written by an earlier run can be loaded (calibrate once,
    evaluate many); it is refused when it was made for another model, checkpoint or config.

    Args:
        save_state: write the calibrated quantizer state to this file (atomically).
        load_state: load the quantizer state from this file instead of calibrating.

    Attributes:
        seconds: how long calibration (or loading) took.
        calib_images: how many images calibration saw (0 when loaded).
        report: the per-quantizer report measured on the last calibration batch.
    """

    def __init__(self, save_state: Optional[str] = None, load_state: Optional[str] = None) -> None:
        super().__init__()
        self.save_state = save_state
        self.load_state = load_state
        self.seconds = 0.0
        self.calib_images = 0
        self.report: list[QuantizerStats] = []

    def check_paths(self) -> None:
        """Fail before any compute when a state path is unusable."""
        if self.load_state is not None and not os.path.isfile(self.load_state):
            raise ConfigError(f"calibration.load_state={self.load_state} does not exist; calibrate once with save_state first")
        if self.save_state is not None:
            check_writable(self.save_state, "calibration.save_state")

    def prepare(
        self, pl_module: LightningModule, datamodule: Optional[Any] = None, trainer: Optional[Trainer] = None
    ) -> bool:
        """Calibrate (or load) the quantizers of ``pl_module``, broadcast them, save the state.

        What :meth:`on_validation_start` does, usable without a running validation loop (the
        ``export`` subcommand): the first ``calib_batches`` batches of
        ``datamodule.calib_dataloader()`` (or ``load_state``), then rank 0's quantizer state
        broadcast to every rank and, with ``save_state``, written by rank 0. The module must
        already be on the device to calibrate on.

        Args:
            pl_module: a :class:`~lit_ptq.module.PTQModule` (anything with ``quantized`` and ``model``).
            datamodule: gives :meth:`~lit_ptq.data.ImageNetDataModule.calib_dataloader`; not
                needed with ``load_state``.
            trainer: for the progress bar and the rank (``None``: no bar, rank 0).

        Returns:
            False when there is nothing to calibrate (a float or ONNX module), else True.
        """
        if not getattr(pl_module, "quantized", False):
            return False
        start = time.perf_counter()
        if self.load_state is not None:
            self._load(pl_module)
        else:
            if datamodule is None:
                raise ValueError("calibration needs a datamodule with calib_dataloader() (or load_state)")
            self._calibrate(datamodule, pl_module, trainer)
        broadcast_quant_state(pl_module.model)
        if self.save_state is not None and (trainer is None or trainer.is_global_zero):
            self._save(pl_module)
        self.seconds = time.perf_counter() - start
        log.info("calibration took %.2f s (%d images)", self.seconds, self.calib_images)
        return True

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Run :meth:`prepare` with the trainer's datamodule and log ``calibration/seconds``."""
        if self.prepare(pl_module, trainer.datamodule, trainer):
            pl_module.log("calibration/seconds", self.seconds, rank_zero_only=True)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """As :meth:`on_validation_start`, before ``main.py test``."""
        self.on_validation_start(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Run :meth:`prepare` before ``main.py predict`` (nothing is logged: Lightning does not log in predict)."""
        self.prepare(pl_module, trainer.datamodule, trainer)

    def _calibrate(self, datamodule: Any, pl_module: LightningModule, trainer: Optional[Trainer]) -> None:
        loader = datamodule.calib_dataloader()
        last: list[torch.Tensor] = []
        bar = _progress(trainer, len(loader))

        def images() -> Iterator[torch.Tensor]:
            for batch in loader:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                self.calib_images += x.shape[0]
                last[:] = [x]
                yield x.to(pl_module.device)
                if bar is not None:
                    bar.update(1)

        self.calib_images = 0
        calibrate(pl_module.model, images())
        if bar is not None:
            bar.close()
        self.report = quant_report(pl_module.model, last[0].to(pl_module.device))

    @staticmethod
    def _state_meta(pl_module: LightningModule) -> dict[str, Any]:
        """What the state file is tied to besides the quantization config and the weights."""
        hp = pl_module.hparams
        return dict(model=hp.model_name, num_classes=hp.num_classes, img_size=hp.get("img_size"), model_kwargs=dict(hp.get("model_kwargs") or {}))

    @rank_zero_only
    def _save(self, pl_module: LightningModule) -> None:
        save_quant_state(pl_module.model, self.save_state, self._state_meta(pl_module))
        log.info("saved quantizer state to %s", self.save_state)

    def _load(self, pl_module: LightningModule) -> None:
        load_quant_state(pl_module.model, self.load_state, self._state_meta(pl_module), option="calibration.load_state")
        self.calib_images = 0


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
