"""Calibration steps and recipes, registered by name (a leaf: it imports nothing of ``lit_ptq.quant``).

Calibration is an ordered list of steps, each a function ``step(model, batches, ctx)`` of the
quantized model, the calibration batches and a
:class:`~lit_ptq.quant.calibration.CalibrationContext`. A step is registered with
:func:`register_step`, by the module that implements it (the core registers ``observe``,
``calibrate_weights`` and ``calibrate_activations_sequential``; each transform of
``lit_ptq.quant.transforms`` registers its own); a recipe is a named tuple of step names,
registered with :func:`register_recipe`. As in torchao's ``quantize_`` handlers and
modelopt's calibration modes, the entry point looks steps up here and never imports them,
so a new step or recipe is one file (``docs/lowbit.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Optional

from ..errors import ConfigError

__all__ = ["Step", "STEPS", "RECIPES", "PLAIN_STEPS", "register_step", "register_recipe", "steps_of"]

StepFn = Callable[[Any, Any, Any], None]
"""``step(model, batches, ctx)``: changes the model in place and returns nothing."""


@dataclass(frozen=True)
class Step:
    """A registered calibration step.

    Attributes:
        name: the name recipes list it by.
        fn: ``fn(model, batches, ctx)``.
        needs: the model facts it reads from the family (``Family.fact``), each with the
            words that name it in an error, e.g. ``{"blocks": "blocks"}``.
    """

    name: str
    fn: StepFn
    needs: Mapping[str, str] = field(default_factory=dict)


_STEPS: dict[str, Step] = {}
_RECIPES: dict[str, tuple[str, ...]] = {}

STEPS: Mapping[str, Step] = MappingProxyType(_STEPS)
"""Registered steps by name, in registration order (read-only; add with :func:`register_step`)."""
RECIPES: Mapping[str, tuple[str, ...]] = MappingProxyType(_RECIPES)
"""Recipe name -> its step names, in registration order (read-only; add with :func:`register_recipe`)."""
PLAIN_STEPS: tuple[str, ...] = ("observe", "calibrate_weights")
"""The steps of a config without a recipe: FQ-ViT's and the seed's calibration."""


def register_step(name: str, needs: Mapping[str, str] = MappingProxyType({})) -> Callable[[StepFn], StepFn]:
    """Decorator: register ``fn(model, batches, ctx)`` as the calibration step ``name``.

    Args:
        name: the step's name; registering a name twice is an error.
        needs: the model facts the step reads (see :class:`Step`); ``quantize_`` refuses a
            recipe whose family lacks one, before any calibration.

    Returns:
        The decorator; it returns the function unchanged.
    """

    def wrap(fn: StepFn) -> StepFn:
        if name in _STEPS:
            raise ValueError(f"a calibration step named {name!r} is already registered")
        _STEPS[name] = Step(name, fn, MappingProxyType(dict(needs)))
        return fn

    return wrap


def register_recipe(name: str, steps: Sequence[str]) -> None:
    """Register the recipe ``name`` (``QuantConfig(recipe=name)``): its steps, in the order they run.

    The steps may be registered later (a transform module loads after the recipe that names
    it); :func:`steps_of` checks them when the recipe is used.
    """
    if name in _RECIPES:
        raise ValueError(f"a recipe named {name!r} is already registered")
    if isinstance(steps, str) or not steps:
        raise ValueError(f"recipe {name!r} needs a non-empty sequence of step names, got {steps!r}")
    _RECIPES[name] = tuple(steps)


def steps_of(recipe: Optional[str]) -> tuple[Step, ...]:
    """The registered steps ``recipe`` runs (:data:`PLAIN_STEPS` for ``None``), in order.

    Raises:
        ConfigError: the recipe, or one of its steps, is not registered.
    """
    if recipe is not None and recipe not in _RECIPES:
        raise ConfigError(f"recipe={recipe!r} is not one of: {', '.join(_RECIPES)}")
    names = PLAIN_STEPS if recipe is None else _RECIPES[recipe]
    missing = [n for n in names if n not in _STEPS]
    if missing:
        raise ConfigError(
            f"recipe={recipe!r} runs the step(s) {', '.join(missing)}, which no loaded module registers; "
            f"registered steps: {', '.join(_STEPS)}"
        )
    return tuple(_STEPS[n] for n in names)
