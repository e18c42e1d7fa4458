"""QuantConfig: defaults, the specs derived per role, ``bits`` parsing, and every rejection."""

from __future__ import annotations

import dataclasses
import re

import pytest

from lit_ptq.errors import ConfigError
from lit_ptq.quant import GELU_QUANTIZERS, METHODS, PLACEMENTS, SOFTMAX_QUANTIZERS, Arithmetic, Granularity, QuantConfig, QuantSpec, parse_bits


def test_defaults_are_the_seed_run() -> None:
    config = QuantConfig()
    assert (config.method, config.placement, config.bits) == ("minmax", "seed", "8/8/8")
    assert (config.ptf, config.lis, config.arithmetic) == (False, False, Arithmetic.SEED)
    assert config.describe() == dict(
        method="minmax", placement="seed", bits="8/8/8", ptf=False, lis=False, arithmetic="seed"
    )


@pytest.mark.parametrize("placement", ["seed", "full"])
@pytest.mark.parametrize("method", ["minmax", "ema", "percentile", "omse"])
def test_method_placement_bits_is_all_a_run_needs(method: str, placement: str) -> None:
    config = QuantConfig(method=method, placement=placement, bits="8/8/8")
    assert (config.method, config.placement, config.ptf, config.lis) == (method, placement, False, False)
    assert config.arithmetic is Arithmetic.SEED


def test_valid_values_are_the_documented_ones() -> None:
    assert tuple(METHODS) == ("minmax", "ema", "percentile", "omse", "mse")
    assert tuple(PLACEMENTS) == ("seed", "full", "matmul")
    assert tuple(SOFTMAX_QUANTIZERS) == ("uniform", "adalog", "log2", "log_sqrt2", "twin_uniform")
    assert tuple(GELU_QUANTIZERS) == ("uniform", "adalog", "twin_uniform")


@pytest.mark.parametrize("placement", ["seed", "fq-vit"])
def test_any_placement_name_is_kept_for_the_family_to_check(placement: str) -> None:
    assert QuantConfig(placement=placement).placement == placement


@pytest.mark.parametrize("placement", ["", None])
def test_a_placement_must_be_a_name(placement: object) -> None:
    with pytest.raises(ConfigError, match=rf"placement={placement!r} must name a placement of the model's family"):
        QuantConfig(placement=placement)


@pytest.mark.parametrize("method", ["minmax", "ema", "percentile", "omse"])
def test_weights_are_int8_symmetric_per_channel_minmax_whatever_the_method(method: str) -> None:
    weight = QuantConfig(method=method).weight
    assert weight == QuantSpec(bits=8, signed=True, granularity=Granularity.PER_CHANNEL, observer="minmax")
    assert (weight.qmin, weight.qmax) == (-128, 127)


@pytest.mark.parametrize("method", ["minmax", "ema", "percentile", "omse"])
def test_activations_are_uint8_per_tensor_with_the_method_as_observer(method: str) -> None:
    act = QuantConfig(method=method).act
    assert act == QuantSpec(bits=8, signed=False, granularity=Granularity.PER_TENSOR, observer=method)
    assert (act.qmin, act.qmax) == (0, 255)


@pytest.mark.parametrize(
    ("bits", "weight", "act", "attn"),
    [("8/8/8", 8, 8, 8), ("6/6/6", 6, 6, 6), ("4/4/4", 4, 4, 4), ("8/8/4", 8, 8, 4), ("2/16/3", 2, 16, 3)],
)
def test_each_field_of_bits_sets_its_role(bits: str, weight: int, act: int, attn: int) -> None:
    config = QuantConfig(method="ema", bits=bits)
    assert parse_bits(bits) == (weight, act, attn)
    assert (config.weight.bits, config.act.bits, config.attn.bits) == (weight, act, attn)
    assert (config.weight.qmin, config.weight.qmax) == (-(2 ** (weight - 1)), 2 ** (weight - 1) - 1)
    assert (config.act.qmin, config.act.qmax) == (0, 2**act - 1)
    assert (config.attn.qmin, config.attn.qmax) == (0, 2**attn - 1)


@pytest.mark.parametrize(("lis", "observer"), [(False, "percentile"), (True, "minmax")])
def test_softmax_output_observer_is_the_method_or_minmax_under_lis(lis: bool, observer: str) -> None:
    attn = QuantConfig(method="percentile", bits="8/8/4", lis=lis).attn
    assert attn == QuantSpec(bits=4, signed=False, granularity=Granularity.PER_TENSOR, observer=observer)


@pytest.mark.parametrize(
    ("ptf", "granularity", "observer"),
    [(False, Granularity.PER_TENSOR, "omse"), (True, Granularity.PER_CHANNEL, "ptf")],
)
def test_layernorm_inputs_are_per_channel_ptf_only_under_ptf(
    ptf: bool, granularity: Granularity, observer: str
) -> None:
    norm = QuantConfig(method="omse", placement="full", bits="8/6/8", ptf=ptf).norm
    assert norm == QuantSpec(bits=6, signed=False, granularity=granularity, observer=observer)


