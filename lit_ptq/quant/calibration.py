"""Calibration: the registered steps of the model's config, run in order.

Without a recipe a config runs :data:`~lit_ptq.quant.steps.PLAIN_STEPS`, FQ-ViT's and the
seed's calibration (Lin et al., "FQ-ViT: Post-Training Quantization for Fully Quantized
Vision Transformer", IJCAI 2022; megvii-research/FQ-ViT): ``observe`` (the float model runs
on each batch with the activation observers recording; the last batch is flagged, and each
activation point finishes on it) then ``calibrate_weights``. A recipe runs its own step list
(``lit_ptq.quant.recipes``, ``docs/lowbit.md``); the steps of the transforms are registered
by their modules, which this module never imports.

The steps of plain calibration read the batches once, as they come (a data loader is
streamed); a recipe's steps pass over them several times, so they get them in memory on the
model's device, outside inference mode (reconstruction trains with autograd).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import CalibrationError
from .config import QuantConfig
from .quantizer import QuantMode, WeightQuantizer
from .registry import Family, family_of
from .state import weights_fingerprint
from .steps import register_step, steps_of
from .walk import as_input, is_quantized, owner_weight, quantizers, set_quant_mode

__all__ = [
    "CalibrationContext",
    "CalibrationError",
    "run_calibration",
    "calibrate",
    "observe",
    "calibrate_weights",
    "calibrate_activations_sequential",
]

logger = logging.getLogger(__name__)


@dataclass
class CalibrationContext:
    """What every calibration step is given besides the model and the batches.

    Attributes:
        config: the model's quantization config.
        family: the model's family (its facts: ``family.fact("blocks", model)``).
        device: the device of the model's parameters (the batches are moved there).
        log: where steps report progress (``log("corrected %d weights", n)``); the module logger's
            ``info`` by default.
        results: what steps leave for the caller, by name (``corrected_weights``, ...).
        batches: the number of calibration batches seen (set by the runner).
    """

    config: QuantConfig
    family: Family
    device: torch.device
    log: Callable[..., None] = logger.info
    results: dict[str, Any] = field(default_factory=dict)
    batches: int = 0


@register_step("observe")
def observe(model: nn.Module, batches: Iterable[torch.Tensor], ctx: CalibrationContext) -> None:
    """Run the model on each batch with every point calibrating, the last batch flagged.

    Each activation point finishes as soon as it has seen the last batch (as FQ-ViT and the
    seed: a log-int-softmax after a calibrated logits point is already applied there); a
    point that batch never reached finishes afterwards. Weight points pass their weight through.
    """
    acts = [q for _, q in quantizers(model) if not isinstance(q, WeightQuantizer)]
    set_quant_mode(model, QuantMode.CALIBRATE)
    it = iter(batches)
    current = next(it, None)
    while current is not None:
        following = next(it, None)
        for q in acts:
            q.last_batch = following is None
        model(current)
        current = following
    for q in acts:
        if not q.ready:
            q.finish_calibration()


@register_step("calibrate_weights")
def calibrate_weights(model: nn.Module, batches: Iterable[torch.Tensor], ctx: CalibrationContext) -> None:
    """Calibrate every weight point on its (current) weight and switch it to quantizing."""
    for name, q in quantizers(model):
        if isinstance(q, WeightQuantizer):
            q.calibrate_weight(owner_weight(model, name))
            q.set_mode(QuantMode.QUANTIZE)


@register_step("calibrate_activations_sequential")
def calibrate_activations_sequential(model: nn.Module, batches: Sequence[torch.Tensor], ctx: CalibrationContext) -> None:
    """Calibrate the activation points in forward order, each on the last batch with the points
    before it already quantizing (RepQ-ViT's calibration pass); weights keep quantizing.

    Leaves the model quantizing.
    """
    acts = [q for _, q in quantizers(model) if not isinstance(q, WeightQuantizer)]
    for q in acts:
        q.set_mode(QuantMode.CALIBRATE)
        q.sequential = True
    try:
        for i, x in enumerate(batches):
            for q in acts:
                q.last_batch = i == len(batches) - 1
            model(x)
        for q in acts:
            if not q.ready:
                q.finish_calibration()
    finally:
        for q in acts:
            q.sequential = False
    set_quant_mode(model, QuantMode.QUANTIZE)


def _streamed(batches: Iterable[object], ctx: CalibrationContext) -> Iterator[torch.Tensor]:
    """The batches' images on the model's device, one at a time, counted in ``ctx.batches``.

    Raises:
        CalibrationError: there is no batch.
    """
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise CalibrationError("calibration needs at least one batch, got none")

    def images() -> Iterator[torch.Tensor]:
        for batch in itertools.chain((first,), it):
            ctx.batches += 1
            yield as_input(batch).to(ctx.device, non_blocking=True)

    return images()


def _in_memory(model: nn.Module, batches: Iterable[object], ctx: CalibrationContext) -> list[torch.Tensor]:
    """The batches' images as a list on the model's device (copies made outside inference
    mode), and the fingerprint of the float weights recorded before a recipe changes them.

    Raises:
        CalibrationError: there is no batch.
    """
    data = [as_input(b).to(ctx.device).clone() for b in batches]
    if not data:
        raise CalibrationError("calibration needs at least one batch, got none")
    ctx.batches = len(data)
    if not hasattr(model, "float_weights_sha256"):
        model.float_weights_sha256 = weights_fingerprint(model)
    return data


@torch.no_grad()
def run_calibration(model: nn.Module, batches: Iterable[object]) -> CalibrationContext:
    """Calibrate every quant point of a ``quantize_``-d model with the steps of its config,
    and leave it quantizing.

    Args:
        model: a model prepared with :func:`~lit_ptq.quant.quantize_`.
        batches: an iterable of input tensors, or of ``(images, ...)`` tuples.

    Returns:
        The context the steps ran with: the batches seen and the steps' results.

    Raises:
        CalibrationError: no batches, or a quantizer saw NaN / Inf (its name is given).
        UserError: another of the library's one-line errors, raised by a step.

    Any other exception (a bug) propagates unchanged, with its traceback. After a failure
    every quant point is left in ``FLOAT`` mode.
    """
    if not is_quantized(model):
        raise ValueError("calibrate() needs a model prepared with quantize_(model, config)")
    config: QuantConfig = model.quant_config
    steps = steps_of(config.recipe)
    ctx = CalibrationContext(config, family_of(model), next(model.parameters()).device)
    was_training = model.training
    model.eval()
    in_memory = config.recipe is not None
    try:
        with torch.inference_mode(False) if in_memory else contextlib.nullcontext():
            data = _in_memory(model, batches, ctx) if in_memory else _streamed(batches, ctx)
            set_quant_mode(model, QuantMode.FLOAT)
            for step in steps:
                step.fn(model, data, ctx)
    except BaseException:
        set_quant_mode(model, QuantMode.FLOAT)
        raise
    finally:
        model.train(was_training)
    set_quant_mode(model, QuantMode.QUANTIZE)
    return ctx


def calibrate(model: nn.Module, batches: Iterable[object]) -> int:
    """Calibrate a ``quantize_``-d model (see :func:`run_calibration`) and leave it quantizing.

    Args:
        model: a model prepared with :func:`~lit_ptq.quant.quantize_`.
        batches: an iterable of input tensors, or of ``(images, ...)`` tuples.

    Returns:
        The number of batches seen.

    Raises:
        CalibrationError: no batches, or a quantizer saw NaN / Inf (its name is given).
    """
    return run_calibration(model, batches).batches
