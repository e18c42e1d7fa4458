"""lit_ptq/quant/plugins/timm_swin.py on a small timm Swin: the quant points ``full``
(FQ-ViT's Swin points), ``seed`` and ``matmul`` create, by name; which are LayerNorm inputs
(per channel under PTF); the scale the log-int-softmax reads; the heads the plugin refuses;
the LayerNorm -> Linear pairs (none into a block that pads to whole windows) and blocks it
states; for every placement (and on models padded along one axis), the float tensor each quant
point sees, and that the attention adds the bias table its point returns.
``test_contract.py`` runs what every family keeps (FLOAT mode, calibration, state dicts, LIS,
the fold, the recipes, ...).

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
from timm.models.swin_transformer import PatchMerging, SwinTransformer

from lit_ptq.errors import ConfigError
from lit_ptq.models import create_model
from lit_ptq.quant import LogSoftmaxQuantizer, QuantConfig, QuantMode, calibrate, quant_points, quantize_, quantizers, set_quant_mode
from lit_ptq.quant.plugins.timm_swin import (
    FAMILY,
    QuantPatchMerging,
    QuantSwinTransformer,
    QuantSwinTransformerBlock,
    QuantWindowAttention,
)
from lit_ptq.quant.transforms import reparameterize_

SMALL = dict(img_size=32, depths=(2, 2), num_heads=(1, 2), embed_dim=16, window_size=4, num_classes=10)
DEPTHS = SMALL["depths"]
BLOCKS = [f"layers.{i}.blocks.{j}" for i, depth in enumerate(DEPTHS) for j in range(depth)]
MERGES = [f"layers.{i}.downsample" for i in range(1, len(DEPTHS))]
DIMS = {f"layers.{i}": 16 * 2**i for i in range(len(DEPTHS))}

IMAGE_POINT = "patch_embed.proj.input_quantizer"
MODEL_POINTS = {
    IMAGE_POINT,
    "patch_embed.proj_output",
    "patch_embed.output",
    "norm_output",
    "head.fc.input_quantizer",
    "head_output",
}
ATTENTION_POINTS = ("qkv_output", "logits", "bias_table", "biased_logits", "softmax_output", "context", "proj_output")
SEED_ATTENTION_POINTS = ("qkv_output", "logits", "softmax_output", "context", "proj_output")


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


def _points(model: nn.Module) -> set[str]:
    return {n for n, _ in quant_points(model)}


@pytest.fixture(scope="module")
def swin_float(trained_like: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """The small Swin with trained-like seeded weights (as ``tiny_float``), in eval mode; never modified."""
    return trained_like(create_model("swin_tiny_patch4_window7_224", **SMALL).eval())


@pytest.fixture
def swin(swin_float: nn.Module) -> nn.Module:
    """A fresh copy of the seeded small Swin."""
    return copy.deepcopy(swin_float)


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
    assert _points(model) == expected


def test_quantized_classes_are_swapped_in(swin) -> None:
    model = quantize_(swin, QuantConfig(placement="full"))
    assert type(model) is QuantSwinTransformer
    assert all(type(b) is QuantSwinTransformerBlock for layer in model.layers for b in layer.blocks)
    assert all(type(b.attn) is QuantWindowAttention for layer in model.layers for b in layer.blocks)
    assert type(model.layers[1].downsample) is QuantPatchMerging


def test_ptf_makes_exactly_the_layernorm_inputs_per_channel(swin) -> None:
    model = quantize_(swin, QuantConfig(placement="full", ptf=True))
    per_channel = {n: tuple(q.scale.shape) for n, q in quantizers(model) if n in FULL_ACTS and q.scale.numel() > 1}
    expected = {f"{b}.{p}": (DIMS[b.rsplit(".", 2)[0]],) for b in BLOCKS for p in ("attn_residual", "mlp_residual")}
    expected |= {f"{m}.reduction_output": (DIMS[m.rsplit(".", 1)[0]],) for m in MERGES}
    assert per_channel == expected  # the patch embedding's points stay per tensor
    # per tensor: 6 model-level, 11 per block, 1 per PatchMerging (Swin-T: 141; 129 once LIS drops the 12 softmaxes)
    assert len(FULL_ACTS) - len(per_channel) == 6 + 11 * sum(DEPTHS) + len(MERGES)


@pytest.mark.parametrize("placement", ["seed", "full"])
def test_lis_reads_the_biased_logits_scale(placement, swin) -> None:
    model = quantize_(swin, QuantConfig(placement=placement, bits="8/8/4", lis=True))
    for b in BLOCKS:
        attn = model.get_submodule(f"{b}.attn")
        assert type(attn.softmax_output) is LogSoftmaxQuantizer and attn.softmax_output.bits == 4
        # FQ-ViT's Swin feeds its log-int-softmax the scale of the point after the position bias.
        assert attn.softmax_source() is (attn.biased_logits if placement == "full" else attn.logits)


def test_other_pooling_is_refused() -> None:
    model = create_model("swin_tiny_patch4_window7_224", **SMALL, global_pool="max")
    with pytest.raises(ConfigError, match="average pooling"):
        quantize_(model, QuantConfig(placement="full"))


def test_bias_table_point_sees_the_parameter_itself(swin, calib_batches) -> None:
    model = quantize_(swin, QuantConfig(placement="full"))
    calibrate(model, calib_batches)
    attn = model.layers[0].blocks[1].attn
    table = attn.relative_position_bias_table.detach()
    q = attn.bias_table
    expected = (table.max() - table.min()) / 255
    assert torch.equal(q.scale.reshape(()), expected.clamp(min=torch.finfo(torch.float32).eps))


# --- matmul placement, LayerNorm -> Linear pairs and blocks -----------------------------------

LINEARS = [f"{b}.{layer}" for b in BLOCKS for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
LINEARS += [f"{m}.reduction" for m in MERGES]
MATMUL_POINTS = {f"{b}.attn.{p}" for b in BLOCKS for p in ("query", "key", "softmax_output", "value")} | {
    f"{layer}.{q}" for layer in ("patch_embed.proj", *LINEARS, "head.fc") for q in ("input_quantizer", "weight_quantizer")
}
FQVIT_OUTPUT_POINTS = {p for p in FULL_ACTS if not p.endswith("input_quantizer") and not p.endswith("softmax_output")}
"""FQ-ViT's points on the outputs of layers, sums and the bias table, which ``matmul`` leaves float."""
PAIRS = [
    ("layers.0.blocks.0.norm1", "layers.0.blocks.0.attn.qkv"),
    ("layers.0.blocks.0.norm2", "layers.0.blocks.0.mlp.fc1"),
    ("layers.0.blocks.1.norm1", "layers.0.blocks.1.attn.qkv"),
    ("layers.0.blocks.1.norm2", "layers.0.blocks.1.mlp.fc1"),
    ("layers.1.downsample.norm", "layers.1.downsample.reduction"),
    ("layers.1.blocks.0.norm1", "layers.1.blocks.0.attn.qkv"),
    ("layers.1.blocks.0.norm2", "layers.1.blocks.0.mlp.fc1"),
    ("layers.1.blocks.1.norm1", "layers.1.blocks.1.attn.qkv"),
    ("layers.1.blocks.1.norm2", "layers.1.blocks.1.mlp.fc1"),
    ("norm", "head.fc"),
]
UNITS = ["patch_embed", "layers.0.blocks.0", "layers.0.blocks.1", "layers.1.downsample", "layers.1.blocks.0", "layers.1.blocks.1", "head.fc"]


