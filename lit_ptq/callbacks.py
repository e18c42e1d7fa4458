"""Calibration callback: calibrates the quantizers on the first N batches before validation."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.distributed as dist
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_only

from .errors import CheckpointError, ConfigError
from .io import atomic_path, check_writable
from .quant import QuantizerStats, calibrate, quant_report, quantizers, set_quant_mode

__all__ = ["CalibrationCallback", "weights_fingerprint"]

log = logging.getLogger(__name__)

STATE_FORMAT = "lit_ptq.quant_state"
STATE_VERSION = 1


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the model's float parameters (names, shapes and bytes), to tie a state to its weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _quant_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for name, q in quantizers(model):
        for key, buf in q.named_buffers():
            state[f"{name}.{key}"] = buf.detach().cpu().clone()
    return state


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
        _broadcast_quant_state(pl_module.model)
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

    def _state_meta(self, pl_module: LightningModule) -> dict[str, Any]:
        summary = pl_module.run_summary()
        summary.pop("checkpoint", None)
        summary["overrides"] = dict(pl_module.hparams.get("overrides") or {})
        summary["img_size"] = pl_module.hparams.get("img_size")
        summary["weights_sha256"] = weights_fingerprint(pl_module.model)
        return summary

    @rank_zero_only
    def _save(self, pl_module: LightningModule) -> None:
        payload = dict(
            format=STATE_FORMAT,
            version=STATE_VERSION,
            meta=self._state_meta(pl_module),
            state=_quant_state(pl_module.model),
        )
        with atomic_path(self.save_state) as tmp:
            torch.save(payload, tmp)
        log.info("saved quantizer state to %s", self.save_state)

    def _load(self, pl_module: LightningModule) -> None:
        path = self.load_state
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # the unpickler fails on foreign bytes in many ways
            raise CheckpointError(f"calibration.load_state={path} is not a lit_ptq quantizer state ({type(err).__name__})") from None
        if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
            raise CheckpointError(f"calibration.load_state={path} is not a lit_ptq quantizer state file")
        want, have = self._state_meta(pl_module), payload.get("meta", {})
        diff = [f"{k}: file {have.get(k)!r}, run {want[k]!r}" for k in want if have.get(k) != want[k]]
        if diff:
            raise CheckpointError(
                f"calibration.load_state={path} was made for another model or config ({'; '.join(diff)}); "
                "calibrate again or use the matching state file"
            )
        own = _quant_state(pl_module.model)
        state = payload["state"]
        if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
            raise CheckpointError(f"calibration.load_state={path} does not hold this model's quantizers")
        pl_module.model.load_state_dict(state, strict=False)
        set_quant_mode(pl_module.model, "quantize")
        self.calib_images = 0


def _broadcast_quant_state(model: torch.nn.Module) -> None:
    """Make every rank's quantizer buffers equal to rank 0's."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for _, q in quantizers(model):
        for buf in q.buffers():
            if buf.is_floating_point():
                dist.broadcast(buf, src=0)


def _progress(trainer: Trainer, total: int) -> Optional[Any]:
    bar = trainer.progress_bar_callback
    if not isinstance(bar, TQDMProgressBar) or not trainer.is_global_zero or bar.is_disabled:
        return None
    tqdm_bar = bar.init_validation_tqdm()
    tqdm_bar.reset(total=total)
    tqdm_bar.set_description("Calibration")
    return tqdm_bar