@pytest.mark.parametrize("arithmetic", ["fused", Arithmetic.FUSED])
def test_arithmetic_accepts_its_name_or_the_enum(arithmetic: object) -> None:
    assert QuantConfig(arithmetic=arithmetic).arithmetic is Arithmetic.FUSED


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("method", "kl", r"method='kl' is not one of: minmax, ema, percentile, omse, mse$"),
        ("method", "MinMax", r"method='MinMax' is not one of: minmax, ema, percentile, omse, mse$"),
        ("arithmetic", "fast", r"arithmetic='fast' is not one of: seed, fused"),
    ],
)
def test_unknown_choice_is_rejected_with_the_valid_values(field: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**{field: value})


@pytest.mark.parametrize(
    ("bits", "message"),
    [
        ("8/8", r"bits='8/8' must be three integers 'weights/activations/attention'"),
        ("8/8/8/8", r"bits='8/8/8/8' must be three integers"),
        ("a/b/c", r"bits='a/b/c' must be three integers"),
        ("8.5/8/8", r"bits='8.5/8/8' must be three integers"),
        ("", r"bits='' must be three integers"),
        ("1/8/8", r"bits='1/8/8': the weight width 1 is outside the supported range 2\.\.16"),
        ("8/17/8", r"bits='8/17/8': the activation width 17 is outside the supported range 2\.\.16"),
        ("8/8/0", r"bits='8/8/0': the attention width 0 is outside the supported range 2\.\.16"),
        ("8/-4/8", r"bits='8/-4/8': the activation width -4 is outside the supported range 2\.\.16"),
    ],
)
def test_bad_bits_are_rejected_naming_the_field(bits: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        QuantConfig(bits=bits)
    with pytest.raises(ConfigError, match=message):
        parse_bits(bits)


@pytest.mark.parametrize(("bits", "width"), [("2/2/2", 2), ("16/16/16", 16)])
def test_bit_widths_2_and_16_are_the_inclusive_limits(bits: str, width: int) -> None:
    config = QuantConfig(bits=bits)
    assert (config.weight.bits, config.act.bits, config.attn.bits) == (width, width, width)


def test_config_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        QuantConfig(method="nope")


@pytest.mark.parametrize(("field", "value"), [("method", "ema"), ("bits", "4/4/4"), ("ptf", True), ("weight", None)])
def test_config_is_frozen(field: str, value: object) -> None:
    config = QuantConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, field, value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(bits=1), r"bits=1 is outside the supported range 2\.\.16"),
        (dict(bits=17), r"bits=17 is outside the supported range 2\.\.16"),
        (dict(bits=8.0), r"bits=8\.0 is outside the supported range 2\.\.16"),
        (dict(observer="kl"), r"observer='kl' is not one of: adalog, ema, log2, log_sqrt2, minmax, mse, omse, percentile, ptf, twin_uniform"),
        (dict(granularity="per_row"), r"'per_row' is not a valid Granularity"),
    ],
)
def test_quant_spec_rejects_impossible_values(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantSpec(**fields)


def test_quant_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantSpec().bits = 4  # type: ignore[misc]


# --- override patterns against a model's point names -------------------------------------------

POINTS = [f"blocks.{i}.attn.{p}" for i in range(12) for p in ("qkv_output", "proj_output", "qkv.weight_quantizer")] + [
    "head.weight_quantizer"
]


def test_override_counts_are_the_points_each_pattern_matches_in_order() -> None:
    config = QuantConfig(overrides={"blocks.*.attn.qkv*": {"bits": 6}, "head.*": None, "blocks.1[01].*": {}})
    counts = [(pattern, override.describe(), n) for pattern, override, n in config.override_counts(POINTS)]
    assert counts == [("blocks.*.attn.qkv*", {"bits": 6}, 24), ("head.*", None, 1), ("blocks.1[01].*", {}, 6)]
    assert QuantConfig().override_counts(POINTS) == []


@pytest.mark.parametrize(
    ("pattern", "closest"),
    [
        ("blokcs.*.qkv*", "'blocks.*.attn.qkv_output', "),
        ("blocks.*.attn.qkv", "'blocks.*.attn.qkv_output', "),
        ("haed.weight_quantizer", "'head.weight_quantizer', "),
    ],
)
def test_a_pattern_that_matches_no_point_is_refused_naming_the_closest(pattern: str, closest: str) -> None:
    config = QuantConfig(overrides={"head.*": None, pattern: {"bits": 8}})
    head = f"overrides: the pattern '{pattern}' matches no quant point of this model (placement 'seed'); "
    with pytest.raises(ConfigError, match="^" + re.escape(head + "the closest point names are " + closest) + r"'[^']+', '[^']+'$"):
        config.override_counts(POINTS)


def test_a_model_without_points_refuses_any_pattern() -> None:
    with pytest.raises(ConfigError, match=r"^overrides: the pattern 'head\.\*' matches no quant point: placement 'full' places none"):
        QuantConfig(placement="full", overrides={"head.*": None}).override_counts([])


@pytest.mark.parametrize(
    ("setting", "summary"),
    [(None, "float"), ({"bits": 8}, "bits 8"), ({"bits": 4, "observer": "mse", "granularity": "per_tensor"}, "bits 4, observer mse, granularity per_tensor"), ({}, "the role's setting")],
)
def test_an_override_says_what_it_does_in_words(setting: object, summary: str) -> None:
    ((_, override),) = QuantConfig(overrides={"x": setting}).overrides
    assert override.summary() == summary
