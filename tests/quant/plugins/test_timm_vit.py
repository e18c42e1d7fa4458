"""lit_ptq/quant/plugins/timm_vit.py on small timm ViTs (DeiT-Ti-like and ViT-Ti-like, 32x32
input, patch 16, depth 2, width 32): where ``full`` (FQ-ViT's ViT/DeiT points) and ``seed``
put their quant points, PTF and LIS, FLOAT-mode equality with timm, calibration and a
state-dict round trip; the ``matmul`` placement, its LayerNorm -> Linear pairs (the fold keeps
the float logits) and blocks (each called once, in forward order), and the ``repq`` and
``repq_gptq`` recipes on a model with outlier LayerNorm channels; for every placement, the
float tensor each quant point sees and that its output is used.
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

REACH_IDS = ("full-deit", "full-ptf-lis", "matmul")  # the distinct forward paths; seed's points are a subset of full's
REACH_VARIANTS = [VARIANTS[VARIANT_IDS.index(i)] for i in REACH_IDS]


@pytest.fixture(scope="module")
def variant_floats(floats, trained_like) -> dict[str, nn.Module]:
    """``floats`` and a small DeiT with ``qk_norm``, each with timm's explicit (unfused) attention."""
    models = {**floats, QK_NORM: trained_like(create_model(DEIT, **SMALL, qk_norm=True)).eval()}
    return {name: _unfused(model) for name, model in models.items()}


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def _perturbed(x: torch.Tensor) -> torch.Tensor:
    """``x`` times seeded factors in [1, 1.5) (no constant shift, which a LayerNorm or a softmax would undo)."""
    return x * (1 + 0.5 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0)))


def _capture_float(model: nn.Module, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name -> (first input, output)`` of every submodule of the float ``model`` on ``images``."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str, args: tuple, out: object) -> None:
        assert name not in seen, f"{name} called twice"
        seen[name] = (args[0].detach().clone() if args else None, out.detach().clone())

    handles = [
        m.register_forward_hook(lambda _m, args, out, n=n: record(n, args, out)) for n, m in model.named_modules() if n
    ]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return seen


def _observe_points(model: nn.Module, images: torch.Tensor) -> dict[str, tuple]:
    """``name -> arguments`` each quant point of ``model`` receives on ``images`` in CALIBRATE mode."""
    set_quant_mode(model, QuantMode.CALIBRATE)
    seen: dict[str, tuple] = {}

    def record(name: str, args: tuple) -> None:
        assert name not in seen, f"{name} called twice"
        seen[name] = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)

    points = [(n, m) for n, m in model.named_modules() if isinstance(m, (TensorQuantizer, LogSoftmaxQuantizer))]
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: record(n, args)) for n, m in points]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return seen


def _unfused(model: nn.Module) -> nn.Module:
    """A copy of the float ``model`` whose attentions run timm's explicit softmax path."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


def _expected_inputs(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every point name any placement can create -> the float tensor it names (a uniform or
    log2 softmax point reads the softmax output; a log-int-softmax reads the logits)."""
    cap = _capture_float(model, images)
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
def test_every_quant_point_sees_the_float_tensor_it_names(name, fields, variant_floats, eval_images) -> None:
    model = quantize_(copy.deepcopy(variant_floats[name]), QuantConfig(**fields))
    expected = _expected_inputs(variant_floats[name], eval_images)
    seen = _observe_points(model, eval_images)
    assert set(seen) == set(_points(model))  # every point is reached, once
    for point, args in seen.items():
        if isinstance(model.get_submodule(point), LogSoftmaxQuantizer):
            logits = point.rsplit(".", 1)[0] + ".logits"
            assert _close(args[0], expected[logits]) and args[1] is model.get_submodule(logits), point
        else:
            assert len(args) == 1 and _close(args[0], expected[point]), point


@pytest.mark.parametrize(("name", "fields"), REACH_VARIANTS, ids=REACH_IDS)
def test_every_activation_point_output_reaches_the_logits(name, fields, variant_floats, eval_images) -> None:
    # a point whose result the module drops (it uses the tensor before the point) leaves the logits unchanged
    model = set_quant_mode(quantize_(copy.deepcopy(variant_floats[name]), QuantConfig(**fields)), QuantMode.CALIBRATE)
    with torch.no_grad():
        ref = model(eval_images)
        for point, module in _points(model).items():
            if isinstance(module, WeightQuantizer):
                continue  # QuantLinear's, tested with the generic layers
            handle = module.register_forward_hook(lambda _m, _args, out: _perturbed(out))
            try:
                assert not torch.allclose(model(eval_images), ref, rtol=1e-4, atol=1e-5), point
            finally:
                handle.remove()


def test_logits_point_sees_the_query_times_the_key_then_scaled_bit_for_bit(eval_images) -> None:
    """FQ-ViT's order, ``(q @ k^T) * scale`` from the ``qkv`` output: scaling ``q`` first
    rounds differently, so the order is pinned exactly."""
    model = quantize_(create_model(DEIT, **dict(SMALL, embed_dim=24)).eval(), QuantConfig(placement="full"))  # scale 12^-0.5: inexact
    seen = _observe_points(model, eval_images)
    for b in BLOCKS:
        attn = model.get_submodule(f"{b}.attn")
        qkv, logits = seen[f"{b}.attn.qkv_output"][0], seen[f"{b}.attn.logits"][0]
        q, k, _ = qkv.reshape(*qkv.shape[:2], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        assert torch.equal(logits, (q @ k.transpose(-2, -1)) * attn.scale), b
        assert not torch.equal(logits, (q * attn.scale) @ k.transpose(-2, -1)), b