def test_matmul_name_list_has_the_size_worked_out_by_hand() -> None:
    # 4 operands and 4 Linears (input + weight) per block, 2 per PatchMerging, the patch embedding and the head
    # (Swin-T: 4 + 12*12 + 2*3 = 154)
    assert len(MATMUL_POINTS) == 4 + 12 * sum(DEPTHS) + 2 * len(MERGES) == 54


def test_matmul_placement_creates_exactly_these_quant_points(swin) -> None:
    model = quantize_(swin, QuantConfig(placement="matmul"))
    assert _points(model) == MATMUL_POINTS
    assert not _points(model) & FQVIT_OUTPUT_POINTS


def test_norm_linear_pairs_and_blocks(swin_float) -> None:
    assert FAMILY.norm_linear_pairs(swin_float) == PAIRS
    assert FAMILY.blocks(swin_float) == UNITS


def test_blocks_that_pad_to_whole_windows_have_no_norm1_pair(trained_like, calib_batches) -> None:
    # 48x48: a 12x12 grid in stage 0 (three windows a side), 6x6 in stage 1, padded to 8x8.
    float_model = trained_like(create_model("swin_tiny_patch4_window7_224", **{**SMALL, "img_size": 48})).eval()
    pairs = FAMILY.norm_linear_pairs(float_model)
    assert [p for p in PAIRS if p not in pairs] == [PAIRS[5], PAIRS[7]]  # layers.1.blocks.{0,1}.norm1 -> qkv
    images = [torch.nn.functional.interpolate(x, size=48) for x in calib_batches]
    with torch.no_grad():
        ref = float_model(images[0])
        folded = quantize_(copy.deepcopy(float_model), QuantConfig(placement="matmul"))
        reparameterize_(folded, images, pairs, folded.quant_config.act)
        assert torch.allclose(folded(images[0]), ref, atol=1e-4, rtol=0)
        # The left-out pair: the padding tokens reach qkv as zeros, which the folded bias moves.
        reparameterize_(folded, images, [PAIRS[5]], folded.quant_config.act)
        assert not torch.allclose(folded(images[0]), ref, atol=1e-3, rtol=0)
    dynamic = create_model("swin_tiny_patch4_window7_224", **SMALL, strict_img_size=False)
    assert not [p for p in FAMILY.norm_linear_pairs(dynamic) if p[0].endswith("norm1")]


