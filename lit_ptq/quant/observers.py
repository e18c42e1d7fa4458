"""Observers: collect statistics of a tensor during calibration, then turn them into a range.

The four activation observers of PTQ-for-iTPN / FQ-ViT, with the seed's arithmetic
(REFERENCE section 4), and FQ-ViT's power-of-two-factor observer for LayerNorm inputs:

- ``minmax``: running min / max over all calibration batches.
- ``ema``: the first batch sets min / max, then ``m <- m + 0.01 * (cur - m)``.
- ``percentile``: per batch the 1e-5 and 1 - 1e-5 quantiles, smoothed like ``ema``.
- ``omse``: running min / max, then on the *last* calibration batch the range
  ``(min, max) * (1 - 0.01 i)``, i = 0..89, with the lowest quantization MSE.
- ``ptf``: FQ-ViT's power-of-two factor (Lin et al., "FQ-ViT: Post-Training Quantization
  for Fully Quantized Vision Transformer", IJCAI 2022): one base scale, each channel picks
  ``2**a`` times ``s / 8`` with ``a`` in 0..3 by least squared error on the last batch.

An observer only records (``update``) and computes (``compute``); the quantizer owns the
buffers. ``update(x, last=True)`` marks the last calibration batch, which ``omse`` and
``ptf`` search on, as the seed does.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .primitives import affine_qparams, fake_quant_seed, quantile_pair, symmetric_qparams

__all__ = ["Observer", "OBSERVERS", "register_observer", "build_observer", "QParams"]

QParams = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""``(scale, zero_point, min_val, max_val)`` as float32 tensors."""

OBSERVERS: dict[str, type["Observer"]] = {}


def register_observer(name: str) -> Callable[[type["Observer"]], type["Observer"]]:
    """Class decorator registering an observer under ``name``."""

    def wrap(cls: type["Observer"]) -> type["Observer"]:
        cls.name = name
        OBSERVERS[name] = cls
        return cls

    return wrap


def build_observer(name: str, qmin: int, qmax: int, signed: bool, per_channel: bool, channel_axis: int) -> "Observer":
    """Instantiate the observer registered under ``name``."""
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; registered: {', '.join(sorted(OBSERVERS))}")
    return OBSERVERS[name](qmin, qmax, signed, per_channel, channel_axis)


