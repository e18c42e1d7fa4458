"""Weight clipping by output error (lit_ptq/quant/transforms/weight_clip.py): the range each
weight row gets is the ``mse`` candidate of least ``||A w_c - A q(w_c)||^2``, found here by a
brute-force loop over channels and candidates with the captured inputs themselves."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from lit_ptq.quant import STEPS, CalibrationContext, QuantConfig, QuantMode, calibrate, quantize_, set_quant_mode
from lit_ptq.quant.config import Granularity, QuantSpec
from lit_ptq.quant.primitives import affine_qparams
from lit_ptq.quant.quantizer import WeightQuantizer
from lit_ptq.quant.transforms import clip_weights_output_, correct_weights_, layer_stats, output_clip_, ridge_weights
from lit_ptq.quant.transforms.gptq import correct_layer_
from lit_ptq.quant.transforms.weight_clip import clip_layer_

CANDIDATES = 80  # the mse search's: (min, max) * (1 - 0.01 i), i < 80


def brute_force_ranges(weight: torch.Tensor, a: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``weight`` ``(out, in)``, the candidate range of least ``||A w - A q(w)||^2``
    (the first, i.e. widest, on ties) with ``A`` ``(rows, in)`` used directly; also the index."""
    qmax = 2**bits - 1
    w, a64 = weight.detach().float(), a.double()
    factors = [1.0 - 0.01 * i for i in range(CANDIDATES)]
    lows, highs, picks = [], [], []
    for row in w:
        lo = torch.stack([row.min() * f for f in factors])[:, None]  # (candidates, 1)
        hi = torch.stack([row.max() * f for f in factors])[:, None]
        scale, zp = affine_qparams(lo, hi, 0, qmax)
        q = (torch.round(row / scale + zp).clamp(0, qmax) - zp) * scale  # (candidates, in)
        errors = (a64 @ (row.double() - q.double()).T).pow(2).sum(dim=0)  # ||A w_c - A q||^2 per candidate
        best = int(torch.nonzero(errors == errors.min())[0])  # the first (widest) on ties
        lows.append(lo[best, 0])
        highs.append(hi[best, 0])
        picks.append(best)
    return torch.stack(lows), torch.stack(highs), torch.tensor(picks)


def weight_quantizer(out: int, bits: int = 4) -> WeightQuantizer:
    """A recipe's weight quantizer: asymmetric, per output channel, ``mse``."""
    return WeightQuantizer(QuantSpec(bits, False, Granularity.PER_CHANNEL, "mse"), out)


def asymmetric_case(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of uneven offsets, widths and one heavy tail each; correlated inputs with uneven
    channel means and a few wide channels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 40, generator=g) * torch.rand(24, 1, generator=g) + 0.3 * torch.randn(24, 1, generator=g)
    w[torch.arange(24), torch.randint(0, 40, (24,), generator=g)] *= 6.0  # an outlier in each row
    x = torch.randn(600, 40, generator=g) @ torch.randn(40, 40, generator=g) * 0.3 + torch.linspace(-1.0, 2.0, 40)
    x[:, [3, 17, 31]] *= 8.0  # wide input channels
    return w, x


@pytest.mark.parametrize("bits", [4, 6])
@pytest.mark.parametrize("seed", [0, 1])
def test_output_clip_picks_the_brute_force_argmin_of_the_output_error(seed: int, bits: int) -> None:
    w, x = asymmetric_case(seed)
    quantizer = weight_quantizer(len(w), bits)
    output_clip_(quantizer, w, (x.T @ x).double())
    lo, hi, picks = brute_force_ranges(w, x, bits)
    assert torch.equal(quantizer.min_val, lo) and torch.equal(quantizer.max_val, hi)
    scale, zp = affine_qparams(lo, hi, 0, 2**bits - 1)
    assert torch.equal(quantizer.scale, scale) and torch.equal(quantizer.zero_point, zp)
    assert bool(quantizer.calibrated) and quantizer.ready
    mse = weight_quantizer(len(w), bits)
    mse.calibrate_weight(w)
    differs = (mse.min_val != quantizer.min_val).sum()
    assert differs >= len(w) // 4, "the output error should move many rows off the weight's own mse range"
    assert len(set(picks.tolist())) > 3  # not a corner of the grid: the candidates matter


def test_output_clip_with_a_scaled_identity_hessian_is_the_mse_range() -> None:
    w, _ = asymmetric_case(2)
    quantizer, mse = weight_quantizer(len(w)), weight_quantizer(len(w))
    output_clip_(quantizer, w, 3.0 * torch.eye(w.shape[1], dtype=torch.float64))
    mse.calibrate_weight(w)
    assert torch.equal(quantizer.min_val, mse.min_val) and torch.equal(quantizer.scale, mse.scale)


def test_output_clip_refuses_a_quantizer_without_the_mse_candidates() -> None:
    quantizer = WeightQuantizer(QuantSpec(4, True, Granularity.PER_CHANNEL, "minmax"), 3)
    with pytest.raises(ValueError, match="mse candidates.*minmax"):
        output_clip_(quantizer, torch.randn(3, 5), torch.eye(5, dtype=torch.float64))


@pytest.fixture(scope="module")
def calibrated_repq(tiny_float: nn.Module, calib_batches: list[torch.Tensor]) -> nn.Module:
    """The seeded ``itpn_tiny`` at W4A4 after ``repq``, quantizing; tests take copies."""
    model = quantize_(copy.deepcopy(tiny_float), QuantConfig("minmax", "matmul", "4/4/4", recipe="repq"))
    calibrate(model, calib_batches)
    return model


