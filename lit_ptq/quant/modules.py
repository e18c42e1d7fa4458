"""Quantized subclasses of the float iTPN modules, swapped in place by ``quantize_``.

Each class adds explicit quantizer submodules and a ``forward`` that applies them; in
``FLOAT`` mode every class computes exactly what its float parent computes. Quant points
that a placement leaves out are ``None``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.itpn import Attention, Mlp, PatchMerge
from .config import QuantConfig
from .quantizer import LogSoftmaxQuantizer, QuantMode, TensorQuantizer, WeightQuantizer

__all__ = [
    "QuantLinear",
    "QuantConv2d",
    "QuantLayerNorm",
    "QuantAttention",
    "QuantMlp",
    "QuantPatchMerge",
    "QUANT_MODULES",
]


def _act(config: QuantConfig, inplace: bool = False) -> TensorQuantizer:
    return TensorQuantizer(config.act, "act", arithmetic=config.arithmetic, inplace=inplace)


def _out(config: QuantConfig) -> TensorQuantizer:
    """A quant point on a tensor the module has just computed and nothing else reads: in place."""
    return _act(config, inplace=True)


def _maybe(q: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    return q(x) if q is not None else x


class QuantLinear(nn.Linear):
    """``nn.Linear`` with an optional input quantizer and an optional weight quantizer."""

    input_quantizer: Optional[TensorQuantizer]
    weight_quantizer: Optional[WeightQuantizer]

    def setup_quant(self, config: QuantConfig, quant_weight: bool, quant_input: bool) -> None:
        """Create the quantizers this placement asks for."""
        self.input_quantizer = _act(config) if quant_input else None
        self.weight_quantizer = WeightQuantizer(config.weight, self.out_features) if quant_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight
        return F.linear(_maybe(self.input_quantizer, x), weight, self.bias)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` with an optional input quantizer and an optional weight quantizer."""

    input_quantizer: Optional[TensorQuantizer]
    weight_quantizer: Optional[WeightQuantizer]

    def setup_quant(self, config: QuantConfig, quant_weight: bool, quant_input: bool) -> None:
        """Create the quantizers this placement asks for."""
        self.input_quantizer = _act(config) if quant_input else None
        self.weight_quantizer = WeightQuantizer(config.weight, self.out_channels) if quant_weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight
        return self._conv_forward(_maybe(self.input_quantizer, x), weight, self.bias)


class QuantLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose input is quantized (per channel with power-of-two factors under PTF)."""

    input_quantizer: Optional[TensorQuantizer]

    def setup_quant(self, config: QuantConfig, quant_input: bool) -> None:
        """Create the input quantizer when the placement quantizes LayerNorm inputs."""
        channels = self.normalized_shape[-1]
        self.input_quantizer = (
            TensorQuantizer(config.norm, "norm", channels=channels, arithmetic=config.arithmetic) if quant_input else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(_maybe(self.input_quantizer, x), self.normalized_shape, self.weight, self.bias, self.eps)


class QuantAttention(Attention):
    """Attention with the seed's five quant points.

    ``qkv_output`` (q, k and v), ``logits`` (``(q @ k^T) * scale`` before the position bias),
    ``softmax_output`` (uniform, or log2 under LIS), ``context`` (``attn @ v``) and
    ``proj_output``. Outside ``FLOAT`` mode the logits are computed as the seed does,
    ``(q @ k^T) * scale``; in ``FLOAT`` mode as the official model, ``(q * scale) @ k^T``.
    """

    def setup_quant(self, config: QuantConfig) -> None:
        """Create the five quant points."""
        self.qkv_output = _out(config)
        self.logits = _out(config)
        self.softmax_output = (
            LogSoftmaxQuantizer(config.attn.bits)
            if config.lis
            else TensorQuantizer(config.attn, "attn", arithmetic=config.arithmetic, inplace=True)
        )
        self.context = _out(config)
        self.proj_output = _out(config)

    def attention_probs(self, attn: torch.Tensor) -> torch.Tensor:
        """Softmax of the biased logits, through the softmax quant point."""
        if isinstance(self.softmax_output, LogSoftmaxQuantizer):
            return self.softmax_output(attn, self.logits.scale)
        return self.softmax_output(attn.softmax(dim=-1))

    def forward(self, x: torch.Tensor, rpe_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        N = x.shape[1]
        q, k, v = self.split_heads(self.qkv_output(self.qkv(x)))
        if self.logits.mode is QuantMode.FLOAT:
            attn = (q * self.scale) @ k.transpose(-2, -1)
        else:
            attn = (q @ k.transpose(-2, -1)).mul_(self.scale)  # (q @ k^T) * scale, one tensor fewer
        attn = self.logits(attn)  # an identity in FLOAT mode, still seen by hooks (quant_report)
        bias = self.position_bias(rpe_index, N)
        if bias is not None:
            attn = attn + bias if self.logits.mode is QuantMode.FLOAT else attn.add_(bias)
        attn = self.attn_drop(self.attention_probs(attn))
        x = self.context(self.merge_heads(attn @ v))
        return self.proj_drop(self.proj_output(self.proj(x)))


class QuantMlp(Mlp):
    """MLP with the seed's quant points: the GELU output (``act_output``) and ``fc2_output``."""

    def setup_quant(self, config: QuantConfig) -> None:
        """Create the two quant points."""
        self.act_output = _out(config)
        self.fc2_output = _out(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act_output(self.act(self.fc1(x))))
        return self.drop2(self.fc2_output(self.fc2(x)))


class QuantPatchMerge(PatchMerge):
    """PatchMerge with the seed's quant point on the output of ``reduction``."""

    def setup_quant(self, config: QuantConfig) -> None:
        """Create the output quant point."""
        self.reduction_output = _out(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction_output(self.reduction(self.norm(self.gather(x))))


QUANT_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
    nn.LayerNorm: QuantLayerNorm,
    Attention: QuantAttention,
    Mlp: QuantMlp,
    PatchMerge: QuantPatchMerge,
}
"""Float module type -> quantized subclass that ``quantize_`` swaps in."""