class Observer:
    """Base observer: tracks ``min_val`` / ``max_val`` (per tensor or per channel).

    Args:
        qmin: smallest integer code.
        qmax: largest integer code.
        signed: symmetric (zero point 0) instead of asymmetric qparams.
        per_channel: one range per channel along ``channel_axis``.
        channel_axis: the channel dimension (0 for weights, -1 for activations).
    """

    name = "base"

    def __init__(self, qmin: int, qmax: int, signed: bool, per_channel: bool, channel_axis: int) -> None:
        self.qmin, self.qmax, self.signed = qmin, qmax, signed
        self.per_channel, self.channel_axis = per_channel, channel_axis
        self.min_val: Optional[torch.Tensor] = None
        self.max_val: Optional[torch.Tensor] = None
        self.shape: Optional[tuple[int, ...]] = None

    def reset(self) -> None:
        """Forget everything seen."""
        self.min_val = self.max_val = None
        self.shape = None

    def _check_shape(self, x: torch.Tensor) -> None:
        if not self.per_channel:
            return
        channels = x.shape[self.channel_axis]
        if self.shape is not None and self.shape != (channels,):
            raise ValueError(
                f"{self.name} observer saw {channels} channels in a tensor of shape {tuple(x.shape)} "
                f"after {self.shape[0]} channels before"
            )
        self.shape = (channels,)

    def batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This batch's ``(min, max)``: global, or per channel along ``channel_axis``."""
        x = x.detach()
        if not self.per_channel:
            lo, hi = torch.aminmax(x)
            return lo.float(), hi.float()
        channels = x.shape[self.channel_axis]
        if self.channel_axis % x.dim() == 0:  # weights: one row per channel, no transposed copy
            rows, dim = x.reshape(channels, -1), 1
        else:
            rows, dim = x.movedim(self.channel_axis, -1).reshape(-1, channels), 0
        # amin and amax along a dimension are vectorized; aminmax along one is several times slower.
        return rows.amin(dim=dim).float(), rows.amax(dim=dim).float()

    def update(self, x: torch.Tensor, last: bool = False) -> None:
        """Record the statistics of one calibration tensor."""
        raise NotImplementedError

    def qparams_from_range(self, min_val: torch.Tensor, max_val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of a range, symmetric or affine as configured."""
        fn = symmetric_qparams if self.signed else affine_qparams
        return fn(min_val, max_val, self.qmin, self.qmax)

    def compute(self) -> QParams:
        """``(scale, zero_point, min_val, max_val)`` from what was recorded.

        Raises:
            RuntimeError: when nothing was recorded.
        """
        if self.min_val is None or self.max_val is None:
            raise RuntimeError(f"{self.name} observer has seen no data")
        scale, zp = self.qparams_from_range(self.min_val, self.max_val)
        return scale, zp, self.min_val, self.max_val


@register_observer("minmax")
class MinMaxObserver(Observer):
    """Running minimum and maximum over all calibration batches."""

    def update(self, x: torch.Tensor, last: bool = False) -> None:
        self._check_shape(x)
        lo, hi = self.batch_range(x)
        self.min_val = lo if self.min_val is None else torch.min(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.max(self.max_val, hi)


class _SmoothedObserver(Observer):
    """Exponential moving average of a per-batch range: ``m <- m + momentum * (cur - m)``."""

    momentum = 0.01

    def batch_statistic(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-batch ``(low, high)`` that is smoothed."""
        return self.batch_range(x)

    def update(self, x: torch.Tensor, last: bool = False) -> None:
        self._check_shape(x)
        lo, hi = self.batch_statistic(x)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = self.min_val + self.momentum * (lo - self.min_val)
            self.max_val = self.max_val + self.momentum * (hi - self.max_val)


@register_observer("ema")
class EmaObserver(_SmoothedObserver):
    """The first batch's min / max, then an exponential moving average with momentum 0.01."""


@register_observer("percentile")
class PercentileObserver(_SmoothedObserver):
    """Per batch the 0.00001 and 0.99999 quantiles of the whole tensor (linear
    interpolation, any size; see :func:`lit_ptq.quant.primitives.quantile`), smoothed like EMA.
    """

    alpha = 0.99999

    def update(self, x: torch.Tensor, last: bool = False) -> None:
        if self.per_channel:
            raise ValueError("the percentile observer computes one range per tensor, not per channel")
        super().update(x, last)

    def batch_statistic(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = quantile_pair(x, self.alpha)
        return lo.float(), hi.float()


@register_observer("omse")
class OmseObserver(MinMaxObserver):
    """Running min / max; on the last calibration batch, the shrunken range of least MSE.

    The search runs on the last calibration batch only, as in the seed: candidates
    ``(min, max) * (1 - 0.01 i)`` for i = 0..89, scored by the mean squared error between
    that batch and its fake-quantized copy; the first candidate with the lowest error wins.
    The error of every candidate comes from one pass over the data: a fine histogram of
    the batch with the count, sum and sum of squares of each bin, so a bin's error under a
    candidate is ``S2 - 2 v S1 + n v^2`` for the level ``v`` its centre quantizes to
    (exact for every bin that does not straddle a rounding boundary).

    Both steps work in pieces of bounded size, so the search needs a few MiB whatever the
    size of the batch: the histogram ``chunk`` elements at a time, accumulated in element
    order (the sums are those of one ``bincount`` over the whole batch, to the bit), and the
    candidates a few rows of the (candidates x bins) error table at a time.
    """

    bins = 1 << 16
    candidates = 90
    chunk = 1 << 20
    table_elements = 1 << 20

    def update(self, x: torch.Tensor, last: bool = False) -> None:
        super().update(x, last)
        if last:
            if self.per_channel:
                raise ValueError("the omse observer searches one range per tensor, not per channel")
            self.min_val, self.max_val = self.search(x.detach().float())

    def candidate_ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 90 ``(min, max)`` candidates, shrinking by 1% of the running range each."""
        factors = 1.0 - torch.arange(self.candidates, dtype=torch.float64) * 0.01
        factors = factors.to(torch.float32).to(self.min_val.device)
        return self.min_val * factors, self.max_val * factors

    def histogram(self, flat: torch.Tensor, lo: torch.Tensor, width: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per bin of ``[lo, lo + width]``: the count, the sum and the sum of squares (float64).

        Works ``chunk`` elements at a time; ``index_add_`` into a 1-D tensor adds the elements
        one after the other, in order, as ``bincount`` does, so the sums are bit-identical to
        ``bincount(idx, weights=flat.double())`` over the whole tensor.
        """
        per_bin = self.bins / width
        count, s1, s2 = (torch.zeros(self.bins, dtype=torch.float64, device=flat.device) for _ in range(3))
        ones = torch.ones((), dtype=torch.float64, device=flat.device).expand(min(self.chunk, flat.numel()))
        for part in flat.split(self.chunk):
            idx = torch.sub(part, lo).mul_(per_bin).long().clamp_(0, self.bins - 1)
            part64 = part.double()
            count.index_add_(0, idx, ones[: idx.numel()])
            s1.index_add_(0, idx, part64)
            s2.index_add_(0, idx, part64.mul_(part64))
        return count, s1, s2

    def search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidate range with the least fake-quantization MSE on ``x``."""
        lo, hi = self.min_val, self.max_val
        flat = x.reshape(-1)
        width = (hi - lo).clamp(min=torch.finfo(torch.float32).tiny)
        count, s1, s2 = self.histogram(flat, lo, width)
        centers = lo.double() + (torch.arange(self.bins, device=flat.device, dtype=torch.float64) + 0.5) * (
            width.double() / self.bins
        )
        # Empty bins add nothing to any candidate's error: score only the occupied ones.
        occupied = (count > 0).nonzero().squeeze(1)
        count, s1, s2, centers = (t.index_select(0, occupied) for t in (count, s1, s2, centers))
        new_min, new_max = self.candidate_ranges()
        scale, zp = self.qparams_from_range(new_min, new_max)
        c = centers.float()[None, :]
        err = torch.cat([self.candidate_errors(c, count, s1, s2, scale[r], zp[r]) for r in self._row_blocks(c.shape[1])])
        best = torch.argmin(err)  # a tensor index: no host-device sync
        return new_min[best], new_max[best]

    def _row_blocks(self, bins: int) -> list[slice]:
        """Rows of the error table per step: about ``table_elements`` entries, never a lone row
        (a one-row sum would be split across threads and add in another order)."""
        n = self.candidates
        step = min(n, max(2, self.table_elements // max(bins, 1)))
        starts = list(range(0, n, step))
        if len(starts) > 1 and n - starts[-1] == 1:
            starts.pop()
        return [slice(a, b) for a, b in zip(starts, starts[1:] + [n])]

    def candidate_errors(
        self,
        c: torch.Tensor,
        count: torch.Tensor,
        s1: torch.Tensor,
        s2: torch.Tensor,
        scale: torch.Tensor,
        zp: torch.Tensor,
    ) -> torch.Tensor:
        """Squared error of each candidate ``(scale, zp)`` summed over the histogram's bins.

        ``level = (clamp(round(c / s + zp)) - zp) * s`` for each bin centre ``c`` (float32,
        shape ``(1, bins)``), then ``sum(S2 - 2 level S1 + n level^2)`` in float64, computed in
        place with the operations and the order of that expression.
        """
        s, z = scale[:, None], zp[:, None]
        level = torch.div(c, s)
        level = level.add_(z).round_().clamp_(self.qmin, self.qmax).sub_(z).mul_(s).double()
        err = torch.mul(level, 2).mul_(s1)
        err = torch.sub(s2, err, out=err)
        return err.add_(torch.mul(count, level).mul_(level)).sum(dim=1)


@register_observer("ptf")
class PtfObserver(MinMaxObserver):
    """FQ-ViT's power-of-two factor for LayerNorm inputs (per channel along the last axis).

    Running per-channel min / max; the base scale ``s = (max - min) / (qmax - qmin)`` of the
    whole tensor and its zero point are shared; on the last batch each channel picks
    ``a`` in {0, 1, 2, 3} whose scale ``(s / 8) * 2**a`` gives the least mean squared error.
    """

    factors = 4

    def __init__(self, qmin: int, qmax: int, signed: bool, per_channel: bool, channel_axis: int) -> None:
        super().__init__(qmin, qmax, signed, True, channel_axis)
        self.exponent: Optional[torch.Tensor] = None

    def reset(self) -> None:
        super().reset()
        self.exponent = None

    def base_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared ``(s, zero_point)`` of the whole tensor's range."""
        return affine_qparams(self.min_val.min(), self.max_val.max(), self.qmin, self.qmax)

    def update(self, x: torch.Tensor, last: bool = False) -> None:
        super().update(x, last)
        if last:
            self.exponent = self.search(x.detach().float())

    def search(self, x: torch.Tensor) -> torch.Tensor:
        """Per channel, the exponent ``a`` of least squared error (the first on ties)."""
        s, zp = self.base_qparams()
        flat = x.movedim(self.channel_axis, -1).reshape(-1, x.shape[self.channel_axis])
        errors = []
        for a in range(self.factors):
            sa = s / 2 ** (self.factors - 1 - a)
            fq = fake_quant_seed(flat, sa, zp, self.qmin, self.qmax)
            errors.append(fq.sub_(flat).pow_(2).mean(dim=0))
        return torch.argmin(torch.stack(errors), dim=0)

    def compute(self) -> QParams:
        if self.exponent is None:
            raise RuntimeError("ptf observer needs a last calibration batch")
        s, zp = self.base_qparams()
        scale = (s / 2 ** (self.factors - 1)) * (2.0 ** self.exponent.float())
        return scale, zp.expand_as(scale).clone(), self.min_val, self.max_val