# --- what each quant point sees ---------------------------------------------------------------
# Every point in CALIBRATE mode records and passes its input through, so the quantized model
# computes the float function; each point's input is compared with the tensor it names, taken
# from timm's own float modules with forward hooks (the relative position bias from its
# definition). PAD_H / PAD_W are non-square models whose stage-1 feature map (6x4 / 4x6) is
# padded to whole (4x2 / 2x4) windows along exactly one axis, which the other window shape
# would not pad.

PAD_H = dict(SMALL, img_size=(48, 32), window_size=(4, 2))
PAD_W = dict(SMALL, img_size=(32, 48), window_size=(2, 4))
VARIANTS = [
    ("small", dict(placement="seed")),
    ("small", dict(placement="seed", lis=True, bits="8/8/4")),
    ("small", dict(placement="full")),
    ("small", dict(placement="full", ptf=True, lis=True, bits="8/8/4")),
    ("small", dict(placement="matmul")),
    ("small", dict(placement="matmul", softmax="log2")),
    ("pad_h", dict(placement="full")),
    ("pad_h", dict(placement="matmul")),
    ("pad_w", dict(placement="full", ptf=True, lis=True, bits="8/8/4")),
]
VARIANT_IDS = ["seed", "seed-lis", "full", "full-ptf-lis", "matmul", "matmul-log2"]
VARIANT_IDS += ["pad-h-full", "pad-h-matmul", "pad-w-full-ptf-lis"]


@pytest.fixture(scope="module")
def variant_floats(swin_float, trained_like) -> dict[str, nn.Module]:
    """The small Swin and the two padded non-square ones, seeded, in eval mode; never modified."""
    padded = (("pad_h", PAD_H), ("pad_w", PAD_W))
    return {"small": swin_float, **{k: trained_like(create_model("swin_tiny_patch4_window7_224", **c)).eval() for k, c in padded}}


def _images(model: nn.Module, eval_images: torch.Tensor) -> torch.Tensor:
    """``eval_images`` resized to the model's input size."""
    return torch.nn.functional.interpolate(eval_images, size=model.patch_embed.img_size)


