"""Quantizers: state in buffers (save, load, move), the three modes, the weight cache, and the
errors a user can meet (not calibrated, NaN / Inf in calibration data)."""

from __future__ import annotations

import math

import pytest
import torch

from lit_ptq.models import create_model
from lit_ptq.quant import (
    Arithmetic,
    CalibrationError,
    Granularity,
    LogQuantizer,
    NotCalibratedError,
    QuantConfig,
    QuantMode,
    QuantSpec,
    TensorQuantizer,
    WeightQuantizer,
    calibrate,
    quantize_,
    quantizers,
    set_quant_mode,
)
from lit_ptq.quant.primitives import EPS, fake_quant_per_channel_divide

ROUND_TRIP_CONFIGS = [
    dict(method="minmax", placement="seed"),
    dict(method="omse", placement="full", ptf=True, lis=True),
    dict(method="percentile", placement="full", bits="8/6/4", arithmetic="fused"),
]


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


@pytest.mark.parametrize("fields", ROUND_TRIP_CONFIGS, ids=lambda f: "-".join(str(v) for v in f.values()))
def test_saved_state_quantizes_a_fresh_model_bit_identically(fields, make_quantized, eval_images) -> None:
    model = make_quantized(**fields)
    expected = _logits(model, eval_images)
    state = model.state_dict()
    assert all(f"{name}.scale" in state and f"{name}.calibrated" in state for name, _ in quantizers(model))

    fresh = quantize_(create_model("itpn_tiny", num_classes=10).eval(), QuantConfig(**fields))
    fresh.load_state_dict(state)
    set_quant_mode(fresh, "quantize")
    assert torch.equal(_logits(fresh, eval_images), expected)


def test_buffers_move_with_the_model(make_quantized, eval_images) -> None:
    model = make_quantized(placement="full", ptf=True)
    model.to("cpu")
    assert all(q.scale.device.type == "cpu" for _, q in quantizers(model))
    model.to(torch.float64)
    for _, q in quantizers(model):
        assert q.scale.dtype == q.zero_point.dtype == q.min_val.dtype == torch.float64
        assert q.calibrated.dtype == torch.bool and bool(q.calibrated)
    out = _logits(model, eval_images.double())
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    model.to("meta")
    assert all(q.scale.device.type == "meta" and q.calibrated.device.type == "meta" for _, q in quantizers(model))


@pytest.mark.parametrize(
    ("placement", "first"),
    [("seed", r"blocks\.0\.mlp\.fc1\.weight_quantizer"), ("full", r"patch_embed\.proj\.weight_quantizer")],
)
def test_quantizing_before_calibration_names_the_quantizer(placement, first, make_quantized, eval_images) -> None:
    model = set_quant_mode(make_quantized(calibrated=False, placement=placement), "quantize")
    message = rf"quantizer {first} is not calibrated: run lit_ptq\.quant\.calibrate"
    with pytest.raises(NotCalibratedError, match=message):
        _logits(model, eval_images)


def test_a_state_saved_before_calibration_loads_as_not_calibrated(make_quantized, eval_images) -> None:
    state = make_quantized(calibrated=False).state_dict()
    model = make_quantized()
    model.load_state_dict(state)
    with pytest.raises(NotCalibratedError, match=r"blocks\.0\.mlp\.fc1\.weight_quantizer"):
        _logits(model, eval_images)


@pytest.mark.parametrize(("placement", "ptf"), [("seed", False), ("full", False), ("full", True)])
def test_sixteen_bits_everywhere_is_nearly_float(placement, ptf, make_tiny, make_quantized, calib_batches) -> None:
    model = make_quantized(placement=placement, bits="16/16/16", ptf=ptf)
    x = calib_batches[-1]  # the calibration batch itself: nothing is clipped
    reference = _logits(make_tiny(), x)
    assert reference.abs().max() > 1.0
    assert (_logits(model, x) - reference).abs().max() < 1e-3


@pytest.mark.parametrize("method", ["minmax", "ema", "percentile", "omse"])
@pytest.mark.parametrize("value", [0.0, 3.0, -2.5])
def test_a_constant_activation_gets_a_finite_positive_scale(method: str, value: float) -> None:
    q = TensorQuantizer(QuantConfig(method=method).act, "act")
    q.set_mode(QuantMode.CALIBRATE)
    q.last_batch = True
    x = torch.full((2, 5, 3), value)
    assert q(x) is x  # calibration passes the tensor through
    q.finish_calibration()
    assert torch.equal(q.scale, torch.tensor([EPS]))
    assert bool(q.calibrated)
    q.set_mode(QuantMode.QUANTIZE)
    out = q(x)
    assert torch.isfinite(out).all()
    if value == 0.0:
        assert torch.equal(out, x)


