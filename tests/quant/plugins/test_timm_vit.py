"""lit_ptq/quant/plugins/timm_vit.py on small timm ViTs (DeiT-Ti-like and ViT-Ti-like, 32x32
input, patch 16, depth 2, width 32): where ``full`` (FQ-ViT's ViT/DeiT points) and ``seed``
put their quant points, PTF and LIS, FLOAT-mode equality with timm, calibration and a
state-dict round trip; the ``matmul`` placement, its LayerNorm -> Linear pairs (the fold keeps
the float logits) and blocks (each called once, in forward order), and the ``repq`` and
``repq_gptq`` recipes on a model with outlier LayerNorm channels.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
import torch.nn as nn

from lit_ptq.errors import ConfigError
from lit_ptq.models import create_model
from lit_ptq.quant import (
    LogSoftmaxQuantizer,
    QuantConfig,
    QuantMode,
    TensorQuantizer,
    WeightQuantizer,
    calibrate,
    quantize_,
    quantizers,
    set_quant_mode,
)
from lit_ptq.quant.plugins.timm_vit import FAMILY, QuantTimmAttention, QuantTimmBlock, QuantVisionTransformer

SMALL = dict(img_size=32, depth=2, embed_dim=32, num_heads=2, num_classes=10)
DEPTH = SMALL["depth"]
DEIT, VIT = "deit_tiny_patch16_224", "vit_tiny_patch16_224"
BLOCKS = [f"blocks.{i}" for i in range(DEPTH)]
MODEL_POINTS = {"patch_embed.output", "tokens", "pos_embed_output", "embed_output", "head.input_quantizer", "head_output"}
IMAGE_POINT = "patch_embed.proj.input_quantizer"  # FQ-ViT quantizes the image of DeiT only
BLOCK_POINTS = (
    "attn.qkv.input_quantizer",
    "attn.qkv_output",
    "attn.logits",
    "attn.softmax_output",
    "attn.context",
    "attn.proj_output",
    "attn_residual",
    "mlp.fc1.input_quantizer",
    "mlp.act_output",
    "mlp.fc2_output",
    "mlp_residual",
)
SEED_BLOCK_POINTS = ("attn.qkv_output", "attn.logits", "attn.softmax_output", "attn.context", "attn.proj_output")
SEED_BLOCK_POINTS += ("mlp.act_output", "mlp.fc2_output")
BLOCK_WEIGHTS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
NORM_ROLE = {"embed_output"} | {f"{b}.{p}" for b in BLOCKS for p in ("attn_residual", "mlp_residual")}


def _full_activation_points(name: str) -> set[str]:
    names = MODEL_POINTS | ({IMAGE_POINT} if name == DEIT else set())
    return names | {f"{b}.{p}" for b in BLOCKS for p in BLOCK_POINTS}


def _full_points(name: str) -> set[str]:
    weights = {f"{b}.{w}.weight_quantizer" for b in BLOCKS for w in BLOCK_WEIGHTS}
    return _full_activation_points(name) | weights | {"patch_embed.proj.weight_quantizer", "head.weight_quantizer"}


SEED_POINTS = {f"{b}.{p}" for b in BLOCKS for p in SEED_BLOCK_POINTS} | {
    f"{b}.{w}.weight_quantizer" for b in BLOCKS for w in BLOCK_WEIGHTS
}


def _points(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (TensorQuantizer, LogSoftmaxQuantizer))}


@pytest.fixture(scope="module")
def floats(trained_like: Callable[[nn.Module], nn.Module]) -> dict[str, nn.Module]:
    """The small DeiT and ViT with seeded weights, in eval mode; never modified."""
    return {name: trained_like(create_model(name, **SMALL)).eval() for name in (DEIT, VIT)}


@pytest.fixture
def make_quantized(floats: dict[str, nn.Module], calib_batches: list[torch.Tensor]) -> Callable[..., nn.Module]:
    """``make_quantized(name, calibrated=True, **config_fields)``: a fresh small model, quantized (and calibrated)."""

    def make(name: str, calibrated: bool = True, **fields: object) -> nn.Module:
        model = quantize_(copy.deepcopy(floats[name]), QuantConfig(**fields))
        if calibrated:
            calibrate(model, calib_batches)
        return model

    return make


# --- placement ------------------------------------------------------------------------------


def test_expected_name_lists_have_the_sizes_worked_out_by_hand() -> None:
    # FQ-ViT: 7 model-level points for DeiT (6 for ViT: no image point) and 11 per block (DeiT-T: 7 + 11*12 = 139).
    assert len(_full_activation_points(DEIT)) == 7 + 11 * DEPTH == 29
    assert len(_full_activation_points(VIT)) == 6 + 11 * DEPTH == 28
    assert len(_full_points(DEIT)) - len(_full_activation_points(DEIT)) == 2 + 4 * DEPTH
    assert len(SEED_POINTS) == 11 * DEPTH


@pytest.mark.parametrize("name", [DEIT, VIT])
@pytest.mark.parametrize("placement", ["seed", "full"])
def test_placement_creates_exactly_these_quant_points(name, placement, make_quantized) -> None:
    model = make_quantized(name, calibrated=False, placement=placement)
    assert set(_points(model)) == (_full_points(name) if placement == "full" else SEED_POINTS)


def test_quantized_classes_are_swapped_in(make_quantized) -> None:
    model = make_quantized(DEIT, calibrated=False, placement="full")
    assert type(model) is QuantVisionTransformer
    assert all(type(b) is QuantTimmBlock and type(b.attn) is QuantTimmAttention for b in model.blocks)


@pytest.mark.parametrize("placement", ["seed", "full"])
def test_quant_point_kinds_and_roles(placement, make_quantized) -> None:
    model = make_quantized(DEIT, calibrated=False, placement=placement)
    for name, point in _points(model).items():
        if name.endswith("weight_quantizer"):
            assert type(point) is WeightQuantizer and point.role == "weight"
        elif name.endswith("softmax_output"):
            assert point.role == "attn"
        elif name == IMAGE_POINT:
            assert point.role == "image"
        else:
            assert point.role == ("norm" if name in NORM_ROLE else "image" if name == IMAGE_POINT else "act"), name


@pytest.mark.parametrize("name", [DEIT, VIT])
def test_ptf_makes_exactly_the_layernorm_inputs_per_channel(name, make_quantized) -> None:
    model = make_quantized(name, calibrated=False, placement="full", ptf=True)
    acts = _full_activation_points(name)
    per_channel = {n: tuple(q.scale.shape) for n, q in quantizers(model) if n in acts and q.scale.numel() > 1}
    assert per_channel == {n: (32,) for n in NORM_ROLE}  # DeiT-T: 1 + 2*12 = 25


@pytest.mark.parametrize("placement", ["seed", "full"])
def test_lis_softmax_is_stateless(placement, make_quantized) -> None:
    model = make_quantized(DEIT, calibrated=False, placement=placement, bits="8/8/4", lis=True)
    state = model.state_dict()
    for b in BLOCKS:
        lis = model.get_submodule(f"{b}.attn.softmax_output")
        assert type(lis) is LogSoftmaxQuantizer and lis.bits == 4 and list(lis.buffers()) == []
        assert not any(k.startswith(f"{b}.attn.softmax_output.") for k in state)
    expected = _full_points(DEIT) if placement == "full" else SEED_POINTS
    assert {n for n, _ in quantizers(model)} == expected - {f"{b}.attn.softmax_output" for b in BLOCKS}


def test_lis_without_its_logits_point_is_refused(make_quantized) -> None:
    with pytest.raises(ConfigError, match="log-int-softmax"):
        make_quantized(DEIT, calibrated=False, placement="full", bits="8/8/4", lis=True, overrides={"*.logits": None})


@pytest.mark.parametrize("variant", [dict(reg_tokens=2), dict(class_token=False, global_pool="avg")])
def test_unsupported_variants_are_refused(variant) -> None:
    model = create_model(DEIT, **SMALL, **variant)
    with pytest.raises(ConfigError, match="timm_vit plugin does not quantize"):
        quantize_(model, QuantConfig(placement="full"))


# --- FLOAT mode -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [DEIT, VIT])
@pytest.mark.parametrize(("placement", "lis"), [("seed", False), ("full", False), ("full", True)])
def test_float_mode_computes_what_timm_computes(name, placement, lis, make_quantized, floats, eval_images) -> None:
    model = make_quantized(name, calibrated=False, placement=placement, lis=lis, bits="8/8/4" if lis else "8/8/8")
    with torch.no_grad():
        assert torch.equal(model(eval_images), floats[name](eval_images))


def test_float_mode_after_calibration_is_timm_again(make_quantized, floats, eval_images) -> None:
    model = set_quant_mode(make_quantized(DEIT, placement="full"), QuantMode.FLOAT)
    with torch.no_grad():
        assert torch.equal(model(eval_images), floats[DEIT](eval_images))


# --- calibration ----------------------------------------------------------------------------

COMBINATIONS = [
    ("minmax", "full", False, False),
    ("ema", "full", False, False),
    ("percentile", "full", False, False),
    ("omse", "full", False, False),
    ("minmax", "full", True, True),
    ("minmax", "seed", False, False),
    ("minmax", "seed", False, True),
]


@pytest.mark.parametrize(("method", "placement", "ptf", "lis"), COMBINATIONS)
def test_calibrated_model_quantizes_and_stays_finite(method, placement, ptf, lis, make_quantized, floats, eval_images) -> None:
    model = make_quantized(DEIT, method=method, placement=placement, ptf=ptf, lis=lis, bits="8/8/4" if lis else "8/8/8")
    assert all(q.ready for _, q in quantizers(model))
    with torch.no_grad():
        out = model(eval_images)
    assert out.shape == (len(eval_images), 10) and torch.isfinite(out).all()
    assert not torch.equal(out, floats[DEIT](eval_images))


def test_pos_embed_point_sees_the_parameter_itself(make_quantized) -> None:
    model = make_quantized(DEIT, placement="full")
    pos = model.pos_embed.detach()
    assert torch.equal(model.pos_embed_output.scale.reshape(()), (pos.max() - pos.min()) / 255)


def test_state_dict_round_trip(make_quantized, eval_images) -> None:
    calibrated = make_quantized(DEIT, placement="full", ptf=True, lis=True, bits="8/8/4")
    fresh = make_quantized(DEIT, calibrated=False, placement="full", ptf=True, lis=True, bits="8/8/4")
    fresh.load_state_dict(calibrated.state_dict())
    set_quant_mode(fresh, QuantMode.QUANTIZE)
    with torch.no_grad():
        assert torch.equal(fresh(eval_images), calibrated(eval_images))


# --- matmul placement and the low-bit recipes -------------------------------------------------

MATMUL_BLOCK_POINTS = ("attn.query", "attn.key", "attn.softmax_output", "attn.value")
MATMUL_POINTS = {f"{b}.{p}" for b in BLOCKS for p in MATMUL_BLOCK_POINTS} | {
    f"{layer}.{q}"
    for layer in ("patch_embed.proj", "head", *(f"{b}.{w}" for b in BLOCKS for w in BLOCK_WEIGHTS))
    for q in ("input_quantizer", "weight_quantizer")
}
PAIRS = [(f"{b}.{n}", f"{b}.{l}") for b in BLOCKS for n, l in (("norm1", "attn.qkv"), ("norm2", "mlp.fc1"))]
UNITS = ["patch_embed", *BLOCKS, "head"]
FQVIT_OUTPUT_POINTS = (MODEL_POINTS - {"head.input_quantizer"}) | {
    f"{b}.{p}" for b in BLOCKS for p in BLOCK_POINTS if not p.endswith("input_quantizer") and p != "attn.softmax_output"
}
"""FQ-ViT's points on the outputs of layers and sums, which ``matmul`` leaves float."""
RECIPE_BOUND = 0.3
"""Largest relative error of the 8/8/8 recipe logits (measured: 0.20 for repq, 0.20 for repq_gptq)."""



