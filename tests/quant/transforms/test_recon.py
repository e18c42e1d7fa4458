"""Block reconstruction (``lit_ptq.quant.transforms.recon``) on the seeded ``itpn_tiny``."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn as nn
from tqdm import tqdm

from lit_ptq.errors import ConfigError
from lit_ptq.quant import LogQuantizer, QuantConfig, QuantMode, TensorQuantizer, WeightQuantizer, calibrate, quant_points, quantize_, quantizers
from lit_ptq.quant.config import Granularity, QuantSpec, ReconSettings
from lit_ptq.quant.plugins.itpn import blocks
from lit_ptq.quant import owner_weight, set_quant_mode
from lit_ptq.quant.transforms import recon, reconstruct_
from lit_ptq.quant.transforms.recon import (
    _AdaRoundWeight,
    _beta,
    _block_mse,
    _BlockData,
    _Drop,
    _LearnedStep,
    _LsqFakeQuant,
    _limit,
    _Optimizers,
    _rec_loss,
    _split_inputs,
    _StraightThrough,
    _Swap,
    _train,
)

SETTINGS = ReconSettings(iters=20, batch_size=4, weight_lr=1e-2, act_lr=1e-3)
"""Few steps, with learning rates high enough that 20 steps change the rounding."""


def calibrated(tiny_float: nn.Module, calib_batches: list[torch.Tensor]) -> nn.Module:
    """A copy of the seeded model with the ``repq`` steps done (what ``recon`` starts from)."""
    model = quantize_(copy.deepcopy(tiny_float), QuantConfig(method="mse", placement="matmul", bits="4/4/4", recipe="repq"))
    calibrate(model, calib_batches)
    return model


@pytest.fixture(scope="module")
def run(tiny_float: nn.Module, calib_batches: list[torch.Tensor]) -> dict[str, Any]:
    """The model before and after reconstruction with :data:`SETTINGS`, the block errors, and
    the data each block was reconstructed on (recorded from ``recon._capture``)."""
    model = calibrated(tiny_float, calib_batches)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    captured: dict[str, _BlockData] = {}
    capture = recon._capture

    def recording(model: nn.Module, name: str, *args: Any) -> _BlockData:
        captured[name] = capture(model, name, *args)
        return captured[name]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recon, "_capture", recording)
        errors = reconstruct_(model, blocks(model), calib_batches, SETTINGS)
    return dict(model=model, before=before, errors=errors, captured=captured)


def test_every_block_error_decreases(run: dict[str, Any]) -> None:
    errors = run["errors"]
    assert list(errors) == blocks(run["model"])
    for name, (before, after) in errors.items():
        assert after < before, name


def test_weights_lie_on_the_grid_and_rounding_changed(run: dict[str, Any]) -> None:
    model, before = run["model"], run["before"]
    flipped = 0
    for name, q in quantizers(model):
        if isinstance(q, WeightQuantizer):
            weight = owner_weight(model, name)
            assert torch.equal(q(weight), weight), name
            nearest = q._fake_quant_weight(before[name.rsplit(".", 1)[0] + ".weight"])
            flipped += int((nearest != weight).sum())
    assert flipped > 0  # AdaRound rounded some weights away from nearest


def test_step_sizes_learned_and_nothing_else_changed(run: dict[str, Any]) -> None:
    model, before = run["model"], run["before"]
    after = model.state_dict()
    assert list(after) == list(before)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed, "reconstruction changed nothing"
    assert all(k.endswith(("weight", ".scale")) for k in changed), sorted(changed)
    assert any(k.endswith("input_quantizer.scale") for k in changed)


def test_model_is_left_an_ordinary_quantized_model(run: dict[str, Any], tiny_float: nn.Module, calib_batches: list[torch.Tensor]) -> None:
    model = run["model"]
    reference = calibrated(tiny_float, calib_batches)
    assert [(n, type(p)) for n, p in quant_points(model)] == [(n, type(p)) for n, p in quant_points(reference)]
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert all(p.mode is QuantMode.QUANTIZE for _, p in quant_points(model))
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), type(m).__name__


def test_same_seed_same_result(run: dict[str, Any], tiny_float: nn.Module, calib_batches: list[torch.Tensor]) -> None:
    again = calibrated(tiny_float, calib_batches)
    errors = reconstruct_(again, blocks(again), calib_batches, SETTINGS)
    assert errors == run["errors"]
    reference = run["model"].state_dict()
    for key, value in again.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_recipe_runs_reconstruction_on_the_images_asked_for(make_quantized, calib_batches: list[torch.Tensor], eval_images: torch.Tensor) -> None:
    model = make_quantized(method="mse", placement="matmul", bits="4/4/4", recipe="recon", recon=dict(iters=2, images=5))
    assert torch.isfinite(model(eval_images)).all()
    assert [b.shape[0] for b in _limit(calib_batches, 5)] == [4, 1]
    assert _limit(calib_batches, None) == calib_batches


def test_block_arguments_besides_the_input_must_not_change() -> None:
    x, index = torch.zeros(2, 3), torch.arange(4)
    inputs, args, kwargs = _split_inputs("b", [((x, index), {"k": 1}), ((x + 1, index.clone()), {"k": 1})])
    assert inputs.shape == (4, 3) and args[0] is index and kwargs == {"k": 1}
    with pytest.raises(RuntimeError, match="change between batches"):
        _split_inputs("b", [((x, index), {}), ((x, index + 1), {})])


def test_adaround_starts_at_the_float_weight() -> None:
    weight = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    q = WeightQuantizer(QuantConfig(method="mse", placement="matmul", bits="4/4/4", recipe="repq").weight, 6)
    q.calibrate_weight(weight)
    stand_in = _AdaRoundWeight(q, weight)
    scale, zero_point = q.broadcast_qparams(weight)
    inside = (weight / scale + zero_point >= q.spec.qmin) & (weight / scale + zero_point <= q.spec.qmax)
    torch.testing.assert_close(stand_in(weight)[inside], weight[inside])
    q.set_mode(QuantMode.QUANTIZE)
    assert torch.equal(q(stand_in.hard()), stand_in.hard())


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("drop", [False, True])
def test_fused_lsq_matches_autograd(per_channel: bool, drop: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4, 7, generator=g)).requires_grad_()
    step = (torch.rand(7 if per_channel else 1, generator=g) * 0.5 + 0.2).requires_grad_()
    zero_point = torch.full_like(step, 3.0)
    keep = torch.rand(4, 7, generator=g) < 0.5 if drop else None
    out = _LsqFakeQuant.apply(x, step, zero_point, 0, 15, keep)
    grads = torch.autograd.grad(out.pow(2).sum(), (x, step))

    clipped = (x / step + zero_point).clamp(0, 15)  # LSQ: no gradient to x outside the range
    code = clipped + (clipped.round() - clipped).detach()
    expected = (code - zero_point) * step
    if keep is not None:
        expected = torch.where(keep, x, expected)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), (x, step))
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(iters=0), "iters"),
        (dict(iters=2.5), "iters"),
        (dict(batch_size=True), "batch_size"),
        (dict(images=0), "images"),
        (dict(weight_lr=-1e-3), "weight_lr"),
        (dict(act_lr=float("nan")), "act_lr"),
        (dict(round_weight="0.01"), "round_weight"),
        (dict(drop_prob=1.0), "drop_prob"),
        (dict(seed=0.5), "seed"),
    ],
)
def test_settings_are_validated(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^recon\.{field}=.* must be [^.]*$"):
        ReconSettings(**fields)


def test_config_rejects_unknown_or_misplaced_recon_settings() -> None:
    with pytest.raises(ConfigError, match="unknown field"):
        QuantConfig(method="mse", placement="matmul", bits="4/4/4", recipe="recon", recon=dict(iter=5))
    with pytest.raises(ConfigError, match="recipe='recon'"):
        QuantConfig(method="mse", placement="matmul", bits="4/4/4", recipe="repq", recon=dict(iters=5))
    assert QuantConfig(method="mse", placement="matmul", bits="4/4/4", recipe="recon").recon == ReconSettings()


def block_calls(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Block name -> its first argument and its output over whole forwards of ``model`` on ``batches``."""
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for n in names:
        module = model.get_submodule(n)
        handles.append(module.register_forward_pre_hook(lambda _m, args, n=n: inputs[n].append(args[0].clone())))
        handles.append(module.register_forward_hook(lambda _m, _a, out, n=n: outputs[n].append(out.clone())))
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: (torch.cat(inputs[n]), torch.cat(outputs[n])) for n in names}


