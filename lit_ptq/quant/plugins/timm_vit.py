"""timm's ViT and DeiT (``timm.models.vision_transformer.VisionTransformer``) as a
quantization plugin: the ``full``, ``seed`` and ``matmul`` placements (``docs/quantization.md``).

``full`` is FQ-ViT's placement (Lin et al., "FQ-ViT: Post-Training Quantization for Fully
Quantized Vision Transformer", IJCAI 2022; megvii-research/FQ-ViT, ``models/vit_quant.py``),
point for point: the image (DeiT only, as FQ-ViT's ``input_quant``), the patch embedding
output, the class token + patch tokens, the position embedding itself, their sum, in every
block the LayerNorm outputs (the inputs of ``qkv`` and ``fc1``), ``qkv``, ``(q @ k^T) * scale``,
the softmax (log2 under LIS), ``attn @ v``, ``proj``, the GELU, ``fc2`` and both residual sums
(the LayerNorm inputs, per channel under PTF), the final norm's output (the head's input) and
the head's output; every weight, per output channel. FQ-ViT quantizes the residual stream
itself, so the sums are points of the block, not inputs of the LayerNorms.

``seed`` maps PTQ-for-iTPN's points to the same roles: ``qkv``, logits, softmax, ``attn @ v``,
``proj``, GELU and ``fc2`` outputs, and the weights of every Linear but the head.

``matmul`` is the benchmark protocol of PTQ4ViT, RepQ-ViT, ERQ and AdaLog: the input and the
weight of every Linear (``qkv``, ``proj``, ``fc1``, ``fc2`` of every block, the ``head``) and
of the patch embedding (its input is the image), and the operands of both attention
products: q and k (``query``, ``key``, per head, after timm's optional ``q_norm``/``k_norm``
and before the logits' scale), the softmax output and v (``value``). LayerNorm inputs, the
residual stream and FQ-ViT's output points stay float. Its LayerNorm -> Linear pairs (for
RepQ-ViT's reparameterization) are ``norm1 -> attn.qkv``, ``norm2 -> mlp.fc1`` and the final
LayerNorm (``norm``, or ``fc_norm`` after average pooling) -> ``head``; the class-token
selection or token mean between ``norm`` and ``head`` acts on each channel alone.

With every point in ``FLOAT`` mode the modules compute what timm's do (timm's own
``forward`` where it differs, e.g. its fused attention kernel).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Attention, Mlp, PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer

from ...errors import ConfigError
from ..layers import OPERAND_POINTS, matmul_placement, maybe_quant, module_mode, quantize_operands
from ..quantizer import QuantMode
from ..registry import PointFactory, register_family
from ._timm_layers import QuantTimmMlp, QuantTimmPatchEmbed, fqvit_full_placement
from .toolkit import AttentionPoints, LogitsPoint, ResidualPoints, block_pairs, gelu_linears, patch_embed_conv, seed_placement, stem_blocks_head

__all__ = ["FAMILY", "QuantTimmAttention", "QuantTimmBlock", "QuantVisionTransformer"]


def _quantizes_image(root: nn.Module) -> bool:
    """FQ-ViT quantizes the input image of its DeiT models and not of its ViT models."""
    name = getattr(root, "model_name", None) or getattr(root, "pretrained_cfg", {}).get("architecture", "")
    return str(name).startswith("deit")


def _final_norm(model: VisionTransformer) -> Optional[str]:
    """The LayerNorm whose output reaches ``head`` through channel-wise operations only:
    ``fc_norm`` (after pooling) or ``norm`` (before the class-token selection or token mean)."""
    if model.attn_pool is not None or not isinstance(model.head, nn.Linear):
        return None
    for name in ("fc_norm", "norm"):
        if isinstance(getattr(model, name), nn.LayerNorm):
            return name
    return None


def norm_linear_pairs(model: VisionTransformer) -> list[tuple[str, str]]:
    """Each LayerNorm and the Linear it feeds: ``norm1 -> attn.qkv``, ``norm2 -> mlp.fc1`` in
    every block, and the final LayerNorm -> ``head`` (see the module docstring)."""
    pairs = [pair for i in range(len(model.blocks)) for pair in block_pairs(f"blocks.{i}")]
    final = _final_norm(model)
    return pairs if final is None else [*pairs, (final, "head")]


FAMILY = register_family(
    "timm_vit",
    (VisionTransformer,),
    {
        "seed": seed_placement((Attention, Mlp), "head", OPERAND_POINTS),
        "full": fqvit_full_placement(("qkv", "fc1", "head"), _quantizes_image),
        "matmul": matmul_placement((Attention,)),
    },
    image_convs=patch_embed_conv,
    norm_linear_pairs=norm_linear_pairs,
    gelu_linears=gelu_linears,
    blocks=stem_blocks_head(),
)
FAMILY.quant_module(Mlp)(QuantTimmMlp)
FAMILY.quant_module(PatchEmbed)(QuantTimmPatchEmbed)


@FAMILY.quant_module(Attention)
class QuantTimmAttention(AttentionPoints, Attention):
    """timm's ``Attention`` with FQ-ViT's five points and the three operand points.

    ``qkv_output``, ``logits`` (``(q @ k^T) * scale``), ``softmax_output``, ``context``
    (``attn @ v``), ``proj_output``; ``query``, ``key`` and ``value`` are the operands of the
    two products (per head, after ``q_norm``/``k_norm``, before the logits' scale).
    """

    def setup_quant(self, points: PointFactory) -> None:
        """Create the five quant points, and ``query``, ``key``, ``value`` (the operands)."""
        if self.gate is not None:
            raise ConfigError(f"{points.module_name}: gated attention is not supported by the timm_vit plugin")
        super().setup_quant(points)

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        if module_mode(self) is QuantMode.FLOAT:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("quantized timm attention takes no attention mask")
        B, N, _ = x.shape
        qkv = maybe_quant(self.qkv_output, self.qkv(x))
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = quantize_operands(self, q, k, v)
        attn = maybe_quant(self.logits, (q @ k.transpose(-2, -1)).mul_(self.scale))
        attn = self.attn_drop(self.attention_probs(attn))
        x = maybe_quant(self.context, (attn @ v).transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(maybe_quant(self.proj_output, self.proj(self.norm(x))))


@FAMILY.quant_module(Block)
class QuantTimmBlock(ResidualPoints, Block):
    """timm's ViT ``Block`` with the residual stream quantized after each sum (FQ-ViT's
    ``qact2`` / ``qact4``): ``attn_residual`` and ``mlp_residual``, the next LayerNorms' inputs."""

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        attn = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        x = maybe_quant(self.attn_residual, x + self.drop_path1(self.ls1(attn)))
        return maybe_quant(self.mlp_residual, x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))))


