"""Capturing what a submodule receives (and returns) while the whole model runs, without
finishing the forward."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Callable, Union

import torch
import torch.nn as nn

__all__ = ["Call", "capture_inputs", "capture_outputs"]

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
