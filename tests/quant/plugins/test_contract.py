"""The contract every model family keeps, run over every family the plugins register x each of
its placements x its flag variants (LIS, PTF, a log2 softmax), on a tiny seeded model of each
(the table ``MODELS``, as timm's ``tests/test_models.py`` keeps per-model facts in tables),
and over a toy family that this file registers with the plugin toolkit, with a placement of
its own (``residuals``), for the duration of the module.

Contracts: ``FLOAT`` mode computes the float model bit for bit (before and after
calibration); ``quantize_`` refuses a quantized model; every quant point is one the placement
rule accepted, with that site's role and kind (LIS: a stateless log-int-softmax; PTF: exactly
the LayerNorm-input points per channel); calibration leaves every point ready and quantizing,
with finite logits that differ from the float ones; each point is reached once per forward,
and each activation point's output reaches the logits; a state dict restores a fresh model
exactly; a log-int-softmax without its logits point is refused; the ``matmul`` image keeps 8
bits. For families that state the facts: the blocks are called once each in forward order;
each LayerNorm -> Linear pair has matching widths and RepQ-ViT's fold keeps the float
logits; the ``repq`` and ``repq_gptq`` recipes bring a model with outlier channels close to
float. The family files test what is their own (point lists, what each point sees).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

from lit_ptq.errors import ConfigError
from lit_ptq.models import create_model
from lit_ptq.quant import (
    FAMILIES,
    Family,
    Granularity,
    LogSoftmaxQuantizer,
    QuantConfig,
    QuantMode,
    Site,
    WeightQuantizer,
    calibrate,
    quant_points,
    quantize_,
    quantizers,
    register_family,
    set_quant_mode,
)
from lit_ptq.quant.layers import OPERAND_POINTS, matmul_placement, maybe_quant, quantize_operands
from lit_ptq.quant.plugins import load_plugins
from lit_ptq.quant.plugins.toolkit import (
    AttentionPoints,
    MlpPoints,
    ResidualPoints,
    block_pairs,
    seed_placement,
    stem_blocks_head,
)

# --- a toy family, written with the toolkit -------------------------------------------------


class ToyAttention(nn.Module):
    """Plain multi-head self-attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(B, N, 3C)`` -> q, k, v of shape ``(B, H, N, C/H)``."""
        return tuple(qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split(self.qkv(x))
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).flatten(2))


class ToyMlp(nn.Module):
    """``fc1 -> GELU -> fc2`` with timm's attribute names."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.0)
        self.fc2, self.drop2 = nn.Linear(2 * dim, dim), nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class ToyBlock(nn.Module):
    """A pre-norm transformer block."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), ToyAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), ToyMlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ToyViT(nn.Module):
    """A patch embedding (8x8 patches), two blocks, a final LayerNorm, the token mean and a head."""

    def __init__(self, dim: int = 16, heads: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=8, stride=8)
        self.blocks = nn.ModuleList([ToyBlock(dim, heads), ToyBlock(dim, heads)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


class QuantToyAttention(AttentionPoints, ToyAttention):
    """The toolkit's attention points on the toy attention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = quantize_operands(self, *self.split(maybe_quant(self.qkv_output, self.qkv(x))))
        attn = self.attention_probs(maybe_quant(self.logits, (q * self.scale) @ k.transpose(-2, -1)))
        return maybe_quant(self.proj_output, self.proj(maybe_quant(self.context, (attn @ v).transpose(1, 2).flatten(2))))


class QuantToyMlp(MlpPoints, ToyMlp):
    """The toolkit's MLP points on the toy MLP."""


class QuantToyBlock(ResidualPoints, ToyBlock):
    """The toolkit's residual-sum points on the toy block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = maybe_quant(self.attn_residual, x + self.attn(self.norm1(x)))
        return maybe_quant(self.mlp_residual, x + self.mlp(self.norm2(x)))


def _residuals_only(site: Site) -> bool:
    """The toy family's own placement: the residual sums and the Linear weights."""
    return isinstance(site.module, ToyBlock) or site.role == "weight"


def _toy_pairs(model: ToyViT) -> list[tuple[str, str]]:
    """``norm1 -> attn.qkv``, ``norm2 -> mlp.fc1`` in both blocks, ``norm -> head`` (through the token mean)."""
    return [*(p for i in range(len(model.blocks)) for p in block_pairs(f"blocks.{i}")), ("norm", "head")]


