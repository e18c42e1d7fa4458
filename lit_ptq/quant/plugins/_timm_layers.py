"""Quantized versions of timm's shared layers (``Mlp``, ``PatchEmbed``), used by the timm
family plugins (``timm_vit``, ``timm_swin``). Not a plugin itself: it registers no family.

Quant points follow FQ-ViT (Lin et al., IJCAI 2022; megvii-research/FQ-ViT,
``models/layers_quant.py``): the GELU output and the ``fc2`` output of the MLP, and the patch
embedding output before and after its (optional) LayerNorm.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp, PatchEmbed
from timm.layers.format import Format, nchw_to

from ..layers import maybe_quant, module_mode
from ..quantizer import QuantMode
from ..registry import PointFactory

__all__ = ["QuantTimmMlp", "QuantTimmPatchEmbed"]


class QuantTimmMlp(Mlp):
    """timm's ``Mlp`` with quant points on the activation output (``act_output``) and ``fc2_output``."""

    def setup_quant(self, points: PointFactory) -> None:
        """Create the two quant points."""
        self.act_output = points.act("act_output", inplace=True)
        self.fc2_output = points.act("fc2_output", inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(maybe_quant(self.act_output, self.act(self.fc1(x))))
        return self.drop2(maybe_quant(self.fc2_output, self.fc2(self.norm(x))))


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
