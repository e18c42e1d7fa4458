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
from ..layers import (
    OPERAND_POINTS,
    check_softmax_source,
    matmul_placement,
    maybe_quant,
    module_mode,
    quantize_operands,
    quantized_softmax,
    setup_operands,
)
from ..quantizer import QuantMode
from ..registry import PointFactory, Site, register_family

__all__ = ["FAMILY", "QuantAttention", "QuantMlp", "QuantPatchMerge"]

_OWN_POINTS = (Attention, Mlp, PatchMerge)
_INPUT_QUANTIZED_LINEARS = ("qkv", "fc1", "reduction", "head")


def seed_placement(site: Site) -> bool:
    """PTQ-for-iTPN's points: block outputs, and every Linear weight except the head's."""
    if isinstance(site.module, _OWN_POINTS):
        return site.point not in OPERAND_POINTS
    return site.role == "weight" and isinstance(site.module, nn.Linear) and site.module_name != "head"


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
            pairs.append((f"blocks.{i}.norm", f"blocks.{i}.reduction"))
            continue
        if blk.attn is not None:
            pairs.append((f"blocks.{i}.norm1", f"blocks.{i}.attn.qkv"))
        pairs.append((f"blocks.{i}.norm2", f"blocks.{i}.mlp.fc1"))
    if isinstance(model.head, nn.Linear):
        pairs.append(("fc_norm", "head"))
    return pairs


def blocks(model: iTPN) -> list[str]:
    """The patch embedding, every block and PatchMerge in order, then the head."""
    return ["patch_embed", *(f"blocks.{i}" for i in range(len(model.blocks))), "head"]


FAMILY = register_family(
    "itpn",
    (iTPN,),
    {"seed": seed_placement, "full": full_placement, "matmul": matmul_placement((Attention,))},
    image_convs=lambda model: ["patch_embed.proj"],
    norm_linear_pairs=norm_linear_pairs,
    blocks=blocks,
)


@FAMILY.quant_module(Attention)
class QuantAttention(Attention):
    """Attention with the seed's five quant points and the three operand points.

    ``qkv_output`` (q, k and v), ``logits`` (``(q @ k^T) * scale`` before the position bias),
    ``softmax_output`` (uniform, or log2 under LIS), ``context`` (``attn @ v``) and
    ``proj_output``; ``query``, ``key`` and ``value`` are the operands of the two products
    (per head, before the logits' scale). Outside ``FLOAT`` mode the logits are computed as the seed does,
    ``(q @ k^T) * scale``; in ``FLOAT`` mode as the official model, ``(q * scale) @ k^T``.
    """

    def setup_quant(self, points: PointFactory) -> None:
        """Create the five quant points, and ``query``, ``key``, ``value`` (the operands)."""
        self.qkv_output = points.act("qkv_output", inplace=True)
        setup_operands(self, points)
        self.logits = points.act("logits", inplace=True)
        self.softmax_output = points.softmax("softmax_output")
        self.context = points.act("context", inplace=True)
        self.proj_output = points.act("proj_output", inplace=True)
        check_softmax_source(self.softmax_output, self.logits, points.module_name)

    def attention_probs(self, attn: torch.Tensor) -> torch.Tensor:
        """Softmax of the biased logits, through the softmax quant point."""
        return quantized_softmax(self.softmax_output, self.logits, attn)

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
class QuantMlp(Mlp):
    """MLP with the seed's quant points: the GELU output (``act_output``) and ``fc2_output``."""

    def setup_quant(self, points: PointFactory) -> None:
        """Create the two quant points."""
        self.act_output = points.act("act_output", inplace=True)
        self.fc2_output = points.act("fc2_output", inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(maybe_quant(self.act_output, self.act(self.fc1(x))))
        return self.drop2(maybe_quant(self.fc2_output, self.fc2(x)))


@FAMILY.quant_module(PatchMerge)
class QuantPatchMerge(PatchMerge):
    """PatchMerge with the seed's quant point on the output of ``reduction``."""

    def setup_quant(self, points: PointFactory) -> None:
        """Create the output quant point."""
        self.reduction_output = points.act("reduction_output", inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_quant(self.reduction_output, self.reduction(self.norm(self.gather(x))))
