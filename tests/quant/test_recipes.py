"""Low-bit recipes (lit_ptq/quant/recipes.py) on the seeded itpn_tiny: the matmul placement,
RepQ-ViT's log-sqrt2 softmax and MSE weight grids, calibrate-once state files, and errors."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_ptq.errors import CheckpointError, ConfigError
from lit_ptq.quant import (
    RECIPES,
    STEPS,
    QuantConfig,
    calibrate,
    family_of,
    load_quant_state,
    owner_weight,
    quant_points,
    quantize_,
    quantizers,
    save_quant_state,
)
from lit_ptq.quant.primitives import affine_qparams
from lit_ptq.quant.quantizer import LogQuantizer, QuantMode, TensorQuantizer, WeightQuantizer
from lit_ptq.quant.transforms import correct_weights_, reparameterize_


def test_the_recipes_run_these_registered_steps_in_this_order() -> None:
    repq = ("reparameterize", "calibrate_weights", "calibrate_activations_sequential")
    assert dict(RECIPES) == {
        "repq": repq,
        "repq_gptq": (*repq, "correct_weights"),
        "recon": (*repq, "reconstruct"),
        "repq_oclip": (*repq, "clip_weights_output"),  # the output-error clip after the activations
        "repq_gptq_oclip": (*repq, "correct_weights_output_clip"),  # ridge, output-error grid, GPTQ
        "recon_fisher": (*repq, "reconstruct_fisher"),  # the Fisher-weighted block loss
        "recon_joint": (*repq, "reconstruct", "reconstruct_joint"),  # the joint stage after the blocks
        "recon_fisher_joint": (*repq, "reconstruct_fisher", "reconstruct_joint"),
    }
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


# --- The calibration order of a recipe, against a step-by-step reference -------------------

RECIPE_FIELDS = dict(method="mse", placement="matmul", bits="4/4/4")


@pytest.fixture(scope="module")
def distinct_batches() -> list[torch.Tensor]:
    """Three calibration batches of two images, each drawn from its own seed and wider than
    the one before (so the first batch's range and search differ from the last's)."""
    return [
        torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(20 + i)) * (1.0 + 0.5 * i) for i in range(3)
    ]


def _mse_range(observed: list[torch.Tensor], qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``mse`` observer's range from the plain definition: ``observed`` holds one
    ``(channels, values)`` tensor per batch; per channel the running min / max over all of
    them, then on the LAST one the range ``(min, max) * (1 - 0.01 i)``, i < 80, of least
    squared fake-quantization error (the first, widest, on ties), on an evenly strided subset
    when the tensor has more than 2**18 values."""
    lo = torch.stack([rows.amin(dim=1) for rows in observed]).amin(dim=0)
    hi = torch.stack([rows.amax(dim=1) for rows in observed]).amax(dim=0)
    last = observed[-1]
    last = last[:, :: -(-last.numel() // 2**18)]
    best = (torch.full_like(lo, float("inf")), lo.clone(), hi.clone())
    for i in range(80):
        c_lo, c_hi = lo * (1.0 - 0.01 * i), hi * (1.0 - 0.01 * i)
        scale, zp = affine_qparams(c_lo, c_hi, qmin, qmax)
        s, z = scale[:, None], zp[:, None]
        err = ((torch.round(last / s + z).clamp(qmin, qmax) - z) * s - last).pow(2).sum(dim=1)
        better = err < best[0]
        best = tuple(torch.where(better, new, old) for new, old in zip((err, c_lo, c_hi), best))
    return best[1], best[2]


def _log_delta(observed: list[torch.Tensor], bits: int, steps_per_octave: int) -> torch.Tensor:
    """RepQ-ViT's ``delta``: the running max over all batches or the 0.999 / 0.9999 / 0.99999
    quantile of the LAST batch, whichever log-codes that batch with the least squared error
    (the running max first on ties)."""
    last = observed[-1].flatten()
    candidates = [torch.stack([x.max() for x in observed]).max()]
    candidates += [torch.quantile(last, q) for q in (0.999, 0.9999, 0.99999)]

    def squared_error(delta: torch.Tensor) -> torch.Tensor:
        code = torch.round(-steps_per_octave * torch.log2(last / delta))
        value = delta * torch.exp2(-code.clamp(0, 2**bits - 1) / steps_per_octave)
        return (torch.where(code >= 2**bits, 0.0, value) - last).pow(2).sum()

    errors = torch.stack([squared_error(d.clamp(min=torch.finfo(torch.float32).tiny)) for d in candidates])
    return candidates[int(torch.argmin(errors))].clamp(min=torch.finfo(torch.float32).tiny)


def _set_qparams(q: TensorQuantizer, scale: torch.Tensor, zp: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Give ``q`` these buffers (as a loaded state would) and switch it to quantizing."""
    size = q.scale.shape
    buffers = {"scale": scale, "zero_point": zp, "min_val": lo, "max_val": hi}
    q.load_state_dict({**{k: v.reshape(size) for k, v in buffers.items()}, "calibrated": torch.tensor(True)})
    q.set_mode(QuantMode.QUANTIZE)


def _inputs_of(model: torch.nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """A copy of what each quant point in ``names`` receives in one forward of ``model`` on ``x``
    (in the order they are called)."""
    seen: dict[str, torch.Tensor] = {}
    def record(name: str, x: torch.Tensor) -> None:
        seen[name] = x.detach().float().clone()

    handles = [model.get_submodule(n).register_forward_pre_hook(lambda _, args, n=n: record(n, args[0])) for n in names]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _reference_repq(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.nn.Module:
    """``repq`` done by hand on a fresh ``quantize_``-d ``model``: the fold (black box), every
    weight calibrated on its folded weight, then the activation points one at a time in
    forward order (the earlier batches seen with every activation point passing its input
    through, the last with the points before it quantizing)."""
    family = family_of(model)
    reparameterize_(model, batches, family.norm_linear_pairs(model), model.quant_config.act)
    with torch.no_grad():
        for name, q in quantizers(model):
            if isinstance(q, WeightQuantizer):
                weight = owner_weight(model, name)
                lo, hi = _mse_range([weight.reshape(weight.shape[0], -1)], q.spec.qmin, q.spec.qmax)
                _set_qparams(q, *affine_qparams(lo, hi, q.spec.qmin, q.spec.qmax), lo, hi)
        acts = {n: q for n, q in quantizers(model) if not isinstance(q, WeightQuantizer)}
        for q in acts.values():  # uncalibrated points pass their input through, the model computing as when quantizing
            q.set_mode(QuantMode.CALIBRATE)
        earlier = [_inputs_of(model, list(acts), x) for x in batches[:-1]]
        for name in earlier[0]:  # the points in the order the forward calls them
            q = acts[name]
            observed = [seen[name] for seen in earlier] + [_inputs_of(model, [name], batches[-1])[name]]
            if isinstance(q, LogQuantizer):
                lo = torch.stack([x.min() for x in observed]).min()
                hi = torch.stack([x.max() for x in observed]).max()
                delta = _log_delta(observed, q.spec.bits, 2 if q.spec.observer == "log_sqrt2" else 1)
                _set_qparams(q, delta, torch.zeros_like(delta), lo, hi)
            else:
                lo, hi = _mse_range([x.reshape(1, -1) for x in observed], q.spec.qmin, q.spec.qmax)
                _set_qparams(q, *affine_qparams(lo, hi, q.spec.qmin, q.spec.qmax), lo, hi)
    return model


@pytest.fixture(scope="module")
def repq_reference(tiny_float: torch.nn.Module, distinct_batches: list[torch.Tensor]) -> torch.nn.Module:
    """:func:`_reference_repq` on the seeded itpn_tiny and :func:`distinct_batches` (not to be modified)."""
    model = quantize_(copy.deepcopy(tiny_float), QuantConfig(**RECIPE_FIELDS, recipe="repq"))
    return _reference_repq(model, distinct_batches)


@pytest.mark.parametrize("recipe", ["repq", "repq_gptq"])
def test_recipe_calibrates_weights_then_activations_in_forward_order_on_the_last_batch(
    make_tiny, distinct_batches, eval_images, repq_reference, recipe
) -> None:
    """Every parameter and buffer and the logits equal those of the recipe done step by step."""
    model = quantize_(make_tiny(), QuantConfig(**RECIPE_FIELDS, recipe=recipe)).train()
    labels = torch.zeros(2, dtype=torch.long)
    assert calibrate(model, [(x, labels) for x in distinct_batches]) == len(distinct_batches)
    assert model.training  # calibrate restores the mode it found
    model.eval()
    reference = copy.deepcopy(repq_reference)
    if recipe == "repq_gptq":
        with torch.no_grad():
            correct_weights_(reference, family_of(reference).blocks(reference), distinct_batches)
    expected = reference.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert all(p.mode is QuantMode.QUANTIZE for _, p in quant_points(model))
    with torch.no_grad():
        assert torch.equal(model(eval_images), reference(eval_images))
