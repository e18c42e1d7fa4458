"""lit_ptq/quant/plugins/timm_swin.py on a small timm Swin: where ``full`` (FQ-ViT's Swin
points) and ``seed`` put their quant points, PTF and LIS, FLOAT-mode equality with timm,
calibration and a state-dict round trip.

The small Swin (32x32 input, patch 4, window 4, depths (2, 2), embed_dim 16) has an 8x8 grid
in stage 0 (four windows; ``layers.0.blocks.1`` is shifted and masked) and a 4x4 grid in
stage 1, which starts with a PatchMerging (``layers.1.downsample``) and has no shift.
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformer

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
from lit_ptq.quant.plugins.timm_swin import (
    QuantPatchMerging,
    QuantSwinTransformer,
    QuantSwinTransformerBlock,
    QuantWindowAttention,
)

SMALL = dict(img_size=32, depths=(2, 2), num_heads=(1, 2), embed_dim=16, window_size=4, num_classes=10)
DEPTHS = SMALL["depths"]
BLOCKS = [f"layers.{i}.blocks.{j}" for i, depth in enumerate(DEPTHS) for j in range(depth)]
MERGES = [f"layers.{i}.downsample" for i in range(1, len(DEPTHS))]
DIMS = {f"layers.{i}": 16 * 2**i for i in range(len(DEPTHS))}

MODEL_POINTS = {
    "patch_embed.proj.input_quantizer",
    "patch_embed.proj_output",
    "patch_embed.output",
    "norm_output",
    "head.fc.input_quantizer",
    "head_output",
}
ATTENTION_POINTS = ("qkv_output", "logits", "bias_table", "biased_logits", "softmax_output", "context", "proj_output")
SEED_ATTENTION_POINTS = ("qkv_output", "logits", "softmax_output", "context", "proj_output")
NORM_ROLE = {f"{b}.{p}" for b in BLOCKS for p in ("attn_residual", "mlp_residual")} | {
    f"{m}.reduction_output" for m in MERGES
}


def _full_activation_points() -> set[str]:
    names = set(MODEL_POINTS)
    for b in BLOCKS:
        names |= {f"{b}.attn.{p}" for p in ATTENTION_POINTS}
        names |= {f"{b}.attn.qkv.input_quantizer", f"{b}.mlp.fc1.input_quantizer"}
        names |= {f"{b}.mlp.act_output", f"{b}.mlp.fc2_output", f"{b}.attn_residual", f"{b}.mlp_residual"}
    for m in MERGES:
        names |= {f"{m}.reduction.input_quantizer", f"{m}.reduction_output"}
    return names


def _weights(head: bool) -> set[str]:
    names = {f"{b}.{layer}.weight_quantizer" for b in BLOCKS for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    names |= {f"{m}.reduction.weight_quantizer" for m in MERGES}
    return names | ({"patch_embed.proj.weight_quantizer", "head.fc.weight_quantizer"} if head else set())


def _seed_points() -> set[str]:
    names = _weights(head=False)
    for b in BLOCKS:
        names |= {f"{b}.attn.{p}" for p in SEED_ATTENTION_POINTS} | {f"{b}.mlp.act_output", f"{b}.mlp.fc2_output"}
    return names | {f"{m}.reduction_output" for m in MERGES}


FULL_ACTS = _full_activation_points()
FULL_POINTS = FULL_ACTS | _weights(head=True)
SEED_POINTS = _seed_points()


def _points(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (TensorQuantizer, LogSoftmaxQuantizer))}


@pytest.fixture(scope="module")
def swin_float(trained_like: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """The small Swin with trained-like seeded weights (as ``tiny_float``), in eval mode; never modified."""
    return trained_like(create_model("swin_tiny_patch4_window7_224", **SMALL).eval())


@pytest.fixture
def swin(swin_float: nn.Module) -> nn.Module:
    """A fresh copy of the seeded small Swin."""
    return copy.deepcopy(swin_float)


@pytest.fixture
def make_quantized(swin_float: nn.Module, calib_batches: list[torch.Tensor]) -> Callable[..., nn.Module]:
    """``make_quantized(calibrated=True, **config_fields)``: a fresh small Swin, quantized (and calibrated)."""

    def make(calibrated: bool = True, **fields: object) -> nn.Module:
        model = quantize_(copy.deepcopy(swin_float), QuantConfig(**fields))
        if calibrated:
            calibrate(model, calib_batches)
        return model

    return make


# --- placement ------------------------------------------------------------------------------


def test_the_small_model_has_the_layout_the_tests_assume(swin_float) -> None:
    assert isinstance(swin_float, SwinTransformer)
    blocks = [b for layer in swin_float.layers for b in layer.blocks]
    assert [b.shift_size for b in blocks] == [(0, 0), (2, 2), (0, 0), (0, 0)]
    assert [b.attn_mask is not None for b in blocks] == [False, True, False, False]
    assert isinstance(swin_float.layers[0].downsample, nn.Identity)


def test_expected_name_lists_have_the_sizes_worked_out_by_hand() -> None:
    # FQ-ViT's Swin: 6 model-level points, 13 per block, 2 per PatchMerging (Swin-T: 6 + 13*12 + 2*3 = 168).
    assert len(FULL_ACTS) == 6 + 13 * sum(DEPTHS) + 2 * (len(DEPTHS) - 1) == 60
    assert len(_weights(head=True)) == 2 + 4 * sum(DEPTHS) + len(MERGES) == 19
    assert len(SEED_POINTS) == 4 * 4 + 1 + 7 * 4 + 1 == 46


@pytest.mark.parametrize(("placement", "expected"), [("seed", SEED_POINTS), ("full", FULL_POINTS)])
def test_placement_creates_exactly_these_quant_points(placement, expected, swin) -> None:
    model = quantize_(swin, QuantConfig(placement=placement))
    assert set(_points(model)) == expected


def test_quantized_classes_are_swapped_in(swin) -> None:
    model = quantize_(swin, QuantConfig(placement="full"))
    assert type(model) is QuantSwinTransformer
    assert all(type(b) is QuantSwinTransformerBlock for layer in model.layers for b in layer.blocks)
    assert all(type(b.attn) is QuantWindowAttention for layer in model.layers for b in layer.blocks)
    assert type(model.layers[1].downsample) is QuantPatchMerging


@pytest.mark.parametrize("placement", ["seed", "full"])
def test_quant_point_kinds_and_roles(placement, swin) -> None:
    model = quantize_(swin, QuantConfig(placement=placement))
    for name, point in _points(model).items():
        if name.endswith("weight_quantizer"):
            assert type(point) is WeightQuantizer and point.role == "weight"
        elif name.endswith("softmax_output"):
            assert point.role == "attn"
        else:
            assert point.role == ("norm" if name in NORM_ROLE else "image" if name == "patch_embed.proj.input_quantizer" else "act"), name
            assert point.scale.shape == (1,) or point.scale.numel() == 1


def test_ptf_makes_exactly_the_layernorm_inputs_per_channel(swin) -> None:
    model = quantize_(swin, QuantConfig(placement="full", ptf=True))
    per_channel = {n: tuple(q.scale.shape) for n, q in quantizers(model) if n in FULL_ACTS and q.scale.numel() > 1}
    expected = {f"{b}.{p}": (DIMS[b.rsplit(".", 2)[0]],) for b in BLOCKS for p in ("attn_residual", "mlp_residual")}
    expected |= {f"{m}.reduction_output": (DIMS[m.rsplit(".", 1)[0]],) for m in MERGES}
    assert per_channel == expected  # the patch embedding's points stay per tensor
    # per tensor: 6 model-level, 11 per block, 1 per PatchMerging (Swin-T: 141; 129 once LIS drops the 12 softmaxes)
    assert len(FULL_ACTS) - len(per_channel) == 6 + 11 * sum(DEPTHS) + len(MERGES)


@pytest.mark.parametrize("placement", ["seed", "full"])
def test_lis_softmax_is_stateless_and_reads_the_biased_logits_scale(placement, swin) -> None:
    model = quantize_(swin, QuantConfig(placement=placement, bits="8/8/4", lis=True))
    state = model.state_dict()
    for b in BLOCKS:
        attn = model.get_submodule(f"{b}.attn")
        assert type(attn.softmax_output) is LogSoftmaxQuantizer and attn.softmax_output.bits == 4
        assert list(attn.softmax_output.buffers()) == []
        assert not any(k.startswith(f"{b}.attn.softmax_output.") for k in state)
        # FQ-ViT's Swin feeds its log-int-softmax the scale of the point after the position bias.
        assert attn.softmax_source() is (attn.biased_logits if placement == "full" else attn.logits)
    expected = FULL_POINTS if placement == "full" else SEED_POINTS
    assert {n for n, _ in quantizers(model)} == expected - {f"{b}.attn.softmax_output" for b in BLOCKS}


def test_lis_without_its_logits_points_is_refused(swin) -> None:
    overrides = {"*.attn.logits": None, "*.attn.biased_logits": None}
    with pytest.raises(ConfigError, match="log-int-softmax"):
        quantize_(swin, QuantConfig(placement="full", bits="8/8/4", lis=True, overrides=overrides))


def test_other_pooling_is_refused() -> None:
    model = create_model("swin_tiny_patch4_window7_224", **SMALL, global_pool="max")
    with pytest.raises(ConfigError, match="average pooling"):
        quantize_(model, QuantConfig(placement="full"))


# --- FLOAT mode -----------------------------------------------------------------------------


@pytest.mark.parametrize(("placement", "lis"), [("seed", False), ("full", False), ("full", True)])
def test_float_mode_computes_what_timm_computes(placement, lis, swin, swin_float, eval_images) -> None:
    model = quantize_(swin, QuantConfig(placement=placement, lis=lis, bits="8/8/4" if lis else "8/8/8"))
    with torch.no_grad():
        assert torch.equal(model(eval_images), swin_float(eval_images))


def test_float_mode_after_calibration_is_timm_again(make_quantized, swin_float, eval_images) -> None:
    model = set_quant_mode(make_quantized(placement="full"), QuantMode.FLOAT)
    with torch.no_grad():
        assert torch.equal(model(eval_images), swin_float(eval_images))


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
def test_calibrated_model_quantizes_and_stays_finite(method, placement, ptf, lis, make_quantized, swin_float, eval_images) -> None:
    model = make_quantized(method=method, placement=placement, ptf=ptf, lis=lis, bits="8/8/4" if lis else "8/8/8")
    assert all(q.ready for _, q in quantizers(model))
    with torch.no_grad():
        out, ref = model(eval_images), swin_float(eval_images)
    assert out.shape == (len(eval_images), 10) and torch.isfinite(out).all()
    assert not torch.equal(out, ref)


def test_bias_table_point_sees_the_parameter_itself(make_quantized) -> None:
    model = make_quantized(placement="full")
    attn = model.layers[0].blocks[1].attn
    table = attn.relative_position_bias_table.detach()
    q = attn.bias_table
    expected = (table.max() - table.min()) / 255
    assert torch.equal(q.scale.reshape(()), expected.clamp(min=torch.finfo(torch.float32).eps))


def test_state_dict_round_trip(make_quantized, eval_images) -> None:
    calibrated = make_quantized(placement="full", ptf=True, lis=True, bits="8/8/4")
    fresh = make_quantized(calibrated=False, placement="full", ptf=True, lis=True, bits="8/8/4")
    fresh.load_state_dict(calibrated.state_dict())
    set_quant_mode(fresh, QuantMode.QUANTIZE)
    with torch.no_grad():
        assert torch.equal(fresh(eval_images), calibrated(eval_images))
