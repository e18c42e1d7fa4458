"""Per-layer sensitivity, measured: which quant points cost accuracy, and which to keep at higher precision.

Pure functions over a calibrated model and a batch of images (no Lightning, no logging, no
files). Each quant point is quantized alone (every other point float) and its cost is read on
the model's output against the float model's: the KL divergence ``KL(float || quantized)`` of
the softmax outputs (mean over the images, in nats) and the top-1 agreement (the share of
images whose top-1 class stays the float model's). Points are ranked worst first by KL, which
separates points that the agreement of a few hundred images ties. This is the "sensitivity
analysis" of mixed-precision PTQ (e.g. Dong et al., "HAWQ: Hessian AWare Quantization of Neural
Networks with Mixed-Precision", ICCV 2019, ranks layers by a second-order proxy; Liu et al.,
"Post-Training Quantization for Vision Transformer", NeurIPS 2021, by the output's nuclear
norm); lit_ptq measures each point's effect on the output directly.

The ranking gives a mixed-precision config: every point at the run's bit widths except the
``keep`` most sensitive ones, which get ``keep_bits`` (a ``model.overrides`` mapping, see
:attr:`lit_ptq.quant.QuantConfig.overrides`). The run around it (images, files, TensorBoard)
is :mod:`lit_ptq.sensitivity`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ..errors import ConfigError
from .config import QuantConfig
from .quantizer import QuantMode, QuantPoint
from .report import QuantizerStats
from .walk import float_points, quant_points

__all__ = [
    "HISTOGRAM_BINS",
    "ActivationHistogram",
    "PointSensitivity",
    "activation_histograms",
    "check_keep_bits",
    "keep_count",
    "measure_sensitivity",
    "mixed_precision_overrides",
    "output_divergence",
]

HISTOGRAM_BINS = 120
"""Bins of an activation histogram (over the values seen and the grid's range together)."""

Progress = Callable[[int], Any]
"""Makes a progress bar for ``total`` steps (with ``update(n)`` and ``close()``), or returns None."""


@dataclass
class PointSensitivity:
    """What quantizing one point alone does to the model's output.

    Attributes:
        name: the quant point's name (``blocks.3.mlp.act_output``), as ``overrides`` patterns match it.
        role: ``weight``, ``act``, ``attn`` or ``norm``.
        bits: its bit width.
        kl: mean ``KL(float || quantized)`` of the softmax outputs, in nats.
        agreement: images (percent) whose top-1 class is the float model's.
        sqnr_db: the point's own SQNR on the last calibration batch (from the quantizer report;
            NaN when unknown).
        clipped: the share of its values the grid saturates there (NaN when unknown).
    """

    name: str
    role: str
    bits: int
    kl: float
    agreement: float
    sqnr_db: float = math.nan
    clipped: float = math.nan

    @property
    def top1_drop(self) -> float:
        """``100 - agreement``: images (percent) whose top-1 class changes."""
        return 100.0 - self.agreement

    def as_dict(self) -> dict[str, Any]:
        """The fields and ``top1_drop`` as a plain dict (for JSON)."""
        return dict(asdict(self), top1_drop=self.top1_drop)


@dataclass
class ActivationHistogram:
    """The values one quant point sees in the float model, with the range of its grid.

    Attributes:
        name: the quant point.
        role: its role.
        bits: its bit width.
        edges: ``len(counts) + 1`` bin edges, spanning the values and the grid's range.
        counts: values per bin.
        grid: the lowest and highest level of its grid (:meth:`QuantPoint.grid_range`), or None.
        clipped: the share of the values the grid saturates.
        numel, total, total_squares, min_val, max_val: count, sum, sum of squares and extremes
            of the values (TensorBoard's histogram summary).
    """

    name: str
    role: str
    bits: int
    edges: list[float]
    counts: list[float]
    grid: Optional[tuple[float, float]]
    clipped: float
    numel: int
    total: float
    total_squares: float
    min_val: float
    max_val: float


def output_divergence(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement (percent) and mean ``KL(reference || logits)`` (nats) of two logit batches.

    Args:
        reference: ``(N, classes)`` logits of the float model.
        logits: ``(N, classes)`` logits of the same images through the quantized model.

    Returns:
        ``(agreement, kl)``: 100 and 0 for identical logits.
    """
    if reference.shape != logits.shape or reference.dim() != 2 or reference.shape[0] == 0:
        shapes = f"{tuple(reference.shape)} and {tuple(logits.shape)}"
        raise ValueError(f"need two (N, classes) logit batches of one shape, got {shapes}")
    ref, out = reference.detach().double(), logits.detach().double()
    agreement = 100.0 * float((ref.argmax(1) == out.argmax(1)).double().mean())
    log_p, log_q = ref.log_softmax(1), out.log_softmax(1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(1).mean())
    return agreement, max(kl, 0.0)


def _logits(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's float32 logits of ``images``, forwarded ``batch_size`` at a time."""
    device = next(model.parameters()).device
    return torch.cat([model(images[i : i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int,
    report: Sequence[QuantizerStats] = (),
    progress: Optional[Progress] = None,
) -> list[PointSensitivity]:
    """Quantize each point of a calibrated model alone and measure the cost on its output.

    The float logits are computed once; then, point by point, only that point quantizes (the
    others pass their input through) and the images are forwarded again. The modes of every
    point and the model's training flag are restored afterwards.

    Args:
        model: a calibrated model (``calibrate`` or a loaded state).
        images: the fixed images, ``(N, C, H, W)``.
        batch_size: images per forward.
        report: the quantizer report of the run (:func:`lit_ptq.quant.quant_report`), whose SQNR
            and clipping are copied into the result.
        progress: makes a bar over the quant points, advanced once a point is measured.

    Returns:
        One :class:`PointSensitivity` per quant point, worst first (largest KL; ties in module order).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    own = {r.name: r for r in report}
    was_training = model.training
    model.eval()
    result = []
    bar = None
    try:
        with float_points(model) as points:
            reference = _logits(model, images, batch_size)
            bar = progress(len(points)) if progress is not None else None
            for name, point in points:
                point.mode = QuantMode.QUANTIZE
                try:
                    agreement, kl = output_divergence(reference, _logits(model, images, batch_size))
                finally:
                    point.mode = QuantMode.FLOAT
                stats = own.get(name)
                result.append(
                    PointSensitivity(
                        name, point.role, point.bits, kl, agreement,
                        stats.sqnr_db if stats else math.nan, stats.clipped if stats else math.nan,
                    )
                )  # fmt: skip
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return sorted(result, key=lambda p: -p.kl)


def _histogram(point: QuantPoint, args: tuple, out: torch.Tensor, bins: int) -> ActivationHistogram:
    """The histogram of what ``point`` sees in one float-mode call."""
    x, _, clipped = point.error_terms(args, out)
    x = x.detach().double().flatten()
    grid = point.grid_range()
    lo, hi = float(x.min()), float(x.max())
    if grid is not None:
        lo, hi = min(lo, grid[0]), max(hi, grid[1])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(x, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return ActivationHistogram(
        point.qualname, point.role, point.bits, edges.tolist(), counts.cpu().tolist(), grid,
        float(clipped.double().mean()), x.numel(), float(x.sum()), float(x.pow(2).sum()),
        float(x.min()), float(x.max()),
    )  # fmt: skip


@torch.no_grad()
def activation_histograms(
    model: nn.Module, images: torch.Tensor, names: Iterable[str], bins: int = HISTOGRAM_BINS
) -> list[ActivationHistogram]:
    """Histograms of the values the points ``names`` see when the float model runs on ``images``.

    Each point's histogram spans the values and its grid's range, so the clipping range can be
    drawn on it. The modes of every point are restored afterwards.

    Args:
        model: a calibrated model.
        images: one batch of images (every value of every named point is counted).
        names: quant point names, in the order the histograms are returned.
        bins: bins per histogram.
    """
    points = dict(quant_points(model))
    wanted = [n for n in names if n in points]
    found: dict[str, ActivationHistogram] = {}
    hooks = []
    for name in wanted:

        def hook(mod: QuantPoint, args: tuple, out: torch.Tensor, name: str = name) -> None:
            if name not in found:  # a point called twice in a forward keeps its first call
                found[name] = _histogram(mod, args, out, bins)

        hooks.append(points[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with float_points(model):
            model(images.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [found[n] for n in wanted if n in found]


def keep_count(keep: Union[int, float], candidates: int) -> int:
    """How many points to keep at higher precision.

    Args:
        keep: a count (an ``int`` >= 0) or a share of the candidates (a ``float`` in (0, 1],
            rounded up).
        candidates: how many points could be kept.
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ConfigError(f"sensitivity.keep={keep!r} must be a count (an integer >= 0) or a share in (0, 1]")
    if isinstance(keep, int):
        if keep < 0:
            raise ConfigError(f"sensitivity.keep={keep} must be a count >= 0 or a share in (0, 1]")
        return min(keep, candidates)
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"sensitivity.keep={keep} must be a share in (0, 1] (or an integer count)")
    return min(math.ceil(keep * candidates - 1e-9), candidates)


def check_keep_bits(keep_bits: int) -> None:
    """Raise ``ConfigError`` unless ``keep_bits`` is an integer in 2..16."""
    if isinstance(keep_bits, bool) or not isinstance(keep_bits, int) or not 2 <= keep_bits <= 16:
        raise ConfigError(f"sensitivity.keep_bits={keep_bits!r} is outside the supported range 2..16")


def _literal_pattern(name: str) -> str:
    """An ``fnmatch`` pattern that matches exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def mixed_precision_overrides(
    points: Sequence[PointSensitivity], config: QuantConfig, keep: Union[int, float], keep_bits: int
) -> tuple[dict[str, Optional[dict[str, Any]]], list[str]]:
    """The ``model.overrides`` mapping that keeps the most sensitive points at ``keep_bits``.

    Candidates are the points below ``keep_bits``; the ``keep_count(keep, candidates)`` worst of
    them (in the order of ``points``, worst first) get ``{bits: keep_bits}``. The config's own
    overrides come first, so the mapping replaces ``model.overrides`` without losing them.

    Args:
        points: the sensitivity ranking, worst first.
        config: the run's quantization config.
        keep: a count or a share of the candidates (see :func:`keep_count`).
        keep_bits: the bit width of the kept points, 2..16.

    Returns:
        ``(overrides, kept)``: the mapping and the names of the kept points, worst first.
    """
    check_keep_bits(keep_bits)
    candidates = [p for p in points if p.bits < keep_bits]
    kept = [p.name for p in candidates[: keep_count(keep, len(candidates))]]
    overrides = {pattern: o.describe() for pattern, o in config.overrides}
    for name in kept:
        pattern = _literal_pattern(name)
        # moved to the end, so that no earlier wildcard of the run's own overrides wins over it
        overrides[pattern] = {**(overrides.pop(pattern, None) or {}), "bits": keep_bits}
    return overrides, kept
