"""Observers: each one against the seed's arithmetic, worked out on a few tiny batches or by a
straightforward re-implementation of the seed's loop."""

from __future__ import annotations

import pytest
import torch

from lit_ptq.errors import CalibrationError, ConfigError
from lit_ptq.quant.observers import METHODS, OBSERVERS, SOFTMAX_QUANTIZERS, OmseObserver, PtfObserver, build_observer
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


def test_registry_holds_the_eight_observers() -> None:
    assert sorted(OBSERVERS) == ["ema", "log2", "log_sqrt2", "minmax", "mse", "omse", "percentile", "ptf"]
    assert all(cls.name == name for name, cls in OBSERVERS.items())


def test_what_each_observer_is_for_is_an_attribute_of_its_class() -> None:
    def names(attribute: str) -> list[str]:
        return [name for name, cls in OBSERVERS.items() if getattr(cls, attribute)]

    assert names("method") == ["minmax", "ema", "percentile", "omse", "mse"] == list(METHODS)
    assert names("softmax") == ["log_sqrt2", "log2"] and list(SOFTMAX_QUANTIZERS) == ["uniform", "log2", "log_sqrt2"]
    # the methods RepQ-ViT's reparameterization calibrates per channel with (others: mse)
    assert [name for name in METHODS if OBSERVERS[name].supports_per_channel] == ["minmax", "ema", "mse"]


@pytest.mark.parametrize("name", ["percentile", "omse", "log2", "log_sqrt2"])
def test_a_per_tensor_observer_refuses_per_channel_in_one_line(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"^the {name} observer computes one range per tensor, not per channel; use per_tensor for it$"):
        build_observer(name, 0, 255, False, True, -1)


def test_unknown_observer_names_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="unknown observer 'kl'; registered: ema, log2, log_sqrt2, minmax, mse, omse, percentile, ptf"):
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


def test_mse_observer_clips_a_heavy_tail_and_keeps_a_uniform_range() -> None:
    g = torch.Generator().manual_seed(0)
    heavy = torch.randn(20000, generator=g)
    heavy[0] = 40.0  # one outlier: the least-error 4-bit grid clips it
    obs = build_observer("mse", 0, 15, False, False, -1)
    obs.update(heavy, last=True)
    _, _, lo, hi = obs.compute()
    assert float(hi) < 20.0  # far below the outlier
    flat = torch.linspace(-1.0, 1.0, 4096)
    obs = build_observer("mse", 0, 15, False, False, -1)
    obs.update(flat, last=True)
    _, _, lo, hi = obs.compute()
    assert float(hi) > 0.9 and float(lo) < -0.9  # nothing to gain from clipping a uniform range


def test_mse_observer_searches_each_weight_row() -> None:
    w = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    w[1, 0] = 30.0
    obs = build_observer("mse", -8, 7, True, True, 0)
    obs.update(w, last=True)
    scale, zp, lo, hi = obs.compute()
    assert scale.shape == (3,) and torch.equal(zp, torch.zeros(3))
    assert float(hi[1]) < 30.0 and float(hi[0]) == pytest.approx(float(w[0].abs().max()), rel=0.5)


@pytest.mark.parametrize("name, steps", [("log2", 1), ("log_sqrt2", 2)])
def test_log_observers_pick_the_least_error_delta(name: str, steps: int) -> None:
    probs = torch.softmax(3 * torch.randn(64, 49, generator=torch.Generator().manual_seed(2)), dim=-1)
    obs = build_observer(name, 0, 15, False, False, -1)
    obs.update(probs, last=True)
    scale, zp, _, hi = obs.compute()
    assert obs.steps_per_octave == steps and float(zp) == 0.0
    assert 0 < float(scale) <= float(hi)
    with pytest.raises(ConfigError, match="one range per tensor, not per channel"):
        build_observer(name, 0, 15, False, True, -1)
