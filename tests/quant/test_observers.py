"""Observers: each one against the seed's arithmetic, worked out on a few tiny batches or by a
straightforward re-implementation of the seed's loop."""

from __future__ import annotations

import pytest
import torch

from lit_ptq.errors import CalibrationError, ConfigError
from lit_ptq.quant.observers import METHODS, OBSERVERS, SOFTMAX_QUANTIZERS, Observer, OmseObserver, PtfObserver, build_observer
from lit_ptq.quant.primitives import EPS, affine_qparams, symmetric_qparams

F32 = torch.float32


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _act_observer(name: str, bits: int = 8):
    return build_observer(name, 0, 2**bits - 1, signed=False, per_channel=False, channel_axis=-1)


BATCHES = [
    torch.tensor([[-1.0, 0.5], [2.0, 0.0]]),
    torch.tensor([[-3.0, 1.0, 0.25]]),
    torch.tensor([0.5, 4.0, -2.0, 1.0]),
]


def test_registry_holds_the_ten_observers() -> None:
    assert sorted(OBSERVERS) == ["adalog", "ema", "log2", "log_sqrt2", "minmax", "mse", "omse", "percentile", "ptf", "twin_uniform"]
    assert all(cls.name == name for name, cls in OBSERVERS.items())


def test_what_each_observer_is_for_is_an_attribute_of_its_class() -> None:
    def names(attribute: str) -> list[str]:
        return [name for name, cls in OBSERVERS.items() if getattr(cls, attribute)]

    assert names("method") == ["minmax", "ema", "percentile", "omse", "mse"] == list(METHODS)
    assert names("softmax") == ["log_sqrt2", "log2", "adalog", "twin_uniform"]
    assert list(SOFTMAX_QUANTIZERS) == ["uniform", "adalog", "log2", "log_sqrt2", "twin_uniform"]
    assert names("gelu") == ["adalog", "twin_uniform"]
    # the methods RepQ-ViT's reparameterization calibrates per channel with (others: mse)
    assert [name for name in METHODS if OBSERVERS[name].supports_per_channel] == ["minmax", "ema", "mse"]


@pytest.mark.parametrize("name", ["percentile", "omse", "log2", "log_sqrt2"])
def test_a_per_tensor_observer_refuses_per_channel_in_one_line(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"^the {name} observer computes one range per tensor, not per channel; use per_tensor for it$"):
        build_observer(name, 0, 255, False, True, -1)


def test_unknown_observer_names_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="unknown observer 'kl'; registered: adalog, ema, log2, log_sqrt2, minmax, mse, omse, percentile, ptf, twin_uniform"):
        build_observer("kl", 0, 255, False, False, -1)


def test_minmax_is_the_running_min_and_max() -> None:
    obs = _act_observer("minmax")
    expected = [(-1.0, 2.0), (-3.0, 2.0), (-3.0, 4.0)]
    for batch, (lo, hi) in zip(BATCHES, expected):
        obs.update(batch)
        assert (obs.min_val.item(), obs.max_val.item()) == (lo, hi)
    scale, zp, lo, hi = obs.compute()
    assert torch.equal(scale, torch.tensor(7 / 255, dtype=F32))  # (4 - (-3)) / 255
    assert torch.equal(zp, torch.tensor(109.0))  # round(3 * 255 / 7) = round(109.29)
    assert (lo.item(), hi.item()) == (-3.0, 4.0)


def test_minmax_per_channel_weight_is_symmetric() -> None:
    obs = build_observer("minmax", -128, 127, signed=True, per_channel=True, channel_axis=0)
    w = torch.tensor([[-1.0, 0.5, 0.25], [0.1, -0.2, 2.55], [0.0, 0.0, 0.0]])
    obs.update(w)
    scale, zp, lo, hi = obs.compute()
    assert torch.equal(lo, torch.tensor([-1.0, -0.2, 0.0]))
    assert torch.equal(hi, torch.tensor([0.5, 2.55, 0.0]))
    assert torch.equal(scale, torch.stack([torch.tensor(1.0) / 127.5, torch.tensor(2.55) / 127.5, torch.tensor(EPS)]))
    assert torch.equal(zp, torch.zeros(3))


def test_minmax_per_channel_activation_along_the_last_axis() -> None:
    obs = build_observer("minmax", 0, 255, signed=False, per_channel=True, channel_axis=-1)
    obs.update(torch.tensor([[[1.0, -2.0], [3.0, 0.5]]]))
    obs.update(torch.tensor([[-1.0, 0.0]]))
    assert torch.equal(obs.min_val, torch.tensor([-1.0, -2.0]))
    assert torch.equal(obs.max_val, torch.tensor([3.0, 0.5]))


