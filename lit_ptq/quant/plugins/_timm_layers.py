"""Quantized versions of timm's shared layers (``Mlp``, ``PatchEmbed``) and FQ-ViT's ``full``
placement, used by the timm family plugins (``timm_vit``, ``timm_swin``). Not a plugin itself:
it registers no family.

Quant points follow FQ-ViT (Lin et al., IJCAI 2022; megvii-research/FQ-ViT,
``models/layers_quant.py``): the GELU output and the ``fc2`` output of the MLP, and the patch
embedding output before and after its (optional) LayerNorm.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from timm.layers import Mlp, PatchEmbed
from timm.layers.format import Format, nchw_to

from ..layers import OPERAND_POINTS, maybe_quant, module_mode
from ..quantizer import QuantMode
from ..registry import Placement, PointFactory, Site
from .toolkit import MlpPoints

__all__ = ["QuantTimmMlp", "QuantTimmPatchEmbed", "fqvit_full_placement"]


class QuantTimmMlp(MlpPoints, Mlp):
    """timm's ``Mlp`` with quant points on the activation output (``act_output``) and ``fc2_output``."""

    def hidden_norm(self, x: torch.Tensor) -> torch.Tensor:
        """timm's optional ``norm`` between the activation and ``fc2``."""
        return self.norm(x)


class QuantTimmPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` with quant points on the projection output (``proj_output``, before
    the norm) and on its output (``output``, after the norm). In ``FLOAT`` mode it is timm's."""

    def setup_quant(self, points: PointFactory) -> None:
        """Create the two quant points."""
        self.proj_output = points.act("proj_output")
        self.output = points.act("output")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if module_mode(self) is QuantMode.FLOAT:
            return super().forward(x)
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        return maybe_quant(self.output, self.norm(maybe_quant(self.proj_output, x)))


def fqvit_full_placement(input_linears: tuple[str, ...], quantizes_image: Callable[[nn.Module], bool]) -> Placement:
    """FQ-ViT's ``full`` placement of a timm family: no LayerNorm input (the residual-stream
    points are the family's own), the input of the Linears whose last name is in
    ``input_linears`` (they read a LayerNorm output) and of the patch embedding when
    ``quantizes_image(model)``, the patch embedding's ``proj_output`` only before a LayerNorm,
    and every other point but the attention operands."""

    def rule(site: Site) -> bool:
        module = site.module
        if isinstance(module, nn.LayerNorm):
            return False
        if site.point == "input_quantizer":
            if isinstance(module, nn.Conv2d):
                return quantizes_image(site.root)
            return site.leaf in input_linears
        if site.point == "proj_output" and isinstance(module, PatchEmbed):
            return not isinstance(module.norm, nn.Identity)
        return site.point not in OPERAND_POINTS

    return rule
