"""Calibration as registered steps (lit_ptq/quant/steps.py, calibration.py).

An observer and a recipe registered in this file, outside the package, run by name through
``QuantConfig`` and ``calibrate``: a recipe made of ``repq``'s steps gives ``repq``'s result
bit for bit, and a fixed-range observer's range is the scale of every activation point. A
bug in a step keeps its exception and traceback; the library's own errors are one line.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator

import pytest
import torch

from lit_ptq.errors import CalibrationError, ConfigError
from lit_ptq.quant import (
    METHODS,
    OBSERVERS,
    RECIPES,
    STEPS,
    CalibrationContext,
    Observer,
    QuantConfig,
    QuantMode,
    calibrate,
    quant_points,
    quantize_,
    quantizers,
    register_observer,
    register_recipe,
    register_step,
    run_calibration,
)
from lit_ptq.quant import steps as steps_module
from lit_ptq.quant.steps import PLAIN_STEPS

LOW, HIGH = -2.0, 6.0


class FixedRangeObserver(Observer):
    """Whatever it sees, the range is ``[LOW, HIGH]``."""

    def update(self, x: torch.Tensor, last: bool = False) -> None:
        self.min_val, self.max_val = torch.tensor(LOW), torch.tensor(HIGH)


@pytest.fixture
def fixed_range() -> Iterator[str]:
    """The observer registered as ``fixed_range`` for one test."""
    register_observer("fixed_range")(FixedRangeObserver)
    yield "fixed_range"
    del OBSERVERS["fixed_range"]


@pytest.fixture
def registered() -> Iterator[list[str]]:
    """Names of the steps and recipes a test registers (append them); removed afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        steps_module._STEPS.pop(name, None)
        steps_module._RECIPES.pop(name, None)


def _state_and_logits(model: torch.nn.Module, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    with torch.no_grad():
        return dict(model.state_dict()), model(images)


def test_a_recipe_of_repqs_steps_registered_here_is_repq_bit_for_bit(
    registered, make_tiny, calib_batches, eval_images
) -> None:
    register_recipe("repq_again", RECIPES["repq"])
    registered.append("repq_again")
    results = {}
    for recipe in ("repq_again", "repq"):
        model = quantize_(make_tiny(), QuantConfig(method="mse", placement="matmul", bits="4/4/4", recipe=recipe))
        assert calibrate(model, calib_batches) == len(calib_batches)
        results[recipe] = _state_and_logits(model, eval_images)
    (state, logits), (ref_state, ref_logits) = results["repq_again"], results["repq"]
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    assert torch.equal(logits, ref_logits)
    float_state = make_tiny().state_dict()
    assert not torch.equal(state["blocks.4.norm1.weight"], float_state["blocks.4.norm1.weight"])  # folded


def test_an_observer_registered_here_is_a_method_and_its_range_is_the_scale(
    fixed_range, make_tiny, calib_batches
) -> None:
    assert fixed_range in METHODS
    model = quantize_(make_tiny(), QuantConfig(method=fixed_range, placement="full", bits="8/8/8"))
    calibrate(model, calib_batches)
    acts = [(n, q) for n, q in quantizers(model) if q.role == "act"]
    assert len(acts) > 10 and all(q.spec.observer == fixed_range for _, q in acts)
    scale = torch.tensor((HIGH - LOW) / 255, dtype=torch.float32)  # uint8: 8 / 255
    for name, q in acts:
        assert q.min_val.tolist() == [LOW] and q.max_val.tolist() == [HIGH], name
        assert torch.equal(q.scale, scale.reshape(1)), name
        assert q.zero_point.tolist() == [64.0], name  # -round(-2 / (8 / 255)) = 64
    weights = [q for _, q in quantizers(model) if q.role == "weight"]
    assert weights and all(q.spec.observer == "minmax" for q in weights)


def test_an_observer_that_is_not_a_method_is_refused_with_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"method='ptf' is not one of: minmax, ema, percentile, omse, mse$"):
        QuantConfig(method="ptf")