TOY = "contract_toy"
TOY_PLACEMENTS = {
    "seed": seed_placement((ToyAttention, ToyMlp), "head", OPERAND_POINTS),
    "matmul": matmul_placement((ToyAttention,)),
    "residuals": _residuals_only,
}


@pytest.fixture(scope="module", autouse=True)
def toy_family() -> Iterator[Family]:
    """The toy family, registered for this module only (the global lists other tests read stay as they are)."""
    family = register_family(
        TOY,
        (ToyViT,),
        TOY_PLACEMENTS,
        image_convs=lambda model: ["patch_embed"],
        norm_linear_pairs=_toy_pairs,
        blocks=stem_blocks_head(),
    )
    for float_cls, qcls in ((ToyAttention, QuantToyAttention), (ToyMlp, QuantToyMlp), (ToyBlock, QuantToyBlock)):
        family.quant_module(float_cls)(qcls)
    yield family
    del FAMILIES[TOY]


# --- the table of families ------------------------------------------------------------------

MODELS: dict[str, Callable[[], nn.Module]] = {
    "itpn": lambda: create_model("itpn_tiny", num_classes=10),
    "timm_vit": lambda: create_model("deit_tiny_patch16_224", img_size=32, depth=2, embed_dim=32, num_heads=2, num_classes=10),
    "timm_swin": lambda: create_model(
        "swin_tiny_patch4_window7_224", img_size=32, depths=(2, 2), num_heads=(1, 2), embed_dim=16, window_size=4, num_classes=10
    ),
    TOY: ToyViT,
}
"""Family -> a tiny model of it (32x32 input, 10 classes)."""
RECIPE_BOUND = {"itpn": 0.15, "timm_vit": 0.3, "timm_swin": 0.15, TOY: 0.15}
"""Largest relative error of the 8/8/8 recipe logits on the outlier model (measured for repq
and repq_gptq: 0.06 and 0.06, 0.20 and 0.20, 0.08 and 0.08, 0.07 and 0.09)."""
OBSERVERS = ("minmax", "ema", "percentile", "omse")
"""The observers every family is calibrated with (on its ``full`` placement, else its first)."""

PLAIN: dict[str, Any] = {}
LIS = dict(lis=True, bits="8/8/4")
VARIANTS = {"seed": [PLAIN, LIS], "full": [PLAIN, dict(ptf=True, **LIS)], "matmul": [PLAIN, dict(softmax="log2")]}
VARIANTS["residuals"] = [PLAIN, dict(ptf=True)]
"""Placement -> the flag variants it is tested with (``lis`` needs the logits point, which ``matmul`` leaves float)."""


def _plugin_families() -> dict[str, list[str]]:
    """Every family a plugin module registers -> its placements."""
    modules = [importlib.import_module(f"lit_ptq.quant.plugins.{name}") for name in load_plugins()]
    return {m.FAMILY.name: list(m.FAMILY.placements) for m in modules if hasattr(m, "FAMILY")}


FAMILY_PLACEMENTS = {**_plugin_families(), TOY: list(TOY_PLACEMENTS)}
"""Every family under test -> its placements."""


def _variant_id(fields: dict[str, Any]) -> str:
    return "-".join(k if v is True else str(v) for k, v in fields.items() if k != "bits") or "plain"


CASES = [
    pytest.param(family, placement, fields, id=f"{family}-{placement}-{_variant_id(fields)}")
    for family, placements in FAMILY_PLACEMENTS.items()
    for placement in placements
    for fields in VARIANTS.get(placement, [PLAIN])
]
"""Family x placement x flag variant."""
FAMILY_IDS = list(FAMILY_PLACEMENTS)


@pytest.fixture(scope="module")
def float_model(trained_like: Callable[[nn.Module], nn.Module]) -> Callable[[str], nn.Module]:
    """``float_model(family)``: the family's tiny model with trained-like seeded weights, in
    eval mode, built once per module; never modified."""
    built: dict[str, nn.Module] = {}

    def get(family: str) -> nn.Module:
        assert family in MODELS, f"the {family} family has no tiny model in test_contract.MODELS"
        if family not in built:
            built[family] = trained_like(MODELS[family]()).eval()
        return built[family]

    return get


