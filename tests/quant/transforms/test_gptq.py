"""Ridge regression and GPTQ rounding (lit_ptq/quant/transforms/gptq.py)."""

from __future__ import annotations

import copy
from typing import Optional

import pytest
import torch
import torch.nn as nn

from lit_ptq.quant import QuantConfig, QuantMode, calibrate, quantize_
from lit_ptq.quant.primitives import affine_qparams, fake_quant_seed
from lit_ptq.quant import set_quant_mode
from lit_ptq.quant.transforms import correct_weights_, gptq_round, ridge_weights
from lit_ptq.quant.transforms.gptq import correct_layer_


def grid(w: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    qmax = 2**bits - 1
    scale, zp = affine_qparams(w.amin(1), w.amax(1), 0, qmax)
    return scale, zp, 0, qmax


def reference_gptq(
    weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, damp: float
) -> torch.Tensor:
    """Textbook GPTQ, one column at a time (no lazy blocks), in float64."""
    w, h = weight.double().clone(), hessian.double().clone()
    cols = h.shape[0]
    for j in range(cols):
        if h[j, j] == 0:  # a dead input: nothing to compensate with, its weights are dropped
            h[j, j] = 1.0
            w[:, j] = 0.0
    h = h + damp * h.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    h_inv = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)  # H^-1 = U^T U
    q = torch.zeros_like(w)
    for i in range(cols):
        q[:, i] = fake_quant_seed(w[:, i].float(), scale.float(), zero_point.float(), qmin, qmax).double()
        err = (w[:, i] - q[:, i]) / h_inv[i, i]
        w[:, i + 1:] -= torch.outer(err, h_inv[i, i + 1:])
    return q.float()


