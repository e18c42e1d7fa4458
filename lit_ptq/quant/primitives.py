"""The arithmetic of fake quantization, in one place: every observer and quantizer calls these.

The formulas are those of FQ-ViT / PTQ-for-iTPN (REFERENCE section 4), kept to the bit:
float32 throughout, ``torch.round`` (half to even), the scale clamped to float32 epsilon.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "EPS",
    "affine_qparams",
    "symmetric_qparams",
    "fake_quant_seed",
    "fake_quant_fused",
    "fake_quant_per_channel_divide",
    "quantile",
    "quantile_pair",
    "log_int_softmax",
]

EPS = torch.finfo(torch.float32).eps
_TORCH_QUANTILE_LIMIT = 2**24


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


def fake_quant_seed(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``((round(x / s + zp)).clamp(qmin, qmax) - zp) * s`` with broadcastable ``s``, ``zp``."""
    return (torch.round(x / scale + zero_point).clamp(qmin, qmax) - zero_point) * scale


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
    return torch.round(w / s).clamp(qmin, qmax) * s


def _select(flat: torch.Tensor, positions: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Values at two ascending-order positions, by partial selection (topk) instead of a sort."""
    n = flat.numel()
    lo, hi = positions
    if hi < n // 2:
        vals = torch.topk(flat, hi + 1, largest=False, sorted=True).values
        return vals[lo], vals[hi]
    if lo >= n // 2:
        vals = torch.topk(flat, n - lo, largest=True, sorted=True).values
        return vals[n - 1 - lo], vals[n - 1 - hi]
    return torch.kthvalue(flat, lo + 1).values, torch.kthvalue(flat, hi + 1).values


def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of all elements of ``x`` with linear interpolation, for any size.

    Bit-identical to ``torch.quantile(x.flatten(), q)`` up to 2**24 elements (``q`` rounded
    to float32, the rank ``q * (n - 1)`` in float64, a float32 lerp); above that, where ``torch.quantile``
    refuses, the rank is computed in float64 as numpy does (the seed's fallback). Values are
    found by partial selection (``topk``/``kthvalue``), on CPU and GPU, without numpy.
    """
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    if n <= _TORCH_QUANTILE_LIMIT:
        # torch.quantile: q rounded to the input dtype, the rank in float64, a float32 lerp.
        rank = float(torch.tensor(q, dtype=flat.dtype).item()) * (n - 1)
        lo, hi = math.floor(rank), math.ceil(rank)
        below, above = _select(flat, (lo, hi))
        return torch.lerp(below, above, torch.tensor(rank - lo, dtype=flat.dtype, device=flat.device))
    rank = q * (n - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    below, above = _select(flat, (lo, hi))
    t = rank - lo
    b, a = below.double(), above.double()
    value = a - (a - b) * (1 - t) if t >= 0.5 else b + (a - b) * t
    return value.to(flat.dtype)


def quantile_pair(x: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quantile(x, 1 - q), quantile(x, q))``, the lower and upper percentile of the seed."""
    return quantile(x, 1.0 - q), quantile(x, q)


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
