"""Weight error correction without gradients: ERQ's ridge regression, then GPTQ rounding.

- Ridge regression (Zhong et al., "ERQ: Error Reduction for Post-Training Quantization of
  Vision Transformers", ICML 2024; zysxmu/ERQ): with ``A`` the quantized inputs a layer
  receives and ``X`` the same inputs before its input quantizer (in the model whose earlier
  layers are already quantized and corrected), the weights and bias solve
  ``min ||A W'^T + b' - X W^T - b||^2 + lam ||[W', b'] - [W, b]||^2`` so that they absorb
  the error of quantizing this layer's input: ``(A^T A + lam I) W'^T = A^T X W^T + lam W^T``
  (with a column of ones for the bias). Targeting the layer's own unquantized input rather
  than the float model's keeps the problem well posed with few calibration images.
- GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
  Pre-trained Transformers", ICLR 2023): the columns of ``W'`` are rounded to the weight
  quantizer's grid in order, each column's rounding error spread over the columns not yet
  rounded through the inverse Hessian ``H = A^T A``.

:func:`correct_weights_` runs both layer by layer through the family's blocks in forward
order, each layer's inputs captured from the model as corrected so far, so that later
layers see the quantized outputs of earlier ones. The corrected weights lie on the grid
and are written into the layers' ``weight`` (the weight quantizer maps them to themselves).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn as nn

from ..calibration import CalibrationContext
from ..primitives import fake_quant_seed
from ..quantizer import QuantMode, WeightQuantizer
from ..steps import register_step
from ..walk import set_quant_mode
from .capture import Call, for_each_layer_, layer_stats

__all__ = ["correct_weights", "correct_weights_", "ridge_weights", "gptq_round", "Grid", "RIDGE_DAMP", "GPTQ_DAMP", "GPTQ_BLOCK"]

RIDGE_DAMP = 0.1
"""Ridge strength relative to the mean diagonal of ``A^T A``."""
GPTQ_DAMP = 0.01
"""GPTQ's dampening of the Hessian, relative to its mean diagonal (the paper's 1%)."""
GPTQ_BLOCK = 128
"""Columns rounded per lazy-update block (the paper's 128)."""

Grid = Callable[[WeightQuantizer, torch.Tensor, torch.Tensor], None]
"""How the grid of a ridge-corrected weight is chosen: ``grid(quantizer, weight, hessian)`` with
the ``(out, in)`` weight and ``H = A^T A`` (float64) calibrates ``quantizer``. ``None``: the
quantizer's own observer on the weight (the ``mse`` range)."""


def ridge_weights(
    weight: torch.Tensor, bias: torch.Tensor, h_aa: torch.Tensor, h_ax: torch.Tensor, s_a: torch.Tensor, s_x: torch.Tensor, n: int, damp: float = RIDGE_DAMP
) -> tuple[torch.Tensor, torch.Tensor]:
    """ERQ's ridge solution for ``(W', b')`` from accumulated statistics (float64).

    Args:
        weight: ``(out, in)`` float weight.
        bias: ``(out,)`` float bias.
        h_aa: ``A^T A``; h_ax: ``A^T X``; s_a, s_x: column sums of ``A`` and ``X``.
        n: number of rows of ``A``.
        damp: ridge strength relative to the mean diagonal of ``[A 1]^T [A 1]``.
    """
    d = h_aa.shape[0]
    gram = torch.empty(d + 1, d + 1, dtype=torch.float64, device=h_aa.device)
    gram[:d, :d], gram[:d, d], gram[d, :d], gram[d, d] = h_aa, s_a, s_a, n
    cross = torch.empty(d + 1, d + 1, dtype=torch.float64, device=h_aa.device)
    cross[:d, :d], cross[:d, d], cross[d, :d], cross[d, d] = h_ax, s_a, s_x, n
    w_aug = torch.cat([weight.double(), bias.double()[:, None]], dim=1)  # (out, in + 1)
    lam = damp * gram.diagonal().mean()
    eye = torch.eye(d + 1, dtype=torch.float64, device=h_aa.device)
    solution = torch.linalg.solve(gram + lam * eye, cross @ w_aug.T + lam * w_aug.T).T
    return solution[:, :d], solution[:, d]


def gptq_round(
    weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
    block: int = GPTQ_BLOCK, damp: float = GPTQ_DAMP,
) -> torch.Tensor:
    """GPTQ: ``weight`` ``(out, in)`` rounded column by column onto the per-row grid
    ``(scale, zero_point)`` with the error compensated through ``hessian`` ``(in, in)``.

    Returns:
        The fake-quantized weight (float32, on the grid).
    """
    w = weight.double().clone()
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    s, z = scale.reshape(-1).float(), zero_point.reshape(-1).float()
    q_all = torch.zeros_like(w)
    cols = w.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1, hi = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), h_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q = fake_quant_seed(col.float(), s, z, qmin, qmax).double()
            q_all[:, i1 + i] = q
            err = (col - q) / hi[i, i]
            w1[:, i:] -= err[:, None] * hi[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]
    return q_all.float()


