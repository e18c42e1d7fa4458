"""What the model-family plugins share: the attention, MLP and residual quant points, the
``seed`` placement, and the ``blocks`` and ``norm_linear_pairs`` facts of pre-norm
transformers. Not a plugin itself: it registers no family.

The quant points follow PTQ-for-iTPN's seed (the outputs of ``qkv``, the logits, the softmax,
``attn @ v``, ``proj``, the GELU and ``fc2``) and FQ-ViT (Lin et al., IJCAI 2022;
megvii-research/FQ-ViT, ``models/layers_quant.py``: the residual sums); the operand points
``query``, ``key`` and ``value`` follow the ``matmul`` protocol of PTQ4ViT and RepQ-ViT
(``docs/quantization.md``). The mixins create the points in forward order (the order of the
model's quant points, its state dict and its report) and leave each family's quantized
``forward`` explicit: a family mixes one in before its float class, e.g.
``class QuantAttention(AttentionPoints, Attention)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..layers import check_softmax_source, maybe_quant, quantized_softmax, setup_operands
from ..quantizer import QuantPoint, TensorQuantizer
from ..registry import Fact, Placement, PointFactory, Site

__all__ = [
    "AttentionPoints",
    "MlpPoints",
    "ResidualPoints",
    "LogitsPoint",
    "seed_placement",
    "patch_embed_conv",
    "indexed",
    "stem_blocks_head",
    "gelu_linears",
    "block_pairs",
    "merge_pair",
]


class AttentionPoints:
    """Mixin for a quantized attention: ``qkv_output``; the operands ``query``, ``key`` and
    ``value`` (per head, before the logits' scale); ``logits``; the family's points between
    the logits and the softmax (:meth:`setup_logits_points`); ``softmax_output`` (uniform, log2
    or log-sqrt2, or FQ-ViT's log-int-softmax under LIS); ``context`` (``attn @ v``) and
    ``proj_output``, created in this order."""

    qkv_output: Optional[TensorQuantizer]
    logits: Optional[TensorQuantizer]
    softmax_output: Optional[QuantPoint]
    context: Optional[TensorQuantizer]
    proj_output: Optional[TensorQuantizer]

    def setup_quant(self, points: PointFactory) -> None:
        """Create the attention's points; refuse a log-int-softmax without the point whose scale it reads."""
        self.qkv_output = points.act("qkv_output", inplace=True)
        setup_operands(self, points)
        self.logits = points.act("logits", inplace=True)
        self.setup_logits_points(points)
        self.softmax_output = points.softmax("softmax_output")
        self.context = points.act("context", inplace=True)
        self.proj_output = points.act("proj_output", inplace=True)
        check_softmax_source(self.softmax_output, self.softmax_source(), points.module_name)

    def setup_logits_points(self, points: PointFactory) -> None:
        """Create the points between the logits and the softmax (none by default)."""

    def softmax_source(self) -> Optional[TensorQuantizer]:
        """The point whose scale a log-int-softmax uses (``logits`` by default)."""
        return self.logits

    def attention_probs(self, attn: torch.Tensor) -> torch.Tensor:
        """Softmax of ``attn`` over the last dimension, through the softmax point."""
        return quantized_softmax(self.softmax_output, self.softmax_source(), attn)


class MlpPoints:
    """Mixin for a quantized ``fc1 -> act -> fc2`` MLP (the attributes of timm's ``Mlp``):
    ``act_output`` (the GELU output, quantized as ``QuantConfig.gelu`` says) and ``fc2_output``."""

    act_output: Optional[TensorQuantizer]
    fc2_output: Optional[TensorQuantizer]

    def setup_quant(self, points: PointFactory) -> None:
        """Create the two quant points."""
        self.act_output = points.gelu("act_output", inplace=True)
        self.fc2_output = points.act("fc2_output", inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(maybe_quant(self.act_output, self.act(self.fc1(x))))
        return self.drop2(maybe_quant(self.fc2_output, self.fc2(self.hidden_norm(x))))

    def hidden_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The normalization between the activation and ``fc2`` (none by default)."""
        return x


class ResidualPoints:
    """Mixin for a quantized pre-norm block whose residual stream is quantized after each sum
    (FQ-ViT's ``qact2`` / ``qact4``): ``attn_residual`` and ``mlp_residual``, the next
    LayerNorms' inputs (per channel, along the last dimension, under PTF)."""

    attn_residual: Optional[TensorQuantizer]
    mlp_residual: Optional[TensorQuantizer]

    def setup_quant(self, points: PointFactory) -> None:
        """Create the two residual-sum points."""
        dim = self.norm1.normalized_shape[-1]
        self.attn_residual = points.norm("attn_residual", dim)
        self.mlp_residual = points.norm("mlp_residual", dim)


class LogitsPoint:
    """Mixin for a quantized timm-style classifier: ``forward_head`` ends in the ``head_output``
    point (FQ-ViT's last point), which the family's ``setup_quant`` creates."""

    head_output: Optional[TensorQuantizer]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = super().forward_head(x, pre_logits=pre_logits)
        return x if pre_logits else maybe_quant(self.head_output, x)


def seed_placement(own: tuple[type[nn.Module], ...], head: str, left_out: tuple[str, ...]) -> Placement:
    """PTQ-for-iTPN's placement: every point of the modules of types ``own`` except the points
    named in ``left_out``, and the weight of every Linear except ``head``'s."""

    def rule(site: Site) -> bool:
        if isinstance(site.module, own):
            return site.point not in left_out
        return site.role == "weight" and isinstance(site.module, nn.Linear) and site.module_name != head

    return rule


def patch_embed_conv(model: nn.Module) -> list[str]:
    """The convolution that reads the image: ``patch_embed.proj`` (an ``image_convs``)."""
    return ["patch_embed.proj"]


def indexed(prefix: str, modules: nn.Module) -> list[str]:
    """``prefix.0``, ``prefix.1``, ...: the names of the children of the container ``modules``."""
    return [f"{prefix}.{i}" for i in range(len(modules))]


def stem_blocks_head(stem: str = "patch_embed", container: str = "blocks", head: str = "head") -> Fact:
    """The ``blocks`` fact of a plain stack: ``stem``, every child of ``container`` in order,
    then ``head`` (called once on the pooled features)."""

    def blocks(model: nn.Module) -> list[str]:
        """The stem, every block in order, then the head."""
        return [stem, *indexed(container, model.get_submodule(container)), head]

    return blocks


def gelu_linears(model: nn.Module) -> list[str]:
    """The ``gelu_linears`` fact of models built of ``fc1 -> act -> fc2`` MLPs: the ``fc2`` of
    every module whose ``act`` is a GELU (torch's ``nn.GELU``, timm's included)."""
    return [
        f"{name}.fc2" if name else "fc2"
        for name, module in model.named_modules()
        if isinstance(getattr(module, "act", None), nn.GELU) and isinstance(getattr(module, "fc2", None), nn.Linear)
    ]


def block_pairs(block: str, qkv: bool = True) -> list[tuple[str, str]]:
    """A pre-norm block's LayerNorm -> Linear pairs: ``norm1 -> attn.qkv`` (when ``qkv``) and
    ``norm2 -> mlp.fc1``."""
    pairs = [(f"{block}.norm1", f"{block}.attn.qkv")] if qkv else []
    return [*pairs, (f"{block}.norm2", f"{block}.mlp.fc1")]


def merge_pair(merge: str) -> tuple[str, str]:
    """A patch merging's LayerNorm -> Linear pair: ``norm -> reduction``."""
    return (f"{merge}.norm", f"{merge}.reduction")