def test_target_is_the_float_block_on_the_float_input_and_the_block_trains_on_the_quantized_input(
    run: dict[str, Any], calib_batches: list[torch.Tensor]
) -> None:
    """BRECQ/QDrop: the target and the float input come from the float model as it was before
    reconstruction; the quantized input from the quantized model with the earlier blocks done."""
    model, captured = run["model"], run["captured"]
    names = blocks(model)
    assert list(captured) == names
    float_model = copy.deepcopy(model)
    float_model.load_state_dict(run["before"])
    set_quant_mode(float_model, QuantMode.FLOAT)
    float_calls = block_calls(float_model, names, calib_batches)
    quantized_calls = block_calls(model, names, calib_batches)  # a block's input depends only on earlier blocks
    for name in names:
        data = captured[name]
        float_in, float_out = float_calls[name]
        assert torch.equal(data.float_input, float_in), name
        assert torch.equal(data.target, float_out), name
        assert torch.equal(data.quantized_input, quantized_calls[name][0]), name
    for name in names[1:]:  # the inputs after the first block differ, so the checks above tell them apart
        assert not torch.equal(captured[name].float_input, captured[name].quantized_input), name


def test_qdrop_keeps_each_element_float_with_the_drop_probability() -> None:
    """QDrop: ``drop_prob`` is the probability of the float value (0.25, so 0.75 would fail)."""
    prob, n = 0.25, 400_000
    x = torch.rand(n, generator=torch.Generator().manual_seed(1)) + 1  # in [1, 2)
    quantized = -x  # disjoint from x: every output element tells which one was taken
    out = _Drop(prob, torch.Generator().manual_seed(2))(x, quantized)
    from_x = out == x
    assert torch.equal(from_x | (out == quantized), torch.ones(n, dtype=torch.bool))
    share = from_x.double().mean().item()
    assert abs(share - prob) < 4 * math.sqrt(prob * (1 - prob) / n)
    mask = _Drop(prob, torch.Generator().manual_seed(2)).mask(x)  # the same draw: True where float
    assert mask is not None and torch.equal(mask, from_x)


