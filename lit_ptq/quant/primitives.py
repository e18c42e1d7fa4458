"""The arithmetic of fake quantization, in one place: every observer and quantizer calls these.

The formulas are those of FQ-ViT / PTQ-for-iTPN (``docs/quantization.md``), kept to the bit:
float32 throughout, ``torch.round`` (half to even), the scale clamped to float32 epsilon.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "EPS",
    "affine_qparams",
    "symmetric_qparams",
    "fake_quant_seed",
    "fake_quant_seed_",
    "fake_quant_fused",
    "fake_quant_per_channel_divide",
    "quantile",
    "quantile_pair",
    "evenly_strided",
    "log_int_softmax",
    "fake_quant_log",
    "adalog_table",
    "fake_quant_adalog",
    "fake_quant_twin",
]

EPS = torch.finfo(torch.float32).eps


def affine_qparams(min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric scale and zero point from a range: ``s = (max - min) / (qmax - qmin)``.

    Returns:
        ``(scale, zero_point)``, both float32; ``zero_point = clamp(qmin - round(min / s))``.
    """
    scale = ((max_val - min_val) / float(qmax - qmin)).clamp(min=EPS)
    zero_point = (qmin - torch.round(min_val / scale)).clamp(qmin, qmax)
    return scale, zero_point


def symmetric_qparams(min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric scale ``max(|min|, |max|) / ((qmax - qmin) / 2)`` and a zero point of 0.

    For int8 the divisor is 127.5, which puts each channel's largest magnitude exactly on a
    rounding half; :func:`fake_quant_per_channel_divide` rounds it as the seed does.
    """
    scale = (torch.max(-min_val, max_val) / (float(qmax - qmin) / 2)).clamp(min=EPS)
    return scale, torch.zeros_like(scale)


_CPU_BLOCK = 1 << 21
"""Elements fake-quantized per step on CPU (8 MiB of float32) when a tensor holds more than
two blocks: the six passes over a block stay in cache instead of streaming the whole tensor
through memory six times. Blocks are not made smaller: each step of each block is one
parallel region of the intra-op thread pool, and on a loaded machine every region can wait
for a descheduled thread."""


def _seed_fast_path(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> bool:
    """Whether the seed formula can run as in-place steps on one output of ``x``'s shape and dtype.

    True when ``s`` and ``zp`` share ``x``'s dtype and broadcast to ``x`` without growing it (so
    every out-of-place step would give a tensor of that shape and dtype, and in-place steps give
    the same numbers), and no gradient is being recorded for ``s`` or ``zp`` (a gradient
    recorded for ``x`` alone goes through :class:`_SeedFakeQuant`).
    """
    if not (x.dtype == scale.dtype == zero_point.dtype and x.is_floating_point()):
        return False
    if _recording(scale) or _recording(zero_point):
        return False
    if scale.numel() == 1 and zero_point.numel() == 1 and max(scale.dim(), zero_point.dim()) <= x.dim():
        return True  # one value each (the common case): broadcasts to x whatever x's shape
    shape = x.shape
    return torch.broadcast_shapes(shape, scale.shape, zero_point.shape) == shape


def _recording(t: torch.Tensor) -> bool:
    """Whether autograd records the operations on ``t`` now."""
    return t.requires_grad and torch.is_grad_enabled()


def _seed_steps(
    src: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> None:
    """``out = (clamp(round(src / s + zp)) - zp) * s`` in six steps; ``out`` may be ``src``."""
    torch.div(src, scale, out=out)
    out.add_(zero_point).round_().clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


def _seed_into(
    src: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """The seed formula from ``src`` into ``out`` (``out`` may be ``src``), blockwise on CPU.

    Blocks are used when ``src`` and ``out`` are contiguous and ``s``, ``zp`` are one value or
    one per channel of the last dimension; each element still goes through the same
    float32 operations, so the result is the same to the bit.
    """
    n = src.numel()
    if scale.numel() == 1 and zero_point.numel() == 1:
        # 0-dim: the kernels take their one-value-operand path (the same division, ~10% faster)
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    if src.device.type != "cpu" or n <= 2 * _CPU_BLOCK or not (src.is_contiguous() and out.is_contiguous()):
        _seed_steps(src, out, scale, zero_point, qmin, qmax)
        return out
    if scale.dim() == 0:
        width, s, zp = 1, scale, zero_point
        src2, out2 = src.view(-1), out.view(-1)
    else:
        width = src.shape[-1]
        if not all(t.numel() == 1 or (t.numel() == width and t.shape[-1] == width) for t in (scale, zero_point)):
            _seed_steps(src, out, scale, zero_point, qmin, qmax)
            return out
        s, zp = scale.reshape(-1), zero_point.reshape(-1)
        src2, out2 = src.view(-1, width), out.view(-1, width)
    step = max(1, _CPU_BLOCK // width)
    for a, b in zip(src2.split(step), out2.split(step)):
        _seed_steps(a, b, s, zp, qmin, qmax)
    return out


class _SeedFakeQuant(torch.autograd.Function):
    """The seed formula for an ``x`` that records a gradient, computed outside the graph.

    The seed's ``round`` has a zero derivative, so the formula passes no gradient to ``x``
    (nor does this node); computing the values with the in-place steps on one new tensor
    gives the same numbers without six recorded operations and their saved tensors.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        return _seed_into(x, _empty_like(x), scale, zero_point, qmin, qmax)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, ...]:
        return None, None, None, None, None


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format if x.is_contiguous() else torch.preserve_format)