def reference_ridge(
    weight: torch.Tensor, bias: torch.Tensor, a: torch.Tensor, x: torch.Tensor, damp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``argmin ||[A 1] theta - (X W^T + b)||^2 + lam ||theta - [W b]^T||^2`` with
    ``lam = damp * mean(diag([A 1]^T [A 1]))``, as least squares on the stacked system."""
    a, x, w, b = a.double(), x.double(), weight.double(), bias.double()
    a1 = torch.cat([a, torch.ones(len(a), 1, dtype=torch.float64)], dim=1)
    lam = damp * a1.pow(2).sum(0).mean()
    eye = torch.eye(a1.shape[1], dtype=torch.float64)
    theta0 = torch.cat([w, b[:, None]], dim=1).T
    lhs = torch.cat([a1, lam.sqrt() * eye])
    rhs = torch.cat([x @ w.T + b, lam.sqrt() * theta0])
    theta = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution
    return theta[:-1].T, theta[-1]


def correlated(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) @ torch.randn(cols, cols, generator=g)


def test_gptq_beats_nearest_rounding_on_correlated_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=g) @ torch.randn(32, 32, generator=g)  # correlated columns
    w = torch.randn(16, 32, generator=g)
    scale, zp, qmin, qmax = grid(w)
    nearest = fake_quant_seed(w, scale[:, None], zp[:, None], qmin, qmax)
    rounded = gptq_round(w, x.T @ x, scale, zp, qmin, qmax)
    on_grid = fake_quant_seed(rounded, scale[:, None], zp[:, None], qmin, qmax)
    assert torch.equal(on_grid, rounded)  # every value lies on the row's grid
    err = lambda q: (x @ (q - w).T).pow(2).sum()  # noqa: E731
    assert err(rounded) < 0.7 * err(nearest)


@pytest.mark.parametrize("block", [32, 7, 70, None])
def test_gptq_round_over_several_lazy_blocks_equals_the_per_column_reference(block: Optional[int]) -> None:
    x = correlated(2048, 70, seed=3)
    w = torch.randn(24, 70, generator=torch.Generator().manual_seed(4))
    scale, zp, qmin, qmax = grid(w)
    kwargs = {} if block is None else {"block": block}  # None: the default block of 128
    rounded = gptq_round(w, (x.T @ x).double(), scale, zp, qmin, qmax, **kwargs)
    expected = reference_gptq(w, x.T @ x, scale, zp, qmin, qmax, damp=0.01)
    assert torch.equal(rounded, expected)
    assert (expected != fake_quant_seed(w, scale[:, None], zp[:, None], qmin, qmax)).sum() > 100  # not nearest rounding


@pytest.mark.parametrize("damp", [None, 0.1, 1e-4])
def test_gptq_round_on_a_rank_deficient_hessian_with_dead_inputs_equals_the_reference(damp: Optional[float]) -> None:
    x = correlated(40, 70, seed=5)  # 40 rows for 70 columns: H is singular without damping
    dead = list(range(0, 70, 7)) + [69]
    x[:, dead] = 0.0
    x /= x.pow(2).sum(0).mean().sqrt()  # mean diagonal 1: the 1 put on the dead diagonal moves the damping
    w = torch.randn(24, 70, generator=torch.Generator().manual_seed(6))
    scale, zp, qmin, qmax = grid(w)
    h = (x.T @ x).double()
    kwargs = {} if damp is None else {"damp": damp}  # None: the default damping of 1%
    rounded = gptq_round(w, h, scale, zp, qmin, qmax, block=32, **kwargs)
    expected = reference_gptq(w, h, scale, zp, qmin, qmax, damp=0.01 if damp is None else damp)
    assert torch.equal(rounded, expected)
    assert torch.equal(rounded[:, dead], torch.zeros(24, len(dead)))  # the grid holds 0: dead inputs get zero weights
    assert not torch.equal(expected, reference_gptq(w, h, scale, zp, qmin, qmax, damp=0.05))  # the damping matters here


def test_ridge_without_quantization_error_keeps_the_weights() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 8, generator=g)
    w, b = torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    h = (x.T @ x).double()
    new_w, new_b = ridge_weights(w, b, h, h, x.sum(0).double(), x.sum(0).double(), x.shape[0])
    assert torch.allclose(new_w.float(), w, atol=1e-5) and torch.allclose(new_b.float(), b, atol=1e-5)


def test_ridge_absorbs_the_input_quantization_error() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4096, 8, generator=g)
    a = ((x * 2).round() / 2).clamp(-1.0, 1.0)  # a coarse, clipping grid: its error is correlated with it
    w, b = torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
    target = x @ w.T + b
    new_w, new_b = ridge_weights(w, b, (a.T @ a).double(), (a.T @ x).double(), a.sum(0).double(), x.sum(0).double(), len(x), damp=1e-3)
    before = (a @ w.T + b - target).pow(2).mean()
    after = (a @ new_w.float().T + new_b.float() - target).pow(2).mean()
    assert after < 0.8 * before


@pytest.mark.parametrize("damp", [None, 1e-3])
def test_ridge_equals_the_damped_least_squares_on_a_biased_input(damp: Optional[float]) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(512, 12, generator=g) * 0.7 + torch.linspace(-0.5, 1.5, 12)  # nonzero, uneven means
    scale, zp = affine_qparams(x.min(), x.max(), 0, 7)  # a coarse asymmetric grid
    a = fake_quant_seed(x, scale, zp, 0, 7)
    assert (a.mean(0) - x.mean(0)).abs().min() > 1e-3  # the cross sums s_a and s_x differ
    w, b = torch.randn(5, 12, generator=g), torch.randn(5, generator=g)
    ad, xd = a.double(), x.double()
    kwargs = {} if damp is None else {"damp": damp}  # None: the default ridge strength of 0.1
    new_w, new_b = ridge_weights(w, b, ad.T @ ad, ad.T @ xd, ad.sum(0), xd.sum(0), len(x), **kwargs)
    ref_w, ref_b = reference_ridge(w, b, a, x, 0.1 if damp is None else damp)
    torch.testing.assert_close(new_w, ref_w, rtol=1e-9, atol=1e-9 * ref_w.abs().max().item())
    torch.testing.assert_close(new_b, ref_b, rtol=1e-9, atol=1e-9 * ref_b.abs().max().item())
    assert (ref_b - b).abs().max() > 0.1  # the bias column absorbs the shift of the mean


@pytest.fixture(scope="module")
def calibrated_repq(tiny_float: nn.Module, calib_batches: list[torch.Tensor]) -> nn.Module:
    """The seeded ``itpn_tiny`` at W4A4 (``matmul``) after the ``repq`` recipe (asymmetric MSE
    weight grids), quantizing; tests take copies."""
    model = quantize_(copy.deepcopy(tiny_float), QuantConfig("minmax", "matmul", "4/4/4", recipe="repq"))
    calibrate(model, calib_batches)
    return model


def input_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as rows of the flattened weight: tokens, or the non-overlapping
    patches (channel, row, column order) of a Conv2d whose stride is its kernel."""
    if isinstance(layer, nn.Conv2d):
        (k, _), (b, c, h, w) = layer.kernel_size, x.shape
        assert layer.stride == layer.kernel_size and layer.padding == (0, 0)
        return x.reshape(b, c, h // k, k, w // k, k).permute(0, 2, 4, 1, 3, 5).reshape(-1, c * k * k)
    return x.reshape(-1, x.shape[-1])


def reference_correction(
    model: nn.Module, layer: nn.Module, batches: list[torch.Tensor], ridge: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weight and bias ridge + GPTQ give ``layer`` from its inputs ``X`` in ``model`` and
    ``A = input_quantizer(X)``: the grid recomputed from the ridge weight, ``H = A^T A``."""
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    x = torch.cat([input_rows(layer, v) for v in seen]).double()
    a = torch.cat([input_rows(layer, layer.input_quantizer(v)) for v in seen]).double()
    assert not torch.equal(a, x)
    weight = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    bias = layer.bias.detach() if layer.bias is not None else torch.zeros(weight.shape[0])
    quantizer = copy.deepcopy(layer.weight_quantizer)
    if ridge:
        weight, bias = reference_ridge(weight, bias, a, x, 0.1)
        quantizer.calibrate_weight(weight.float().reshape(layer.weight.shape))
    spec = quantizer.spec
    rounded = reference_gptq(weight, a.T @ a, quantizer.scale, quantizer.zero_point, spec.qmin, spec.qmax, 0.01)
    new_bias = bias.float() if ridge or layer.bias is not None else None
    return rounded.reshape(layer.weight.shape), new_bias


@pytest.mark.parametrize("ridge", [True, False])
@pytest.mark.parametrize("name", ["patch_embed.proj", "blocks.2.mlp.fc2", "head", "blocks.0.mlp.fc1 without bias"])
def test_correct_layer_writes_ridge_and_gptq_of_its_captured_inputs(
    calibrated_repq: nn.Module, calib_batches: list[torch.Tensor], name: str, ridge: bool
) -> None:
    model = copy.deepcopy(calibrated_repq)
    layer = model.get_submodule(name.split()[0])
    if name.endswith("without bias"):
        layer.bias = None
    expected_weight, expected_bias = reference_correction(model, layer, calib_batches, ridge)
    old_scale = layer.weight_quantizer.scale.clone()
    with torch.no_grad():
        correct_layer_(model, layer, calib_batches, ridge=ridge)
    assert torch.equal(layer.weight, expected_weight)
    if expected_bias is None:
        assert layer.bias is None
    else:
        assert isinstance(layer.bias, nn.Parameter)
        torch.testing.assert_close(layer.bias.detach(), expected_bias, rtol=1e-6, atol=1e-6 * expected_bias.abs().max().item())
    assert torch.equal(layer.weight_quantizer.scale, old_scale) != ridge  # recalibrated on the ridge weight only
    assert torch.equal(layer.weight_quantizer(layer.weight), layer.weight)  # the weight lies on its grid


@pytest.mark.parametrize("ridge", [True, False])
def test_correct_weights_corrects_each_block_in_forward_order_on_the_quantizing_model(
    calibrated_repq: nn.Module, calib_batches: list[torch.Tensor], ridge: bool
) -> None:
    blocks = ["patch_embed", "blocks.0"]
    # correct_layer_ (pinned above) on the whole quantizing model, layer after layer in forward
    # order: each layer sees the quantized, corrected layers before it
    expected = copy.deepcopy(calibrated_repq)
    with torch.no_grad():
        for name in ("patch_embed.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"):
            correct_layer_(expected, expected.get_submodule(name), calib_batches, ridge=ridge)
    model = set_quant_mode(copy.deepcopy(calibrated_repq), QuantMode.FLOAT)  # correct_weights_ switches it back
    timed: list[tuple[str, float]] = []
    assert correct_weights_(model, blocks, calib_batches, ridge=ridge, on_block=lambda n, s: timed.append((n, s))) == 3
    assert [n for n, _ in timed] == blocks
    expected_state = expected.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected_state[name]), name
    assert not torch.equal(model.blocks[0].mlp.fc2.weight, calibrated_repq.blocks[0].mlp.fc2.weight)
