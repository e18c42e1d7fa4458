"""Observers: collect statistics of a tensor during calibration, then turn them into a range.

The four activation observers of PTQ-for-iTPN / FQ-ViT, with the seed's arithmetic
(``docs/quantization.md``), and FQ-ViT's power-of-two-factor observer for LayerNorm inputs:

- ``minmax``: running min / max over all calibration batches.
- ``ema``: the first batch sets min / max, then ``m <- m + 0.01 * (cur - m)``.
- ``percentile``: per batch the 1e-5 and 1 - 1e-5 quantiles, smoothed like ``ema``.
- ``omse``: running min / max, then on the *last* calibration batch the range
  ``(min, max) * (1 - 0.01 i)``, i = 0..89, with the lowest quantization MSE.
- ``mse``: running min / max, then on the last batch, per tensor or per channel, the range
  ``(min, max) * (1 - 0.01 i)`` of least squared error (the clip search of PTQ4ViT, RepQ-ViT
  and GPTQ for activations and weights at low bit widths).
- ``log2`` / ``log_sqrt2``: the scale ``delta`` of RepQ-ViT's logarithmic softmax quantizer:
  the running maximum or one of the 0.999 / 0.9999 / 0.99999 quantiles of the last batch,
  whichever quantizes it with the least squared error.
- ``ptf``: FQ-ViT's power-of-two factor (Lin et al., "FQ-ViT: Post-Training Quantization
  for Fully Quantized Vision Transformer", IJCAI 2022): one base scale, each channel picks
  ``2**a`` times ``s / 8`` with ``a`` in 0..3 by least squared error on the last batch.

An observer only records (``update``) and computes (``compute``); the quantizer owns the
buffers. ``update(x, last=True)`` marks the last calibration batch, which ``omse`` and
``ptf`` search on, as the seed does. Three class attributes say where an observer may be
used, so the registry is the only list: ``method`` (an activation method,
``QuantConfig(method=...)``: :data:`METHODS`), ``supports_per_channel`` (it can compute one
range per channel), ``softmax`` (a non-uniform code of the softmax output,
``QuantConfig(softmax=...)``: :data:`SOFTMAX_QUANTIZERS`) and ``gelu`` (a non-uniform code of
the post-GELU activation, ``QuantConfig(gelu=...)``: :data:`GELU_QUANTIZERS`). A new observer
is one file that subclasses :class:`Observer` and registers it with :func:`register_observer`;
AdaLog's and PTQ4ViT's twin-uniform codes live in ``adalog.py`` and ``twin_uniform.py``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..errors import CalibrationError, ConfigError
from .names import NameView
from .primitives import affine_qparams, evenly_strided, fake_quant_log, fake_quant_seed, quantile, quantile_pair, symmetric_qparams

__all__ = [
    "Observer",
    "LastBatchSearchObserver",
    "OBSERVERS",
    "METHODS",
    "SOFTMAX_QUANTIZERS",
    "GELU_QUANTIZERS",
    "register_observer",
    "build_observer",
    "QParams",
]

QParams = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""``(scale, zero_point, min_val, max_val)`` as float32 tensors."""

OBSERVERS: dict[str, type["Observer"]] = {}
"""Registered observers by name, in registration order."""
METHODS = NameView(lambda: [n for n, cls in OBSERVERS.items() if cls.method], "activation methods")
"""The registered observers usable as ``QuantConfig(method=...)`` (``Observer.method``), live."""
SOFTMAX_QUANTIZERS = NameView(
    lambda: ["uniform", *sorted(n for n, cls in OBSERVERS.items() if cls.softmax)], "softmax-output quantizers"
)
"""``uniform`` and the registered non-uniform softmax codes (``Observer.softmax``), live."""
GELU_QUANTIZERS = NameView(
    lambda: ["uniform", *sorted(n for n, cls in OBSERVERS.items() if cls.gelu)], "post-GELU quantizers"
)
"""``uniform`` and the registered non-uniform codes of a post-GELU activation (``Observer.gelu``), live."""


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
        raise ConfigError(f"unknown observer {name!r}; registered: {', '.join(sorted(OBSERVERS))}")
    return OBSERVERS[name](qmin, qmax, signed, per_channel, channel_axis)


