"""Block reconstruction (``lit_ptq.quant.transforms.recon``) on the seeded ``itpn_tiny``."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn as nn

from lit_ptq.errors import ConfigError
from lit_ptq.quant import QuantConfig, QuantMode, WeightQuantizer, calibrate, quant_points, quantize_, quantizers
from lit_ptq.quant.config import ReconSettings
from lit_ptq.quant.plugins.itpn import blocks
from lit_ptq.quant import owner_weight
from lit_ptq.quant.transforms import reconstruct_
from lit_ptq.quant.transforms.recon import _AdaRoundWeight, _LsqFakeQuant, _limit, _split_inputs

SETTINGS = ReconSettings(iters=20, batch_size=4, weight_lr=1e-2, act_lr=1e-3)
"""Few steps, with learning rates high enough that 20 steps change the rounding."""


def calibrated(tiny_float: nn.Module, calib_batches: list[torch.Tensor]) -> nn.Module:
    """A copy of the seeded model with the ``repq`` steps done (what ``recon`` starts from)."""
    model = quantize_(copy.deepcopy(tiny_float), QuantConfig(method="mse", placement="matmul", bits="4/4/4", recipe="repq"))
    calibrate(model, calib_batches)
    return model


@pytest.fixture(scope="module")
def run(tiny_float: nn.Module, calib_batches: list[torch.Tensor]) -> dict[str, Any]:
    """The model before and after reconstruction with :data:`SETTINGS`, and the block errors."""
    model = calibrated(tiny_float, calib_batches)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    errors = reconstruct_(model, blocks(model), calib_batches, SETTINGS)
    return dict(model=model, before=before, errors=errors)


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
