"""Calibration callback: calibrates the quantizers on the first N batches before validation."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any, Optional

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_only

from .errors import ConfigError
from .io import check_writable
from .quant import QuantizerStats, broadcast_quant_state, calibrate, load_quant_state, quant_report, save_quant_state

__all__ = ["CalibrationCallback"]

log = logging.getLogger(__name__)


class CalibrationCallback(Callback):
    """Calibrate before validation: observers on, the first N batches, qparams, broadcast.

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

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not getattr(pl_module, "quantized", False):
            return
        start = time.perf_counter()
        if self.load_state is not None:
            self._load(pl_module)
        else:
            self._calibrate(trainer, pl_module)
        broadcast_quant_state(pl_module.model)
        if self.save_state is not None and trainer.is_global_zero:
            self._save(pl_module)
        self.seconds = time.perf_counter() - start
        log.info("calibration took %.2f s (%d images)", self.seconds, self.calib_images)
        pl_module.log("calibration/seconds", self.seconds, rank_zero_only=True)

    def _calibrate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loader = trainer.datamodule.calib_dataloader()
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


def _progress(trainer: Trainer, total: int) -> Optional[Any]:
    bar = trainer.progress_bar_callback
    if not isinstance(bar, TQDMProgressBar) or not trainer.is_global_zero or bar.is_disabled:
        return None
    tqdm_bar = bar.init_validation_tqdm()
    tqdm_bar.reset(total=total)
    tqdm_bar.set_description("Calibration")
    return tqdm_bar