def fake_quant_seed(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``((round(x / s + zp)).clamp(qmin, qmax) - zp) * s`` with broadcastable ``s``, ``zp``.

    Computed into one new tensor with in-place steps (blockwise on CPU), which gives the
    same numbers as the six out-of-place operations of the seed at a fraction of the memory
    traffic; ``x`` is not modified. Gradients are the seed formula's: none to ``x`` (the
    rounding's derivative is zero), and through the six operations when ``s`` or ``zp``
    require one.
    """
    if torch.compiler.is_compiling() or not _seed_fast_path(x, scale, zero_point):
        # traced by torch.compile: the six operations as one expression, which Inductor fuses
        # into one loop with the operation that made x and the one that reads the result
        return (torch.round(x / scale + zero_point).clamp(qmin, qmax) - zero_point) * scale
    if _recording(x):
        return _SeedFakeQuant.apply(x, scale, zero_point, qmin, qmax)
    return _seed_into(x, _empty_like(x), scale, zero_point, qmin, qmax)


def fake_quant_seed_(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """In-place :func:`fake_quant_seed`: overwrites and returns ``x`` (same numbers).

    Returns a new tensor instead, leaving ``x`` alone, when the steps cannot run in place:
    ``x`` not contiguous, ``s`` or ``zp`` of another dtype or of a larger shape than ``x``,
    or a gradient being recorded (``x`` may be saved for the backward pass of the
    operation that made it).
    """
    if torch.compiler.is_compiling() or not (x.is_contiguous() and _seed_fast_path(x, scale, zero_point)) or _recording(x):
        return fake_quant_seed(x, scale, zero_point, qmin, qmax)
    return _seed_into(x, x, scale, zero_point, qmin, qmax)


def fake_quant_fused(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int = -1
) -> torch.Tensor:
    """torch's fused fake-quantize kernel; per channel along ``axis`` when ``scale`` has several elements."""
    zp = zero_point.to(torch.int32)
    if scale.numel() == 1:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zp.reshape(()), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zp, axis % x.dim(), qmin, qmax)