@FAMILY.quant_module(VisionTransformer)
class QuantVisionTransformer(LogitsPoint, VisionTransformer):
    """timm's ``VisionTransformer`` with FQ-ViT's model-level points: ``tokens`` (class token
    and patch tokens), ``pos_embed_output`` (the position embedding), ``embed_output`` (their
    sum, the first LayerNorm's input) and ``head_output`` (the logits)."""

    def setup_quant(self, points: PointFactory) -> None:
        """Create the model-level points; refuse ViT variants FQ-ViT's layout does not cover."""
        unsupported = [
            what
            for what, present in (
                ("register tokens", self.reg_token is not None),
                ("no class token", self.cls_token is None),
                ("no_embed_class", self.no_embed_class),
                ("dynamic_img_size", self.dynamic_img_size),
                ("no position embedding", self.pos_embed is None),
            )
            if present
        ]
        if unsupported:
            raise ConfigError(f"the timm_vit plugin does not quantize ViTs with {', '.join(unsupported)}")
        dim = self.embed_dim
        self.tokens = points.act("tokens")
        self.pos_embed_output = points.act("pos_embed_output")
        self.embed_output = points.norm("embed_output", dim)
        self.head_output = points.act("head_output", inplace=True)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if module_mode(self) is QuantMode.FLOAT:
            return super()._pos_embed(x)
        x = maybe_quant(self.tokens, torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1))
        x = x + maybe_quant(self.pos_embed_output, self.pos_embed)
        return self.pos_drop(maybe_quant(self.embed_output, x))
