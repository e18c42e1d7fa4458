"""Weight clipping by output error: each weight row's range chosen for the layer's output.

The ``mse`` weight range (``docs/lowbit.md``) keeps, per output channel ``c``, the candidate
``(min_c, max_c) * (1 - 0.01 i)``, ``i < 80``, whose fake-quantized row ``q(w_c)`` is closest
to ``w_c``. What matters is the layer's output: with ``A`` the inputs the layer multiplies its
weight with (after its input quantizer, in the model whose earlier layers are quantized),
channel ``c`` of the output moves by ``A (w_c - q(w_c))``, and

    ||A w_c - A q(w_c)||^2 = (w_c - q(w_c))^T H (w_c - q(w_c)),   H = A^T A,

so one ``H`` per layer scores every candidate of every row at the cost of one
``(out, in) x (in, in)`` product per candidate. A row whose large weights meet small inputs
can then clip them harder than its own squared error would, and a row that meets a wide
input keeps its range. The candidates are the ``mse`` search's, so that the two searches
differ only in what they measure.

The measure is ERQ's (Zhong et al., "ERQ: Error Reduction for Post-Training Quantization of
Vision Transformers", ICML 2024; zysxmu/ERQ): the output error of a layer's weight
quantization with its quantized input held fixed, whose Hessian ``A^T A`` its rounding step
and GPTQ (:mod:`.gptq`) also use. AdaLog (Wu et al., "AdaLog: Post-Training Quantization for
Vision Transformers with Adaptive Logarithm Quantizer", ECCV 2024; GoatWu/AdaLog,
``quant_layers/linear.py``, after PTQ4ViT) likewise picks each output channel's weight scale
by the layer's output on quantized inputs, measured against the float model's output, so that
its score also holds the input's own quantization error; here that error is left to the
activation grids and to the ridge regression.

Two registered steps:

- ``clip_weights_output``: after the activations are calibrated, block by block in forward
  order (each block's inputs captured from the quantizing model as clipped so far), every
  quantized Linear / Conv2d gets the range of least output error; its weight is unchanged.
- ``correct_weights_output_clip``: ERQ's ridge regression and GPTQ (:mod:`.gptq`) with the grid
  of each ridge weight chosen by output error instead of by ``mse``; GPTQ then rounds within
  that range.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ...errors import ConfigError
from ..calibration import CalibrationContext
from ..observers import MseObserver
from ..quantizer import QuantMode, WeightQuantizer
from ..steps import register_step
from ..walk import set_quant_mode
from .capture import Call, for_each_layer_, layer_stats
from .gptq import correct_weights_

__all__ = [
    "output_clip_",
    "clip_layer_",
    "clip_weights_output_",
    "clip_weights_output",
    "correct_weights_output_clip",
]


@torch.no_grad()
def output_clip_(quantizer: WeightQuantizer, weight: torch.Tensor, hessian: torch.Tensor) -> None:
    """Calibrate ``quantizer`` on ``weight`` with, per row, the ``mse`` candidate range of least
    output error ``(w - q(w))^T H (w - q(w))`` (the widest on ties).

    Args:
        quantizer: a weight quantizer with the ``mse`` observer (every recipe's weights).
        weight: ``(out, in)``, the weight flattened per output channel.
        hessian: ``H = A^T A``, ``(in, in)``.

    Raises:
        ConfigError: the quantizer's observer is not ``mse``.
    """
    observer = quantizer.observer
    if not isinstance(observer, MseObserver):
        raise ConfigError(f"the output-error weight clip searches the mse candidates; {quantizer.qualname} uses {observer.name!r}")
    w = weight.detach().float()
    h = hessian.to(device=w.device, dtype=torch.float64)
    w64 = w.double()

    def output_error(q: torch.Tensor) -> torch.Tensor:
        e = q.double().sub_(w64)
        return ((e @ h) * e).sum(dim=1, keepdim=True)

    observer.reset()
    observer.update(w.reshape(quantizer.scale.numel(), -1))  # not the last batch: the running (min, max) only
    observer.min_val, observer.max_val = observer.best_range(w, output_error)
    quantizer.finish_calibration()


@torch.no_grad()
def clip_layer_(model: nn.Module, layer: nn.Module, batches: Sequence[Call]) -> None:
    """Give ``layer``'s weight quantizer the range of least output error on the inputs it
    receives in ``model`` (which calls it once per forward) on ``batches``."""
    stats = layer_stats(model, layer, batches, cross=False)
    output_clip_(layer.weight_quantizer, layer.weight.reshape(layer.weight.shape[0], -1), stats.h_aa)


@torch.no_grad()
def clip_weights_output_(model: nn.Module, blocks: Sequence[str], batches: Sequence[torch.Tensor]) -> int:
    """:func:`clip_layer_` for every quantized Linear / Conv2d, block by block in forward order,
    on the quantizing model (each layer sees the layers before it clipped).

    Returns:
        The number of layers clipped.
    """
    set_quant_mode(model, QuantMode.QUANTIZE)
    return for_each_layer_(model, blocks, batches, clip_layer_)


@register_step("clip_weights_output", needs={"blocks": "blocks"})
def clip_weights_output(model: nn.Module, batches: Sequence[torch.Tensor], ctx: CalibrationContext) -> None:
    """The recipe step: :func:`clip_weights_output_` through the family's blocks; the number of
    layers is left in ``ctx.results["clipped_weights"]``."""
    count = clip_weights_output_(model, ctx.family.fact("blocks", model), batches)
    ctx.results["clipped_weights"] = count
    ctx.log("clipped %d weights by output error", count)


@register_step("correct_weights_output_clip", needs={"blocks": "blocks"})
def correct_weights_output_clip(model: nn.Module, batches: Sequence[torch.Tensor], ctx: CalibrationContext) -> None:
    """The recipe step: ridge regression + GPTQ (:func:`~.gptq.correct_weights_`) with each
    ridge weight's grid chosen by :func:`output_clip_`; the number of corrected layers is left
    in ``ctx.results["corrected_weights"]``."""
    count = correct_weights_(model, ctx.family.fact("blocks", model), batches, grid=output_clip_)
    ctx.results["corrected_weights"] = count
    ctx.log("corrected %d weights (ridge regression + output-error grid + GPTQ)", count)
