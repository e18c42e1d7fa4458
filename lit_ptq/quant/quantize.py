"""``quantize_`` (swap modules in place), ``set_quant_mode`` and ``calibrate``.

Placements:

- ``seed`` (PTQ-for-iTPN): the weights of every Linear except ``head``; the outputs of
  ``qkv``, the logits, the softmax, ``attn @ v``, ``proj``, the GELU, ``fc2`` and
  PatchMerge's ``reduction``. Patch embedding, LayerNorms and ``head`` stay float.
- ``full`` (FQ-ViT style): the seed's points plus the weights of ``head`` and the patch
  embedding, the input of every Linear and Conv whose input is not already quantized
  (the image, and the LayerNorm outputs feeding ``qkv``, ``fc1``, ``reduction`` and
  ``head``), and every LayerNorm input.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Union

import torch
import torch.nn as nn

from ..errors import UserError
from .config import QuantConfig
from .modules import QUANT_MODULES, QuantConv2d, QuantLayerNorm, QuantLinear
from .quantizer import LogSoftmaxQuantizer, QuantMode, TensorQuantizer, WeightQuantizer

__all__ = ["quantize_", "set_quant_mode", "calibrate", "quantizers", "is_quantized", "CalibrationError"]

_INPUT_QUANTIZED_LINEARS = ("qkv", "fc1", "reduction", "head")


class CalibrationError(UserError, ValueError):
    """Calibration could not produce quantization parameters (no data, NaN or Inf)."""


def _setup(module: nn.Module, name: str, config: QuantConfig) -> None:
    full = config.placement == "full"
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, QuantLinear):
        module.setup_quant(config, quant_weight=full or leaf != "head", quant_input=full and leaf in _INPUT_QUANTIZED_LINEARS)
    elif isinstance(module, QuantConv2d):
        module.setup_quant(config, quant_weight=full, quant_input=full)
    elif isinstance(module, QuantLayerNorm):
        module.setup_quant(config, quant_input=full)
    else:
        module.setup_quant(config)


def quantize_(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Swap the float modules of ``model`` for their quantized subclasses, in place.

    Parameters are kept (the class of each module changes, as in modelopt); the new
    quantizers are in ``FLOAT`` mode until :func:`calibrate` or :func:`set_quant_mode`.

    Args:
        model: a float model (for example from ``lit_ptq.models.create_model``).
        config: what to quantize and how.

    Returns:
        ``model``, with ``model.quant_config`` set.

    Raises:
        ValueError: the model is already quantized.
    """
    if is_quantized(model):
        raise ValueError("the model is already quantized; build a fresh float model to quantize it again")
    device = next(model.parameters()).device
    for name, module in model.named_modules():
        qcls = QUANT_MODULES.get(type(module))
        if qcls is None:
            continue
        module.__class__ = qcls
        _setup(module, name, config)
    for name, module in model.named_modules():
        if isinstance(module, (TensorQuantizer, LogSoftmaxQuantizer)):
            module.qualname = name
    model.quant_config = config
    return model.to(device)


def is_quantized(model: nn.Module) -> bool:
    """Whether ``quantize_`` has been applied to ``model``."""
    return any(isinstance(m, (TensorQuantizer, LogSoftmaxQuantizer)) for m in model.modules())


def quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    """``(name, quantizer)`` for every tensor quantizer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, TensorQuantizer):
            yield name, module


def set_quant_mode(model: nn.Module, mode: Union[QuantMode, str]) -> nn.Module:
    """Put every quantizer of ``model`` in ``float``, ``calibrate`` or ``quantize`` mode."""
    mode = QuantMode(mode)
    for module in model.modules():
        if isinstance(module, (TensorQuantizer, LogSoftmaxQuantizer)):
            module.set_mode(mode)
    return model


def _as_input(batch: object) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"calibration batches must be tensors or (images, ...) tuples, got {type(batch).__name__}")


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[object]) -> int:
    """Calibrate every quantizer of a ``quantize_``-d model and leave it quantizing.

    The float model runs on each batch with the activation observers recording; the last
    batch is flagged so that OMSE and PTF search on it (as the seed does). Then each
    activation quantizer turns its statistics into a scale and zero point, each weight
    quantizer reads its weight (MinMax), and the model is switched to ``quantize`` mode.

    Args:
        model: a model prepared with :func:`quantize_`.
        batches: an iterable of input tensors, or of ``(images, ...)`` tuples.

    Returns:
        The number of batches seen.

    Raises:
        CalibrationError: no batches, or a quantizer saw NaN / Inf (its name is given).
    """
    if not is_quantized(model):
        raise ValueError("calibrate() needs a model prepared with quantize_(model, config)")
    device = next(model.parameters()).device
    acts = [q for _, q in quantizers(model) if not isinstance(q, WeightQuantizer)]
    was_training = model.training
    model.eval()
    set_quant_mode(model, QuantMode.CALIBRATE)
    it = iter(batches)
    current = next(it, None)
    if current is None:
        set_quant_mode(model, QuantMode.FLOAT)
        raise CalibrationError("calibration needs at least one batch, got none")
    seen = 0
    while current is not None:
        following = next(it, None)
        for q in acts:
            q.last_batch = following is None
        model(_as_input(current).to(device, non_blocking=True))
        seen += 1
        current = following
    try:
        for name, q in quantizers(model):
            if isinstance(q, WeightQuantizer):
                q.calibrate_weight(_owner_weight(model, name))
            else:
                q.finish_calibration()
    except ValueError as err:
        set_quant_mode(model, QuantMode.FLOAT)
        raise CalibrationError(str(err)) from None
    set_quant_mode(model, QuantMode.QUANTIZE)
    model.train(was_training)
    return seen


def _owner_weight(model: nn.Module, quantizer_name: str) -> torch.Tensor:
    owner = model.get_submodule(quantizer_name.rsplit(".", 1)[0]) if "." in quantizer_name else model
    return owner.weight