@pytest.fixture
def make(float_model, calib_batches) -> Callable[..., nn.Module]:
    """``make(family, calibrated=False, **config_fields)``: a fresh copy of the family's tiny
    model, quantized (and calibrated)."""

    def build(family: str, calibrated: bool = False, **fields: Any) -> nn.Module:
        model = quantize_(copy.deepcopy(float_model(family)), QuantConfig(**fields))
        if calibrated:
            assert calibrate(model, calib_batches) == len(calib_batches)
        return model

    return build


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


# --- contracts over family x placement x variant ---------------------------------------------


@pytest.mark.parametrize(("family", "placement", "fields"), CASES)
def test_float_mode_is_the_float_model_bit_for_bit(family, placement, fields, make, float_model, eval_images) -> None:
    expected = _logits(float_model(family), eval_images)
    model = make(family, placement=placement, **fields)
    assert torch.equal(_logits(model, eval_images), expected)
    calibrate(model, [eval_images])
    assert torch.equal(_logits(set_quant_mode(model, QuantMode.FLOAT), eval_images), expected)


@pytest.mark.parametrize(("family", "placement", "fields"), CASES)
def test_points_are_the_sites_the_placement_accepts(family, placement, fields, make, monkeypatch) -> None:
    accepted: dict[str, Site] = {}
    rule = FAMILIES[family].placement(placement)

    def recording(site: Site) -> bool:
        assert site.name not in accepted, f"{site.name} asked twice"
        return rule(site) and accepted.setdefault(site.name, site) is site

    monkeypatch.setitem(FAMILIES[family].placements, placement, recording)
    model = make(family, placement=placement, **fields)
    points = dict(quant_points(model))
    assert points and set(points) == set(accepted)
    for name, point in points.items():
        assert point.role == accepted[name].role and point.qualname == name, name
        assert isinstance(point, WeightQuantizer) == (point.role == "weight"), name
        assert isinstance(point, LogSoftmaxQuantizer) == (fields.get("lis", False) and point.role == "attn"), name
    per_channel = {n for n, q in quantizers(model) if q.role != "weight" and q.spec.granularity is Granularity.PER_CHANNEL}
    assert per_channel == ({n for n, p in points.items() if p.role == "norm"} if fields.get("ptf") else set())


@pytest.mark.parametrize(("family", "placement", "fields"), CASES)
def test_log_int_softmax_is_stateless(family, placement, fields, make) -> None:
    model = make(family, placement=placement, **fields)
    lis = [n for n, p in quant_points(model) if isinstance(p, LogSoftmaxQuantizer)]
    assert bool(lis) == bool(fields.get("lis"))
    state = model.state_dict()
    assert all(list(model.get_submodule(n).buffers()) == [] for n in lis)
    assert not any(key.startswith(f"{n}.") for key in state for n in lis)


@pytest.mark.parametrize(("family", "placement", "fields"), CASES)
def test_calibration_leaves_every_point_quantizing_and_moves_the_logits(
    family, placement, fields, make, float_model, eval_images
) -> None:
    model = make(family, calibrated=True, placement=placement, **fields)
    assert all(q.ready for _, q in quantizers(model))
    assert all(p.mode is QuantMode.QUANTIZE for _, p in quant_points(model))
    out = _logits(model, eval_images)
    assert out.shape == (len(eval_images), 10) and torch.isfinite(out).all()
    assert not torch.equal(out, _logits(float_model(family), eval_images))


@pytest.mark.parametrize(("family", "placement", "fields"), CASES)
def test_every_point_is_reached_once_per_forward(family, placement, fields, make, eval_images) -> None:
    model = make(family, calibrated=True, placement=placement, **fields)
    for mode in (QuantMode.QUANTIZE, QuantMode.CALIBRATE):
        calls = dict.fromkeys((n for n, _ in quant_points(model)), 0)
        handles = [p.register_forward_pre_hook(lambda *_, n=n: calls.__setitem__(n, calls[n] + 1)) for n, p in quant_points(model)]
        try:
            _logits(set_quant_mode(model, mode), eval_images)
        finally:
            for h in handles:
                h.remove()
        assert set(calls.values()) == {1}, {n: c for n, c in calls.items() if c != 1}


@pytest.mark.parametrize(("family", "placement", "fields"), CASES)
def test_every_activation_point_output_reaches_the_logits(family, placement, fields, make, perturbed, eval_images) -> None:
    # a point whose result the module drops (it uses the tensor before the point) leaves the logits unchanged
    model = set_quant_mode(make(family, placement=placement, **fields), QuantMode.CALIBRATE)
    ref = _logits(model, eval_images)
    for name, point in quant_points(model):
        if isinstance(point, WeightQuantizer):
            continue  # QuantLinear's and QuantConv2d's, tested with the generic layers
        handle = point.register_forward_hook(lambda _m, _args, out: perturbed(out))
        try:
            assert not torch.allclose(_logits(model, eval_images), ref, rtol=1e-4, atol=1e-5), name
        finally:
            handle.remove()