def test_a_constant_layernorm_input_gets_finite_positive_ptf_scales() -> None:
    spec = QuantSpec(8, False, Granularity.PER_CHANNEL, "ptf")
    q = TensorQuantizer(spec, "norm", channels=3)
    q.set_mode(QuantMode.CALIBRATE)
    q.last_batch = True
    q(torch.zeros(2, 4, 3))
    q.finish_calibration()
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()


@pytest.mark.parametrize("method", ["minmax", "ema", "percentile", "omse"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_in_calibration_data_names_a_quantizer(method, bad, make_quantized, calib_batches) -> None:
    model = make_quantized(calibrated=False, method=method)
    poisoned = calib_batches[0].clone()
    poisoned[1, 2, 3, 4] = bad
    message = r"quantizer (blocks\.|patch_embed).* saw NaN or Inf values during calibration"
    with pytest.raises(CalibrationError, match=message):
        calibrate(model, [calib_batches[1], poisoned])
    assert all(q.mode is QuantMode.FLOAT for _, q in quantizers(model))  # left usable, in float


def test_quantize_mode_passes_through_nothing_but_the_grid() -> None:
    q = TensorQuantizer(QuantConfig().act, "act")
    q.set_mode(QuantMode.CALIBRATE)
    q(torch.tensor([-1.0, 3.0]))
    q.finish_calibration()
    q.set_mode(QuantMode.QUANTIZE)
    out = q(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 4.0]))
    s = torch.tensor(4 / 255, dtype=torch.float32)
    # zp = 64: codes clamp(round(x / s) + 64) = 0, 0, 64, 128 (63.75 -> 64), 255, 255
    assert torch.equal(out, (torch.tensor([0.0, 0.0, 64.0, 128.0, 255.0, 255.0]) - 64) * s)


@pytest.mark.parametrize("fields", [dict(placement="seed"), dict(placement="full", ptf=True, method="ema")], ids=str)
def test_in_place_quant_points_give_the_same_logits(fields, make_quantized, eval_images) -> None:
    model = make_quantized(**fields)
    in_place = [q for _, q in quantizers(model) if q.inplace]
    assert in_place  # the quantized modules quantize the outputs they compute in place
    images = eval_images.clone()
    expected = _logits(model, images)
    assert torch.equal(images, eval_images)  # never the caller's input
    for q in in_place:
        q.inplace = False
    assert torch.equal(_logits(model, images), expected)


# --- the weight cache -------------------------------------------------------------------------


def test_quantized_weight_is_cached_between_forwards(make_quantized, eval_images) -> None:
    model = make_quantized()
    linear = model.blocks[4].attn.qkv
    wq = linear.weight_quantizer
    _logits(model, eval_images)
    first = wq.quantized_weight(linear.weight)
    _logits(model, eval_images)
    assert wq.quantized_weight(linear.weight) is first
    assert torch.equal(first, fake_quant_per_channel_divide(linear.weight, wq.scale, -128, 127))


def test_quantized_weight_follows_a_loaded_scale(make_quantized) -> None:
    model = make_quantized()
    linear = model.blocks[4].mlp.fc1
    wq = linear.weight_quantizer
    before = wq.quantized_weight(linear.weight)
    state = model.state_dict()
    state["blocks.4.mlp.fc1.weight_quantizer.scale"] = state["blocks.4.mlp.fc1.weight_quantizer.scale"] * 2
    model.load_state_dict(state)
    after = wq.quantized_weight(linear.weight)
    assert after is not before
    assert torch.equal(after, fake_quant_per_channel_divide(linear.weight, wq.scale, -128, 127))
    assert not torch.equal(after, before)


def test_quantized_weight_follows_an_in_place_weight_change(make_quantized) -> None:
    model = make_quantized()
    linear = model.blocks[1].reduction
    wq = linear.weight_quantizer
    before = wq.quantized_weight(linear.weight)
    with torch.no_grad():
        linear.weight.mul_(0.5)
    after = wq.quantized_weight(linear.weight)
    assert after is not before
    assert torch.equal(after, fake_quant_per_channel_divide(linear.weight, wq.scale, -128, 127))


def test_a_model_built_under_inference_mode_quantizes_every_forward(make_quantized, eval_images) -> None:
    """Inference tensors have no version counter: nothing is cached, a weight change is seen."""
    expected = _logits(make_quantized(), eval_images)
    with torch.inference_mode():
        model = make_quantized()  # every parameter and buffer an inference tensor
        linear = model.blocks[4].mlp.fc1
        assert linear.weight.is_inference()
        assert torch.equal(model(eval_images), expected)
        assert linear.weight_quantizer._cache is None
        linear.weight.mul_(0.5)
        assert torch.equal(
            linear.weight_quantizer.quantized_weight(linear.weight),
            fake_quant_per_channel_divide(linear.weight, linear.weight_quantizer.scale, -128, 127),
        )


