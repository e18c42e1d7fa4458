"""lit_ptq/quant/plugins/timm_vit.py on small timm ViTs (DeiT-Ti-like and ViT-Ti-like, 32x32
input, patch 16, depth 2, width 32): the quant points ``full`` (FQ-ViT's ViT/DeiT points),
``seed`` and ``matmul`` create, by name; which are LayerNorm inputs (per channel under PTF);
the variants the plugin refuses; the LayerNorm -> Linear pairs and blocks it states; for every
placement, the float tensor each quant point sees. ``test_contract.py`` runs what every family
keeps (FLOAT mode, calibration, state dicts, LIS, the fold, the recipes, ...).
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
import torch.nn as nn

from lit_ptq.errors import ConfigError
from lit_ptq.models import create_model
from lit_ptq.quant import LogSoftmaxQuantizer, QuantConfig, calibrate, quant_points, quantize_, quantizers
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


def _points(model: nn.Module) -> set[str]:
    return {n for n, _ in quant_points(model)}


@pytest.fixture(scope="module")
def floats(trained_like: Callable[[nn.Module], nn.Module]) -> dict[str, nn.Module]:
    """The small DeiT and ViT with seeded weights, in eval mode; never modified."""
    return {name: trained_like(create_model(name, **SMALL)).eval() for name in (DEIT, VIT)}


@pytest.fixture
def make_quantized(floats: dict[str, nn.Module], calib_batches: list[torch.Tensor]) -> Callable[..., nn.Module]:
    """``make_quantized(name, calibrated=False, **config_fields)``: a fresh small model, quantized (and calibrated)."""

    def make(name: str, calibrated: bool = False, **fields: object) -> nn.Module:
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
    model = make_quantized(name, placement=placement)
    assert _points(model) == (_full_points(name) if placement == "full" else SEED_POINTS)


def test_quantized_classes_are_swapped_in(make_quantized) -> None:
    model = make_quantized(DEIT, placement="full")
    assert type(model) is QuantVisionTransformer
    assert all(type(b) is QuantTimmBlock and type(b.attn) is QuantTimmAttention for b in model.blocks)


@pytest.mark.parametrize("name", [DEIT, VIT])
def test_ptf_makes_exactly_the_layernorm_inputs_per_channel(name, make_quantized) -> None:
    model = make_quantized(name, placement="full", ptf=True)
    acts = _full_activation_points(name)
    per_channel = {n: tuple(q.scale.shape) for n, q in quantizers(model) if n in acts and q.scale.numel() > 1}
    assert per_channel == {n: (32,) for n in NORM_ROLE}  # DeiT-T: 1 + 2*12 = 25


@pytest.mark.parametrize("variant", [dict(reg_tokens=2), dict(class_token=False, global_pool="avg")])
def test_unsupported_variants_are_refused(variant) -> None:
    model = create_model(DEIT, **SMALL, **variant)
    with pytest.raises(ConfigError, match="timm_vit plugin does not quantize"):
        quantize_(model, QuantConfig(placement="full"))


def test_pos_embed_point_sees_the_parameter_itself(make_quantized) -> None:
    model = make_quantized(DEIT, calibrated=True, placement="full")
    pos = model.pos_embed.detach()
    assert torch.equal(model.pos_embed_output.scale.reshape(()), (pos.max() - pos.min()) / 255)


# --- matmul placement, LayerNorm -> Linear pairs and blocks -----------------------------------

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


def test_matmul_name_list_has_the_size_worked_out_by_hand() -> None:
    # 4 operands and 4 Linears (input + weight) per block, the patch embedding and the head (DeiT-T: 4 + 12*12 = 148)
    assert len(MATMUL_POINTS) == 4 + 12 * DEPTH == 28


@pytest.mark.parametrize("name", [DEIT, VIT])
def test_matmul_placement_creates_exactly_these_quant_points(name, make_quantized) -> None:
    model = make_quantized(name, placement="matmul")
    assert _points(model) == MATMUL_POINTS
    assert not _points(model) & FQVIT_OUTPUT_POINTS


def test_norm_linear_pairs_and_blocks(floats) -> None:
    assert FAMILY.norm_linear_pairs(floats[DEIT]) == [*PAIRS, ("norm", "head")]
    assert FAMILY.blocks(floats[DEIT]) == UNITS
    avg = create_model(VIT, **SMALL, global_pool="avg")  # the final LayerNorm after the token mean
    assert FAMILY.norm_linear_pairs(avg) == [*PAIRS, ("fc_norm", "head")]


def test_reparameterization_after_the_token_mean_keeps_the_float_logits(
    trained_like, check_fold_keeps_float, calib_batches, eval_images
) -> None:
    original = trained_like(create_model(DEIT, **SMALL, global_pool="avg")).eval()
    check_fold_keeps_float(original, calib_batches, eval_images)


# --- what each quant point sees ---------------------------------------------------------------
# Every point in CALIBRATE mode records and passes its input through, so the quantized model
# computes the float function; each point's input is compared with the tensor it names, taken
# from timm's own float modules (unfused attention) with forward hooks.

QK_NORM = "deit_tiny_patch16_224-qk_norm"  # q_norm / k_norm are LayerNorms: the operands after them differ
VARIANTS = [
    (DEIT, dict(placement="seed")),
    (DEIT, dict(placement="seed", lis=True, bits="8/8/4")),
    (DEIT, dict(placement="full")),
    (VIT, dict(placement="full")),
    (DEIT, dict(placement="full", ptf=True, lis=True, bits="8/8/4")),
    (QK_NORM, dict(placement="full")),
    (DEIT, dict(placement="matmul")),
    (DEIT, dict(placement="matmul", softmax="log2")),
    (QK_NORM, dict(placement="matmul")),
]
VARIANT_IDS = ["seed", "seed-lis", "full-deit", "full-vit", "full-ptf-lis", "full-qk-norm"]
VARIANT_IDS += ["matmul", "matmul-log2", "matmul-qk-norm"]


@pytest.fixture(scope="module")
def variant_floats(floats, trained_like) -> dict[str, nn.Module]:
    """``floats`` and a small DeiT with ``qk_norm``, each with timm's explicit (unfused) attention."""
    models = {**floats, QK_NORM: trained_like(create_model(DEIT, **SMALL, qk_norm=True)).eval()}
    return {name: _unfused(model) for name, model in models.items()}