def captured_rows(model: nn.Module, layer: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """``A``: the layer's inputs in ``model`` after its input quantizer, as rows of the flattened
    weight (tokens, or the non-overlapping patches of a Conv2d whose stride is its kernel)."""
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(layer.input_quantizer(args[0]).detach().clone()))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    if isinstance(layer, nn.Conv2d):
        (k, _) = layer.kernel_size
        assert layer.stride == layer.kernel_size and layer.padding == (0, 0)
        return torch.cat([v.reshape(v.shape[0], v.shape[1], v.shape[2] // k, k, v.shape[3] // k, k)
                          .permute(0, 2, 4, 1, 3, 5).reshape(-1, v.shape[1] * k * k) for v in seen])
    return torch.cat([v.reshape(-1, v.shape[-1]) for v in seen])


@pytest.mark.parametrize("name", ["patch_embed.proj", "blocks.2.mlp.fc2", "blocks.4.attn.qkv", "head"])
def test_clip_layer_writes_the_brute_force_ranges_of_its_captured_quantized_inputs(
    calibrated_repq: nn.Module, calib_batches: list[torch.Tensor], name: str
) -> None:
    model = copy.deepcopy(calibrated_repq)
    layer = model.get_submodule(name)
    weight = layer.weight.detach().clone()
    a = captured_rows(model, layer, calib_batches)
    lo, hi, _ = brute_force_ranges(weight.reshape(len(weight), -1), a, 4)
    before = layer.weight_quantizer.min_val.clone()
    clip_layer_(model, layer, calib_batches)
    assert torch.equal(layer.weight_quantizer.min_val, lo) and torch.equal(layer.weight_quantizer.max_val, hi)
    assert not torch.equal(before, lo)  # the repq (mse) range was another
    assert torch.equal(layer.weight, weight)  # the weight itself is kept


def test_clip_weights_output_clips_each_block_in_forward_order_on_the_quantizing_model(
    calibrated_repq: nn.Module, calib_batches: list[torch.Tensor]
) -> None:
    # clip_layer_ (pinned above) on the whole quantizing model, in forward order: each layer
    # sees the layers before it with their new grids
    expected = copy.deepcopy(calibrated_repq)
    for name in ("patch_embed.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"):
        clip_layer_(expected, expected.get_submodule(name), calib_batches)
    model = set_quant_mode(copy.deepcopy(calibrated_repq), QuantMode.FLOAT)  # the step switches it back
    assert clip_weights_output_(model, ["patch_embed", "blocks.0"], calib_batches) == 3
    expected_state = expected.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected_state[key]), key
    assert not torch.equal(model.blocks[0].mlp.fc2.weight_quantizer.scale, calibrated_repq.blocks[0].mlp.fc2.weight_quantizer.scale)


def test_ridge_and_gptq_round_within_the_output_error_grid_of_the_ridge_weight(
    calibrated_repq: nn.Module, calib_batches: list[torch.Tensor]
) -> None:
    model = copy.deepcopy(calibrated_repq)
    layer = model.blocks[2].mlp.fc2
    stats = layer_stats(model, layer, calib_batches)
    ridge, _ = ridge_weights(layer.weight, layer.bias, stats.h_aa, stats.h_ax, stats.s_a, stats.s_x, stats.n)
    lo, hi, _ = brute_force_ranges(ridge.float(), captured_rows(model, layer, calib_batches), 4)
    with torch.no_grad():
        correct_layer_(model, layer, calib_batches, grid=output_clip_)
    assert torch.equal(layer.weight_quantizer.min_val, lo) and torch.equal(layer.weight_quantizer.max_val, hi)
    assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)  # GPTQ rounded onto that grid


class TwoBlocks:
    """A family stand-in whose ``blocks`` fact names the patch embedding and the first block."""

    blocks = ["patch_embed", "blocks.0"]

    def fact(self, name: str, model: nn.Module) -> list[str]:
        assert name == "blocks"
        return self.blocks


@pytest.mark.parametrize("step", ["clip_weights_output", "correct_weights_output_clip"])
def test_the_registered_steps_run_their_functions_over_the_family_blocks(
    calibrated_repq: nn.Module, calib_batches: list[torch.Tensor], step: str
) -> None:
    expected = copy.deepcopy(calibrated_repq)
    if step == "clip_weights_output":
        count = clip_weights_output_(expected, TwoBlocks.blocks, calib_batches)
    else:
        count = correct_weights_(expected, TwoBlocks.blocks, calib_batches, grid=output_clip_)
    model = copy.deepcopy(calibrated_repq)
    ctx = CalibrationContext(model.quant_config, TwoBlocks(), torch.device("cpu"), log=lambda *args: None)
    with torch.no_grad():
        STEPS[step].fn(model, calib_batches, ctx)
    assert STEPS[step].needs == {"blocks": "blocks"}
    assert ctx.results == {"clipped_weights" if step == "clip_weights_output" else "corrected_weights": count} and count == 3
    expected_state = expected.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected_state[key]), key


def test_repq_oclip_changes_only_the_weight_grids_of_repq(
    tiny_float: nn.Module, calibrated_repq: nn.Module, calib_batches: list[torch.Tensor], eval_images: torch.Tensor
) -> None:
    model = quantize_(copy.deepcopy(tiny_float), QuantConfig("minmax", "matmul", "4/4/4", recipe="repq_oclip"))
    calibrate(model, calib_batches)
    changed = set()
    for (key, value), other in zip(calibrated_repq.state_dict().items(), model.state_dict().values()):
        if not torch.equal(value, other):
            changed.add(key.rsplit(".", 1)[-1] if "weight_quantizer" in key else key)
    # folded weights, activation grids: as repq; the zero point of (min, max) * f is that of (min, max)
    assert changed == {"scale", "min_val", "max_val"}
    with torch.no_grad():
        assert torch.isfinite(model(eval_images)).all()
