"""Ridge regression and GPTQ rounding (lit_ptq/quant/transforms/gptq.py)."""

from __future__ import annotations

import torch

from lit_ptq.quant.primitives import affine_qparams, fake_quant_seed
from lit_ptq.quant.transforms import gptq_round, ridge_weights


def grid(w: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    qmax = 2**bits - 1
    scale, zp = affine_qparams(w.amin(1), w.amax(1), 0, qmax)
    return scale, zp, 0, qmax


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