def test_ema_first_batch_sets_the_range_then_moves_one_percent() -> None:
    obs = _act_observer("ema")
    obs.update(BATCHES[0])
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 2.0)
    lo, hi = torch.tensor(-1.0), torch.tensor(2.0)
    for batch, (cur_lo, cur_hi) in zip(BATCHES[1:], [(-3.0, 1.0), (-2.0, 4.0)]):
        obs.update(batch)
        lo = lo + 0.01 * (torch.tensor(cur_lo) - lo)
        hi = hi + 0.01 * (torch.tensor(cur_hi) - hi)
        assert torch.equal(obs.min_val, lo) and torch.equal(obs.max_val, hi)
    # by hand: -1 -> -1 + 0.01 * (-3 + 1) = -1.02 -> -1.02 + 0.01 * (-2 + 1.02) = -1.0298;
    # 2 -> 2 + 0.01 * (1 - 2) = 1.99 -> 1.99 + 0.01 * (4 - 1.99) = 2.0101
    assert obs.min_val.item() == pytest.approx(-1.0298, abs=1e-6)
    assert obs.max_val.item() == pytest.approx(2.0101, abs=1e-6)
    scale, zp, _, _ = obs.compute()
    assert torch.equal(scale, affine_qparams(lo, hi, 0, 255)[0])
    assert torch.equal(zp, affine_qparams(lo, hi, 0, 255)[1])


def test_percentile_is_an_ema_of_torch_quantile() -> None:
    obs = _act_observer("percentile")
    batches = [_randn(4, 64, 32, seed=s) * (1 + s) for s in range(3)]
    lo = hi = None
    for x in batches:
        obs.update(x)
        cur_lo, cur_hi = torch.quantile(x.flatten(), 1.0 - 0.99999), torch.quantile(x.flatten(), 0.99999)
        lo = cur_lo if lo is None else lo + 0.01 * (cur_lo - lo)
        hi = cur_hi if hi is None else hi + 0.01 * (cur_hi - hi)
        assert torch.equal(obs.min_val, lo) and torch.equal(obs.max_val, hi)


def test_percentile_of_tiny_batches_by_hand() -> None:
    obs = _act_observer("percentile")
    obs.update(torch.tensor([0.0, 10.0]))  # rank q * (n - 1): 1e-5 -> 1e-4, 0.99999 -> 9.9999
    assert obs.min_val.item() == pytest.approx(1e-4, rel=1e-4)
    assert obs.max_val.item() == pytest.approx(9.9999, rel=1e-6)


# --- OMSE -----------------------------------------------------------------------------------


def _seed_omse(x: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor, qmin: int = 0, qmax: int = 255):
    """The seed's loop: 90 shrunken ranges, MSE of the fake-quantized batch, strict < keeps the first."""
    best_score, best, scores = 1e10, None, []
    for i in range(90):
        new_max = max_val * (1.0 - (i * 0.01))
        new_min = min_val * (1.0 - (i * 0.01))
        scale = ((new_max - new_min) / float(qmax - qmin)).clamp(min=EPS)
        zp = (qmin - torch.round(new_min / scale)).clamp(qmin, qmax)
        x_q = ((x / scale + zp).round().clamp(qmin, qmax) - zp) * scale
        score = ((x - x_q) ** 2).mean().item()
        scores.append(score)
        if score < best_score:
            best_score, best = score, i
    return best, scores


def _chosen_index(obs: OmseObserver, running_min: torch.Tensor, running_max: torch.Tensor) -> int:
    factors = (1.0 - torch.arange(90, dtype=torch.float64) * 0.01).float()
    hit = ((running_min * factors == obs.min_val) & (running_max * factors == obs.max_val)).nonzero()
    assert len(hit) >= 1, "the chosen range is none of the 90 candidates"
    return int(hit[0])