def test_qdrop_with_probability_zero_always_quantizes() -> None:
    x = torch.arange(6.0)
    drop = _Drop(0.0, torch.Generator().manual_seed(0))
    assert drop.mask(x) is None
    assert torch.equal(drop(x, -x), -x)


@pytest.mark.parametrize("iters", [100, 18])
def test_beta_is_off_during_the_warmup_then_decays_linearly_from_20_to_2(iters: int) -> None:
    """AdaRound/BRECQ's linear decay: no regularizer for the first ``int(0.2 * iters)`` steps,
    then ``beta = 2 + (20 - 2) (1 - (t - warmup) / (iters - warmup))``."""
    settings = ReconSettings(iters=iters)
    warmup = {100: 20, 18: 3}[iters]  # 0.2 * iters rounded down
    assert all(_beta(t, settings) is None for t in range(warmup))

    def expected(t: int) -> float:
        return 2.0 + 18.0 * (1 - (t - warmup) / (iters - warmup))

    assert _beta(warmup, settings) == pytest.approx(20.0, rel=1e-12)
    middle = (warmup + iters) // 2
    assert _beta(middle, settings) == pytest.approx(expected(middle), rel=1e-12)
    assert _beta(iters - 1, settings) == pytest.approx(expected(iters - 1), rel=1e-12)
    assert _beta(iters, settings) == pytest.approx(2.0, rel=1e-12)
    if iters == 100:
        assert _beta(60, settings) == pytest.approx(11.0, rel=1e-12)  # halfway from 20 to 2
        assert _beta(99, settings) == pytest.approx(2.225, rel=1e-12)


