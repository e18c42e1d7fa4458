"""AdaLog's adaptive-base logarithmic quantizer for the softmax output and post-GELU activations.

Wu et al., "AdaLog: Post-Training Quantization for Vision Transformers with Adaptive Logarithm
Quantizer", ECCV 2024 (GoatWu/AdaLog: ``quantizers/logarithm.py``, ``AdaLogQuantizer`` and
``ShiftAdaLogQuantizer``; the searches in ``quant_layers/matmul.py`` and ``quant_layers/linear.py``).
The code is a logarithm to the base ``2**(q / r)`` (``r = 37``, ``q`` an integer searched per
point) of ``(x + shift) / scale``; the arithmetic is :func:`~lit_ptq.quant.primitives.fake_quant_adalog`.
``QuantConfig(softmax="adalog")`` and ``QuantConfig(gelu="adalog")`` select it (``docs/lowbit.md``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .observers import LastBatchSearchObserver, QParams, register_observer
from .primitives import fake_quant_adalog
from .quantizer import NonUniformQuantizer, register_code_quantizer

__all__ = ["AdaLogObserver", "AdaLogQuantizer"]


@register_observer("adalog")
class AdaLogObserver(LastBatchSearchObserver):
    """AdaLog's search for the shift, scale and base of its logarithmic code.

    Running min / max over the calibration batches; on the last batch (an evenly strided sample
    of at most ``sample`` values):

    - ``shift = max(0, -min)``: 0 for the softmax output; for a post-GELU activation the
      magnitude of its minimum (AdaLog fixes GELU's, 0.16997), so that ``x + shift >= 0``.
    - Scale candidates (AdaLog's post-GELU candidates): ``scale_candidates`` values evenly
      spaced from the 0.9 quantile of the sample's positive values (AdaLog's rank
      ``ceil(0.9 n) - 1`` of the sorted positives) to the running max, both plus ``shift``.
    - Base candidates ``q`` = 10 .. 137 (``r = 37``: the bases ``2**(10/37)`` .. ``2**(137/37)``;
      ``q = 37`` is log2).
    - Starting from the largest scale and ``q = 37``, ``rounds`` rounds of: the ``q`` of least
      squared error at the current scale, then the scale of least squared error at that ``q``
      (the first candidate on ties), until a round changes neither.

    AdaLog scores its candidates by the error of the layer's output (``attn @ v``, ``fc2``) and
    fixes the softmax's scale to 1; an observer sees only its own tensor, so here the error is
    the quantized tensor's, and the softmax's scale is searched like the others (the running
    max, about 1, is a candidate).
    """

    method = False
    supports_per_channel = False
    softmax = True
    gelu = True
    r = 37
    base_candidates = tuple(range(10, 138))
    scale_candidates = 32
    rounds = 3
    sample = 1 << 16
    chunk = 16

    @property
    def bits(self) -> int:
        """The code's bit width."""
        return (self.qmax - self.qmin + 1).bit_length() - 1

    def shift(self) -> torch.Tensor:
        """``max(0, -min)`` of the running minimum."""
        return (-self.min_val).clamp(min=0.0)

    def candidate_scales(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``scale_candidates`` scales from the 0.9 quantile of the positives of ``x`` to the max, plus ``shift``."""
        hi = self.max_val.clamp(min=0.0) + shift
        positive = x[x > 0].sort().values
        lo = positive[max(0, -(-positive.numel() * 9 // 10) - 1)] + shift if positive.numel() else hi
        steps = torch.arange(self.scale_candidates, dtype=torch.float32, device=x.device) / (self.scale_candidates - 1)
        return (lo + (hi - lo) * steps).clamp(min=torch.finfo(torch.float32).tiny)

    def errors(self, x: torch.Tensor, scales: torch.Tensor, shift: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
        """The squared error on ``x`` of each code ``(scales[i], shift, qs[i])`` (``scales`` and
        ``qs`` broadcast to one length), ``chunk`` candidates at a time."""
        scales, qs = torch.broadcast_tensors(scales.reshape(-1), qs.reshape(-1))
        out = []
        for s, q in zip(scales.split(self.chunk), qs.split(self.chunk)):
            fq = fake_quant_adalog(x, s[:, None], shift, q[:, None], self.bits, self.r)
            out.append(fq.sub_(x).pow_(2).sum(dim=1))
        return torch.cat(out)

    def best_base(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """The base candidate ``q`` of least squared error at ``scale`` (the first on ties)."""
        qs = torch.tensor(self.base_candidates, dtype=torch.float32, device=x.device)
        return qs[int(torch.argmin(self.errors(x, scale, shift, qs)))]

    def best_scale(self, x: torch.Tensor, scales: torch.Tensor, shift: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The scale candidate of least squared error at base ``q`` (the first on ties)."""
        return scales[int(torch.argmin(self.errors(x, scales, shift, q)))]

    def search(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scale, shift, q)`` by alternating the base and the scale search on ``x``."""
        shift = self.shift()
        scales = self.candidate_scales(x, shift)
        scale, q = scales[-1], torch.tensor(float(self.r), device=x.device)
        for _ in range(self.rounds):
            new_q = self.best_base(x, scale, shift)
            new_scale = self.best_scale(x, scales, shift, new_q)
            if bool(new_q == q) and bool(new_scale == scale):
                break
            scale, q = new_scale, new_q
        return scale, shift, q

    def compute(self) -> QParams:
        if self.found is None:
            raise RuntimeError(f"{self.name} observer needs a last calibration batch")
        scale = self.found[0].reshape(1)
        return scale, torch.zeros_like(scale), self.min_val, self.max_val

    def code_params(self) -> dict[str, torch.Tensor]:
        """``shift`` and ``base`` (the integer ``q``)."""
        if self.found is None:
            raise RuntimeError(f"{self.name} observer needs a last calibration batch")
        return {"shift": self.found[1], "base": self.found[2]}


@register_code_quantizer("adalog")
class AdaLogQuantizer(NonUniformQuantizer):
    """AdaLog's code of a per-tensor activation: ``scale`` (the value of code 0 before the
    shift), and the buffers ``shift`` and ``base`` (``q`` of the base ``2**(q / 37)``).

    See :func:`~lit_ptq.quant.primitives.fake_quant_adalog` and :class:`AdaLogObserver`.
    """

    kind = "logarithmic quantizer with an adaptive base (AdaLog)"
    code_buffers = ("shift", "base")

    def __init__(self, spec, role: str) -> None:
        super().__init__(spec, role)
        self.base.fill_(float(AdaLogObserver.r))

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """The AdaLog-coded copy of ``x``."""
        return fake_quant_adalog(x, self.scale, self.shift, self.base, self.spec.bits, AdaLogObserver.r)

    def grid_range(self) -> Optional[tuple[float, float]]:
        """``(-shift, scale - shift)``: the underflow value and the value of code 0."""
        return -float(self.shift), float(self.scale) - float(self.shift)

    def clip_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Where ``x`` lies above the top level, or above ``-shift`` and underflows to it."""
        top = self.scale - self.shift
        return (x > top) | ((self.fake_quant(x) == -self.shift) & (x > -self.shift))
