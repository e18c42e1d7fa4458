"""timm's Swin Transformer (``timm.models.swin_transformer.SwinTransformer``; Liu et al.,
"Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021) as a
quantization plugin: the ``full``, ``seed`` and ``matmul`` placements (``docs/quantization.md``).

``full`` is FQ-ViT's placement for Swin (Lin et al., "FQ-ViT: Post-Training Quantization for
Fully Quantized Vision Transformer", IJCAI 2022; megvii-research/FQ-ViT,
``models/swin_quant.py``), point for point:

- model level: the image (the patch embedding conv's input), the conv output before the
  patch embedding's LayerNorm and that LayerNorm's output (both per tensor, also under PTF),
  the final LayerNorm's output, the pooled features (the head's input) and the logits;
- in every block: the first LayerNorm's output (the input of ``qkv``), ``qkv``,
  ``(q * scale) @ k^T`` (scaled before the product, as Swin computes it), the relative
  position bias table itself (before it is gathered by the position index), the logits plus
  the gathered bias (before the shift mask, which is added afterwards and never quantized;
  the log-int-softmax uses this point's scale under LIS), the softmax (log2 under LIS),
  ``attn @ v``, ``proj``, both residual sums (the next LayerNorms' inputs, per channel under
  PTF), the second LayerNorm's output (the input of ``fc1``), the GELU and ``fc2``;
- in every PatchMerging: its LayerNorm's output (the input of ``reduction``) and the
  ``reduction`` output (the next block's LayerNorm input, per channel under PTF);
- every weight, per output channel.

Swin-T has 168 activation points: 6 at model level, 13 per block, 2 per PatchMerging. timm
runs PatchMerging at the start of stage ``i + 1`` (``layers.{i+1}.downsample``) where
FQ-ViT has it at the end of stage ``i``: the tensors are the same. timm keeps feature maps
as ``(B, H, W, C)``; per-channel points use the last dimension, as FQ-ViT does on ``(B, L, C)``.

``seed`` maps PTQ-for-iTPN's points to the same roles: ``qkv``, the logits (before the
position bias), the softmax, ``attn @ v``, ``proj``, GELU and ``fc2`` outputs, the
PatchMerging ``reduction`` output, and the weights of every Linear but the head's.

``matmul`` is the benchmark protocol of PTQ4ViT, RepQ-ViT, ERQ and AdaLog: the input and the
weight of every Linear (``qkv``, ``proj``, ``fc1``, ``fc2`` of every block, PatchMerging's
``reduction``, ``head.fc``) and of the patch embedding (its input is the image), and the
operands of both attention products: q and k (``query``, ``key``, per head, before the
logits' scale), the softmax output and v (``value``). LayerNorm inputs, the residual stream,
the position bias and FQ-ViT's output points stay float. Its LayerNorm -> Linear pairs (for
RepQ-ViT's reparameterization) are ``norm1 -> attn.qkv`` (through the cyclic shift and the
window partition, which only move tokens), ``norm2 -> mlp.fc1``, PatchMerging's
``norm -> reduction`` and the final ``norm -> head.fc`` (through the average pooling). A
block whose feature map is (or, with ``strict_img_size=False``, may be) zero-padded to whole
windows has no ``norm1`` pair: the padding tokens are zeros after the LayerNorm, and ``qkv``
would read them through the folded bias.

With every point in ``FLOAT`` mode the modules compute what timm's do (timm's own
``forward`` where it differs).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Mlp, PatchEmbed
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention

from ...errors import ConfigError
from ..layers import OPERAND_POINTS, matmul_placement, maybe_quant, module_mode, quantize_operands
from ..quantizer import QuantMode, TensorQuantizer
from ..registry import PointFactory, register_family
from ._timm_layers import QuantTimmMlp, QuantTimmPatchEmbed, fqvit_full_placement
from .toolkit import (
    AttentionPoints,
    LogitsPoint,
    ResidualPoints,
    block_pairs,
    gelu_linears,
    indexed,
    merge_pair,
    patch_embed_conv,
    seed_placement,
)

__all__ = [
    "FAMILY",
    "QuantWindowAttention",
    "QuantSwinTransformerBlock",
    "QuantPatchMerging",
    "QuantSwinTransformer",
]


_SEED_LEFT_OUT = (*OPERAND_POINTS, "bias_table", "biased_logits")
"""The points of the seed's modules that ``seed`` leaves float: the operands and the position bias."""


def _quantizes_image(root: nn.Module) -> bool:
    """FQ-ViT quantizes the input image of its Swin models."""
    return True


def _may_pad(block: SwinTransformerBlock) -> bool:
    """Whether the block pads its feature map to whole windows before the attention (any
    input size is accepted with ``strict_img_size=False``, and may need padding)."""
    return block.dynamic_mask or any(r % w for r, w in zip(block.input_resolution, block.window_size))


def norm_linear_pairs(model: SwinTransformer) -> list[tuple[str, str]]:
    """Each LayerNorm and the Linear it feeds, in forward order: PatchMerging's
    ``norm -> reduction``, ``norm1 -> attn.qkv`` (unless the block pads, see the module
    docstring) and ``norm2 -> mlp.fc1`` in every block, the final ``norm -> head.fc``."""
    pairs = []
    for i, stage in enumerate(model.layers):
        if isinstance(stage.downsample, PatchMerging):
            pairs.append(merge_pair(f"layers.{i}.downsample"))
        for j, block in enumerate(stage.blocks):
            pairs += block_pairs(f"layers.{i}.blocks.{j}", qkv=not _may_pad(block))
    if isinstance(model.norm, nn.LayerNorm) and isinstance(model.head.fc, nn.Linear):
        pairs.append(("norm", "head.fc"))
    return pairs


