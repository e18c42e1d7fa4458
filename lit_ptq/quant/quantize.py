"""``quantize_`` (swap modules in place), ``set_quant_mode`` and ``calibrate``.

Which modules are swapped and which quant points they create is the business of the model
family's plugin (``lit_ptq/quant/plugins/``); nothing here names a model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from ..errors import ConfigError, UserError
from .config import QuantConfig
from .quantizer import QuantMode, QuantPoint, TensorQuantizer, WeightQuantizer
from .registry import PointFactory, family_of

__all__ = [
    "quantize_",
    "set_quant_mode",
    "float_points",
    "calibrate",
    "quantizers",
    "quant_points",
    "is_quantized",
    "as_input",
    "owner_weight",
    "CalibrationError",
]

FilterFn = Callable[[nn.Module, str], bool]
"""``filter_fn(module, name)``: whether ``quantize_`` may swap this module (torchao's convention)."""


class CalibrationError(UserError, ValueError):
    """Calibration could not produce quantization parameters (no data, NaN or Inf)."""


def quantize_(model: nn.Module, config: QuantConfig, filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Swap the float modules of ``model`` for their quantized subclasses, in place.

    The model's family plugin (found by the model's class) says which module types are
    swapped and, through its placement ``config.placement``, which quant points each one
    creates; ``config.overrides`` then changes or removes points by name. Parameters are kept
    (the class of each module changes, as in modelopt); the new quant points are in
    ``FLOAT`` mode until :func:`calibrate` or :func:`set_quant_mode`.

    Args:
        model: a float model of a registered family (for example from
            ``lit_ptq.models.create_model``).
        config: what to quantize and how.
        filter_fn: ``filter_fn(module, name)``; a module for which it returns False stays
            float (its class is not swapped), as in torchao's ``quantize_``.

    Returns:
        ``model``, with ``model.quant_config`` set.

    Raises:
        ValueError: the model is already quantized.
        ConfigError: no plugin handles the model, or its family lacks the placement (or what
            the config's recipe needs).
    """
    if is_quantized(model):
        raise ValueError("the model is already quantized; build a fresh float model to quantize it again")
    family = family_of(model)
    placement = family.placement(config.placement)
    if config.recipe and (family.norm_linear_pairs is None or family.blocks is None):
        raise ConfigError(f"recipe={config.recipe!r} needs the {family.name} plugin to list its LayerNorm -> Linear pairs and blocks")
    table = family.swap_table()
    device = next(model.parameters()).device
    for name, module in list(model.named_modules()):
        qcls = table.get(type(module))
        if qcls is None or (filter_fn is not None and not filter_fn(module, name)):
            continue
        module.__class__ = qcls
        module.setup_quant(PointFactory(config, placement, name, module, model))
    for name, point in quant_points(model):
        point.qualname = name
    model.quant_config = config
    return model.to(device)


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


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[object]) -> int:
    """Calibrate every quantizer of a ``quantize_``-d model and leave it quantizing.

    The float model runs on each batch with the activation observers recording; the last
    batch is flagged so that OMSE and PTF search on it, and each activation quantizer turns
    its statistics into a scale and zero point as soon as it has seen that batch (as
    FQ-ViT and the seed do: a log-int-softmax after a calibrated logits point is already
    applied there). Then each weight quantizer reads its weight (MinMax), and the model is
    switched to ``quantize`` mode. A config with a ``recipe`` runs the recipe's steps
    instead (:func:`lit_ptq.quant.recipes.calibrate_with_recipe`).

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
    if getattr(model.quant_config, "recipe", None):
        from .recipes import calibrate_with_recipe

        was_training = model.training
        model.eval()
        try:
            seen = calibrate_with_recipe(model, batches)
        except ValueError as err:
            set_quant_mode(model, QuantMode.FLOAT)
            raise CalibrationError(str(err)) from None
        finally:
            model.train(was_training)
        if not seen:
            set_quant_mode(model, QuantMode.FLOAT)
            raise CalibrationError("calibration needs at least one batch, got none")
        return seen
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
    try:
        while current is not None:
            following = next(it, None)
            for q in acts:
                q.last_batch = following is None
            model(as_input(current).to(device, non_blocking=True))
            seen += 1
            current = following
        for name, q in quantizers(model):
            if isinstance(q, WeightQuantizer):
                q.calibrate_weight(owner_weight(model, name))
            elif not q.ready:  # activation points finish on the last batch; one it never reached cannot
                q.finish_calibration()
    except ValueError as err:
        set_quant_mode(model, QuantMode.FLOAT)
        raise CalibrationError(str(err)) from None
    set_quant_mode(model, QuantMode.QUANTIZE)
    model.train(was_training)
    return seen


def owner_weight(model: nn.Module, quantizer_name: str) -> torch.Tensor:
    """The ``weight`` of the module that owns the weight quantizer ``quantizer_name``."""
    owner = model.get_submodule(quantizer_name.rsplit(".", 1)[0]) if "." in quantizer_name else model
    return owner.weight