def rectified_sigmoid(v: float) -> float:
    """AdaRound's ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, zeta 1.1, gamma -0.1."""
    return min(1.0, max(0.0, 1.0 / (1.0 + math.exp(-v)) * 1.2 - 0.1))


def test_adaround_rectified_sigmoid_regularizer_and_rounding() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 9, generator=g)
    q = WeightQuantizer(QuantConfig(method="mse", placement="matmul", bits="4/4/4", recipe="repq").weight, 2)
    q.calibrate_weight(weight)
    stand_in = _AdaRoundWeight(q, weight)
    v = [-10.0, -3.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 3.0, 10.0]  # clamped to 0, inside, exactly 0.5, clamped to 1
    with torch.no_grad():
        stand_in.v.copy_(torch.tensor([v, v[::-1]]))
        stand_in.down[0, -1] = q.spec.qmax - stand_in.zero_point[0, 0]  # rounding up would leave the grid
        stand_in.down[1, -1] = q.spec.qmin - 1 - stand_in.zero_point[1, 0]  # rounding down would leave the grid
    qmin, qmax = q.spec.qmin, q.spec.qmax
    step, zero_point = stand_in.step.flatten().tolist(), stand_in.zero_point.flatten().tolist()

    def on_grid(i: int, j: int, up: float) -> float:
        code = min(qmax, max(qmin, stand_in.down[i, j].item() + up + zero_point[i]))
        return (code - zero_point[i]) * step[i]

    hs = [[rectified_sigmoid(x) for x in stand_in.v[i].tolist()] for i in range(2)]
    h = torch.tensor(hs)
    assert h[0, :2].eq(0).all() and h[0, -2:].eq(1).all() and h[0, 4] == 0.5
    torch.testing.assert_close(stand_in.h(), h, rtol=1e-6, atol=1e-7)
    for beta in (20.0, 3.0, 2.0):  # an odd beta: the absolute value matters
        reference = sum(1 - abs(2 * x - 1) ** beta for row in hs for x in row)
        assert stand_in.regularizer(beta).item() == pytest.approx(reference, rel=1e-5)
    hard = torch.tensor([[on_grid(i, j, 1.0 if hs[i][j] >= 0.5 else 0.0) for j in range(9)] for i in range(2)])
    assert torch.equal(stand_in.hard(), hard)
    soft = torch.tensor([[on_grid(i, j, hs[i][j]) for j in range(9)] for i in range(2)])
    torch.testing.assert_close(stand_in(weight), soft, rtol=1e-6, atol=1e-6)
    assert hard[0, -1] == (qmax - zero_point[0]) * step[0] and hard[1, -1] == (qmin - zero_point[1]) * step[1]


def test_reconstruction_loss_sums_the_squares_over_channels_and_averages_over_images_and_positions() -> None:
    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    per_position = [sum((out[i, j, c] - target[i, j, c]).item() ** 2 for c in range(5)) for i in range(2) for j in range(3)]
    assert _rec_loss(out, target).item() == pytest.approx(sum(per_position) / 6, rel=1e-6)


def test_block_mse_is_the_mean_squared_error_over_every_output_value_of_all_images() -> None:
    """Five images forwarded two at a time: every image counts once, the mean is per value."""
    g = torch.Generator().manual_seed(0)
    block = nn.Linear(3, 2)
    inputs, target = torch.randn(5, 4, 3, generator=g), torch.randn(5, 4, 2, generator=g)
    data = _BlockData(inputs, inputs.clone(), target, (), {})
    with torch.no_grad():
        out = block(inputs)
    squares = [(out[i, j, c] - target[i, j, c]).item() ** 2 for i in range(5) for j in range(4) for c in range(2)]
    assert _block_mse(block, data, 2) == pytest.approx(sum(squares) / len(squares), rel=1e-6)


