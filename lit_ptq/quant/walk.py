"""Walking a quantized model: its quant points, their modes, the weights they read, the input.

A leaf of ``lit_ptq.quant``: it imports only the quant-point classes, so that every other
module (``quantize_``, calibration, state files, reports, transforms, export) may use it
without an import cycle. The helpers follow modelopt's ``TensorQuantizer`` walk: a model's
quant points are found by ``isinstance``, and one helper switches their modes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Union

import torch
import torch.nn as nn

from .quantizer import QuantMode, QuantPoint, TensorQuantizer

__all__ = [
    "quant_points",
    "quantizers",
    "set_quant_mode",
    "float_points",
    "is_quantized",
    "as_input",
    "owner_weight",
]


def is_quantized(model: nn.Module) -> bool:
    """Whether ``quantize_`` has been applied to ``model``."""
    return any(isinstance(m, QuantPoint) for m in model.modules())


def quant_points(model: nn.Module) -> Iterator[tuple[str, QuantPoint]]:
    """``(name, point)`` for every quant point of ``model`` (stateless ones too), in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantPoint):
            yield name, module


def quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    """``(name, quantizer)`` for every tensor quantizer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            yield name, module


def set_quant_mode(model: nn.Module, mode: Union[QuantMode, str]) -> nn.Module:
    """Put every quantizer of ``model`` in ``float``, ``calibrate`` or ``quantize`` mode."""
    mode = QuantMode(mode)
    for _, point in quant_points(model):
        point.set_mode(mode)
    return model


@contextlib.contextmanager
def float_points(model: nn.Module) -> Iterator[list[tuple[str, QuantPoint]]]:
    """Within the block every quant point of ``model`` passes its input through (``FLOAT``).

    Each point's own mode is restored on exit, whatever it was (a model mixing modes keeps
    its mix).

    Yields:
        ``(name, point)`` for every quant point, in module order.
    """
    points = list(quant_points(model))
    modes = [point.mode for _, point in points]
    try:
        for _, point in points:
            point.set_mode(QuantMode.FLOAT)
        yield points
    finally:
        for (_, point), mode in zip(points, modes):
            point.mode = mode


def as_input(batch: object) -> torch.Tensor:
    """The image tensor of a batch: the batch itself, or the first element of a tuple/list."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"calibration batches must be tensors or (images, ...) tuples, got {type(batch).__name__}")


def owner_weight(model: nn.Module, quantizer_name: str) -> torch.Tensor:
    """The ``weight`` of the module that owns the weight quantizer ``quantizer_name``."""
    owner = model.get_submodule(quantizer_name.rsplit(".", 1)[0]) if "." in quantizer_name else model
    return owner.weight