def test_plain_calibration_is_the_observe_then_weights_steps() -> None:
    assert PLAIN_STEPS == ("observe", "calibrate_weights")
    assert all(name in STEPS for name in PLAIN_STEPS)


def test_a_step_registered_here_runs_in_its_recipe_with_the_context(registered, make_tiny, calib_batches) -> None:
    seen: list[tuple[str, object]] = []

    @register_step("record")
    def record(model, batches, ctx: CalibrationContext) -> None:
        seen.append((ctx.config.recipe, ctx.family.name, ctx.device, len(batches), [b.shape for b in batches]))
        ctx.results["record"] = "done"

    register_recipe("recorded", ("record", *RECIPES["repq"]))
    registered.extend(["record", "recorded"])
    model = quantize_(make_tiny(), QuantConfig(method="mse", placement="matmul", recipe="recorded"))
    ctx = run_calibration(model, calib_batches)
    assert seen == [("recorded", "itpn", torch.device("cpu"), 2, [torch.Size([4, 3, 32, 32])] * 2)]
    assert ctx.results["record"] == "done" and ctx.batches == 2
    assert all(q.mode is QuantMode.QUANTIZE for _, q in quant_points(model))


def test_a_recipe_whose_step_reads_a_fact_the_family_lacks_fails_before_calibration(registered, make_tiny) -> None:
    register_step("needs_widgets", needs={"widgets": "widgets"})(lambda model, batches, ctx: None)
    register_recipe("widgets", ("needs_widgets",))
    registered.extend(["needs_widgets", "widgets"])
    with pytest.raises(ConfigError, match=r"^recipe='widgets' needs the itpn plugin to list its widgets$"):
        quantize_(make_tiny(), QuantConfig(method="mse", placement="matmul", recipe="widgets"))


def test_a_recipe_naming_an_unregistered_step_fails_in_one_line(registered, make_tiny) -> None:
    register_recipe("ghost", ("observe", "ghost_step"))
    registered.append("ghost")
    with pytest.raises(ConfigError, match=r"recipe='ghost' runs the step\(s\) ghost_step, which no loaded module registers"):
        quantize_(make_tiny(), QuantConfig(method="mse", placement="matmul", recipe="ghost"))


def test_an_unregistered_recipe_is_refused_with_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"recipe='repq2' is not one of: repq, repq_gptq, recon, repq_oclip, repq_gptq_oclip, recon_fisher, recon_joint, recon_fisher_joint$"):
        QuantConfig(method="mse", placement="matmul", recipe="repq2")


@pytest.mark.parametrize("error", [ValueError("a bug"), RuntimeError("a bug")])
def test_a_bug_in_a_step_keeps_its_exception_and_traceback(error, registered, make_tiny, calib_batches) -> None:
    @register_step("buggy")
    def buggy(model, batches, ctx) -> None:
        raise error

    register_recipe("buggy", ("calibrate_weights", "buggy"))
    registered.append("buggy")
    model = quantize_(make_tiny(), QuantConfig(method="mse", placement="matmul", recipe="buggy"))
    with pytest.raises(type(error), match="a bug") as info:
        calibrate(model, calib_batches)
    assert info.value is error and not isinstance(info.value, CalibrationError)
    assert any(frame.name == "buggy" for frame in traceback.extract_tb(info.tb))
    assert all(q.mode is QuantMode.FLOAT for _, q in quant_points(model))  # left float


def test_registering_a_name_twice_is_refused(registered) -> None:
    with pytest.raises(ValueError, match="a calibration step named 'observe' is already registered"):
        register_step("observe")(lambda model, batches, ctx: None)
    with pytest.raises(ValueError, match="a recipe named 'repq' is already registered"):
        register_recipe("repq", ("observe",))
    with pytest.raises(ValueError, match="needs a non-empty sequence of step names"):
        register_recipe("one_string", "observe")


def test_the_registries_are_read_only() -> None:
    with pytest.raises(TypeError):
        RECIPES["mine"] = ("observe",)  # type: ignore[index]
    with pytest.raises(TypeError):
        STEPS["mine"] = STEPS["observe"]  # type: ignore[index]
