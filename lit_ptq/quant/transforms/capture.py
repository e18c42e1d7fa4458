"""Capturing what a submodule receives (and returns) while the whole model runs, without
finishing the forward; what a quantized layer receives, as the statistics the weight
transforms solve with; and the block-by-block walk over the quantized layers that
:mod:`.gptq` and :mod:`.weight_clip` share."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Call", "InputStats", "capture_inputs", "capture_outputs", "for_each_layer_", "layer_rows", "layer_stats", "quantized_layers"]

Call = Union[torch.Tensor, tuple[tuple[Any, ...], dict[str, Any]]]
"""What a model is called with: one input tensor, or captured ``(args, kwargs)``."""


class _Stop(Exception):
    """Raised by a capture hook to skip the rest of the forward pass."""


def _run(run: Callable[..., Any], x: Call, seen: list, module: nn.Module) -> None:
    """``run(x)`` (or ``run(*args, **kwargs)`` for a captured call) up to the capture hook;
    checks that ``module`` was reached once."""
    seen.clear()
    try:
        if isinstance(x, torch.Tensor):
            run(x)
        else:
            run(*x[0], **x[1])
    except _Stop:
        pass
    if len(seen) != 1:
        raise RuntimeError(f"{type(module).__name__} was not called during the forward pass")


def capture_inputs(model: nn.Module, module: nn.Module, batches: Sequence[Call]) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Run ``model`` on each batch and yield the ``(args, kwargs)`` ``module`` is called with.

    A batch is an input tensor or an ``(args, kwargs)`` pair (from an earlier capture, to
    replay a block). The forward stops as soon as ``module`` is reached (nothing after it
    runs). ``module`` must be called exactly once per forward.
    """
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((args, kwargs))
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for x in batches:
            _run(model, x, seen, module)
            yield seen[0]
    finally:
        handle.remove()


def capture_outputs(
    run: Callable[[torch.Tensor], Any], module: nn.Module, batches: Sequence[torch.Tensor]
) -> Iterator[tuple[tuple[Any, ...], dict[str, Any], Any]]:
    """Call ``run`` (a model, or a function that runs one) on each batch and yield the
    ``(args, kwargs, output)`` of ``module``'s call.

    Tensor arguments are cloned before ``module`` runs (it may modify them in place); the
    forward stops as soon as ``module`` returns. ``module`` must be called exactly once per
    forward.
    """
    seen: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = []
    inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def clone(value: Any) -> Any:
        return value.clone() if isinstance(value, torch.Tensor) else value

    def pre_hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs.append((tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))

    def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        seen.append((*inputs[-1], output))
        raise _Stop

    handles = [
        module.register_forward_pre_hook(pre_hook, with_kwargs=True),
        module.register_forward_hook(hook, with_kwargs=True),
    ]
    try:
        for x in batches:
            inputs.clear()
            _run(run, x, seen, module)
            yield seen[0]
    finally:
        for handle in handles:
            handle.remove()


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The inputs of a Linear or a Conv2d as rows that multiply the flattened weight
    ``weight.reshape(out, -1)``."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class InputStats:
    """Running ``A^T A`` (and, with ``X``, ``A^T X``), column sums and row count in float64."""

    def __init__(self) -> None:
        self.h_aa = self.h_ax = self.s_a = self.s_x = None
        self.n = 0

    def add(self, a: torch.Tensor, x: Optional[torch.Tensor] = None) -> None:
        """Add the rows ``a`` (and the matching rows ``x``, for the cross terms)."""
        a = a.double()
        self.h_aa, self.s_a = _plus(self.h_aa, a.T @ a), _plus(self.s_a, a.sum(0))
        if x is not None:
            x = x.double()
            self.h_ax, self.s_x = _plus(self.h_ax, a.T @ x), _plus(self.s_x, x.sum(0))
        self.n += a.shape[0]


def _plus(total: Optional[torch.Tensor], term: torch.Tensor) -> torch.Tensor:
    """``total + term`` in place, or ``term`` for the first one."""
    return term if total is None else total.add_(term)


def layer_stats(model: nn.Module, layer: nn.Module, batches: Sequence[Call], cross: bool = True) -> InputStats:
    """Statistics of ``A``, the input ``layer`` multiplies its weight with (after its input
    quantizer, when it has one), and with ``cross`` of ``X``, that input before the quantizer,
    as the layer receives it in ``model`` (which calls it once per forward) on ``batches``."""
    stats = InputStats()
    quantizer = getattr(layer, "input_quantizer", None)
    for (x,), _ in capture_inputs(model, layer, batches):
        a = quantizer(x) if quantizer is not None else x
        stats.add(layer_rows(layer, a), layer_rows(layer, x) if cross else None)
    return stats


def quantized_layers(block: nn.Module) -> list[nn.Module]:
    """The Linear and Conv2d modules of ``block`` that have a weight quantizer, in module order."""
    return [m for m in block.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and getattr(m, "weight_quantizer", None) is not None]


def for_each_layer_(
    model: nn.Module,
    blocks: Sequence[str],
    batches: Sequence[torch.Tensor],
    fn: Callable[[nn.Module, nn.Module, list[Call]], None],
    on_block: Optional[Callable[[str, float], None]] = None,
) -> int:
    """Call ``fn(block, layer, calls)`` for every quantized layer, block by block in forward order.

    Each block's inputs ``calls`` are captured once from ``model`` as changed so far (so a block
    sees what ``fn`` did to the blocks before it); ``fn`` replays them through ``block`` to
    reach ``layer`` (:func:`layer_stats`), and the layers of a block come in module order.

    Args:
        model: the model, in the quant mode the caller wants the inputs captured in.
        blocks: the family's block names, in forward order.
        batches: calibration inputs.
        fn: what to do with each layer.
        on_block: called with each block's name and the seconds it took (blocks without a
            quantized layer are skipped).

    Returns:
        The number of layers ``fn`` was called for.
    """
    done = 0
    for block_name in blocks:
        start = time.perf_counter()
        block = model.get_submodule(block_name)
        layers = quantized_layers(block)
        if not layers:
            continue
        calls = list(capture_inputs(model, block, batches))  # the block's inputs, once; its layers replay it
        for layer in layers:
            fn(block, layer, calls)
            done += 1
        if on_block is not None:
            on_block(block_name, time.perf_counter() - start)
    return done