def test_step_sizes_learn_at_a_cosine_rate_decaying_to_zero_at_the_last_step_and_rounding_at_a_fixed_rate() -> None:
    """QDrop's schedule: ``act_lr (1 + cos(pi t / iters)) / 2`` at step ``t``."""
    iters = 8
    settings = ReconSettings(iters=iters, weight_lr=1e-3, act_lr=1e-2)
    v, step = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.ones(2))
    optimizers = _Optimizers([v], [step], settings)
    rates = []
    for _ in range(iters):
        rates.append(tuple(opt.param_groups[0]["lr"] for opt in optimizers.optimizers))
        optimizers.step((v.sum() + step.sum()) ** 2)
    expected = [(1e-3, 1e-2 * (1 + math.cos(math.pi * t / iters)) / 2) for t in range(iters)]
    assert rates == [pytest.approx(e, rel=1e-12) for e in expected]
    assert optimizers.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-18)


class _Recorder(nn.Module):
    """A block that records its input and passes it through one learned-step point."""

    def __init__(self, point: nn.Module) -> None:
        super().__init__()
        self.point = point
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.point(x)


def test_training_steps_take_each_input_element_from_the_float_model_with_the_drop_probability() -> None:
    """QDrop: the block's input is the float model's where the draw keeps it float (``drop_prob``,
    0.25 here, so 0.75 would fail), the quantized model's elsewhere; each step takes a random
    batch of whole images (not always the leading ones)."""
    g = torch.Generator().manual_seed(0)
    float_input = torch.rand(8, 500, generator=g) + 1  # positive
    quantized_input = -float_input  # negative: every element tells which one was taken
    data = _BlockData(quantized_input, float_input, torch.zeros(8, 500), (), {})
    settings = ReconSettings(iters=4, batch_size=3, drop_prob=0.25)
    drop = _Drop(0.25, torch.Generator().manual_seed(1))
    quantizer = TensorQuantizer(QuantSpec(8, False, Granularity.PER_TENSOR, "minmax"), "act")
    block = _Recorder(_LearnedStep(quantizer, drop, learn=True))
    _train(block, data, [_Swap(block, "point", quantizer, block.point)], settings, drop, tqdm(disable=True))
    seen = torch.cat(block.seen)
    assert len(block.seen) == 4 and seen.shape == (12, 500)
    from_float = seen > 0
    images = [next(i for i, image in enumerate(float_input) if torch.equal(row.abs(), image)) for row in seen]
    assert len(set(images)) > 3  # whole images, drawn at random
    share = from_float.double().mean().item()
    assert abs(share - 0.25) < 4 * math.sqrt(0.25 * 0.75 / seen.numel())


def test_learned_step_stand_in_computes_its_per_channel_quantizer_along_its_channel_axis() -> None:
    """Channels along axis 1 (not the last): the stand-in's step and zero point follow that axis."""
    quantizer = TensorQuantizer(QuantSpec(4, False, Granularity.PER_CHANNEL, "minmax"), "act", channels=3, channel_axis=1)
    quantizer.scale.copy_(torch.tensor([0.1, 0.3, 0.7]))
    quantizer.zero_point.copy_(torch.tensor([2.0, 8.0, 13.0]))
    x = 3 * torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    stand_in = _LearnedStep(quantizer, _Drop(0.0, torch.Generator()), learn=True)
    assert torch.equal(stand_in(x), quantizer.fake_quant(x))


def test_log_stand_in_drops_like_qdrop_and_passes_the_gradient_straight_through() -> None:
    """The log-coded softmax point: its own code where the draw does not keep the element
    float (``drop_prob`` 0.25), ``x`` where it does, and a gradient of 1 everywhere."""
    quantizer = LogQuantizer(QuantSpec(3, False, Granularity.PER_TENSOR, "log_sqrt2"))
    quantizer.scale.fill_(0.5)
    x = torch.rand(64, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    stand_in = _StraightThrough(quantizer, _Drop(0.25, torch.Generator().manual_seed(1)))
    out = stand_in(x)
    keep = _Drop(0.25, torch.Generator().manual_seed(1)).mask(x)  # the same draw
    assert keep is not None and 0 < keep.double().mean() < 0.5
    torch.testing.assert_close(out, torch.where(keep, x, quantizer.fake_quant(x)).detach(), rtol=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.ones_like(x))