def _unfused(model: nn.Module) -> nn.Module:
    """A copy of the float ``model`` whose attentions run timm's explicit softmax path."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


def _expected_inputs(model: nn.Module, images: torch.Tensor, capture_float) -> dict[str, torch.Tensor]:
    """Every point name any placement can create -> the float tensor it names (a uniform or
    log2 softmax point reads the softmax output; a log-int-softmax reads the logits)."""
    cap = capture_float(model, images)
    inp = {n: c[0] for n, c in cap.items()}
    out = {n: c[1] for n, c in cap.items()}
    patches = out["patch_embed"]
    table = {
        "patch_embed.output": patches,
        "tokens": torch.cat([model.cls_token.expand(len(images), -1, -1), patches], dim=1),
        "pos_embed_output": model.pos_embed.detach(),
        "embed_output": inp["pos_drop"],  # tokens + position embedding
        "head_output": out["head"],
    }
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            table[f"{name}.input_quantizer"] = inp[name]
            table[f"{name}.weight_quantizer"] = module.weight.detach()
    for b in BLOCKS:
        a = f"{b}.attn"
        heads = model.get_submodule(a).num_heads
        qkv = out[f"{a}.qkv"]
        width = qkv.shape[-1] // 3
        q, k = out[f"{a}.q_norm"], out[f"{a}.k_norm"]
        v = qkv[..., 2 * width :].unflatten(-1, (heads, width // heads)).transpose(1, 2)
        table |= {
            f"{a}.qkv_output": qkv,
            f"{a}.query": q,
            f"{a}.key": k,
            f"{a}.value": v,
            f"{a}.logits": (q @ k.transpose(-2, -1)) * (width // heads) ** -0.5,
            f"{a}.softmax_output": inp[f"{a}.attn_drop"],
            f"{a}.context": inp[f"{a}.norm"],
            f"{a}.proj_output": out[f"{a}.proj"],
            f"{b}.attn_residual": inp[f"{b}.norm2"],
            f"{b}.mlp.act_output": out[f"{b}.mlp.act"],
            f"{b}.mlp.fc2_output": out[f"{b}.mlp.fc2"],
            f"{b}.mlp_residual": out[b],
        }
    return table


@pytest.mark.parametrize(("name", "fields"), VARIANTS, ids=VARIANT_IDS)
def test_every_quant_point_sees_the_float_tensor_it_names(
    name, fields, variant_floats, eval_images, capture_float, observe_points, close
) -> None:
    model = quantize_(copy.deepcopy(variant_floats[name]), QuantConfig(**fields))
    expected = _expected_inputs(variant_floats[name], eval_images, capture_float)
    seen = observe_points(model, eval_images)
    assert set(seen) == _points(model)  # every point is reached, once
    for point, args in seen.items():
        if isinstance(model.get_submodule(point), LogSoftmaxQuantizer):
            logits = point.rsplit(".", 1)[0] + ".logits"
            assert close(args[0], expected[logits]) and args[1] is model.get_submodule(logits), point
        else:
            assert len(args) == 1 and close(args[0], expected[point]), point


def test_logits_point_sees_the_query_times_the_key_then_scaled_bit_for_bit(eval_images, observe_points) -> None:
    """FQ-ViT's order, ``(q @ k^T) * scale`` from the ``qkv`` output: scaling ``q`` first
    rounds differently, so the order is pinned exactly."""
    model = quantize_(create_model(DEIT, **dict(SMALL, embed_dim=24)).eval(), QuantConfig(placement="full"))  # scale 12^-0.5: inexact
    seen = observe_points(model, eval_images)
    for b in BLOCKS:
        attn = model.get_submodule(f"{b}.attn")
        qkv, logits = seen[f"{b}.attn.qkv_output"][0], seen[f"{b}.attn.logits"][0]
        q, k, _ = qkv.reshape(*qkv.shape[:2], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        assert torch.equal(logits, (q @ k.transpose(-2, -1)) * attn.scale), b
        assert not torch.equal(logits, (q * attn.scale) @ k.transpose(-2, -1)), b
