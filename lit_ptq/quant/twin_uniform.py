"""PTQ4ViT's twin-uniform quantizer for the softmax output and post-GELU activations.

Yuan et al., "PTQ4ViT: Post-Training Quantization for Vision Transformers with Twin Uniform
Quantization", ECCV 2022 (hahnyuan/PTQ4ViT: ``quant_layers/matmul.py``, ``quant_layers/linear.py``).
Two uniform grids of ``2**(k-1)`` codes each, ``d2 = 2**m d1``, one bit telling which; the
arithmetic is :func:`~lit_ptq.quant.primitives.fake_quant_twin`. ``QuantConfig(softmax="twin_uniform")``
and ``QuantConfig(gelu="twin_uniform")`` select it (``docs/lowbit.md``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .observers import LastBatchSearchObserver, QParams, register_observer
from .primitives import fake_quant_twin
from .quantizer import NonUniformQuantizer, register_code_quantizer

__all__ = ["TwinUniformObserver", "TwinUniformQuantizer"]


@register_observer("twin_uniform")
class TwinUniformObserver(LastBatchSearchObserver):
    """PTQ4ViT's twin-uniform ranges, searched on the last calibration batch.

    With ``h = 2**(k-1)`` codes per range, running min / max, and an evenly strided sample of
    at most ``sample`` values of the last batch:

    - A tensor with negative values (post-GELU): R1 holds the negatives, ``d1 = -min / h``
      (PTQ4ViT fixes GELU's minimum, 0.16997), codes ``-h .. 0``, boundary 0; R2 the rest,
      codes ``0 .. h - 1``, ``d2 = 2**m d1`` for ``m`` in ``-5 .. 24`` (AdaLog's candidates
      for it).
    - A non-negative tensor (softmax output): R2 ``d2 = max / (h - 1)`` (PTQ4ViT's
      ``1 / (h - 1)``, the largest probability on the top level), R1 ``d1 = d2 / 2**m`` for
      ``m`` in ``0 .. 19`` (PTQ4ViT's split candidates ``2**-m``), codes ``0 .. h - 1`` below
      the boundary ``h d1``.

    ``m`` is the candidate of least squared error on the sample (the first on ties); PTQ4ViT
    scores it by the layer output's Hessian-weighted error, an observer by its own tensor's.
    """

    method = False
    supports_per_channel = False
    softmax = True
    gelu = True
    gelu_exponents = tuple(range(-5, 25))
    softmax_exponents = tuple(range(20))
    sample = 1 << 16

    @property
    def half(self) -> int:
        """``h = 2**(k-1)``, the codes of each range."""
        return (self.qmax - self.qmin + 1) // 2

    def candidates(self) -> list[dict[str, torch.Tensor]]:
        """Every candidate code as ``{scale, low_scale, boundary, low_qmin, low_qmax}`` tensors."""
        h, tiny = self.half, torch.finfo(torch.float32).tiny
        device = self.min_val.device
        if bool(self.min_val < 0):
            low = (-self.min_val / h).clamp(min=tiny)
            zero = torch.zeros((), device=device)
            codes = (torch.tensor(float(-h), device=device), zero)
            return [dict(scale=low * 2.0**m, low_scale=low, boundary=zero, low_qmin=codes[0], low_qmax=codes[1]) for m in self.gelu_exponents]
        high = (self.max_val / (h - 1)).clamp(min=tiny)
        codes = (torch.zeros((), device=device), torch.tensor(float(h - 1), device=device))
        out = []
        for m in self.softmax_exponents:
            low = (high / 2.0**m).clamp(min=tiny)
            out.append(dict(scale=high, low_scale=low, boundary=low * h, low_qmin=codes[0], low_qmax=codes[1]))
        return out

    def fake_quant(self, x: torch.Tensor, code: dict[str, torch.Tensor]) -> torch.Tensor:
        """``x`` through one candidate code."""
        return fake_quant_twin(x, code["low_scale"], code["scale"], code["boundary"], code["low_qmin"], code["low_qmax"], self.half - 1)

    def search(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The candidate code of least squared error on ``x``."""
        codes = self.candidates()
        errors = torch.stack([(self.fake_quant(x, c) - x).pow_(2).sum() for c in codes])
        return codes[int(torch.argmin(errors))]

    def compute(self) -> QParams:
        if self.found is None:
            raise RuntimeError(f"{self.name} observer needs a last calibration batch")
        scale = self.found["scale"].reshape(1)
        return scale, torch.zeros_like(scale), self.min_val, self.max_val

    def code_params(self) -> dict[str, torch.Tensor]:
        """``low_scale`` (``d1``), ``boundary``, ``low_qmin`` and ``low_qmax`` (R1's codes)."""
        if self.found is None:
            raise RuntimeError(f"{self.name} observer needs a last calibration batch")
        return {k: v for k, v in self.found.items() if k != "scale"}


@register_code_quantizer("twin_uniform")
class TwinUniformQuantizer(NonUniformQuantizer):
    """PTQ4ViT's twin-uniform code of a per-tensor activation: ``scale`` is R2's step ``d2``;
    the buffers ``low_scale`` (``d1``), ``boundary`` and ``low_qmin`` / ``low_qmax`` (R1's codes).

    See :func:`~lit_ptq.quant.primitives.fake_quant_twin` and :class:`TwinUniformObserver`.
    """

    kind = "twin-uniform quantizer (PTQ4ViT)"
    code_buffers = ("low_scale", "boundary", "low_qmin", "low_qmax")

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """The twin-uniform copy of ``x``."""
        half = (self.spec.qmax - self.spec.qmin + 1) // 2
        return fake_quant_twin(x, self.low_scale, self.scale, self.boundary, self.low_qmin, self.low_qmax, half - 1)

    def grid_range(self) -> Optional[tuple[float, float]]:
        """The lowest level of R1 and the highest of R2."""
        half = (self.spec.qmax - self.spec.qmin + 1) // 2
        return float(self.low_qmin * self.low_scale), float((half - 1) * self.scale)

    def clip_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Where ``x`` lies more than half a step outside the lowest or the highest level."""
        lo, hi = self.grid_range()
        return (x < lo - 0.5 * float(self.low_scale)) | (x > hi + 0.5 * float(self.scale))
