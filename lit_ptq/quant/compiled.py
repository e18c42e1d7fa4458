"""A calibrated fake-quantized model through ``torch.compile``, for evaluation only.

Calibration stays eager (the observers are Python: histograms, searches, running ranges).
Once every quant point quantizes, the model is traced with Dynamo and compiled with
Inductor (https://pytorch.org/docs/stable/torch.compiler.html). The quant points are written
for that: traced, an activation point is the seed's six operations as one out-of-place
expression (:func:`lit_ptq.quant.primitives.fake_quant_seed`), which Inductor fuses into one
loop with the operation that produced its input and the one that reads its output; a weight
point returns the fake-quantized weight made once, eagerly, by
:meth:`~lit_ptq.quant.quantizer.WeightQuantizer.freeze`. No forward branches on a tensor's
value or calls ``.item()``, so the whole model is one graph, compiled once per input shape
(``dynamic=False``).

Inductor's own LayerNorm, GELU, softmax and mean give other last bits than ATen's kernels, and
a point after them can then round a value to the neighbouring level; :func:`compile_quantized`
therefore compiles with :func:`eager_kernels_inductor`, which leaves those to ATen. The logits
are then eager's to the bit on the demo and on ``itpn_base`` (``docs/quantization.md``,
"Compiled evaluation"; ``tests/quant/test_compiled.py``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import ConfigError
from .quantizer import QuantMode, TensorQuantizer, WeightQuantizer
from .walk import owner_weight, quant_points

__all__ = ["compile_quantized", "freeze_weights"]


def freeze_weights(model: nn.Module) -> nn.Module:
    """Make the fake-quantized weight of each quantizing weight point once (see
    :meth:`WeightQuantizer.freeze`); any other weight point forgets an earlier one."""
    for name, point in quant_points(model):
        if isinstance(point, WeightQuantizer):
            point.freeze(owner_weight(model, name) if point.mode is QuantMode.QUANTIZE else None)
    return model


def compile_quantized(model: nn.Module, **options: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile(model, dynamic=False, **options)`` for a calibrated quantized (or float) model.

    Compilation itself happens at the first call, for that input's shape (and again for each
    new shape). The model must not change afterwards: the frozen weights are those of now.

    Args:
        model: a model whose quant points all quantize (after calibration or a loaded state),
            or a model without quant points.
        options: further ``torch.compile`` arguments (``mode``, ``backend``, ``options``, ...).

    Raises:
        ConfigError: a quant point is calibrating, or an activation point is not calibrated.
    """
    for name, point in quant_points(model):
        if point.mode is QuantMode.CALIBRATE:
            raise ConfigError(f"quant point {name} is calibrating: compile the model after calibration, for evaluation")
        if isinstance(point, TensorQuantizer) and point.mode is QuantMode.QUANTIZE and not point.ready:
            raise ConfigError(f"quant point {name} is not calibrated: calibrate or load a state before compiling")
    freeze_weights(model)
    options.setdefault("backend", eager_kernels_inductor)
    return torch.compile(model, dynamic=False, **options)


EAGER_KERNELS = (
    torch.ops.aten.native_layer_norm.default,
    torch.ops.aten.gelu.default,
    torch.ops.aten._softmax.default,
)
"""Operations that Inductor runs as the eager kernels instead of decomposing them: its own
LayerNorm (Welford statistics), GELU (erf) and softmax (a division by the sum) give other last
bits than ATen's CPU kernels, which a quant point after them can round to another level."""


@torch.library.custom_op("lit_ptq::eager_mean", mutates_args=())
def eager_mean(x: torch.Tensor, dim: list[int], keepdim: bool) -> torch.Tensor:
    """``torch.mean(x, dim, keepdim)``, an operation Inductor cannot see into: it calls ATen's
    kernel, whose order of summation it does not reproduce (on ``itpn_base``'s mean over 49
    tokens the last bit differs)."""
    return torch.mean(x, dim, keepdim)


@eager_mean.register_fake
def _(x: torch.Tensor, dim: list[int], keepdim: bool) -> torch.Tensor:
    return torch.mean(x, dim, keepdim)


def _is_mean(node: torch.fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target in (torch.mean, torch.Tensor.mean)
    )


def keep_eager_means(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace each ``mean`` over given dimensions (no ``dtype``) in Dynamo's graph by :func:`eager_mean`."""
    for node in list(gm.graph.nodes):
        if not _is_mean(node):
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        x = args.pop(0) if args else kwargs.pop("input", None)
        dim = args.pop(0) if args else kwargs.pop("dim", None)
        keepdim = args.pop(0) if args else kwargs.pop("keepdim", False)
        dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (tuple, list)) else None
        if x is None or args or kwargs or dims is None or not all(isinstance(d, int) for d in dims) or not isinstance(keepdim, bool):
            continue
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_function(torch.ops.lit_ptq.eager_mean.default, (x, dims, keepdim))
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


def eager_kernels_inductor(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """Inductor with :data:`EAGER_KERNELS` left whole and every ``mean`` computed by
    :func:`eager_mean` (both called as ATen fallbacks), everything else decomposed and fused
    as usual.

    AOTAutograd's cache is switched off for this compilation: its key does not hold the
    decomposition table, so it could hand back a graph decomposed by a plain ``torch.compile``.
    """
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    table = {op: fn for op, fn in select_decomp_table().items() if op not in EAGER_KERNELS}
    with functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(keep_eager_means(gm), example_inputs, decompositions=table)