def fake_quant_per_channel_divide(w: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Symmetric per-output-channel fake quantization of a weight, dividing by the scale (seed)."""
    s = scale.reshape(-1, *([1] * (w.dim() - 1)))
    if torch.compiler.is_compiling() or not _seed_fast_path(w, s, s) or _recording(w):
        return torch.round(w / s).clamp(qmin, qmax) * s
    out = torch.div(w, s)
    return out.round_().clamp_(qmin, qmax).mul_(s)


_SELECT_BLOCK = 64
"""Block length of the pre-selection in :func:`_extremes`."""


class _Blocks:
    """A flat tensor cut into blocks of ``_SELECT_BLOCK`` values (the remainder apart), with
    each block's maximum or minimum, computed once, when first needed (``amax`` / ``amin``
    along a dimension are vectorized, ``aminmax`` along a dimension is several times slower)."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat.contiguous()
        n = flat.numel()
        self.split = n - n % _SELECT_BLOCK
        self.blocks = self.flat[: self.split].view(-1, _SELECT_BLOCK)
        self.tail = self.flat[self.split :]
        self._extremes: dict[bool, torch.Tensor] = {}
        self._has_nan: Optional[bool] = None

    def extremes(self, largest: bool) -> torch.Tensor:
        """Each block's maximum (``largest``) or minimum; NaN for a block that holds a NaN."""
        if largest not in self._extremes:
            self._extremes[largest] = self.blocks.amax(dim=1) if largest else self.blocks.amin(dim=1)
        return self._extremes[largest]

    def has_nan(self, largest: bool) -> bool:
        """Whether a block holds a NaN (read from the block extremes, which propagate NaN)."""
        if self._has_nan is None:
            self._has_nan = bool(self.extremes(largest).isnan().any())
        return self._has_nan


def _extremes(flat: torch.Tensor, k: int, largest: bool, blocks: Optional[_Blocks] = None) -> torch.Tensor:
    """``torch.topk(flat, k, largest=largest, sorted=True).values``, cheaply for ``k << n`` on CPU.

    CPU ``topk`` copies all ``n`` values (with their indices) and selects on one thread. Here
    one vectorized pass takes the maximum (minimum) of each block of ``_SELECT_BLOCK`` values,
    and ``topk`` runs over the ``k`` blocks with the largest (smallest) extremes plus the
    remainder. That gives the same values: every value above the ``k``-th largest block
    maximum ``b`` lies in one of those blocks, and each of them holds a value of at least
    ``b``, so they hold ``k`` values of at least ``b``. A NaN in a block (``topk`` ranks NaN
    above everything) sends it back to the plain ``topk``.
    """
    n = flat.numel()
    if flat.device.type != "cpu" or k * _SELECT_BLOCK * 4 > n:
        return torch.topk(flat, k, largest=largest, sorted=True).values
    blocks = blocks if blocks is not None else _Blocks(flat)
    if blocks.has_nan(largest):
        return torch.topk(flat, k, largest=largest, sorted=True).values
    chosen = torch.topk(blocks.extremes(largest), k, largest=largest, sorted=False).indices
    candidates = torch.cat((blocks.blocks.index_select(0, chosen).reshape(-1), blocks.tail))
    return torch.topk(candidates, k, largest=largest, sorted=True).values


