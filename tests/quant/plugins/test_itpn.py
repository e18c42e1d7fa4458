"""lit_ptq/quant/plugins/itpn.py's ``matmul`` placement and what the low-bit recipes need
from it, on the seeded ``itpn_tiny`` (32x32 input; ``tests/quant/test_quantize.py`` covers
``seed`` and ``full``): the quant points by name, the LayerNorm -> Linear pairs and their
fold (the float logits kept), the blocks (each called once, in forward order), and the
``repq`` and ``repq_gptq`` recipes on a model with outlier LayerNorm channels.

itpn_tiny (mlp_depth=1, depth=6) has ``blocks.0`` MLP-only, ``blocks.1`` PatchMerge,
``blocks.2`` MLP-only, ``blocks.3`` PatchMerge, ``blocks.4`` to ``blocks.9`` attention blocks.
"""

from __future__ import annotations

import pytest
import torch.nn as nn

from lit_ptq.quant import LogSoftmaxQuantizer, QuantConfig, TensorQuantizer, quantize_
from lit_ptq.quant.plugins.itpn import FAMILY

MLP_ONLY = [0, 2]
MERGES = [1, 3]
ATTENTION = [4, 5, 6, 7, 8, 9]
IMAGE_POINT = "patch_embed.proj.input_quantizer"


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
RECIPE_BOUND = 0.15
"""Largest relative error of the 8/8/8 recipe logits (measured: 0.06 for repq and repq_gptq)."""


def _points(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (TensorQuantizer, LogSoftmaxQuantizer))}



def test_matmul_name_list_has_the_size_worked_out_by_hand() -> None:
    # patch embedding and head 2 x 2, 8 MLPs x 4, 6 attentions x (4 operands + 2 x 2), 2 merges x 2
    assert len(MATMUL_POINTS) == 4 + 8 * 4 + 6 * 8 + 2 * 2 == 88


def test_matmul_placement_creates_exactly_these_quant_points(tiny_model) -> None:
    model = quantize_(tiny_model, QuantConfig(placement="matmul"))
    assert set(_points(model)) == MATMUL_POINTS
    assert not set(_points(model)) & OUTPUT_POINTS
    assert all(m.input_quantizer is None for m in model.modules() if isinstance(m, nn.LayerNorm))


@pytest.mark.parametrize("placement", ["seed", "full"])
def test_operand_points_are_matmul_only(placement, tiny_model) -> None:
    model = quantize_(tiny_model, QuantConfig(placement=placement))
    assert all(getattr(model.blocks[i].attn, p) is None for i in ATTENTION for p in ("query", "key", "value"))


def test_matmul_point_roles(tiny_model) -> None:
    model = quantize_(tiny_model, QuantConfig(placement="matmul", bits="4/4/4"))
    for name, point in _points(model).items():
        expected = "weight" if name.endswith("weight_quantizer") else "attn" if name.endswith("softmax_output") else "act"
        assert point.role == ("image" if name == IMAGE_POINT else expected), name
    assert model.patch_embed.proj.input_quantizer.spec.bits == 8  # the image keeps 8 bits, as in RepQ-ViT


def test_norm_linear_pairs_and_blocks(tiny_float) -> None:
    assert FAMILY.norm_linear_pairs(tiny_float) == PAIRS
    assert FAMILY.blocks(tiny_float) == UNITS


def test_reparameterization_keeps_the_float_logits(tiny_float, check_fold_keeps_float, calib_batches, eval_images) -> None:
    check_fold_keeps_float(tiny_float, calib_batches, eval_images)


def test_blocks_are_each_called_once_in_forward_order(make_quantized, eval_images, call_order) -> None:
    model = make_quantized(placement="matmul")
    assert call_order(model, FAMILY.blocks(model), eval_images) == UNITS


@pytest.mark.parametrize("recipe", ["repq", "repq_gptq"])
def test_recipe_brings_the_outlier_model_close_to_float(recipe, tiny_float, recipe_errors, calib_batches, eval_images) -> None:
    error, plain_error = recipe_errors(tiny_float, recipe, calib_batches, eval_images)
    assert 0 < error < RECIPE_BOUND < plain_error / 2  # one scale per tensor fails on the outliers
