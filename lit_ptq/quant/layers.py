"""Generic quantized layers: ``nn.Linear``, ``nn.Conv2d`` and ``nn.LayerNorm`` with optional
quant points, swapped in place by ``quantize_`` for every model family.

Each class creates its points in ``setup_quant`` through a
:class:`~lit_ptq.quant.registry.PointFactory` (``None`` where the placement leaves a point
out) and, with its points in ``FLOAT`` mode, computes exactly what its float parent computes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizer import LogSoftmaxQuantizer, QuantMode, QuantPoint, TensorQuantizer, WeightQuantizer
from .registry import GENERIC_MODULES, Placement, PointFactory, Site

__all__ = [
    "QuantLinear",
    "QuantConv2d",
    "QuantLayerNorm",
    "maybe_quant",
    "module_mode",
    "quantized_softmax",
    "check_softmax_source",
    "OPERAND_POINTS",
    "setup_operands",
    "quantize_operands",
    "matmul_placement",
]

OPERAND_POINTS = ("query", "key", "value")
"""The attention operand points q, k and v, which only the ``matmul`` placement places."""


def maybe_quant(point: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``point(x)``, or ``x`` when the point is not placed (``None``)."""
    return point(x) if point is not None else x


def quantized_softmax(
    softmax_point: Optional[QuantPoint], logits_point: Optional[TensorQuantizer], attn: torch.Tensor
) -> torch.Tensor:
    """Softmax over the last dimension through the softmax-output point.

    A :class:`LogSoftmaxQuantizer` (FQ-ViT's log-int-softmax) computes the softmax itself from
    the logits and the scale of ``logits_point``; a uniform point quantizes the float softmax.
    """
    if isinstance(softmax_point, LogSoftmaxQuantizer):
        return softmax_point(attn, logits_point)
    return maybe_quant(softmax_point, attn.softmax(dim=-1))


def check_softmax_source(softmax_point: Optional[QuantPoint], logits_point: Optional[TensorQuantizer], where: str) -> None:
    """Refuse a log-int-softmax whose logits point an override left float (it needs its scale)."""
    if isinstance(softmax_point, LogSoftmaxQuantizer) and logits_point is None:
        from ..errors import ConfigError

        raise ConfigError(f"log-int-softmax at {where} needs its logits quant point, which an override leaves float")


def setup_operands(module: nn.Module, points: PointFactory) -> None:
    """Create an attention module's operand points ``query``, ``key`` and ``value``."""
    for name in OPERAND_POINTS:
        setattr(module, name, points.act(name))


def quantize_operands(
    module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q``, ``k``, ``v`` (per head, before the logits' scale) through the operand points."""
    return maybe_quant(module.query, q), maybe_quant(module.key, k), maybe_quant(module.value, v)


def matmul_placement(attention_types: tuple[type[nn.Module], ...]) -> Placement:
    """The ``matmul`` placement of a family whose attention modules are ``attention_types``:
    every Linear/Conv input and weight, and the operands of the two attention products (q
    and k; the softmax output and v)."""
    operands = (*OPERAND_POINTS, "softmax_output")

    def rule(site: Site) -> bool:
        if isinstance(site.module, attention_types):
            return site.point in operands
        return isinstance(site.module, (nn.Linear, nn.Conv2d))

    return rule


def module_mode(module: nn.Module) -> QuantMode:
    """The mode of the quant points a module owns directly (``FLOAT`` when it owns none).

    ``set_quant_mode`` puts every point of a model in one mode, so the first one tells.
    """
    for child in module.children():
        if isinstance(child, QuantPoint):
            return child.mode
    return QuantMode.FLOAT


class QuantLinear(nn.Linear):
    """``nn.Linear`` with an optional input point and an optional weight point; the input
    point of an MLP's ``fc2`` follows ``QuantConfig.gelu``."""

    input_quantizer: Optional[TensorQuantizer]
    weight_quantizer: Optional[WeightQuantizer]

    def setup_quant(self, points: PointFactory) -> None:
        """Create the points the placement asks for (a post-GELU input point when the family
        lists this Linear among its ``gelu_linears``)."""
        make = points.gelu if points.reads_gelu else points.act
        self.input_quantizer = make("input_quantizer", channels=self.in_features)
        self.weight_quantizer = points.weight("weight_quantizer", self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(maybe_quant(self.input_quantizer, x), maybe_quant(self.weight_quantizer, self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` with an optional input point and an optional weight point.

    The input point of a convolution that reads the image (one of the family's
    ``image_convs``, the patch embedding) has the role ``image``; any other convolution's
    is an ordinary activation point (per tensor).
    """

    input_quantizer: Optional[TensorQuantizer]
    weight_quantizer: Optional[WeightQuantizer]

    def setup_quant(self, points: PointFactory) -> None:
        """Create the points the placement asks for."""
        self.input_quantizer = points.image("input_quantizer") if points.reads_image else points.act("input_quantizer")
        self.weight_quantizer = points.weight("weight_quantizer", self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = maybe_quant(self.weight_quantizer, self.weight)
        return self._conv_forward(maybe_quant(self.input_quantizer, x), weight, self.bias)


class QuantLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose input is quantized (per channel with power-of-two factors under PTF)."""

    input_quantizer: Optional[TensorQuantizer]

    def setup_quant(self, points: PointFactory) -> None:
        """Create the input point when the placement quantizes LayerNorm inputs."""
        self.input_quantizer = points.norm("input_quantizer", self.normalized_shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(maybe_quant(self.input_quantizer, x), self.normalized_shape, self.weight, self.bias, self.eps)


GENERIC_MODULES.update({nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d, nn.LayerNorm: QuantLayerNorm})