def _relative_position_bias(table: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """``(heads, N, N)``: for tokens i, j of a window, the table row of their offset
    ``(dy, dx) = (y_i - y_j, x_i - x_j)``, rows ordered by ``dy`` then ``dx`` from the most negative."""
    wh, ww = window
    coords = [(y, x) for y in range(wh) for x in range(ww)]
    bias = torch.empty(table.shape[1], len(coords), len(coords))
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            bias[:, i, j] = table[(yi - yj + wh - 1) * (2 * ww - 1) + (xi - xj + ww - 1)]
    return bias


def _expected_inputs(model: nn.Module, images: torch.Tensor, capture_float) -> dict[str, torch.Tensor]:
    """Every point name any placement can create -> the float tensor it names (a uniform or
    log2 softmax point reads the softmax output; ``<attn>.softmax_input``, the logits plus the
    bias and the shift mask, is what a log-int-softmax reads)."""
    cap = capture_float(model, images)
    inp = {n: c[0] for n, c in cap.items()}
    out = {n: c[1] for n, c in cap.items()}
    table = {
        "patch_embed.proj_output": inp["patch_embed.norm"],
        "patch_embed.output": out["patch_embed"],
        "norm_output": out["norm"],
        "head_output": out["head"],
    }
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            table[f"{name}.input_quantizer"] = inp[name]
            table[f"{name}.weight_quantizer"] = module.weight.detach()
        if isinstance(module, PatchMerging):
            table[f"{name}.reduction_output"] = out[name]
    for b in BLOCKS:
        a, attn = f"{b}.attn", model.get_submodule(f"{b}.attn")
        qkv = out[f"{a}.qkv"]
        width = qkv.shape[-1] // 3
        q, k, v = (t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for t in qkv.split(width, dim=-1))
        logits = (q * (width // attn.num_heads) ** -0.5) @ k.transpose(-2, -1)
        bias_table = attn.relative_position_bias_table.detach()
        table |= {
            f"{a}.qkv_output": qkv,
            f"{a}.query": q,
            f"{a}.key": k,
            f"{a}.value": v,
            f"{a}.logits": logits,
            f"{a}.bias_table": bias_table,
            f"{a}.biased_logits": logits + _relative_position_bias(bias_table, model.get_submodule(b).window_size),
            f"{a}.softmax_input": inp[f"{a}.softmax"],
            f"{a}.softmax_output": out[f"{a}.softmax"],
            f"{a}.context": inp[f"{a}.proj"],
            f"{a}.proj_output": out[f"{a}.proj"],
            f"{b}.attn_residual": inp[f"{b}.norm2"].view(inp[b].shape),  # (B, L, C) there, (B, H, W, C) here
            f"{b}.mlp.act_output": out[f"{b}.mlp.act"],
            f"{b}.mlp.fc2_output": out[f"{b}.mlp.fc2"],
            f"{b}.mlp_residual": out[b].flatten(1, 2),
        }
    return table


@pytest.mark.parametrize(("key", "fields"), VARIANTS, ids=VARIANT_IDS)
def test_every_quant_point_sees_the_float_tensor_it_names(
    key, fields, variant_floats, eval_images, capture_float, observe_points, close
) -> None:
    float_model = variant_floats[key]
    images = _images(float_model, eval_images)
    model = quantize_(copy.deepcopy(float_model), QuantConfig(**fields))
    expected = _expected_inputs(float_model, images, capture_float)
    seen = observe_points(model, images)
    assert set(seen) == _points(model)  # every point is reached, once
    for point, args in seen.items():
        if isinstance(model.get_submodule(point), LogSoftmaxQuantizer):
            # FQ-ViT's Swin: the masked, biased logits, with the scale of the point after the bias
            attn = point.rsplit(".", 1)[0]
            source = f"{attn}.biased_logits" if fields["placement"] == "full" else f"{attn}.logits"
            assert close(args[0], expected[f"{attn}.softmax_input"]) and args[1] is model.get_submodule(source), point
        else:
            assert len(args) == 1 and close(args[0], expected[point]), point


@pytest.mark.parametrize("key", ["small", "pad_h"])
def test_quantized_attention_adds_the_bias_table_its_point_returns(key, variant_floats, eval_images, perturbed, close) -> None:
    # the table each bias_table point returns must move the logits exactly as that table in the float model
    float_model = copy.deepcopy(variant_floats[key])
    images = _images(float_model, eval_images)
    model = set_quant_mode(quantize_(copy.deepcopy(float_model), QuantConfig(placement="full")), QuantMode.CALIBRATE)
    for b in BLOCKS:
        model.get_submodule(f"{b}.attn.bias_table").register_forward_hook(lambda _m, _args, out: perturbed(out) + 1)
        with torch.no_grad():
            float_table = float_model.get_submodule(f"{b}.attn").relative_position_bias_table
            float_table.copy_(perturbed(float_table) + 1)
    with torch.no_grad():
        assert not torch.allclose(float_model(images), variant_floats[key](images), rtol=1e-3, atol=1e-3)
        assert close(model(images), float_model(images))


@pytest.mark.parametrize(("cfg", "axis"), [(PAD_H, 0), (PAD_W, 1)], ids=["height", "width"])
def test_a_block_padded_along_one_axis_only_has_no_norm1_pair(cfg, axis) -> None:
    float_model = create_model("swin_tiny_patch4_window7_224", **cfg)
    padded = list(float_model.layers[1].blocks)  # 6x4 (4x6) feature map, 4x2 (2x4) windows
    assert [b.input_resolution[axis] % b.window_size[axis] for b in padded] == [2, 2]
    assert [b.input_resolution[1 - axis] % b.window_size[1 - axis] for b in padded] == [0, 0]
    # with the window's axes swapped nothing would pad
    assert [b.input_resolution[axis] % b.window_size[1 - axis] for b in padded] == [0, 0]
    assert [b.input_resolution[1 - axis] % b.window_size[axis] for b in padded] == [0, 0]
    assert FAMILY.norm_linear_pairs(float_model) == [p for p in PAIRS if p not in (PAIRS[5], PAIRS[7])]


def test_logits_point_sees_the_scaled_query_times_the_key_bit_for_bit(eval_images, observe_points) -> None:
    """Swin's order, ``(q * scale) @ k^T`` from the ``qkv`` output: scaling after the product
    rounds differently, so the order is pinned exactly."""
    float_model = create_model("swin_tiny_patch4_window7_224", **dict(SMALL, embed_dim=12)).eval()  # scale 12^-0.5: inexact
    model = quantize_(float_model, QuantConfig(placement="full"))
    seen = observe_points(model, _images(float_model, eval_images))
    for b in BLOCKS:
        attn = model.get_submodule(f"{b}.attn")
        qkv, logits = seen[f"{b}.attn.qkv_output"][0], seen[f"{b}.attn.logits"][0]
        q, k, _ = qkv.reshape(*qkv.shape[:2], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        assert torch.equal(logits, (q * attn.scale) @ k.transpose(-2, -1)), b
        assert not torch.equal(logits, (q @ k.transpose(-2, -1)) * attn.scale), b
