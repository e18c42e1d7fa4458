"""Low-bit recipes (lit_ptq/quant/recipes.py) on the seeded itpn_tiny: the matmul placement,
RepQ-ViT's log-sqrt2 softmax and MSE weight grids, calibrate-once state files, and errors."""

from __future__ import annotations

import pytest
import torch

from lit_ptq.errors import CheckpointError, ConfigError
from lit_ptq.quant import RECIPES, STEPS, QuantConfig, calibrate, load_quant_state, quant_points, quantize_, save_quant_state
from lit_ptq.quant.quantizer import LogQuantizer, QuantMode, WeightQuantizer


def test_the_recipes_run_these_registered_steps_in_this_order() -> None:
    repq = ("reparameterize", "calibrate_weights", "calibrate_activations_sequential")
    assert dict(RECIPES) == {"repq": repq, "repq_gptq": (*repq, "correct_weights"), "recon": (*repq, "reconstruct")}
    assert all(step in STEPS for steps in RECIPES.values() for step in steps)


def test_matmul_placement_points(make_quantized) -> None:
    model = make_quantized(calibrated=False, method="mse", placement="matmul", bits="4/4/4", recipe="repq")
    names = dict(quant_points(model))
    assert isinstance(names["blocks.4.attn.softmax_output"], LogQuantizer)
    for point in ("query", "key", "value"):
        assert f"blocks.4.attn.{point}" in names
    assert "blocks.4.attn.qkv.input_quantizer" in names and "head.input_quantizer" in names
    assert names["patch_embed.proj.input_quantizer"].bits == 8  # the image, as RepQ-ViT
    assert not any(n.endswith(("qkv_output", "proj_output", "fc2_output", "act_output", "reduction_output")) for n in names)
    assert not any("norm" in n.split(".")[-2] for n in names)  # LayerNorms stay float
    weight = names["blocks.4.attn.qkv.weight_quantizer"]
    assert isinstance(weight, WeightQuantizer) and not weight.spec.signed and weight.spec.observer == "mse"


@pytest.mark.parametrize("recipe", ["repq", "repq_gptq"])
def test_recipes_at_8_bits_stay_close_to_float(make_tiny, make_quantized, eval_images, recipe) -> None:
    with torch.no_grad():
        reference = make_tiny()(eval_images)
        model = make_quantized(method="mse", placement="matmul", bits="8/8/8", recipe=recipe)
        logits = model(eval_images)
    assert (logits - reference).norm() < 0.1 * reference.norm()
    assert all(p.mode is QuantMode.QUANTIZE for _, p in quant_points(model))


def test_gptq_weights_lie_on_their_grids(make_quantized) -> None:
    model = make_quantized(method="mse", placement="matmul", bits="4/4/4", recipe="repq_gptq")
    for name, point in quant_points(model):
        if isinstance(point, WeightQuantizer):
            weight = model.get_submodule(name.rsplit(".", 1)[0]).weight
            assert torch.equal(point.quantized_weight(weight), weight), name


def test_state_round_trip_restores_folded_weights(make_tiny, make_quantized, calib_batches, eval_images, tmp_path) -> None:
    fields = dict(method="mse", placement="matmul", bits="4/4/4", recipe="repq_gptq")
    model = make_quantized(**fields)
    path = str(tmp_path / "state.pt")
    save_quant_state(model, path)
    fresh = quantize_(make_tiny(), QuantConfig(**fields))
    load_quant_state(fresh, path)
    assert fresh.blocks[1].reduction.bias is not None  # the fold gave the bias-free reduction a bias
    with torch.no_grad():
        assert torch.equal(fresh(eval_images), model(eval_images))
    plain = quantize_(make_tiny(), QuantConfig("mse", "matmul", "4/4/4"))
    with pytest.raises(CheckpointError, match="another model or config"):
        load_quant_state(plain, path)


def test_recipes_are_deterministic(make_quantized, eval_images) -> None:
    fields = dict(method="mse", placement="matmul", bits="4/4/4", recipe="repq_gptq")
    with torch.no_grad():
        assert torch.equal(make_quantized(**fields)(eval_images), make_quantized(**fields)(eval_images))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(recipe="repq"), "needs placement='matmul'"),
        (dict(placement="matmul", recipe="smoothquant"), "recipe='smoothquant' is not one of"),
        (dict(placement="matmul", recipe="repq", lis=True), "cannot be combined"),
        (dict(softmax="log3"), "softmax='log3' is not one of"),
        (dict(lis=True, softmax="log2"), "pick one"),
        (dict(placement="matmul", recipe="repq", recon={"iters": 5}), "recon settings are for recipe='recon'"),
        (dict(placement="matmul", recipe="recon", recon={"iters": 0}), "recon.iters=0"),
        (dict(placement="matmul", recipe="recon", recon={"steps": 5}), "unknown field"),
    ],
)
def test_bad_recipe_settings_fail_in_one_sentence(fields, message) -> None:
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**{"method": "mse", **fields})


def test_calibration_needs_batches(make_quantized) -> None:
    from lit_ptq.quant import CalibrationError

    model = make_quantized(calibrated=False, method="mse", placement="matmul", bits="4/4/4", recipe="repq")
    with pytest.raises(CalibrationError, match="at least one batch"):
        calibrate(model, [])
