"""Capturing what a submodule receives while the whole model runs, without finishing the forward."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Union

import torch
import torch.nn as nn

__all__ = ["Call", "capture_inputs"]


class _Stop(Exception):
    """Raised by the capture hook to skip the rest of the forward pass."""


Call = Union[torch.Tensor, tuple[tuple[Any, ...], dict[str, Any]]]
"""What ``model`` is called with: one input tensor, or captured ``(args, kwargs)``."""


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
            seen.clear()
            try:
                if isinstance(x, torch.Tensor):
                    model(x)
                else:
                    model(*x[0], **x[1])
            except _Stop:
                pass
            if len(seen) != 1:
                raise RuntimeError(f"{type(module).__name__} was not called during the forward pass")
            yield seen[0]
    finally:
        handle.remove()
