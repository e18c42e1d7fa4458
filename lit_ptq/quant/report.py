"""Per-quantizer report: range, scale, clipping and SQNR of each quant point on calibration data."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from .walk import as_input, float_points, quant_points
from .quantizer import QuantPoint

__all__ = ["QuantizerStats", "quant_report"]


@dataclass
class QuantizerStats:
    """What one quant point does to the data it sees.

    Attributes:
        name: module path of the quantizer.
        role: ``weight``, ``act``, ``attn`` (softmax output) or ``norm`` (LayerNorm input).
        bits: bit width.
        min_val: smallest observed (calibrated) value; the minimum over channels when per channel.
        max_val: largest observed (calibrated) value.
        scale: the scale; the mean over channels when per channel.
        clipped: fraction of values saturated by the grid: more than half a step outside it, so
            that they do not merely round to the end level.
        sqnr_db: ``10 log10(sum x^2 / sum (x - fq(x))^2)``; ``inf`` when lossless.
        numel: number of values measured.
    """

    name: str
    role: str
    bits: int
    min_val: float
    max_val: float
    scale: float
    clipped: float
    sqnr_db: float
    numel: int

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for JSON)."""
        return asdict(self)


class _Accumulator:
    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.clipped = 0
        self.numel = 0

    def add(self, x: torch.Tensor, fq: torch.Tensor, clipped: torch.Tensor) -> None:
        x64 = x.double()
        self.signal += float(x64.pow(2).sum())
        self.noise += float((x64 - fq.double()).pow(2).sum())
        self.clipped += int(clipped.sum())
        self.numel += x.numel()

    def sqnr(self) -> float:
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)


def _stats(name: str, q: QuantPoint, acc: _Accumulator) -> QuantizerStats:
    lo, hi, scale = q.range_summary()
    clipped = acc.clipped / acc.numel if acc.numel else 0.0
    return QuantizerStats(name, q.role, q.bits, lo, hi, scale, clipped, acc.sqnr(), acc.numel)


@torch.no_grad()
def quant_report(model: nn.Module, batch: object) -> list[QuantizerStats]:
    """Measure every quant point of a calibrated model on one batch.

    The model runs in float, so each quantizer sees the tensor the float model produces and
    its error is its own (not accumulated from earlier quant points); each point measures
    what it would do to what it sees (:meth:`QuantPoint.error_terms`). The model's quant mode is restored afterwards.

    Args:
        model: a calibrated model (see ``calibrate``).
        batch: an input tensor, or an ``(images, ...)`` tuple.

    Returns:
        One :class:`QuantizerStats` per quant point, in module order.
    """
    points = list(quant_points(model))
    accs = {name: _Accumulator() for name, _ in points}
    hooks = []
    for name, m in points:

        def hook(mod: QuantPoint, args: tuple, out: torch.Tensor, acc: _Accumulator = accs[name]) -> None:
            acc.add(*mod.error_terms(args, out))

        hooks.append(m.register_forward_hook(hook))
    try:
        with float_points(model):
            device = next(model.parameters()).device
            model(as_input(batch).to(device))
    finally:
        for h in hooks:
            h.remove()
    return [_stats(name, m, accs[name]) for name, m in points]