OMSE_CASES = {
    "normal": lambda s: _randn(4, 50, 64, seed=s),
    "heavy_tailed": lambda s: _randn(4, 50, 64, seed=s) ** 3,
    "gelu": lambda s: torch.nn.functional.gelu(_randn(4, 50, 64, seed=s) * 3),
    "positive": lambda s: _randn(2, 300, seed=s).exp(),
    "uniform": lambda s: torch.rand(4000, generator=torch.Generator().manual_seed(s)) * 6 - 1,
}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", list(OMSE_CASES))
def test_omse_picks_the_seeds_candidate(case: str, seed: int, bits: int) -> None:
    batches = [OMSE_CASES[case](10 * seed + i) for i in range(3)]
    obs = _act_observer("omse", bits)
    obs.update(batches[0])
    obs.update(batches[1])
    obs.update(batches[2], last=True)
    running_min = torch.stack([b.min() for b in batches]).min()  # the range of all three batches
    running_max = torch.stack([b.max() for b in batches]).max()

    expected, scores = _seed_omse(batches[2], running_min, running_max, 0, 2**bits - 1)
    chosen = _chosen_index(obs, running_min, running_max)
    if chosen != expected:  # a histogram search may swap two near-equal candidates
        assert abs(chosen - expected) == 1
        assert scores[chosen] <= scores[expected] * (1 + 1e-6)


def test_omse_searches_only_on_the_last_batch() -> None:
    obs = _act_observer("omse")
    for x in BATCHES:
        obs.update(x)
    assert (obs.min_val.item(), obs.max_val.item()) == (-3.0, 4.0)  # plain running min / max so far
    x = _randn(5000, seed=3) ** 3
    running_min, running_max = torch.min(torch.tensor(-3.0), x.min()), torch.max(torch.tensor(4.0), x.max())
    obs.update(x, last=True)
    expected, _ = _seed_omse(x, running_min, running_max)
    assert expected > 0  # the heavy tail is clipped
    assert _chosen_index(obs, running_min, running_max) == expected