@pytest.mark.parametrize(("family", "placement", "fields"), CASES)
def test_state_dict_round_trip(family, placement, fields, make, eval_images) -> None:
    calibrated = make(family, calibrated=True, placement=placement, **fields)
    fresh = make(family, placement=placement, **fields)
    fresh.load_state_dict(calibrated.state_dict())
    assert torch.equal(_logits(set_quant_mode(fresh, QuantMode.QUANTIZE), eval_images), _logits(calibrated, eval_images))


@pytest.mark.parametrize(("family", "placement", "fields"), [c for c in CASES if c.values[2].get("lis")])
def test_log_int_softmax_without_its_logits_point_is_refused(family, placement, fields, make) -> None:
    with pytest.raises(ConfigError, match=r"^log-int-softmax at .* needs its logits quant point"):
        make(family, placement=placement, overrides={"*logits": None}, **fields)


# --- contracts over families ------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_IDS)
@pytest.mark.parametrize("method", OBSERVERS)
def test_every_observer_calibrates_the_family(family, method, make, float_model, eval_images) -> None:
    placement = "full" if "full" in FAMILY_PLACEMENTS[family] else FAMILY_PLACEMENTS[family][0]
    model = make(family, calibrated=True, method=method, placement=placement)
    assert all(q.ready for _, q in quantizers(model))
    out = _logits(model, eval_images)
    assert torch.isfinite(out).all() and not torch.equal(out, _logits(float_model(family), eval_images))


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_quantize_twice_is_refused(family, make) -> None:
    model = make(family, placement=FAMILY_PLACEMENTS[family][0])
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(model, QuantConfig(placement=FAMILY_PLACEMENTS[family][0]))


@pytest.mark.parametrize("family", [f for f in FAMILY_IDS if "matmul" in FAMILY_PLACEMENTS[f]])
def test_matmul_image_keeps_8_bits(family, make) -> None:
    model = make(family, placement="matmul", bits="4/4/4")
    images = {f"{name}.input_quantizer" for name in FAMILIES[family].image_convs(model)}
    inputs = {n: p for n, p in quant_points(model) if p.role in ("act", "image")}
    assert images and {n for n, p in inputs.items() if p.role == "image"} == images
    assert {n: p.spec.bits for n, p in inputs.items()} == {n: 8 if n in images else 4 for n in inputs}


@pytest.mark.parametrize("family", FAMILY_IDS)
@pytest.mark.parametrize("placement", ["matmul", "seed"])
def test_blocks_are_each_called_once_in_forward_order(family, placement, make, call_order, eval_images) -> None:
    model = make(family, calibrated=True, placement=placement)
    units = FAMILIES[family].fact("blocks", model)
    assert len(units) > 2 and call_order(model, units, eval_images) == units


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_norm_linear_pairs_join_a_layernorm_and_a_linear_of_its_width(family, float_model) -> None:
    model = float_model(family)
    pairs = FAMILIES[family].fact("norm_linear_pairs", model)
    assert pairs and len(set(pairs)) == len(pairs)
    for norm, linear in pairs:
        norm, linear = model.get_submodule(norm), model.get_submodule(linear)
        assert isinstance(norm, nn.LayerNorm) and isinstance(linear, nn.Linear)
        assert norm.normalized_shape == (linear.in_features,)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_the_layernorm_fold_keeps_the_float_logits(family, float_model, check_fold_keeps_float, calib_batches, eval_images) -> None:
    check_fold_keeps_float(float_model(family), calib_batches, eval_images)


@pytest.mark.parametrize("family", FAMILY_IDS)
@pytest.mark.parametrize("recipe", ["repq", "repq_gptq"])
def test_recipe_brings_the_outlier_model_close_to_float(family, recipe, float_model, recipe_errors, calib_batches, eval_images) -> None:
    error, plain_error = recipe_errors(float_model(family), recipe, calib_batches, eval_images)
    assert 0 < error < RECIPE_BOUND[family] < plain_error / 2  # one scale per tensor fails on the outliers