@torch.no_grad()
def correct_layer_(model: nn.Module, layer: nn.Module, batches: Sequence[Call], ridge: bool = True, grid: Optional[Grid] = None) -> None:
    """Ridge-correct and GPTQ-round the weight of one Linear/Conv2d of a calibrated model.

    Args:
        model: the model, or a block of it, that calls ``layer`` once per forward.
        layer: the layer (with a weight quantizer).
        batches: what ``model`` is called with (tensors, or captured ``(args, kwargs)``).
        ridge: solve ERQ's ridge regression before the GPTQ rounding.
        grid: how the grid of the ridge weight is chosen (see :data:`Grid`); ``None``: the
            weight quantizer's observer (``mse``). Without ``ridge`` the grid is kept.
    """
    wq: WeightQuantizer = layer.weight_quantizer
    stats = layer_stats(model, layer, batches)
    weight = layer.weight.reshape(layer.weight.shape[0], -1)
    bias = layer.bias if layer.bias is not None else torch.zeros(weight.shape[0], device=weight.device)
    if ridge:
        weight, new_bias = ridge_weights(weight, bias, stats.h_aa, stats.h_ax, stats.s_a, stats.s_x, stats.n)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias.to(layer.weight.dtype))
        else:
            layer.bias.copy_(new_bias.to(layer.bias.dtype))
        if grid is None:
            wq.calibrate_weight(weight.reshape(layer.weight.shape).float())  # the grid of the corrected weight
        else:
            grid(wq, weight.float(), stats.h_aa)
    rounded = gptq_round(weight, stats.h_aa, wq.scale, wq.zero_point, wq.spec.qmin, wq.spec.qmax)
    layer.weight.copy_(rounded.reshape(layer.weight.shape).to(layer.weight.dtype))


@torch.no_grad()
def correct_weights_(
    model: nn.Module,
    blocks: Sequence[str],
    batches: Sequence[torch.Tensor],
    ridge: bool = True,
    on_block: Optional[Callable[[str, float], None]] = None,
    grid: Optional[Grid] = None,
) -> int:
    """Correct every quantized Linear/Conv2d weight, block by block in forward order.

    Args:
        model: a calibrated model (left quantizing).
        blocks: the family's block names, in forward order.
        batches: calibration inputs.
        ridge: solve ERQ's ridge regression before the GPTQ rounding.
        on_block: called with each block's name and the seconds its correction took.
        grid: how the grid of each ridge weight is chosen (see :data:`Grid`).

    Returns:
        The number of layers corrected.
    """
    set_quant_mode(model, QuantMode.QUANTIZE)
    return for_each_layer_(model, blocks, batches, lambda block, layer, calls: correct_layer_(block, layer, calls, ridge, grid), on_block)


@register_step("correct_weights", needs={"blocks": "blocks"})
def correct_weights(model: nn.Module, batches: Sequence[torch.Tensor], ctx: CalibrationContext) -> None:
    """The recipe step: :func:`correct_weights_` through the family's blocks; the number of
    corrected layers is left in ``ctx.results["corrected_weights"]``."""
    count = correct_weights_(model, ctx.family.fact("blocks", model), batches)
    ctx.results["corrected_weights"] = count
    ctx.log("corrected %d weights (ridge regression + GPTQ)", count)