def _select(
    flat: torch.Tensor, positions: tuple[int, int], blocks: Optional[_Blocks] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values at two ascending-order positions, by partial selection (topk) instead of a sort."""
    n = flat.numel()
    lo, hi = positions
    if hi < n // 2:
        vals = _extremes(flat, hi + 1, False, blocks)
        return vals[lo], vals[hi]
    if lo >= n // 2:
        vals = _extremes(flat, n - lo, True, blocks)
        return vals[n - 1 - lo], vals[n - 1 - hi]
    return torch.kthvalue(flat, lo + 1).values, torch.kthvalue(flat, hi + 1).values


def _quantile(flat: torch.Tensor, q: float, blocks: Optional[_Blocks] = None) -> torch.Tensor:
    n = flat.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    # torch.quantile: q rounded to the input dtype, the rank in float64, a float32 lerp.
    rank = float(torch.tensor(q, dtype=flat.dtype).item()) * (n - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    below, above = _select(flat, (lo, hi), blocks)
    return torch.lerp(below, above, torch.tensor(rank - lo, dtype=flat.dtype, device=flat.device))


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of all elements of ``x`` with linear interpolation, for any size.

    Bit-identical to ``torch.quantile(x.flatten(), q)`` (``q`` rounded to the input dtype,
    the rank ``q * (n - 1)`` in float64, a float32 lerp) at every size: torch 2.14 no longer
    refuses more than 2**24 elements, so the seed's numpy fallback is never taken. Values are
    found by partial selection (``topk``/``kthvalue``, on CPU narrowed down to a few blocks
    first), on CPU and GPU, without numpy.
    """
    return _quantile(x.detach().reshape(-1), q)


def quantile_pair(x: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quantile(x, 1 - q), quantile(x, q))``, the lower and upper percentile of the seed."""
    flat = x.detach().reshape(-1)
    blocks = _Blocks(flat) if flat.device.type == "cpu" else None
    return _quantile(flat, 1.0 - q, blocks), _quantile(flat, q, blocks)


def evenly_strided(x: torch.Tensor, sample: int) -> torch.Tensor:
    """At most ``sample`` values of ``x``: every ``ceil(n / sample)``-th of the flattened tensor."""
    flat = x.reshape(-1)
    return flat[:: max(1, -(-flat.numel() // sample))]


def _int_exp(x_int: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """I-BERT's integer exp: ``exp(x * scale)`` up to a common factor, for ``x_int <= 0``."""
    b, c = 0.96963238 / 0.35815147, 1.0 / 0.35815147  # I-BERT: 0.358 (x + b)^2 + c, normalized
    n = 30
    x0_int = torch.floor(-0.6931 / scale)
    x_int = torch.max(x_int, n * x0_int)
    q = torch.floor(x_int / x0_int)
    r = x_int - x0_int * q
    b_int = torch.floor(b / scale)
    c_int = torch.floor(c / scale**2)
    poly = r * (r + b_int) + c_int
    return torch.clamp(torch.floor(poly * 2 ** (n - q)), min=0)


def log_int_softmax(logits: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """FQ-ViT's log-int-softmax: integer exp, then a ``bits``-bit log2 code of the probabilities.

    ``logits / scale`` is shifted by its row maximum, exponentiated with :func:`_int_exp`, and
    each probability is coded as ``q = log_round(round(sum / exp))``; the value is ``2**-q``,
    or 0 where ``q >= 2**bits``.
    """
    x_int = logits / scale
    x_int = x_int - x_int.max(dim=-1, keepdim=True).values
    exp_int = _int_exp(x_int, scale)
    ratio = torch.round(exp_int.sum(dim=-1, keepdim=True) / exp_int)
    big = ratio.log2().floor()
    code = torch.where(ratio - 2**big >= 2 ** (big - 1), big + 1, big)
    levels = 2**bits
    out = 2 ** (-code.clamp(0, levels - 1))
    return out.masked_fill(code >= levels, 0.0)


def fake_quant_log(x: torch.Tensor, delta: torch.Tensor, bits: int, steps_per_octave: int) -> torch.Tensor:
    """Logarithmic fake quantization of a non-negative tensor (RepQ-ViT's log2 / log-sqrt2).

    The code is ``q = round(-k * log2(x / delta))`` with ``k`` steps per octave (1: log2,
    2: log-sqrt2, Li et al., "RepQ-ViT", ICCV 2023); the value is ``delta * 2**(-q / k)``
    for ``q`` clamped to ``0 .. 2**bits - 1``, and 0 where ``q`` is past the last level
    (zeros included).
    """
    levels = 2**bits
    code = torch.log2(x / delta).mul_(-steps_per_octave).round_()
    out = torch.exp2(code.clamp(0, levels - 1).div_(-steps_per_octave)).mul_(delta)
    return out.masked_fill_(code >= levels, 0.0)


def adalog_table(r: int, bits: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """AdaLog's mantissa table: ``T[j] = round(2**(-j / r) * (2**(bits + 1) - 2)) / (2**(bits + 1) - 2)``.

    The fractional powers ``2**(-j / r)``, ``j < r``, on a uniform grid of ``2**(bits + 1) - 2``
    steps (``4 n - 2`` with ``n = 2**(bits - 1)`` in GoatWu/AdaLog, ``quantizers/logarithm.py``),
    so that a code's value is a power of two times a table entry.
    """
    steps = float(2 ** (bits + 1) - 2)
    j = torch.arange(r, dtype=torch.float64, device=device)
    return (torch.round(torch.exp2(-j / r) * steps) / steps).float()


def fake_quant_adalog(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, base_q: torch.Tensor, bits: int, r: int = 37
) -> torch.Tensor:
    """AdaLog's adaptive-base logarithmic fake quantization (Wu et al., ECCV 2024; GoatWu/AdaLog).

    With ``y = clamp((x + shift) / scale, 1e-15, 1)`` the code is ``c = round(-log2(y) * r / q)``
    (the logarithm to the base ``2**(q / r)``); codes from ``2**bits`` on underflow to 0. For
    ``c`` clamped to ``0 .. 2**bits - 1`` and ``e = c q``, the value is
    ``2**(-floor(e / r)) * T[e mod r] * scale - shift`` (``T``: :func:`adalog_table`), and
    ``-shift`` for an underflowing code. ``shift`` is 0 for the softmax output and minus the
    minimum for a post-GELU activation (AdaLog's bias shift, 0.16997 for GELU).

    Args:
        x: the tensor.
        scale: the value of code 0 before the shift (one element).
        shift: added before coding, subtracted after (one element).
        base_q: the integer ``q`` of the base ``2**(q / r)`` (one element).
        bits: code width.
        r: the base's denominator (37 in AdaLog).
    """
    levels = 2**bits
    y = torch.clamp((x + shift) / scale, min=1e-15, max=1.0)
    code = torch.round(-torch.log2(y) * r / base_q)
    underflow = code >= levels
    code = code.clamp_(0, levels - 1)
    e = code * base_q
    table = adalog_table(r, bits, x.device)
    out = torch.exp2(-torch.floor(e / r)) * table[torch.remainder(e, r).round_().long()]
    return (out.masked_fill_(underflow, 0.0) * scale) - shift


def fake_quant_twin(
    x: torch.Tensor,
    low_scale: torch.Tensor,
    scale: torch.Tensor,
    boundary: torch.Tensor,
    low_qmin: int,
    low_qmax: int,
    qmax: int,
) -> torch.Tensor:
    """PTQ4ViT's twin-uniform fake quantization (Yuan et al., ECCV 2022; hahnyuan/PTQ4ViT).

    Two uniform grids: where ``x < boundary`` (range R1) ``clamp(round(x / d1), low_qmin,
    low_qmax) d1`` with ``d1 = low_scale``, elsewhere (R2) ``clamp(round(x / d2), 0, qmax) d2``
    with ``d2 = scale``. For the softmax output R1 is ``[0, 2**(k-1) d1)`` (codes
    ``0 .. 2**(k-1) - 1``) and ``boundary = 2**(k-1) d1``; for a post-GELU activation R1 holds
    the negative values (codes ``-2**(k-1) .. 0``) and ``boundary = 0``. One of the ``k`` bits
    says which range a code belongs to.
    """
    low = torch.round(x / low_scale).clamp_(low_qmin, low_qmax).mul_(low_scale)
    high = torch.round(x / scale).clamp_(0, qmax).mul_(scale)
    return torch.where(x < boundary, low, high)
