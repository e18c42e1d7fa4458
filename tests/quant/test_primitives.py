"""The arithmetic of fake quantization (docs/quantization.md), checked against numbers worked
out by hand and against plain element-by-element float32 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lit_ptq.quant.primitives import (
    EPS,
    affine_qparams,
    fake_quant_fused,
    fake_quant_log,
    fake_quant_per_channel_divide,
    fake_quant_seed,
    fake_quant_seed_,
    log_int_softmax,
    quantile,
    quantile_pair,
    symmetric_qparams,
)

F32 = torch.float32


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = F32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=F32)


def _reference_fake_quant(x: torch.Tensor, scale: float, zp: float, qmin: int, qmax: int) -> torch.Tensor:
    """Element by element in numpy float32: ``(clamp(rint(x / s + zp)) - zp) * s``."""
    s, z = np.float32(scale), np.float32(zp)
    out = []
    for v in x.reshape(-1).tolist():
        q = np.rint(np.float32(v) / s + z)
        q = np.float32(min(max(q, qmin), qmax))
        out.append((q - z) * s)
    return torch.tensor(np.array(out, dtype=np.float32)).reshape(x.shape)


# --- scale and zero point ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lo", "hi", "qmin", "qmax", "scale", "zero_point"),
    [
        # s = 4/255; zp = -round(-1 / s) = round(255/4) = round(63.75) = 64
        (-1.0, 3.0, 0, 255, 4 / 255, 64.0),
        # s = 0.75/255; zp = round(0.5 * 255 / 0.75) = 170
        (-0.5, 0.25, 0, 255, 0.75 / 255, 170.0),
        # 4 bits: s = 0.75/15 = 0.05; zp = round(0.5 / 0.05) = 10
        (-0.5, 0.25, 0, 15, 0.05, 10.0),
        # min / s with a fraction below one half, where floor and round part: s = 1;
        # zp = -round(-10.25) = 10 (floor would give 11)
        (-10.25, 244.75, 0, 255, 1.0, 10.0),
        # 4 bits: s = 3.75/15 = 0.25; zp = -round(-3.25) = 3 (floor would give 4)
        (-0.8125, 2.9375, 0, 15, 0.25, 3.0),
        # a tie: zp = -round(-2.5) = 2, half to even (floor, or rounding half away from zero, give 3)
        (-0.625, 3.125, 0, 15, 0.25, 2.0),
        # a range above zero: zp = -round(0.5 / s) = -85 clamps to qmin (the seed does not widen to 0)
        (0.5, 2.0, 0, 255, 1.5 / 255, 0.0),
        # a range below zero: zp = round(3 * 255 / 2) = 382 clamps to qmax
        (-3.0, -1.0, 0, 255, 2 / 255, 255.0),
        # a signed grid: zp = -128 - round(-63.75) = -64
        (-1.0, 3.0, -128, 127, 4 / 255, -64.0),
        # an empty range: the scale is clamped to float32 epsilon
        (0.0, 0.0, 0, 255, EPS, 0.0),
        (2.0, 2.0, 0, 255, EPS, 0.0),
    ],
)
def test_affine_qparams_by_hand(lo: float, hi: float, qmin: int, qmax: int, scale: float, zero_point: float) -> None:
    s, zp = affine_qparams(_f32(lo), _f32(hi), qmin, qmax)
    assert s.dtype == zp.dtype == F32
    assert torch.equal(s, _f32(scale))
    assert torch.equal(zp, _f32(zero_point))


def test_affine_qparams_per_channel_is_elementwise() -> None:
    lo, hi = torch.tensor([-1.0, -0.5, 0.0]), torch.tensor([3.0, 0.25, 0.0])
    s, zp = affine_qparams(lo, hi, 0, 255)
    assert torch.equal(s, torch.tensor([4 / 255, 0.75 / 255, EPS], dtype=F32))
    assert torch.equal(zp, torch.tensor([64.0, 170.0, 0.0]))


@pytest.mark.parametrize(
    ("lo", "hi", "qmin", "qmax", "scale"),
    [
        # int8: scale = max(|min|, |max|) / 127.5; magnitudes chosen as 127.5 * 2**-k, exact in float32
        (-127.5 / 64, 1.0, -128, 127, 1 / 64),
        (-0.1, 127.5 / 128, -128, 127, 1 / 128),
        (-127.5, 127.5, -128, 127, 1.0),
        # int4: divisor (7 - (-8)) / 2 = 7.5
        (-7.5, 3.0, -8, 7, 1.0),
        (-1.0, 15.0, -8, 7, 2.0),
        (0.0, 0.0, -128, 127, EPS),
    ],
)
def test_symmetric_qparams_by_hand(lo: float, hi: float, qmin: int, qmax: int, scale: float) -> None:
    s, zp = symmetric_qparams(_f32(lo), _f32(hi), qmin, qmax)
    assert torch.equal(s, _f32(scale))
    assert torch.equal(zp, _f32(0.0))


# --- the int8 weight knife edge -------------------------------------------------------------


@pytest.fixture(scope="module")
def weight_and_scale() -> tuple[torch.Tensor, torch.Tensor]:
    w = _randn(64, 128, seed=0) * 0.02
    lo, hi = torch.aminmax(w, dim=1)
    scale, _ = symmetric_qparams(lo, hi, -128, 127)
    return w, scale


def test_symmetric_int8_scale_puts_each_channels_largest_weight_on_a_rounding_half(weight_and_scale) -> None:
    w, scale = weight_and_scale
    extreme = (w.abs() / scale[:, None]).amax(dim=1)
    assert torch.all((extreme - 127.5).abs() <= 2**-16)  # within one float32 ulp of 127.5
    assert (extreme == 127.5).sum() > 0


def test_per_channel_divide_rounds_as_the_seed(weight_and_scale) -> None:
    w, scale = weight_and_scale
    s = scale[:, None]
    seed = torch.round(w / s).clamp(-128, 127) * s
    out = fake_quant_per_channel_divide(w, scale, -128, 127)
    assert torch.equal(out, seed)
    codes = torch.round(out / s)
    assert torch.equal(codes * s, out)
    assert codes.min() == -128 and codes.max() == 127
    # The positive half +127.5 rounds to even 128 and clamps to 127; the negative half to -128.
    for c in range(w.shape[0]):
        ratio = w[c] / scale[c]
        assert torch.equal(out[c][ratio == 127.5], torch.full_like(out[c][ratio == 127.5], 127) * scale[c])
        assert torch.equal(out[c][ratio == -127.5], torch.full_like(out[c][ratio == -127.5], -128) * scale[c])


def test_fused_per_channel_kernel_rounds_some_extremes_the_other_way(weight_and_scale) -> None:
    w, scale = weight_and_scale
    s = scale[:, None]
    divide = fake_quant_per_channel_divide(w, scale, -128, 127)
    fused = torch.fake_quantize_per_channel_affine(w, scale, torch.zeros(64, dtype=torch.int32), 0, -128, 127)
    differ = divide != fused
    assert differ.sum() >= 1
    # Every disagreement is a channel's negative extreme: w / s is exactly -127.5, which the seed
    # rounds (half to even) to -128, while w * (1 / s) lands just above it and rounds to -127.
    rows = differ.nonzero()[:, 0]
    assert torch.equal((w / s)[differ], torch.full((len(rows),), -127.5))
    assert torch.all((w * (1 / s))[differ] > -127.5)
    assert torch.equal(divide[differ], -128 * scale[rows])
    assert torch.equal(fused[differ], -127 * scale[rows])


def test_per_channel_divide_broadcasts_over_conv_weights() -> None:
    w = _randn(8, 3, 2, 2, seed=4)
    lo, hi = torch.aminmax(w.reshape(8, -1), dim=1)
    scale, _ = symmetric_qparams(lo, hi, -8, 7)
    expected = torch.stack([_reference_fake_quant(w[c], float(scale[c]), 0.0, -8, 7) for c in range(8)])
    assert torch.equal(fake_quant_per_channel_divide(w, scale, -8, 7), expected)


# --- activations ----------------------------------------------------------------------------

HALVES = torch.tensor([-10.0, -1.75, -1.5, -1.25, -0.25, 0.0, 0.25, 0.75, 1.25, 2.25, 100.0, 200.0])


@pytest.mark.parametrize(
    ("x", "scale", "zp", "qmin", "qmax"),
    [
        (HALVES, 0.5, 3.0, 0, 255),  # x / s + zp hits exact halves: half to even
        (HALVES, 0.5, 3.0, 0, 15),
        (_randn(1000, seed=1) * 3, 6 / 255, 128.0, 0, 255),
        (_randn(1000, seed=2), 0.05, 0.0, -128, 127),
        (_randn(1000, seed=3), EPS, 0.0, 0, 255),
    ],
)
def test_fake_quant_seed_is_the_elementwise_formula(
    x: torch.Tensor, scale: float, zp: float, qmin: int, qmax: int
) -> None:
    out = fake_quant_seed(x, _f32(scale), _f32(zp), qmin, qmax)
    assert torch.equal(out, _reference_fake_quant(x, scale, zp, qmin, qmax))


def test_fake_quant_seed_on_exact_halves_by_hand() -> None:
    # s = 0.5, zp = 3: x / s + zp = -17, -0.5, 0, 0.5, 2.5, 3, 3.5, 4.5, 5.5, 7.5, 203, 403
    out = fake_quant_seed(HALVES, _f32(0.5), _f32(3.0), 0, 255)
    codes = torch.tensor([0.0, 0, 0, 0, 2, 3, 4, 4, 6, 8, 203, 255])  # rounds -0.5->0, 0.5->0, 2.5->2, 3.5->4 ...
    assert torch.equal(out, (codes - 3) * 0.5)


def test_fake_quant_seed_per_channel_broadcast() -> None:
    x = _randn(5, 7, 3, seed=5)
    scale, zp = torch.tensor([0.01, 0.02, 0.04]), torch.tensor([100.0, 128.0, 10.0])
    expected = torch.stack(
        [_reference_fake_quant(x[..., c], float(scale[c]), float(zp[c]), 0, 255) for c in range(3)], dim=-1
    )
    assert torch.equal(fake_quant_seed(x, scale, zp, 0, 255), expected)


def _plain_seed(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return (torch.round(x / scale + zp).clamp(qmin, qmax) - zp) * scale


QPARAMS = {
    "per_tensor": (torch.tensor([6 / 255]), torch.tensor([128.0])),
    "per_channel": (torch.linspace(0.005, 0.05, 128), torch.arange(128.0)),
}


@pytest.mark.parametrize("granularity", list(QPARAMS))
@pytest.mark.parametrize(
    "shape", [(7, 128), (5, 1000, 128)], ids=["small", "blocks"]  # 640,000 elements: the CPU block path
)
def test_fake_quant_seed_and_its_in_place_form_are_the_plain_formula(shape, granularity) -> None:
    x = _randn(*shape, seed=16) * 3
    scale, zp = QPARAMS[granularity]
    expected = _plain_seed(x, scale, zp, 0, 255)
    original = x.clone()
    out = fake_quant_seed(x, scale, zp, 0, 255)
    assert torch.equal(out, expected) and torch.equal(x, original)
    same = fake_quant_seed_(x, scale, zp, 0, 255)
    assert same is x and torch.equal(x, expected)


@pytest.mark.parametrize(
    ("x", "scale", "zp"),
    [
        (_randn(128, 9, seed=17).t(), torch.tensor([0.02]), torch.tensor([100.0])),  # not contiguous
        (_randn(9, 128, seed=18).double(), torch.tensor([0.02]), torch.tensor([100.0])),  # another dtype
        (_randn(9, 1, seed=19), torch.full((1, 128), 0.02), torch.full((1, 128), 100.0)),  # qparams broadcast x
    ],
    ids=["transposed", "float64", "broadcasting"],
)
def test_in_place_fake_quant_falls_back_to_a_new_tensor(x, scale, zp) -> None:
    original = x.clone()
    out = fake_quant_seed_(x, scale, zp, 0, 255)
    assert out is not x and torch.equal(x, original)
    assert torch.equal(out, _plain_seed(x, scale, zp, 0, 255))


# --- gradients: the seed formula's, with or without the fast path ------------------------------


@pytest.mark.parametrize("in_place", [False, True], ids=["new", "in_place"])
@pytest.mark.parametrize("shape", [(7, 128), (5, 1000, 128)], ids=["small", "blocks"])
def test_fake_quant_of_an_input_that_records_a_gradient(shape, in_place: bool) -> None:
    """Same values; no gradient reaches the input (the seed's round has a zero derivative),
    and an input that its producer saved for backward is not overwritten."""
    scale, zp = QPARAMS["per_tensor"]
    logits = (_randn(*shape, seed=21) * 3).requires_grad_()
    probs = logits.softmax(dim=-1) * 255  # softmax saves its output for backward
    fq = fake_quant_seed_ if in_place else fake_quant_seed
    out = fq(probs, scale, zp, 0, 255)
    assert out is not probs and out.requires_grad
    assert torch.equal(out, _plain_seed(probs.detach(), scale, zp, 0, 255))
    (out.sum() + probs.sum()).backward()  # fails if probs was modified in place
    reference = logits.detach().clone().requires_grad_()
    ((reference.softmax(dim=-1) * 255).sum()).backward()  # the only path with a nonzero gradient
    torch.testing.assert_close(logits.grad, reference.grad, rtol=0, atol=0)


def test_fake_quant_gradient_to_the_scale_is_the_seed_formulas() -> None:
    x = _randn(9, 128, seed=22) * 3
    scale = torch.tensor([0.03], requires_grad=True)
    zp = torch.tensor([120.0])
    fake_quant_seed(x, scale, zp, 0, 255).pow(2).sum().backward()
    reference = torch.tensor([0.03], requires_grad=True)
    _plain_seed(x, reference, zp, 0, 255).pow(2).sum().backward()
    assert torch.equal(scale.grad, reference.grad)


@pytest.mark.parametrize(("scale", "zp"), [(6 / 255, 128.0), (0.01, 37.0), (0.5, 3.0)])
def test_fake_quant_fused_is_torchs_kernel_and_one_step_from_the_seed(scale: float, zp: float) -> None:
    x = torch.cat([_randn(20000, seed=6) * 3, HALVES])
    s, z = _f32(scale), _f32(zp)
    fused = fake_quant_fused(x, s.reshape(1), z.reshape(1), 0, 255)
    assert torch.equal(fused, torch.fake_quantize_per_tensor_affine(x, float(s), int(zp), 0, 255))
    seed = fake_quant_seed(x, s, z, 0, 255)
    assert torch.all((fused - seed).abs() <= float(s) * (1 + 1e-5))
    assert (fused != seed).float().mean() < 0.01


def test_fake_quant_fused_per_channel_is_torchs_kernel() -> None:
    x = _randn(4, 6, 3, seed=7)
    scale, zp = torch.tensor([0.01, 0.02, 0.04]), torch.tensor([100.0, 128.0, 10.0])
    out = fake_quant_fused(x, scale, zp, 0, 255, axis=-1)
    assert torch.equal(out, torch.fake_quantize_per_channel_affine(x, scale, zp.int(), 2, 0, 255))


# --- quantile -------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.99999, 1e-5, 1.0 - 0.99999, 0.5, 0.9, 0.0, 1.0])
@pytest.mark.parametrize("n", [1, 2, 10, 1000, 12345, 2**20])
def test_quantile_is_torch_quantile(n: int, q: float) -> None:
    x = _randn(n, seed=n)
    assert torch.equal(quantile(x, q), torch.quantile(x, q))


@pytest.mark.parametrize(
    "x",
    [
        _randn(3, 50, 7, seed=8),  # any shape: the quantile of all elements
        _randn(5000, seed=9, dtype=torch.float64),
        torch.randint(-3, 4, (4321,), generator=torch.Generator().manual_seed(10)).float(),  # many ties
    ],
    ids=["3d", "float64", "ties"],
)
@pytest.mark.parametrize("q", [0.99999, 1e-5, 0.37])
def test_quantile_is_torch_quantile_for_any_shape_dtype_and_ties(x: torch.Tensor, q: float) -> None:
    assert torch.equal(quantile(x, q), torch.quantile(x.flatten(), q))


def test_quantile_pair_is_the_seeds_lower_and_upper_percentile() -> None:
    x = _randn(10000, seed=11)
    lo, hi = quantile_pair(x, 0.99999)
    assert torch.equal(lo, torch.quantile(x, 1.0 - 0.99999))
    assert torch.equal(hi, torch.quantile(x, 0.99999))


def test_quantile_of_nothing_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        quantile(torch.empty(0), 0.5)


def test_quantile_above_2_pow_24_equals_torch_quantile() -> None:
    # The seed calls torch.quantile, which torch 2.14 computes at any size (older releases
    # refused more than 2**24 elements and the seed fell back to numpy).
    x = _randn(20_000_000, seed=12)
    for q in (0.99999, 1e-5):
        assert torch.equal(quantile(x, q), torch.quantile(x, q))


def test_quantile_of_50_million_elements_is_the_percentile() -> None:
    x = _randn(50_000_000, seed=12)  # ~200 MB
    for q in (0.99999, 1e-5):
        got = float(quantile(x, q))
        expected = float(np.percentile(x.numpy(), q * 100))
        # numpy ranks with q in float64, torch with q rounded to float32: ~0.7 positions apart here
        assert got == pytest.approx(expected, rel=1e-4, abs=0)


# --- log-int-softmax ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_log_int_softmax_values_are_zero_or_powers_of_two_below_2_to_the_bits(bits: int) -> None:
    logits = _randn(2, 4, 16, 16, seed=13) * 4
    scale = logits.abs().max() / 127
    out = log_int_softmax(logits, scale, bits)
    assert out.shape == logits.shape and out.dtype == F32
    nonzero = out[out != 0]
    exponent = -torch.log2(nonzero)
    assert torch.equal(exponent, torch.round(exponent))
    assert exponent.min() >= 0 and exponent.max() < 2**bits
    # the largest logit of each row gets the row's largest value
    assert torch.equal(out.gather(-1, logits.argmax(-1, keepdim=True)).squeeze(-1), out.amax(dim=-1))
    if bits == 2:
        assert (out == 0).any()  # codes >= 4 are dropped


def test_log_int_softmax_puts_one_on_the_peak_of_a_peaked_row() -> None:
    logits = _randn(8, 16, seed=14)
    peak = torch.arange(8) * 2
    logits[torch.arange(8), peak] += 20.0
    out = log_int_softmax(logits, logits.abs().max() / 127, 4)
    assert torch.equal(out, torch.nn.functional.one_hot(peak, 16).float())


@pytest.mark.parametrize(
    ("n", "value"),
    # n equal logits: r = round(n) = n; q = floor(log2 n) + (1 if n - 2**floor >= 2**(floor - 1))
    [(1, 1.0), (2, 0.5), (3, 0.25), (4, 0.25), (5, 0.25), (6, 0.125), (8, 0.125), (11, 0.125), (12, 0.0625)],
)
def test_log_int_softmax_of_equal_logits_by_hand(n: int, value: float) -> None:
    assert torch.equal(log_int_softmax(torch.zeros(3, n), _f32(0.1), 4), torch.full((3, n), value))


def test_log_int_softmax_two_logits_one_shift_apart_by_hand() -> None:
    # scale 1/16: x0 = floor(-0.6931 * 16) = -12. Logits (0, -0.75) are x_int (0, -12) = (0, 1 * x0),
    # so exp_int = (c * 2**30, c * 2**29) exactly; sum / exp = (1.5, 3) -> r = (2, 3) (half to even)
    # -> codes (1, 2) -> values (1/2, 1/4).
    out = log_int_softmax(torch.tensor([[0.0, -0.75], [-0.75, 0.0]]), _f32(1 / 16), 4)
    assert torch.equal(out, torch.tensor([[0.5, 0.25], [0.25, 0.5]]))


def test_log_int_softmax_is_shift_invariant() -> None:
    logits = _randn(4, 10, seed=15)
    scale = _f32(1 / 32)
    grid = torch.round(logits / scale) * scale  # on the quantization grid, so x / s is an integer
    assert torch.equal(log_int_softmax(grid, scale, 4), log_int_softmax(grid + 3.0, scale, 4))
    assert math.isclose(float(log_int_softmax(grid, scale, 8).sum(-1).max()), 1.0, abs_tol=0.5)


@pytest.mark.parametrize("steps, bits", [(1, 4), (2, 4), (2, 3)])
def test_log_fake_quant_levels(steps: int, bits: int) -> None:
    delta = torch.tensor(0.75)
    levels = 2**bits
    codes = torch.arange(levels, dtype=torch.float32)
    on_levels = delta * torch.exp2(-codes / steps)
    assert torch.allclose(fake_quant_log(on_levels, delta, bits, steps), on_levels)
    below_last = on_levels[-1] * 2 ** (-1.0 / steps)  # one step past the last level
    assert fake_quant_log(torch.tensor([0.0, below_last.item(), 5.0]), delta, bits, steps).tolist() == [0.0, 0.0, 0.75]
    x = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    out = fake_quant_log(x, delta, bits, steps)
    nonzero = out > 0
    assert torch.isclose(out[nonzero][:, None], on_levels[None, :]).any(dim=1).all()  # every output is a level


@pytest.mark.parametrize("steps, bits", [(1, 4), (2, 4), (1, 2), (2, 2)])
def test_log_fake_quant_rounds_the_log_code_to_the_nearest_level(steps: int, bits: int) -> None:
    """``x = delta 2^(-(q + u) / k)`` with ``|u| <= 0.4`` has code ``q``: its value is
    ``delta 2^(-q / k)`` for ``0 <= q < 2^bits`` (``q < 0`` saturates at ``delta``), 0 past the
    last level; the reference is float64, within 2 float32 roundings of the float32 arithmetic."""
    g = torch.Generator().manual_seed(10 * bits + steps)
    levels = 2**bits
    q = torch.randint(-3, levels + 3, (2000,), generator=g).double()
    u = (torch.rand(2000, generator=g, dtype=torch.float64) - 0.5) * 0.8
    delta = _f32(0.3)
    x = (float(delta) * torch.exp2(-(q + u) / steps)).float()
    expected = torch.where(q >= levels, 0.0, float(delta) * torch.exp2(-q.clamp(0, levels - 1) / steps)).float()
    torch.testing.assert_close(fake_quant_log(x, delta, bits, steps), expected, rtol=2.4e-7, atol=0)
