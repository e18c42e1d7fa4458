"""``quantize_``: swap the float modules of a model for their quantized subclasses, in place.

Which modules are swapped and which quant points they create is the business of the model
family's plugin (``lit_ptq/quant/plugins/``); nothing here names a model. As torchao's
``quantize_`` and modelopt's ``QuantModuleRegistry``: a registry maps float module types to
quantized subclasses, and the model's tree is walked once.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch.nn as nn

from ..errors import ConfigError
from .config import QuantConfig
from .registry import Family, PointFactory, family_of
from .steps import steps_of
from .walk import is_quantized, quant_points

__all__ = ["quantize_", "FilterFn"]

log = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]
"""``filter_fn(module, name)``: whether ``quantize_`` may swap this module (torchao's convention)."""


def quantize_(model: nn.Module, config: QuantConfig, filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Swap the float modules of ``model`` for their quantized subclasses, in place.

    The model's family plugin (found by the model's class) says which module types are
    swapped and, through its placement ``config.placement``, which quant points each one
    creates; ``config.overrides`` then changes or removes points by name (each pattern must
    match a point the placement places; the count it matches is logged). Parameters are kept
    (the class of each module changes, as in modelopt); the new quant points are in
    ``FLOAT`` mode until :func:`~lit_ptq.quant.calibrate` or :func:`~lit_ptq.quant.set_quant_mode`.

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
        ConfigError: no plugin handles the model, or its family lacks the placement (or the
            facts the steps of the config's recipe read, or ``gelu_linears`` for a
            non-uniform ``config.gelu``), or an override's pattern matches no
            quant point the placement places (the model is left partly swapped: build it again).
    """
    if is_quantized(model):
        raise ValueError("the model is already quantized; build a fresh float model to quantize it again")
    family = family_of(model)
    placement = family.placement(config.placement)
    _check_recipe(config, family)
    image_convs = set(family.image_convs(model))
    gelu_linears = set(_gelu_linears(config, family, model))
    table = family.swap_table()
    device = next(model.parameters()).device
    placed: list[str] = []
    for name, module in list(model.named_modules()):
        qcls = table.get(type(module))
        if qcls is None or (filter_fn is not None and not filter_fn(module, name)):
            continue
        module.__class__ = qcls
        module.setup_quant(
            PointFactory(
                config, placement, name, module, model,
                reads_image=name in image_convs, placed=placed, reads_gelu=name in gelu_linears,
            )
        )
    for pattern, override, count in config.override_counts(placed):
        log.info("override %r: %d quant point%s -> %s", pattern, count, "" if count == 1 else "s", override.summary())
    for name, point in quant_points(model):
        point.qualname = name
    model.quant_config = config
    return model.to(device)


def _gelu_linears(config: QuantConfig, family: Family, model: nn.Module) -> list[str]:
    """The Linears whose input is a GELU output, when ``config.gelu`` gives them a code of their own."""
    if config.gelu == "uniform":
        return []
    if "gelu_linears" not in family.facts:
        raise ConfigError(f"gelu={config.gelu!r} needs the {family.name} plugin to list its gelu_linears (each MLP's fc2)")
    return list(family.fact("gelu_linears", model))


def _check_recipe(config: QuantConfig, family: Family) -> None:
    """Refuse a recipe whose steps read facts the family does not state (before any calibration)."""
    if config.recipe is None:
        return
    missing = dict.fromkeys(
        what for step in steps_of(config.recipe) for fact, what in step.needs.items() if fact not in family.facts
    )
    if missing:
        raise ConfigError(f"recipe={config.recipe!r} needs the {family.name} plugin to list its {' and '.join(missing)}")