def test_weights_are_float_outside_quantize_mode(make_quantized) -> None:
    model = set_quant_mode(make_quantized(), "float")
    linear = model.blocks[4].attn.proj
    assert linear.weight_quantizer(linear.weight) is linear.weight


# --- float mode and the two arithmetics -------------------------------------------------------


def test_float_mode_is_the_float_model(make_tiny, make_quantized, eval_images) -> None:
    reference = _logits(make_tiny(), eval_images)
    for fields in (dict(placement="seed"), dict(placement="full", ptf=True, lis=True)):
        model = make_quantized(calibrated=False, **fields)  # quantize_ leaves every quantizer in float
        assert torch.equal(_logits(model, eval_images), reference)
        model = set_quant_mode(make_quantized(**fields), "float")
        assert torch.equal(_logits(model, eval_images), reference)


@pytest.mark.parametrize("placement", ["seed", "full"])
def test_fused_arithmetic_calibrates_the_same_and_differs_less_than_the_quantization_error(
    placement, make_tiny, make_quantized, calib_batches
) -> None:
    seed = make_quantized(placement=placement, arithmetic="seed")
    fused = make_quantized(placement=placement, arithmetic="fused")
    seed_state, fused_state = seed.state_dict(), fused.state_dict()
    assert seed_state.keys() == fused_state.keys()
    assert all(torch.equal(seed_state[k], fused_state[k]) for k in seed_state)

    activations = [q for _, q in quantizers(fused) if not isinstance(q, WeightQuantizer)]
    assert activations and all(q.arithmetic is Arithmetic.FUSED for q in activations)  # weights always divide

    x = calib_batches[-1]
    reference, seed_out, fused_out = _logits(make_tiny(), x), _logits(seed, x), _logits(fused, x)
    assert (fused_out - seed_out).norm() < (seed_out - reference).norm()


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(("arithmetic", "expected"), [("seed", 3.0), ("fused", 6.0)])
def test_the_two_arithmetics_round_a_tie_by_hand(arithmetic: str, expected: float, inplace: bool) -> None:
    """Calibrated on [-9, 756]: s = 765 / 255 = 3 and zp = -round(-9 / 3) = 3. For x = 4.5, x / s = 1.5.
    ``seed`` rounds x / s + zp = 4.5 to the even code 4: (4 - 3) * 3 = 3. ``fused`` rounds x / s = 1.5
    to 2 before adding zp: code 5, (5 - 3) * 3 = 6."""
    q = TensorQuantizer(QuantConfig().act, "act", arithmetic=Arithmetic(arithmetic), inplace=inplace)
    q.set_mode(QuantMode.CALIBRATE)
    q(torch.tensor([-9.0, 756.0]))
    q.finish_calibration()
    assert (q.scale.item(), q.zero_point.item()) == (3.0, 3.0)
    q.set_mode(QuantMode.QUANTIZE)
    assert torch.equal(q(torch.tensor([4.5])), torch.tensor([expected]))


@pytest.mark.parametrize("observer, k", [("log2", 1), ("log_sqrt2", 2)])
def test_log_quantizer_codes_with_its_steps_per_octave_and_clips_underflow_and_overflow_but_not_zeros(observer: str, k: int) -> None:
    """RepQ-ViT's code by hand: ``q = round(-k log2(x / delta))`` (``k`` steps per octave), the
    value ``delta 2^(-max(q, 0) / k)`` below ``2^bits`` levels and 0 past them; the clip mask
    marks a positive value coded 0 and a value above ``delta``, never an exact zero."""
    bits, delta = 3, 0.5
    q = LogQuantizer(QuantSpec(bits, False, Granularity.PER_TENSOR, observer))
    q.scale.fill_(delta)
    xs = [0.0, 1e-9, 0.004, 0.01, 0.1, 0.2, 0.3, 0.35, 0.45, 0.5, 0.7]
    expected, clipped = [], []
    for x in xs:
        code = round(-k * math.log2(x / delta)) if x > 0 else math.inf
        value = delta * 2 ** (-max(code, 0) / k) if code < 2**bits else 0.0
        expected.append(value)
        clipped.append((value == 0 and x > 0) or x > delta)
    x = torch.tensor(xs)
    torch.testing.assert_close(q.fake_quant(x), torch.tensor(expected), rtol=1e-6, atol=0)
    assert q.clip_mask(x).tolist() == clipped