def test_matmul_name_list_has_the_size_worked_out_by_hand() -> None:
    # 4 operands and 4 Linears (input + weight) per block, the patch embedding and the head (DeiT-T: 4 + 12*12 = 148)
    assert len(MATMUL_POINTS) == 4 + 12 * DEPTH == 28


@pytest.mark.parametrize("name", [DEIT, VIT])
def test_matmul_placement_creates_exactly_these_quant_points(name, make_quantized) -> None:
    model = make_quantized(name, calibrated=False, placement="matmul")
    assert set(_points(model)) == MATMUL_POINTS
    assert not set(_points(model)) & FQVIT_OUTPUT_POINTS


def test_matmul_point_roles(make_quantized) -> None:
    model = make_quantized(DEIT, calibrated=False, placement="matmul", bits="4/4/4")
    for name, point in _points(model).items():
        expected = "weight" if name.endswith("weight_quantizer") else "attn" if name.endswith("softmax_output") else "act"
        assert point.role == ("image" if name == IMAGE_POINT else expected), name
    assert model.patch_embed.proj.input_quantizer.spec.bits == 8  # the image keeps 8 bits, as in RepQ-ViT


def test_norm_linear_pairs_and_blocks(floats) -> None:
    assert FAMILY.norm_linear_pairs(floats[DEIT]) == [*PAIRS, ("norm", "head")]
    assert FAMILY.blocks(floats[DEIT]) == UNITS
    avg = create_model(VIT, **SMALL, global_pool="avg")  # the final LayerNorm after the token mean
    assert FAMILY.norm_linear_pairs(avg) == [*PAIRS, ("fc_norm", "head")]


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_reparameterization_keeps_the_float_logits(pool, floats, trained_like, check_fold_keeps_float, calib_batches, eval_images) -> None:
    original = floats[DEIT] if pool == "token" else trained_like(create_model(DEIT, **SMALL, global_pool=pool)).eval()
    check_fold_keeps_float(original, calib_batches, eval_images)


def test_blocks_are_each_called_once_in_forward_order(make_quantized, eval_images, call_order) -> None:
    model = make_quantized(DEIT, placement="matmul")
    assert call_order(model, FAMILY.blocks(model), eval_images) == UNITS


@pytest.mark.parametrize("recipe", ["repq", "repq_gptq"])
def test_recipe_brings_the_outlier_model_close_to_float(recipe, floats, recipe_errors, calib_batches, eval_images) -> None:
    error, plain_error = recipe_errors(floats[DEIT], recipe, calib_batches, eval_images)
    assert 0 < error < RECIPE_BOUND < plain_error / 2  # one scale per tensor fails on the outliers