class Observer:
    """Base observer: tracks ``min_val`` / ``max_val`` (per tensor or per channel).

    Args:
        qmin: smallest integer code.
        qmax: largest integer code.
        signed: symmetric (zero point 0) instead of asymmetric qparams.
        per_channel: one range per channel along ``channel_axis``.
        channel_axis: the channel dimension (0 for weights, -1 for activations).

    Attributes:
        method: usable as an activation method (``QuantConfig(method=name)``).
        supports_per_channel: can compute one range per channel (RepQ-ViT's reparameterization
            calibrates with it, ``mse`` otherwise).
        softmax: a non-uniform code of the softmax output (``QuantConfig(softmax=name)``).
        gelu: a non-uniform code of a post-GELU activation, the input of ``fc2``
            (``QuantConfig(gelu=name)``).

    Raises:
        ConfigError: ``per_channel`` for an observer that computes one range per tensor.
    """

    name = "base"
    method = True
    supports_per_channel = True
    softmax = False
    gelu = False

    def __init__(self, qmin: int, qmax: int, signed: bool, per_channel: bool, channel_axis: int) -> None:
        if per_channel and not self.supports_per_channel:
            raise ConfigError(f"the {self.name} observer computes one range per tensor, not per channel; use per_tensor for it")
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
            raise CalibrationError(
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

    def code_params(self) -> dict[str, torch.Tensor]:
        """The parameters of a non-uniform code beyond ``compute``'s (none for a uniform grid);
        a :class:`~lit_ptq.quant.quantizer.NonUniformQuantizer` keeps them in buffers."""
        return {}


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
    supports_per_channel = False

    def batch_statistic(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = quantile_pair(x, self.alpha)
        return lo.float(), hi.float()


@register_observer("omse")
class OmseObserver(MinMaxObserver):
    """Running min / max; on the last calibration batch, the shrunken range of least MSE.

    The search runs on the last calibration batch only, as in the seed: candidates
    ``(min, max) * (1 - 0.01 i)`` for i = 0..89, scored by the mean squared error between
    that batch and its fake-quantized copy; the first candidate with the lowest error wins.
    The error of every candidate comes from one pass over the data: a fine histogram of the
    batch with the count and the sum of each bin. Each bin goes to the level its centre
    fake-quantizes to (float32, the seed's formula), so the bins of one level form a run;
    with cumulative counts and sums, a level's error ``sum(x^2) - 2 v sum(x) + n v^2`` is
    read from the two ends of its run. ``sum(x^2)`` over all levels is the same for every
    candidate and is left out. The result is exact for every bin that does not straddle a
    rounding boundary.

    The histogram is built ``chunk`` elements at a time (the sums are those of one
    ``bincount`` over the whole batch, to the bit), so the search needs a few MiB whatever
    the size of the batch, and scoring costs ``candidates x levels x log2(bins)`` steps
    instead of ``candidates x bins``.
    """

    bins = 1 << 16
    candidates = 90
    chunk = 1 << 20
    supports_per_channel = False

    def update(self, x: torch.Tensor, last: bool = False) -> None:
        super().update(x, last)
        if last:
            self.min_val, self.max_val = self.search(x.detach().float())

    def candidate_ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 90 ``(min, max)`` candidates, shrinking by 1% of the running range each."""
        factors = 1.0 - torch.arange(self.candidates, dtype=torch.float64) * 0.01
        factors = factors.to(torch.float32).to(self.min_val.device)
        return self.min_val * factors, self.max_val * factors

    def histogram(self, flat: torch.Tensor, lo: torch.Tensor, width: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per bin of ``[lo, lo + width]``: the count (int64) and the sum (float64).

        Works ``chunk`` elements at a time; ``index_add_`` into a 1-D tensor adds the elements
        one after the other, in order, as ``bincount`` does, so the sums are bit-identical to
        ``bincount(idx, weights=flat.double())`` over the whole tensor.
        """
        per_bin = self.bins / width
        count = torch.zeros(self.bins, dtype=torch.int64, device=flat.device)
        s1 = torch.zeros(self.bins, dtype=torch.float64, device=flat.device)
        for part in flat.split(self.chunk):
            idx = torch.sub(part, lo).mul_(per_bin).long().clamp_(0, self.bins - 1)
            count += torch.bincount(idx, minlength=self.bins)
            s1.index_add_(0, idx, part.double())
        return count, s1

    def centers(self, lo: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
        """The float32 centre of every histogram bin (computed in float64, then rounded once)."""
        i = torch.arange(self.bins, device=lo.device, dtype=torch.float64)
        return (lo.double() + (i + 0.5) * (width.double() / self.bins)).float()

    def search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidate range with the least fake-quantization MSE on ``x``."""
        lo, hi = self.min_val, self.max_val
        width = (hi - lo).clamp(min=torch.finfo(torch.float32).tiny)
        count, s1 = self.histogram(x.reshape(-1), lo, width)
        new_min, new_max = self.candidate_ranges()
        scale, zp = self.qparams_from_range(new_min, new_max)
        edges = self.level_edges(lo, width, scale, zp)
        best = torch.argmin(self.candidate_errors(count, s1, edges, scale, zp))  # no host-device sync
        return new_min[best], new_max[best]

    def level_edges(self, lo: torch.Tensor, width: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
        """Per candidate, the first bin of every level: shape ``(candidates, levels + 1)``.

        Column ``k`` is the first bin whose centre fake-quantizes to level ``qmin + k`` or
        above (0 for ``k = 0``, ``bins`` past the last level). The seed's rounding
        ``round(c / s + zp)`` never decreases along the bins, so an edge is the one bin where
        that float32 expression first reaches the level. The real-valued boundary
        ``(q - 0.5 - zp) * s`` gives the bin directly (the bins are uniform); float32
        rounding can put the edge one bin off, so the exact expression is checked on both
        sides and the edge moved; a binary search over all bins takes over should a few steps
        not settle it (a safeguard: where float32 centres are coarser than the bins, the range
        lies far from zero and every bin is at one level).
        """
        centers = self.centers(lo, width)
        q = torch.arange(self.qmin + 1, self.qmax + 1, device=centers.device, dtype=torch.float32)
        s, z = scale[:, None], zp[:, None]

        def reached(i: torch.Tensor) -> torch.Tensor:  # bin i (clamped) is at level q or above
            return torch.div(centers[i.clamp(0, self.bins - 1)], s).add_(z).round_() >= q

        bounds = (q.double() - 0.5 - z.double()) * s.double()
        position = (bounds - lo.double()) * (self.bins / width.double()) - 0.5
        first = position.ceil_().clamp_(0, self.bins).long()
        for _ in range(self.edge_steps):
            early = reached(first - 1) & (first > 0)  # the bin before is at the level already
            late = ~reached(first) & (first < self.bins)  # this bin is not there yet
            if not bool((early | late).any()):
                break
            first = first - early.long() + late.long()
        else:
            first = self._bisect_edges(reached, first.shape, centers.device)
        ends = (torch.zeros_like(first[:, :1]), first, torch.full_like(first[:, :1], self.bins))
        return torch.cat(ends, dim=1)

    edge_steps = 3
    """Checks of the computed edges before the binary search takes over."""

    def _bisect_edges(self, reached: Callable[[torch.Tensor], torch.Tensor], shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The edges by binary search over all bins (``reached`` never decreases along them)."""
        first = torch.zeros(shape, dtype=torch.int64, device=device)
        past = torch.full(shape, self.bins, dtype=torch.int64, device=device)
        for _ in range(self.bins.bit_length()):
            mid = torch.div(first + past, 2, rounding_mode="floor")
            hit = reached(mid)
            searching = first < past
            past = torch.where(searching & hit, mid, past)
            first = torch.where(searching & ~hit, mid + 1, first)
        return first

    def candidate_errors(
        self,
        count: torch.Tensor,
        s1: torch.Tensor,
        edges: torch.Tensor,
        scale: torch.Tensor,
        zp: torch.Tensor,
    ) -> torch.Tensor:
        """Squared error of each candidate ``(scale, zp)``, less the candidate-independent ``sum(x^2)``.

        Level ``q`` holds the bins ``edges[:, q - qmin] .. edges[:, q - qmin + 1]``, its value
        is ``v = (q - zp) * s`` (float32); its error is ``n v^2 - 2 v S1`` in float64 from the
        cumulative count ``n`` and sum ``S1`` of the bins.
        """
        zero = torch.zeros(1, dtype=torch.float64, device=s1.device)
        cum_n = torch.cat((zero, count.cumsum(0).double()))
        cum_s1 = torch.cat((zero, s1.cumsum(0)))
        n = cum_n[edges[:, 1:]] - cum_n[edges[:, :-1]]
        sums = cum_s1[edges[:, 1:]] - cum_s1[edges[:, :-1]]
        q = torch.arange(self.qmin, self.qmax + 1, device=s1.device, dtype=torch.float32)
        v = ((q - zp[:, None]) * scale[:, None]).double()
        return (n * v - 2 * sums).mul_(v).sum(dim=1)


@register_observer("ptf")
class PtfObserver(MinMaxObserver):
    """FQ-ViT's power-of-two factor for LayerNorm inputs (per channel along the last axis).

    Running per-channel min / max; the base scale ``s = (max - min) / (qmax - qmin)`` of the
    whole tensor and its zero point are shared; on the last batch each channel picks
    ``a`` in {0, 1, 2, 3} whose scale ``(s / 8) * 2**a`` gives the least mean squared error.
    """

    factors = 4
    method = False  # for LayerNorm inputs under QuantConfig(ptf=True)

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


@register_observer("mse")
class MseObserver(MinMaxObserver):
    """Running min / max; on the last batch, the shrunken range of least squared error.

    Candidates are ``(min, max) * (1 - 0.01 i)``, i = 0..``candidates - 1``, chosen per
    channel (per row of a weight) or for the whole tensor, by the squared error between the
    last batch and its fake-quantized copy. A tensor with more than ``sample`` values per
    channel is searched on an evenly strided subset of them (the running range is exact).
    """

    candidates = 80
    sample = 1 << 18

    def update(self, x: torch.Tensor, last: bool = False) -> None:
        super().update(x, last)
        if last:
            self.min_val, self.max_val = self.search(x.detach().float())

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``(channels, values)`` (one row for a per-tensor observer), subsampled."""
        if not self.per_channel:
            rows = x.reshape(1, -1)
        elif self.channel_axis % x.dim() == 0:
            rows = x.reshape(x.shape[0], -1)
        else:
            rows = x.movedim(self.channel_axis, -1).reshape(-1, x.shape[self.channel_axis]).t()
        stride = max(1, -(-rows.shape[1] * rows.shape[0] // self.sample))
        return rows[:, ::stride]

    def search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the candidate range with the least squared error (the widest on ties)."""
        rows = self.rows(x)
        return self.best_range(rows, lambda q: q.sub_(rows).pow_(2).sum(dim=1, keepdim=True))

    def best_range(
        self, rows: torch.Tensor, score: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of ``rows``, the candidate range of least ``score`` (the widest on ties).

        Args:
            rows: ``(channels, values)``, one row per channel of the running range.
            score: from the fake-quantized ``rows`` of one candidate (a new tensor it may
                modify), the ``(channels, 1)`` error of each row.
        """
        lo, hi = self.min_val.reshape(-1, 1), self.max_val.reshape(-1, 1)
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for i in range(self.candidates):
            factor = 1.0 - 0.01 * i
            c_lo, c_hi = lo * factor, hi * factor
            scale, zp = self.qparams_from_range(c_lo, c_hi)
            err = score(fake_quant_seed(rows, scale, zp, self.qmin, self.qmax))
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, c_lo, best_lo), torch.where(better, c_hi, best_hi)
        return best_lo.reshape(self.min_val.shape), best_hi.reshape(self.max_val.shape)


class LastBatchSearchObserver(MinMaxObserver):
    """Running min / max, and a search on an evenly strided sample of the last calibration batch.

    A subclass sets ``sample`` (the most values searched) and implements :meth:`search`, whose
    result is kept in ``found`` (``None`` before the last batch) for ``compute`` to read.
    """

    sample = 1 << 16

    def __init__(self, qmin: int, qmax: int, signed: bool, per_channel: bool, channel_axis: int) -> None:
        super().__init__(qmin, qmax, signed, per_channel, channel_axis)
        self.found: Optional[object] = None

    def reset(self) -> None:
        super().reset()
        self.found = None

    def update(self, x: torch.Tensor, last: bool = False) -> None:
        super().update(x, last)
        if last:
            self.found = self.search(evenly_strided(x.detach().float(), self.sample))

    def search(self, x: torch.Tensor) -> object:
        """The searched parameters of the sample ``x`` (a 1-d float tensor)."""
        raise NotImplementedError


@register_observer("log_sqrt2")
class LogSqrt2Observer(MinMaxObserver):
    """The scale ``delta`` of a log-sqrt2 code (RepQ-ViT): the running max or a quantile of
    the last batch (0.999, 0.9999, 0.99999), whichever gives the least squared error."""

    steps_per_octave = 2
    quantiles = (0.999, 0.9999, 0.99999)
    method = False
    supports_per_channel = False
    softmax = True

    def __init__(self, qmin: int, qmax: int, signed: bool, per_channel: bool, channel_axis: int) -> None:
        super().__init__(qmin, qmax, signed, per_channel, channel_axis)
        self.delta: Optional[torch.Tensor] = None

    def reset(self) -> None:
        super().reset()
        self.delta = None

    def update(self, x: torch.Tensor, last: bool = False) -> None:
        super().update(x, last)
        if last:
            self.delta = self.search(x.detach().float())

    def search(self, x: torch.Tensor) -> torch.Tensor:
        """The candidate ``delta`` of least squared error (the running max first on ties)."""
        bits = (self.qmax - self.qmin + 1).bit_length() - 1
        candidates = [self.max_val] + [quantile(x, q) for q in self.quantiles]
        errors = [
            (fake_quant_log(x, d.clamp(min=torch.finfo(torch.float32).tiny), bits, self.steps_per_octave) - x).pow_(2).sum()
            for d in candidates
        ]
        return candidates[int(torch.argmin(torch.stack(errors)))].clamp(min=torch.finfo(torch.float32).tiny)

    def compute(self) -> QParams:
        if self.min_val is None:
            raise RuntimeError(f"{self.name} observer has seen no data")
        delta = self.delta if self.delta is not None else self.max_val.clamp(min=torch.finfo(torch.float32).tiny)
        return delta, torch.zeros_like(delta), self.min_val, self.max_val


@register_observer("log2")
class Log2Observer(LogSqrt2Observer):
    """The scale ``delta`` of a log2 code, searched like ``log_sqrt2``."""

    steps_per_octave = 1
