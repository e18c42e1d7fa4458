"""iTPN (Tian et al., "Integrally Pre-Trained Transformer Pyramid Networks", CVPR 2023;
sunsmarterjie/iTPN) as a quantization plugin: quantized Attention, Mlp and PatchMerge, and
the ``seed`` and ``full`` placements (``docs/quantization.md``).

- ``seed`` (PTQ-for-iTPN): the weights of every Linear except ``head``; the outputs of
  ``qkv``, the logits, the softmax, ``attn @ v``, ``proj``, the GELU, ``fc2`` and
  PatchMerge's ``reduction``. Patch embedding, LayerNorms and ``head`` stay float.
- ``full`` (FQ-ViT style): the seed's points plus the weights of ``head`` and the patch
  embedding, the input of every Linear and Conv whose input is not already quantized
  (the image, and the LayerNorm outputs feeding ``qkv``, ``fc1``, ``reduction`` and
  ``head``), and every LayerNorm input.
- ``matmul`` (the benchmark protocol of PTQ4ViT, RepQ-ViT, ERQ, AdaLog): the input and the
  weight of every Linear (``qkv``, ``proj``, ``fc1``, ``fc2`` of the attention and MLP-only
  blocks, PatchMerge's ``reduction``, the ``head``) and of the patch embedding, and the
  operands of both attention products: q and k, the softmax output and v. LayerNorms and
  the residual stream stay float.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ...models.itpn import Attention, Mlp, PatchMerge, iTPN
from ..layers import OPERAND_POINTS, matmul_placement, maybe_quant, module_mode, quantize_operands
from ..quantizer import QuantMode
from ..registry import PointFactory, Site, register_family
from .toolkit import AttentionPoints, MlpPoints, block_pairs, gelu_linears, merge_pair, patch_embed_conv, seed_placement, stem_blocks_head

__all__ = ["FAMILY", "QuantAttention", "QuantMlp", "QuantPatchMerge"]

_INPUT_QUANTIZED_LINEARS = ("qkv", "fc1", "reduction", "head")


def full_placement(site: Site) -> bool:
    """Every point, except the inputs of Linears that read an already quantized tensor."""
    if site.point == "input_quantizer" and isinstance(site.module, nn.Linear):
        return site.leaf in _INPUT_QUANTIZED_LINEARS
    return site.point not in OPERAND_POINTS


def norm_linear_pairs(model: iTPN) -> list[tuple[str, str]]:
    """Each LayerNorm and the Linear it feeds: ``norm1 -> attn.qkv``, ``norm2 -> mlp.fc1``,
    PatchMerge's ``norm -> reduction``, ``fc_norm -> head`` (after the token mean)."""
    pairs = []
    for i, blk in enumerate(model.blocks):
        if isinstance(blk, PatchMerge):
            pairs.append(merge_pair(f"blocks.{i}"))
        else:
            pairs += block_pairs(f"blocks.{i}", qkv=blk.attn is not None)
    if isinstance(model.head, nn.Linear):
        pairs.append(("fc_norm", "head"))
    return pairs


blocks = stem_blocks_head()
"""The patch embedding, every block and PatchMerge in order, then the head."""


FAMILY = register_family(
    "itpn",
    (iTPN,),
    {
        "seed": seed_placement((Attention, Mlp, PatchMerge), "head", OPERAND_POINTS),
        "full": full_placement,
        "matmul": matmul_placement((Attention,)),
    },
    image_convs=patch_embed_conv,
    norm_linear_pairs=norm_linear_pairs,
    gelu_linears=gelu_linears,
    blocks=blocks,
)


@FAMILY.quant_module(Attention)
class QuantAttention(AttentionPoints, Attention):
    """Attention with the seed's five quant points and the three operand points.

    ``qkv_output`` (q, k and v), ``logits`` (``(q @ k^T) * scale`` before the position bias),
    ``softmax_output`` (uniform, or log2 under LIS), ``context`` (``attn @ v``) and
    ``proj_output``; ``query``, ``key`` and ``value`` are the operands of the two products
    (per head, before the logits' scale). Outside ``FLOAT`` mode the logits are computed as the seed does,
    ``(q @ k^T) * scale``; in ``FLOAT`` mode as the official model, ``(q * scale) @ k^T``.
    """

    def forward(self, x: torch.Tensor, rpe_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        N = x.shape[1]
        q, k, v = self.split_heads(maybe_quant(self.qkv_output, self.qkv(x)))
        q, k, v = quantize_operands(self, q, k, v)
        float_mode = module_mode(self) is QuantMode.FLOAT
        if float_mode:
            attn = (q * self.scale) @ k.transpose(-2, -1)
        else:
            attn = (q @ k.transpose(-2, -1)).mul_(self.scale)  # (q @ k^T) * scale, one tensor fewer
        attn = maybe_quant(self.logits, attn)  # an identity in FLOAT mode, still seen by hooks (quant_report)
        bias = self.position_bias(rpe_index, N)
        if bias is not None:
            attn = attn + bias if float_mode else attn.add_(bias)
        attn = self.attn_drop(self.attention_probs(attn))
        x = maybe_quant(self.context, self.merge_heads(attn @ v))
        return self.proj_drop(maybe_quant(self.proj_output, self.proj(x)))


@FAMILY.quant_module(Mlp)
class QuantMlp(MlpPoints, Mlp):
    """MLP with the seed's quant points: the GELU output (``act_output``) and ``fc2_output``."""


@FAMILY.quant_module(PatchMerge)
class QuantPatchMerge(PatchMerge):
    """PatchMerge with the seed's quant point on the output of ``reduction``."""

    def setup_quant(self, points: PointFactory) -> None:
        """Create the output quant point."""
        self.reduction_output = points.act("reduction_output", inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_quant(self.reduction_output, self.reduction(self.norm(self.gather(x))))
