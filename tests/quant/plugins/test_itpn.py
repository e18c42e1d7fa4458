"""lit_ptq/quant/plugins/itpn.py's ``matmul`` placement and the facts the low-bit recipes read,
on the seeded ``itpn_tiny`` (32x32 input; ``tests/quant/test_quantize.py`` covers ``seed`` and
``full``): the quant points by name, the LayerNorm -> Linear pairs and the blocks.
``test_contract.py`` runs what every family keeps (FLOAT mode, calibration, state dicts, the
fold, the blocks' call order, the recipes, ...).

itpn_tiny (mlp_depth=1, depth=6) has ``blocks.0`` MLP-only, ``blocks.1`` PatchMerge,
``blocks.2`` MLP-only, ``blocks.3`` PatchMerge, ``blocks.4`` to ``blocks.9`` attention blocks.
"""

from __future__ import annotations

import pytest
import torch.nn as nn

from lit_ptq.quant import QuantConfig, quant_points, quantize_
from lit_ptq.quant.plugins.itpn import FAMILY

MLP_ONLY = [0, 2]
MERGES = [1, 3]
ATTENTION = [4, 5, 6, 7, 8, 9]


def _matmul_points() -> set[str]:
    layers = ["patch_embed.proj", "head"]
    layers += [f"blocks.{i}.mlp.{fc}" for i in sorted(MLP_ONLY + ATTENTION) for fc in ("fc1", "fc2")]
    layers += [f"blocks.{i}.attn.{fc}" for i in ATTENTION for fc in ("qkv", "proj")]
    layers += [f"blocks.{i}.reduction" for i in MERGES]
    names = {f"{layer}.{q}" for layer in layers for q in ("input_quantizer", "weight_quantizer")}
    return names | {f"blocks.{i}.attn.{p}" for i in ATTENTION for p in ("query", "key", "softmax_output", "value")}


MATMUL_POINTS = _matmul_points()
OUTPUT_POINTS = {f"blocks.{i}.attn.{p}" for i in ATTENTION for p in ("qkv_output", "logits", "context", "proj_output")}
OUTPUT_POINTS |= {f"blocks.{i}.mlp.{p}" for i in MLP_ONLY + ATTENTION for p in ("act_output", "fc2_output")}
OUTPUT_POINTS |= {f"blocks.{i}.reduction_output" for i in MERGES}
"""The seed's (and ``full``'s) points on layer outputs, which ``matmul`` leaves float."""
PAIRS = [
    ("blocks.0.norm2", "blocks.0.mlp.fc1"),
    ("blocks.1.norm", "blocks.1.reduction"),
    ("blocks.2.norm2", "blocks.2.mlp.fc1"),
    ("blocks.3.norm", "blocks.3.reduction"),
    *((f"blocks.{i}.{n}", f"blocks.{i}.{l}") for i in ATTENTION for n, l in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1"))),
    ("fc_norm", "head"),
]
UNITS = ["patch_embed", *(f"blocks.{i}" for i in range(10)), "head"]


def _points(model: nn.Module) -> set[str]:
    return {n for n, _ in quant_points(model)}


def test_matmul_name_list_has_the_size_worked_out_by_hand() -> None:
    # patch embedding and head 2 x 2, 8 MLPs x 4, 6 attentions x (4 operands + 2 x 2), 2 merges x 2
    assert len(MATMUL_POINTS) == 4 + 8 * 4 + 6 * 8 + 2 * 2 == 88


def test_matmul_placement_creates_exactly_these_quant_points(tiny_model) -> None:
    model = quantize_(tiny_model, QuantConfig(placement="matmul"))
    assert _points(model) == MATMUL_POINTS
    assert not _points(model) & OUTPUT_POINTS
    assert all(m.input_quantizer is None for m in model.modules() if isinstance(m, nn.LayerNorm))


@pytest.mark.parametrize("placement", ["seed", "full"])
def test_operand_points_are_matmul_only(placement, tiny_model) -> None:
    model = quantize_(tiny_model, QuantConfig(placement=placement))
    assert all(getattr(model.blocks[i].attn, p) is None for i in ATTENTION for p in ("query", "key", "value"))


def test_norm_linear_pairs_and_blocks(tiny_float) -> None:
    assert FAMILY.norm_linear_pairs(tiny_float) == PAIRS
    assert FAMILY.blocks(tiny_float) == UNITS