def _brute_edges(obs: OmseObserver, lo: torch.Tensor, width: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """Every bin's level with the seed's float32 rounding, then the first bin of each level."""
    levels = torch.div(obs.centers(lo, width)[None, :], scale[:, None]).add_(zp[:, None]).round_().clamp_(obs.qmin, obs.qmax)
    q = torch.arange(obs.qmin, obs.qmax + 2, dtype=F32)
    return torch.stack([torch.searchsorted(row.contiguous(), q) for row in levels])


EDGE_RANGES = {
    "around_zero": (-3.0, 7.5),
    "positive": (0.0, 0.01),
    "offset": (1000.0, 1e-3),  # float32 centres coarser than the bins (all at the top level)
    "tiny": (-1e-30, 1e-30),
}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("steps", [0, OmseObserver.edge_steps])  # 0: the binary search alone
@pytest.mark.parametrize("case", list(EDGE_RANGES))
def test_omse_level_edges_are_the_first_bin_of_each_level(case: str, steps: int, bits: int, monkeypatch) -> None:
    obs = _act_observer("omse", bits)
    monkeypatch.setattr(obs, "edge_steps", steps)
    lo_value, width_value = EDGE_RANGES[case]
    obs.min_val, obs.max_val = torch.tensor(lo_value), torch.tensor(lo_value + width_value)
    lo, width = obs.min_val, (obs.max_val - obs.min_val).clamp(min=torch.finfo(F32).tiny)
    scale, zp = obs.qparams_from_range(*obs.candidate_ranges())
    edges = obs.level_edges(lo, width, scale, zp)
    assert edges.shape == (90, 2**bits + 1)
    assert torch.equal(edges, _brute_edges(obs, lo, width, scale, zp))


@pytest.mark.parametrize("case", list(OMSE_CASES))
def test_omse_candidate_errors_are_the_per_bin_sums(case: str) -> None:
    """Read from cumulative sums, each candidate's error plus sum(x^2) is the per-bin sum of
    S2 - 2 v S1 + n v^2 with every bin at its centre's level."""
    x = OMSE_CASES[case](5).reshape(-1)
    obs = _act_observer("omse")
    obs.update(x)
    lo, width = obs.min_val, obs.max_val - obs.min_val
    scale, zp = obs.qparams_from_range(*obs.candidate_ranges())
    count, s1 = obs.histogram(x, lo, width)
    errors = obs.candidate_errors(count, s1, obs.level_edges(lo, width, scale, zp), scale, zp)

    idx = ((x - lo) * (obs.bins / width)).long().clamp(0, obs.bins - 1)
    x64 = x.double()
    assert torch.equal(count, torch.bincount(idx, minlength=obs.bins))
    assert torch.equal(s1, torch.bincount(idx, weights=x64, minlength=obs.bins))
    s2 = torch.bincount(idx, weights=x64 * x64, minlength=obs.bins)
    level = torch.div(obs.centers(lo, width)[None, :], scale[:, None]).add_(zp[:, None]).round_().clamp_(0, 255)
    v = level.sub_(zp[:, None]).mul_(scale[:, None]).double()
    expected = (s2 - 2 * v * s1 + count * v * v).sum(dim=1)
    torch.testing.assert_close(errors + (x64 * x64).sum(), expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


# --- PTF ------------------------------------------------------------------------------------


def _seed_ptf(x: torch.Tensor, min_val: torch.Tensor, max_val: torch.Tensor, qmin: int = 0, qmax: int = 255):
    """FQ-ViT's PTF loop: one base scale and zero point, per channel the first of 4 least-error scales."""
    scale8 = ((max_val.max() - min_val.min()) / float(qmax - qmin)).clamp(min=EPS)
    scale4 = scale8 / 2
    scale2 = scale4 / 2
    scale1 = scale2 / 2
    zp = (qmin - torch.round(min_val.min() / scale8)).clamp(qmin, qmax)
    exponents = []
    for j in range(x.shape[-1]):
        data = x[..., j].unsqueeze(-1)
        scores = []
        for s in (scale1, scale2, scale4, scale8):
            data_q = ((data / s + zp).round().clamp(qmin, qmax) - zp) * s
            scores.append((data - data_q).pow(2).mean().item())
        exponents.append(scores.index(min(scores)))
    return torch.tensor(exponents), scale1, zp


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_ptf_exponent_per_channel_is_the_seeds(seed: int) -> None:
    # LayerNorm inputs: channels of very different magnitudes (the reason PTF exists)
    magnitude = 2.0 ** torch.randint(-3, 5, (48,), generator=torch.Generator().manual_seed(seed)).float()
    batches = [_randn(2, 20, 48, seed=10 * seed + i) * magnitude + 0.3 for i in range(3)]
    obs = build_observer("ptf", 0, 255, signed=False, per_channel=False, channel_axis=-1)
    assert isinstance(obs, PtfObserver) and obs.per_channel  # PTF is per channel whatever it is told
    for i, x in enumerate(batches):
        obs.update(x, last=i == 2)
    running_min = torch.stack([b.reshape(-1, 48).amin(0) for b in batches]).amin(0)
    running_max = torch.stack([b.reshape(-1, 48).amax(0) for b in batches]).amax(0)
    assert torch.equal(obs.min_val, running_min) and torch.equal(obs.max_val, running_max)

    exponent, scale1, zp = _seed_ptf(batches[2], running_min, running_max)
    assert torch.equal(obs.exponent, exponent)
    assert len(set(exponent.tolist())) > 1  # the case does exercise several factors
    scale, zero_point, lo, hi = obs.compute()
    assert torch.equal(scale, scale1 * 2.0 ** exponent.float())
    assert torch.equal(zero_point, zp.expand(48))


def test_ptf_largest_factor_gives_back_the_base_scale() -> None:
    obs = build_observer("ptf", 0, 255, signed=False, per_channel=True, channel_axis=-1)
    x = torch.tensor([[-1.0, 50.0], [3.0, -40.0]])  # channel 1 spans the whole range
    obs.update(x, last=True)
    scale, zp, _, _ = obs.compute()
    base, base_zp = affine_qparams(torch.tensor(-40.0), torch.tensor(50.0), 0, 255)
    assert obs.exponent[1] == 3 and scale[1] == base
    assert obs.exponent[0] < 3
    assert torch.equal(zp, base_zp.expand(2))


def test_ptf_compute_before_the_last_batch_raises() -> None:
    obs = build_observer("ptf", 0, 255, signed=False, per_channel=True, channel_axis=-1)
    obs.update(torch.ones(2, 3))
    with pytest.raises(RuntimeError, match="ptf observer needs a last calibration batch"):
        obs.compute()


# --- shapes, resets, no data ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "signed", "axis", "shape"),
    [("minmax", True, 0, (5, 4)), ("minmax", False, -1, (4, 5)), ("ptf", False, -1, (4, 5))],
)
def test_per_channel_observer_rejects_a_changed_channel_count(name: str, signed: bool, axis: int, shape) -> None:
    obs = build_observer(name, -128 if signed else 0, 127 if signed else 255, signed, True, axis)
    obs.update(torch.zeros(4, 4))
    message = rf"{name} observer saw 5 channels in a tensor of shape \({shape[0]}, {shape[1]}\) after 4 channels before"
    with pytest.raises(CalibrationError, match=message):
        obs.update(torch.zeros(shape))


@pytest.mark.parametrize("name", ["minmax", "ema", "percentile", "omse"])
def test_compute_before_update_raises(name: str) -> None:
    with pytest.raises(RuntimeError, match=f"{name} observer has seen no data"):
        _act_observer(name).compute()


@pytest.mark.parametrize("name", ["minmax", "ema", "percentile", "omse"])
def test_reset_forgets_everything(name: str) -> None:
    obs, fresh = _act_observer(name), _act_observer(name)
    obs.update(torch.tensor([-5.0, 5.0]), last=True)
    obs.reset()
    with pytest.raises(RuntimeError, match="has seen no data"):
        obs.compute()
    for o in (obs, fresh):
        o.update(torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(obs.min_val, fresh.min_val) and torch.equal(obs.max_val, fresh.max_val)


def test_symmetric_observer_uses_the_larger_magnitude() -> None:
    obs = build_observer("minmax", -8, 7, signed=True, per_channel=False, channel_axis=-1)
    obs.update(torch.tensor([-7.5, 2.0]))
    scale, zp, _, _ = obs.compute()
    assert torch.equal(scale, symmetric_qparams(torch.tensor(-7.5), torch.tensor(2.0), -8, 7)[0])
    assert scale.item() == 1.0 and zp.item() == 0.0


# --- MSE ------------------------------------------------------------------------------------


def _plain_qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric ``s = (hi - lo) / (qmax - qmin)``, ``zp = clamp(qmin - round(lo / s))``, or
    symmetric ``s = max(-lo, hi) / ((qmax - qmin) / 2)``, ``zp = 0``; ``s`` at least float32 eps."""
    if signed:
        scale = (torch.maximum(-lo, hi) / ((qmax - qmin) / 2)).clamp(min=EPS)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=EPS)
    return scale, (qmin - torch.round(lo / scale)).clamp(qmin, qmax)


def _mse_errors(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, signed: bool, candidates: int = 80
) -> list[float]:
    """Squared error (float64 sum) of ``x`` fake-quantized on each range ``(lo, hi) * (1 - 0.01 i)``, i < ``candidates``."""
    errors = []
    for i in range(candidates):
        scale, zp = _plain_qparams(lo * (1.0 - 0.01 * i), hi * (1.0 - 0.01 * i), qmin, qmax, signed)
        x_hat = (torch.round(x / scale + zp).clamp(qmin, qmax) - zp) * scale
        errors.append(float((x_hat.double() - x.double()).pow(2).sum()))
    return errors


def _brute_force_mse(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, signed: bool) -> int:
    """The first ``i`` of least squared error on ``x``, checked to lead every other candidate by
    1e-4 relative: the observer sums in float32 (relative error ~1e-6 here), so no summation
    order can change the winner and its range can be compared exactly."""
    errors = _mse_errors(x, lo, hi, qmin, qmax, signed)
    best = min(range(80), key=errors.__getitem__)
    assert all(e > errors[best] * (1 + 1e-4) for i, e in enumerate(errors) if i != best)
    return best


def _check_mse_range(obs: Observer, running_lo: torch.Tensor, running_hi: torch.Tensor, best: list[int], signed: bool) -> None:
    """The observer's range is the running range shrunk by ``1 - 0.01 best`` (per row), to the
    bit, and ``compute`` gives that range's scale and zero point."""
    factors = [1.0 - 0.01 * i for i in best]
    lo = torch.stack([v * f for v, f in zip(running_lo.reshape(-1), factors)]).reshape(running_lo.shape)
    hi = torch.stack([v * f for v, f in zip(running_hi.reshape(-1), factors)]).reshape(running_hi.shape)
    assert torch.equal(obs.min_val, lo) and torch.equal(obs.max_val, hi)
    scale, zp, min_val, max_val = obs.compute()
    ref_scale, ref_zp = _plain_qparams(lo, hi, obs.qmin, obs.qmax, signed)
    assert torch.equal(scale, ref_scale) and torch.equal(zp, ref_zp)
    assert torch.equal(min_val, lo) and torch.equal(max_val, hi)


def _uniform(n: int, lo: float, hi: float, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) * (hi - lo) + lo


def _near_levels(n: int, step: float, codes: tuple[int, int], ends: tuple[float, float], seed: int) -> torch.Tensor:
    """Data the full range fits: ``step * q`` for random ``q`` in ``codes`` (within 5% of a
    step, inside the range), and the range's ends ``ends`` once each."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(codes[0], codes[1] + 1, (n - 2,), generator=g).float()
    x = step * (q + 0.1 * (torch.rand(n - 2, generator=g) - 0.5))
    return torch.cat([torch.tensor(ends), x.clamp(*ends)])


def _with_outlier(n: int, seed: int, outlier: float = 6.0) -> torch.Tensor:
    x = _randn(n, seed=seed) * 0.5 + 0.3
    x[7] = outlier
    return x


# name: (data, bits, signed, the brute-force winner: 0 = the full range, 79 = the last candidate, None = between)
MSE_PER_TENSOR_CASES = {
    # the levels of (-0.6, 2.4) at 4 bits: 0.2 (q - 3), q = 0..15
    "near_levels_keeps_the_full_range": (lambda: _near_levels(4000, 0.2, (-3, 12), (-0.6, 2.4), seed=0), 4, False, 0),
    "outlier_is_clipped": (lambda: _with_outlier(4000, seed=1), 4, False, None),
    "outlier_at_2_bits_takes_the_last_candidate": (lambda: _with_outlier(4000, seed=2, outlier=8.0), 2, False, 79),
    # symmetric 4 bits: s = 2.4 / 7.5 = 0.32, levels 0.32 q, q = -8..7 (data at q = -7..3)
    "symmetric_near_levels_keeps_the_full_range": (lambda: _near_levels(4000, 0.32, (-7, 3), (-2.4, 1.0), seed=3), 4, True, 0),
    "symmetric_outlier_is_clipped": (lambda: _with_outlier(4000, seed=4), 4, True, None),
}


@pytest.mark.parametrize("case", list(MSE_PER_TENSOR_CASES))
def test_mse_per_tensor_range_is_the_brute_force_least_error_candidate(case: str) -> None:
    make, bits, signed, winner = MSE_PER_TENSOR_CASES[case]
    x = make()
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    best = _brute_force_mse(x, x.min(), x.max(), qmin, qmax, signed)
    assert best == winner if winner is not None else 0 < best < 79
    if winner == 79:  # the search stops there although i = 80 would fit better
        errors = _mse_errors(x, x.min(), x.max(), qmin, qmax, signed, candidates=81)
        assert errors[80] < errors[79]
    obs = build_observer("mse", qmin, qmax, signed, False, -1)
    obs.update(x, last=True)
    _check_mse_range(obs, x.min(), x.max(), [best], signed)


def _mixed_rows(values: int, seed: int) -> torch.Tensor:
    """Four rows whose least-error ranges differ: near the 4-bit levels of its range (no
    clipping), an outlier, a heavy tail, uniform on a positive range."""
    return torch.stack([
        _near_levels(values, 0.2, (-3, 12), (-0.6, 2.4), seed=seed),
        _with_outlier(values, seed=seed + 1, outlier=-5.0),
        _randn(values, seed=seed + 2) ** 3,
        _uniform(values, 0.5, 1.5, seed=seed + 3),
    ])


@pytest.mark.parametrize("signed", [False, True])
def test_mse_per_weight_row_each_row_takes_its_own_least_error_candidate(signed: bool) -> None:
    rows = _mixed_rows(400, seed=10)
    w = rows.reshape(4, 4, 10, 10)  # a convolution weight: one row per output channel
    qmin, qmax = (-8, 7) if signed else (0, 15)
    lo, hi = rows.amin(1), rows.amax(1)
    best = [_brute_force_mse(rows[r], lo[r], hi[r], qmin, qmax, signed) for r in range(4)]
    assert len(set(best)) >= 3  # a joint search over the rows cannot match
    assert best[0] == 0 or signed
    obs = build_observer("mse", qmin, qmax, signed, True, 0)
    obs.update(w, last=True)
    _check_mse_range(obs, lo, hi, best, signed)


def test_mse_per_channel_activation_ranges_over_all_batches_and_searches_the_last() -> None:
    """Channels along the last axis: the running per-channel range over three batches of
    different content, each channel's candidate chosen on the last batch alone."""
    batches = [_mixed_rows(120, seed=20 + 10 * b).t().reshape(3, 40, 4) for b in range(3)]
    batches[0] = batches[0] * 1.5  # the first batch widens every channel's range
    obs = build_observer("mse", 0, 15, False, True, -1)
    for b, x in enumerate(batches):
        obs.update(x, last=b == 2)
    channels = [x.reshape(-1, 4).t() for x in batches]  # (channel, values) of each batch
    lo = torch.stack([c.amin(1) for c in channels]).amin(0)
    hi = torch.stack([c.amax(1) for c in channels]).amax(0)
    best = [_brute_force_mse(channels[2][c], lo[c], hi[c], 0, 15, False) for c in range(4)]
    on_first = [_brute_force_mse(channels[0][c], lo[c], hi[c], 0, 15, False) for c in range(4)]
    assert len(set(best)) >= 3 and best != on_first  # a search on another batch is wrong
    _check_mse_range(obs, lo, hi, best, False)


def test_mse_per_tensor_ranges_over_all_batches_and_searches_the_last() -> None:
    batches = [_uniform(3000, -2.0, 5.0, seed=30), _randn(3000, seed=31), _with_outlier(3000, seed=32, outlier=3.0)]
    obs = _act_observer("mse", 4)
    obs.update(batches[0])
    obs.update(batches[1])
    assert (obs.min_val, obs.max_val) == (min(batches[0].min(), batches[1].min()), batches[0].max())  # no search yet
    obs.update(batches[2], last=True)
    lo = torch.stack([b.min() for b in batches]).min()
    hi = torch.stack([b.max() for b in batches]).max()
    best = _brute_force_mse(batches[2], lo, hi, 0, 15, False)
    assert best != _brute_force_mse(torch.cat(batches), lo, hi, 0, 15, False)  # not a search on all batches
    assert best != _brute_force_mse(batches[2], batches[2].min(), batches[2].max(), 0, 15, False)  # nor on its own range
    _check_mse_range(obs, lo, hi, [best], False)


def test_mse_keeps_the_widest_range_when_every_candidate_is_exact() -> None:
    """A last batch of zeros is exact on every candidate grid (0 is a level): the tie goes to i = 0."""
    obs = _act_observer("mse", 4)
    obs.update(torch.tensor([-1.0, 3.0]))
    obs.update(torch.zeros(100), last=True)
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 3.0)


@pytest.mark.parametrize("shape, channel", [((3 * 2**17,), False), ((4, 65600), True)])
def test_mse_searches_an_evenly_strided_subset_beyond_2_pow_18_values(shape: tuple[int, ...], channel: bool) -> None:
    """Stride ``ceil(numel / 2**18)`` along each row (2 for both cases, though a weight row holds
    fewer than 2**18 values); the odd values sit at the range's ends, so a search on all values
    would pick another range."""
    x = (_randn(*shape, seed=40) * 0.3).clamp(-0.9, 0.9)
    x[..., 1::2] = torch.tensor([-1.0, 1.0]).repeat(shape[-1] // 4)
    rows = x.reshape(-1, shape[-1])
    lo, hi = rows.amin(1), rows.amax(1)
    best = [_brute_force_mse(r[::2], lo[i], hi[i], 0, 15, False) for i, r in enumerate(rows)]
    assert best[0] != _brute_force_mse(rows[0], lo[0], hi[0], 0, 15, False)
    obs = build_observer("mse", 0, 15, False, channel, 0)
    obs.update(x, last=True)
    _check_mse_range(obs, lo.reshape(obs.min_val.shape), hi.reshape(obs.max_val.shape), best, False)


# --- log2 / log-sqrt2 -----------------------------------------------------------------------


def _log_fake_quant(x: torch.Tensor, delta: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """RepQ-ViT's log code in float64: ``q = round(-k log2(x / delta))``, value ``delta 2^(-q / k)``
    for ``q`` clamped to ``0 .. 2^bits - 1``, 0 where ``q >= 2^bits``."""
    x, delta = x.double(), delta.double()
    q = torch.round(-k * torch.log2(x / delta))
    value = delta * 2.0 ** (-q.clamp(0, 2**bits - 1) / k)
    return torch.where(q >= 2**bits, torch.zeros_like(value), value)


def _delta_candidates(x: torch.Tensor, running_max: torch.Tensor) -> list[torch.Tensor]:
    """The running max and the 0.999 / 0.9999 / 0.99999 quantiles of ``x`` (torch.quantile)."""
    return [running_max] + [torch.quantile(x.flatten(), q) for q in (0.999, 0.9999, 0.99999)]


def _log_errors(x: torch.Tensor, running_max: torch.Tensor, bits: int, k: int) -> list[float]:
    """Squared error (float64 sum) of ``x`` log-coded with each candidate delta."""
    return [float((_log_fake_quant(x, d, bits, k) - x.double()).pow(2).sum()) for d in _delta_candidates(x, running_max)]


def _brute_force_delta(x: torch.Tensor, running_max: torch.Tensor, bits: int, k: int) -> tuple[int, torch.Tensor]:
    """Index and value of the least-error candidate delta, checked to lead the others by 1e-3
    relative (the observer's float32 arithmetic is within ~1e-6 of this float64 one)."""
    errors = _log_errors(x, running_max, bits, k)
    best = min(range(4), key=errors.__getitem__)
    assert all(e > errors[best] * (1 + 1e-3) for i, e in enumerate(errors) if i != best)
    return best, _delta_candidates(x, running_max)[best]


# (observer, bits, temperature, seed, winner: 0 = the running max, 1..3 = the quantiles)
LOG_CASES = [
    ("log2", 4, 1.5, 6, 0),
    ("log2", 4, 3.0, 9, 1),
    ("log2", 4, 1.5, 5, 2),
    ("log2", 4, 1.0, 8, 3),
    ("log_sqrt2", 4, 3.0, 1, 0),
    ("log_sqrt2", 4, 3.0, 6, 1),
    ("log_sqrt2", 4, 2.0, 9, 2),
    ("log_sqrt2", 4, 3.0, 9, 3),
    ("log2", 2, 1.0, 0, 1),
    ("log_sqrt2", 2, 5.0, 8, 1),
]


@pytest.mark.parametrize("name, bits, temperature, seed, winner", LOG_CASES)
def test_log_delta_is_the_brute_force_least_error_candidate(name: str, bits: int, temperature: float, seed: int, winner: int) -> None:
    """Softmax rows; across the cases each of the four candidates wins for each code, and the
    bit width (read from ``qmax``) decides the 2-bit cases."""
    probs = torch.softmax(temperature * _randn(64, 49, seed=seed), dim=-1)
    k = 1 if name == "log2" else 2
    best, delta = _brute_force_delta(probs, probs.max(), bits, k)
    assert best == winner
    if bits == 2:  # at 3 bits another candidate would win
        errors = _log_errors(probs, probs.max(), 3, k)
        assert min(range(4), key=errors.__getitem__) != winner
    obs = build_observer(name, 0, 2**bits - 1, False, False, -1)
    obs.update(probs, last=True)
    scale, zp, lo, hi = obs.compute()
    assert obs.steps_per_octave == k
    assert torch.equal(scale, delta) and torch.equal(zp, torch.tensor(0.0))
    assert torch.equal(lo, probs.min()) and torch.equal(hi, probs.max())


@pytest.mark.parametrize("name, k", [("log2", 1), ("log_sqrt2", 2)])
def test_log_delta_can_be_the_running_max_of_an_earlier_batch(name: str, k: int) -> None:
    """The last batch lies within 2% of the levels below 0.8, the maximum of the first batch:
    delta = 0.8 fits it best, better than any quantile or the last batch's own maximum."""
    g = torch.Generator().manual_seed(50)
    codes = torch.randint(1, 16, (3000,), generator=g).float()
    last = 0.8 * torch.exp2(-codes / k) * (1 + 0.04 * (torch.rand(3000, generator=g) - 0.5))
    obs = build_observer(name, 0, 15, False, False, -1)
    obs.update(torch.tensor([0.0, 0.8, 0.1]))
    obs.update(last, last=True)
    running_max = torch.tensor(0.8)
    assert torch.equal(obs.max_val, running_max) and last.max() < running_max
    assert _brute_force_delta(last, running_max, 4, k)[0] == 0
    assert _brute_force_delta(last, last.max(), 4, k)[0] != 0  # the batch's own max would not win
    assert torch.equal(obs.compute()[0], running_max)


@pytest.mark.parametrize("name", ["log2", "log_sqrt2"])
def test_log_delta_on_a_tie_with_a_quantile_is_the_running_max(name: str) -> None:
    """A last batch of ones: delta 1 (every quantile) codes it exactly, and so does the running
    max 4 (``4 * 2^-2 = 1``); on the tie the running max wins."""
    obs = build_observer(name, 0, 15, False, False, -1)
    obs.update(torch.tensor([0.0, 4.0]))
    obs.update(torch.ones(1000), last=True)
    assert _log_errors(torch.ones(1000), torch.tensor(4.0), 4, obs.steps_per_octave) == [0.0] * 4
    assert obs.compute()[0].item() == 4.0


@pytest.mark.parametrize("name", ["log2", "log_sqrt2"])
def test_log_delta_before_a_last_batch_is_the_running_max(name: str) -> None:
    obs = build_observer(name, 0, 15, False, False, -1)
    obs.update(torch.tensor([0.25, 0.5]))
    obs.update(torch.tensor([0.125, 0.0]))
    scale, zp, lo, hi = obs.compute()
    assert (scale.item(), zp.item(), lo.item(), hi.item()) == (0.5, 0.0, 0.0, 0.5)


@pytest.mark.parametrize("name", ["log2", "log_sqrt2"])
def test_log_observers_refuse_per_channel(name: str) -> None:
    with pytest.raises(ConfigError, match=f"the {name} observer computes one range per tensor, not per channel"):
        build_observer(name, 0, 15, False, True, -1)
