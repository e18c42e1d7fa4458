"""The opt-in reconstruction objectives (``lit_ptq.quant.transforms.recon``) on the seeded
``itpn_tiny``: FIMA-Q's Fisher-weighted block loss (``reconstruct_fisher``) and the joint
stage on the KL divergence from the float logits (``reconstruct_joint``)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
import torch.nn as nn

from lit_ptq.errors import CalibrationError, ConfigError
from lit_ptq.quant import QuantConfig, WeightQuantizer, calibrate, family_of, quantize_, quantizers
from lit_ptq.quant.calibration import CalibrationContext, run_calibration
from lit_ptq.quant.config import ReconSettings
from lit_ptq.quant.plugins.itpn import blocks
from lit_ptq.quant.transforms import recon, reconstruct_, reconstruct_joint, reconstruct_joint_
from lit_ptq.quant.transforms.recon import (
    Rounding,
    _AdaRoundWeight,
    _fisher_loss,
    _fisher_weights,
    _float_weights,
    _kl,
    _LearnedStep,
    _rec_loss,
)

SETTINGS = ReconSettings(iters=4, batch_size=4, weight_lr=1e-2, act_lr=1e-3, joint_iters=10)
"""Few steps, with learning rates high enough that they move every variable."""


def calibrated(tiny_float: nn.Module, calib_batches: list[torch.Tensor]) -> nn.Module:
    """A copy of the seeded model with the ``repq`` steps done (what the recon recipes start from)."""
    model = quantize_(copy.deepcopy(tiny_float), QuantConfig(method="mse", placement="matmul", bits="4/4/4", recipe="repq"))
    calibrate(model, calib_batches)
    return model


# --- the Fisher-weighted block loss -----------------------------------------------------------


@pytest.fixture(scope="module")
def repq_model(tiny_float: nn.Module, calib_batches: list[torch.Tensor]) -> nn.Module:
    """The seeded model after the ``repq`` steps (tests that use it do not change it)."""
    return calibrated(tiny_float, calib_batches)


@pytest.mark.parametrize("index", [0, 2, 11])
def test_fisher_weights_are_the_squared_gradients_of_each_images_own_cross_entropy(
    tiny_float: nn.Module, repq_model: nn.Module, calib_batches: list[torch.Tensor], index: int
) -> None:
    model = repq_model
    names = blocks(model)
    weights = _fisher_weights(model, names[index], calib_batches, _float_weights(model, names))

    # Reference: the unquantized float model, one image at a time, the gradient of
    # -log softmax(z)[argmax z] at the block's output kept by retain_grad.
    reference = copy.deepcopy(tiny_float)
    kept: list[torch.Tensor] = []

    def keep(_: nn.Module, _args: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        kept.append(out)

    handle = reference.get_submodule(names[index]).register_forward_hook(keep)
    grads = []
    for image in torch.cat(calib_batches):
        kept.clear()
        logits = reference(image[None])[0]
        (-torch.log_softmax(logits, -1)[logits.argmax()]).backward()
        grads.append(kept[0].grad[0])
    handle.remove()
    squared = torch.stack(grads) ** 2
    expected = squared / squared.pow(2).mean().sqrt()

    assert weights.shape == squared.shape
    torch.testing.assert_close(weights, expected, rtol=1e-3, atol=1e-6)
    assert float(weights.pow(2).mean()) == pytest.approx(1.0, rel=1e-5)


def test_fisher_loss_weights_each_squared_error_then_sums_channels_and_averages_the_rest() -> None:
    g = torch.Generator().manual_seed(0)
    out, target, weight = (torch.rand(2, 3, 5, generator=g) for _ in range(3))
    expected = sum(
        float(weight[i, t, c]) * (float(out[i, t, c]) - float(target[i, t, c])) ** 2
        for i in range(2)
        for t in range(3)
        for c in range(5)
    ) / (2 * 3)
    assert float(_fisher_loss(out, target, weight)) == pytest.approx(expected, rel=1e-6)
    assert torch.equal(_fisher_loss(out, target, torch.ones_like(out)), _rec_loss(out, target))


def test_unknown_block_loss_is_refused(tiny_float: nn.Module, calib_batches: list[torch.Tensor]) -> None:
    model = copy.deepcopy(tiny_float)
    with pytest.raises(ValueError, match="^loss='kl' must be one of mse, fisher$"):
        reconstruct_(model, blocks(model), calib_batches, SETTINGS, loss="kl")


# --- the joint stage --------------------------------------------------------------------------


def test_kl_is_the_divergence_of_the_quantized_from_the_float_softmax_averaged_over_images() -> None:
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    expected = 0.0
    for i in range(3):
        p = [float(v) for v in target[i].double().exp() / target[i].double().exp().sum()]
        q = [float(v) for v in logits[i].double().exp() / logits[i].double().exp().sum()]
        expected += sum(pc * (torch.tensor(pc).log() - torch.tensor(qc).log()).item() for pc, qc in zip(p, q)) / 3
    assert float(_kl(logits, target)) == pytest.approx(expected, rel=1e-5)
    assert float(_kl(target, target)) == pytest.approx(0.0, abs=1e-7)


@pytest.fixture(scope="module")
def joint(repq_model: nn.Module, calib_batches: list[torch.Tensor]) -> dict[str, Any]:
    """The model after the block stage and after the joint stage, the rounding the block stage
    left, the stand-ins as the joint stage started and ended, and the KL before and after."""
    model = copy.deepcopy(repq_model)
    rounding = Rounding()
    reconstruct_(model, blocks(model), calib_batches, SETTINGS, rounding=rounding)
    after_blocks = {k: v.clone() for k, v in model.state_dict().items()}
    seen: dict[str, Any] = {}
    train = recon._train_joint

    def recording(model: nn.Module, images: torch.Tensor, target: torch.Tensor, swaps: Any, *args: Any) -> None:
        seen["start"] = [(s, {k: v.detach().clone() for k, v in s.stand_in.state_dict().items()}) for s in swaps]
        train(model, images, target, swaps, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recon, "_train_joint", recording)
        kl = reconstruct_joint_(model, blocks(model), calib_batches, SETTINGS, rounding)
    return dict(model=model, rounding=rounding, after_blocks=after_blocks, start=seen["start"], kl=kl)


def _owner(swap: Any, model: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is swap.parent)


def test_joint_stage_resumes_every_weight_from_the_block_stages_v_on_the_float_weight(joint: dict[str, Any]) -> None:
    model, rounding = joint["model"], joint["rounding"]
    resumed = [(s, state) for s, state in joint["start"] if isinstance(s.stand_in, _AdaRoundWeight)]
    assert len(resumed) == len(rounding.v) == len(rounding.float_weights) > 0
    for swap, state in resumed:
        name = f"{_owner(swap, model)}.weight"
        assert torch.equal(state["v"], rounding.v[name])
        assert torch.equal(state["down"], (rounding.float_weights[name] / state["step"]).floor())


def test_joint_stage_trains_every_blocks_rounding_and_step_sizes(joint: dict[str, Any]) -> None:
    model = joint["model"]
    moved: dict[str, set[str]] = {name: set() for name in blocks(model)}
    for swap, start in joint["start"]:
        owner = _owner(swap, model)
        block = next(b for b in moved if owner == b or owner.startswith(b + "."))
        if isinstance(swap.stand_in, _AdaRoundWeight) and not torch.equal(swap.stand_in.v, start["v"]):
            moved[block].add("v")
        if isinstance(swap.stand_in, _LearnedStep) and not torch.equal(swap.stand_in.step, start["step"]):
            moved[block].add("step")
    assert moved == {name: {"v", "step"} for name in moved}


def test_joint_stage_changes_only_block_weights_and_activation_scales(joint: dict[str, Any]) -> None:
    model, before = joint["model"], joint["after_blocks"]
    allowed = {f"{n}.scale" for n, q in quantizers(model) if not isinstance(q, WeightQuantizer)}
    allowed |= {f"{n}.weight" for n in {_owner(s, model) for s, _ in joint["start"] if isinstance(s.stand_in, _AdaRoundWeight)}}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= allowed
    assert any(k.endswith(".weight") for k in changed) and any(k.endswith(".scale") for k in changed)
    for name, q in quantizers(model):
        if isinstance(q, WeightQuantizer):
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            assert torch.equal(q(owner.weight), owner.weight), name  # hard-rounded: on the grid
    assert all(0 <= kl < float("inf") for kl in joint["kl"])


def test_joint_step_needs_a_block_stage_before_it(repq_model: nn.Module, calib_batches: list[torch.Tensor]) -> None:
    model = repq_model
    config = QuantConfig(method="mse", placement="matmul", bits="4/4/4", recipe="recon_joint")
    ctx = CalibrationContext(config=config, family=family_of(model), device=torch.device("cpu"))
    with pytest.raises(CalibrationError, match="^reconstruct_joint needs reconstruct or reconstruct_fisher before it in the recipe$"):
        reconstruct_joint(model, calib_batches, ctx)


@pytest.mark.parametrize(
    "recipe", [pytest.param("recon_fisher", marks=pytest.mark.slow), pytest.param("recon_joint", marks=pytest.mark.slow), "recon_fisher_joint"]
)
def test_recipes_run_and_leave_their_results(make_tiny, calib_batches: list[torch.Tensor], eval_images: torch.Tensor, recipe: str) -> None:
    config = QuantConfig(method="mse", placement="matmul", bits="4/4/4", recipe=recipe, recon=dict(iters=2, joint_iters=2, images=5))
    model = quantize_(make_tiny(), config)
    ctx = run_calibration(model, calib_batches)
    assert torch.isfinite(model(eval_images)).all()
    assert set(ctx.results) == {"reconstruction", *({"joint_reconstruction"} if "joint" in recipe else set())}


def test_joint_iters_is_validated_and_recon_settings_go_with_every_reconstructing_recipe() -> None:
    with pytest.raises(ConfigError, match=r"^recon\.joint_iters=0 must be a positive integer$"):
        ReconSettings(joint_iters=0)
    assert ReconSettings().joint_iters == 200
    for recipe in ("recon_fisher", "recon_joint", "recon_fisher_joint"):
        config = QuantConfig(method="mse", placement="matmul", bits="4/4/4", recipe=recipe, recon=dict(joint_iters=5))
        assert config.recon == dataclasses.replace(ReconSettings(), joint_iters=5)
    with pytest.raises(ConfigError, match="^recon settings are for recipe='recon' or another reconstructing recipe"):
        QuantConfig(method="mse", placement="matmul", bits="4/4/4", recipe="repq", recon=dict(joint_iters=5))


def test_the_joint_steps_setting_is_recorded_only_by_a_recipe_that_runs_it() -> None:
    recon = QuantConfig(method="mse", placement="matmul", bits="4/4/4", recipe="recon").describe()["recon"]
    assert recon == dict(iters=500, batch_size=32, images=None, weight_lr=1e-3, act_lr=4e-5, round_weight=0.01,
                         drop_prob=0.5, seed=0)  # fmt: skip  (records and state files of `recon` as before)
    joint = QuantConfig(method="mse", placement="matmul", bits="4/4/4", recipe="recon_joint", recon=dict(joint_iters=7))
    assert joint.describe()["recon"] == {**recon, "joint_iters": 7}