def blocks(model: SwinTransformer) -> list[str]:
    """The patch embedding, then each stage's PatchMerging and blocks in the order they run,
    then ``head.fc`` (called once on the pooled features)."""
    names = ["patch_embed"]
    for i, stage in enumerate(model.layers):
        if isinstance(stage.downsample, PatchMerging):
            names.append(f"layers.{i}.downsample")
        names += indexed(f"layers.{i}.blocks", stage.blocks)
    return [*names, "head.fc"]


FAMILY = register_family(
    "timm_swin",
    (SwinTransformer,),
    {
        "seed": seed_placement((WindowAttention, Mlp, PatchMerging), "head.fc", _SEED_LEFT_OUT),
        "full": fqvit_full_placement(("qkv", "fc1", "reduction", "fc"), _quantizes_image),
        "matmul": matmul_placement((WindowAttention,)),
    },
    image_convs=patch_embed_conv,
    norm_linear_pairs=norm_linear_pairs,
    gelu_linears=gelu_linears,
    blocks=blocks,
)
FAMILY.quant_module(Mlp)(QuantTimmMlp)
FAMILY.quant_module(PatchEmbed)(QuantTimmPatchEmbed)


@FAMILY.quant_module(WindowAttention)
class QuantWindowAttention(AttentionPoints, WindowAttention):
    """timm's ``WindowAttention`` with FQ-ViT's seven points and the three operand points.

    ``qkv_output``, ``logits`` (``(q * scale) @ k^T``), ``bias_table`` (the
    ``relative_position_bias_table`` parameter, before the gather), ``biased_logits`` (logits
    plus the relative position bias, before the shift mask), ``softmax_output`` (uniform, or
    log2 under LIS from ``biased_logits``' scale, or ``logits``' when that point is not
    placed), ``context`` (``attn @ v``) and ``proj_output``; ``query``, ``key`` and ``value``
    are the operands of the two products (per head, before the logits' scale).
    """

    def setup_logits_points(self, points: PointFactory) -> None:
        """Create ``bias_table`` and ``biased_logits``."""
        self.bias_table = points.act("bias_table")
        self.biased_logits = points.act("biased_logits", inplace=True)

    def softmax_source(self) -> Optional[TensorQuantizer]:
        """The point whose scale a log-int-softmax uses: ``biased_logits``, else ``logits``."""
        return self.biased_logits if self.biased_logits is not None else self.logits

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if module_mode(self) is QuantMode.FLOAT:
            return super().forward(x, mask=mask)
        B_, N, _ = x.shape
        qkv = maybe_quant(self.qkv_output, self.qkv(x))
        q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = quantize_operands(self, q, k, v)
        attn = maybe_quant(self.logits, (q * self.scale) @ k.transpose(-2, -1))
        table = maybe_quant(self.bias_table, self.relative_position_bias_table)
        bias = table[self.relative_position_index.view(-1)].view(self.window_area, self.window_area, -1)
        attn = maybe_quant(self.biased_logits, attn.add_(bias.permute(2, 0, 1).unsqueeze(0)))
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.attention_probs(attn))
        x = maybe_quant(self.context, (attn @ v).transpose(1, 2).reshape(B_, N, -1))
        return self.proj_drop(maybe_quant(self.proj_output, self.proj(x)))


@FAMILY.quant_module(SwinTransformerBlock)
class QuantSwinTransformerBlock(ResidualPoints, SwinTransformerBlock):
    """timm's ``SwinTransformerBlock`` with the residual stream quantized after each sum
    (FQ-ViT's ``qact2`` / ``qact4``): ``attn_residual`` and ``mlp_residual``, the next
    LayerNorms' inputs (per channel, along the last dimension, under PTF)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = maybe_quant(self.attn_residual, x + self.drop_path1(self._attn(self.norm1(x))))
        x = x.reshape(B, -1, C)
        x = maybe_quant(self.mlp_residual, x + self.drop_path2(self.mlp(self.norm2(x))))
        return x.reshape(B, H, W, C)


@FAMILY.quant_module(PatchMerging)
class QuantPatchMerging(PatchMerging):
    """timm's ``PatchMerging`` with a point on the ``reduction`` output (``reduction_output``,
    FQ-ViT's ``downsample.qact2``): the next block's LayerNorm input, per channel under PTF.
    The LayerNorm output is the input point of ``reduction``."""

    def setup_quant(self, points: PointFactory) -> None:
        """Create the output point."""
        self.reduction_output = points.norm("reduction_output", self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_quant(self.reduction_output, super().forward(x))


@FAMILY.quant_module(SwinTransformer)
class QuantSwinTransformer(LogitsPoint, SwinTransformer):
    """timm's ``SwinTransformer`` with FQ-ViT's model-level points: ``norm_output`` (the final
    LayerNorm's output, before pooling) and ``head_output`` (the logits). The image and the
    pooled features are the input points of ``patch_embed.proj`` and ``head.fc``."""

    def setup_quant(self, points: PointFactory) -> None:
        """Create the model-level points; refuse heads FQ-ViT's layout does not cover."""
        if self.global_pool != "avg":
            raise ConfigError(
                f"the timm_swin plugin quantizes Swin models with average pooling, not global_pool={self.global_pool!r}"
            )
        self.norm_output = points.act("norm_output")
        self.head_output = points.act("head_output", inplace=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_quant(self.norm_output, super().forward_features(x))
