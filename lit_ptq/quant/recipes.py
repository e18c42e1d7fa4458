"""Low-bit recipes: named presets that chain the transforms of :mod:`lit_ptq.quant.transforms`.

A recipe runs in place of the plain calibration (:func:`lit_ptq.quant.calibrate` dispatches
here when ``config.recipe`` is set), on the ``matmul`` placement:

1. ``reparameterize`` (RepQ-ViT): each LayerNorm output calibrated per channel and folded
   into the LayerNorm and the Linear it feeds (:mod:`.transforms.reparam`).
2. Weights: asymmetric per output channel, the range of least squared error (``mse``).
3. Activations, in forward order: each point calibrates on the last batch with the points
   before it already quantizing (as RepQ-ViT's calibration pass); the softmax output with
   a log-sqrt2 code.
4. ``correct_weights`` (``repq_gptq``): ERQ's ridge regression and GPTQ rounding, layer by
   layer (:mod:`.transforms.gptq`).
5. ``reconstruct`` (``recon``): block reconstruction with AdaRound and learned step sizes
   (:mod:`.transforms.recon`).

Whatever a recipe changes is kept in the model (folded and rounded weights in the
parameters, step sizes in the quantizers' buffers); the state file of a recipe run holds
the parameters too (:mod:`.state`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn as nn

from .quantize import as_input, owner_weight, quantizers, set_quant_mode
from .quantizer import QuantMode, WeightQuantizer
from .registry import family_of

__all__ = ["RECIPE_STEPS", "calibrate_with_recipe", "calibrate_weights", "calibrate_activations"]

log = logging.getLogger(__name__)

RECIPE_STEPS: dict[str, tuple[str, ...]] = {
    "repq": ("reparameterize",),
    "repq_gptq": ("reparameterize", "correct_weights"),
    "recon": ("reparameterize", "reconstruct"),
}
"""Recipe name -> the optional steps it runs around weight and activation calibration."""


def calibrate_weights(model: nn.Module) -> None:
    """Calibrate every weight quantizer on its (current) weight and switch it to quantizing."""
    for name, q in quantizers(model):
        if isinstance(q, WeightQuantizer):
            q.calibrate_weight(owner_weight(model, name))
            q.set_mode(QuantMode.QUANTIZE)


def calibrate_activations(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Calibrate the activation points on ``batches``, each on the quantized output of those
    before it on the last batch; weights keep quantizing. Leaves the model quantizing."""
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


def calibrate_with_recipe(model: nn.Module, batches: Iterable[object]) -> int:
    """Calibrate a ``quantize_``-d model with the steps of ``model.quant_config.recipe``.

    Args:
        model: a model prepared with ``quantize_`` and a config with a recipe.
        batches: calibration inputs (kept in memory: the steps pass over them several times).

    Returns:
        The number of batches.

    """
    from .state import weights_fingerprint
    from .transforms import correct_weights_, reparameterize_

    config = model.quant_config
    steps = RECIPE_STEPS[config.recipe]
    family = family_of(model)  # quantize_ checked that it lists its pairs and blocks
    device = next(model.parameters()).device
    with torch.inference_mode(False):
        data = [as_input(b).to(device).clone() for b in batches]
        if not data:
            return 0
        if not hasattr(model, "float_weights_sha256"):
            model.float_weights_sha256 = weights_fingerprint(model)
        with torch.no_grad():
            if "reparameterize" in steps:
                reparameterize_(model, data, family.norm_linear_pairs(model), config.act)
            set_quant_mode(model, QuantMode.FLOAT)
            calibrate_weights(model)
            calibrate_activations(model, data)
            if "correct_weights" in steps:
                count = correct_weights_(model, family.blocks(model), data)
                log.info("corrected %d weights (ridge regression + GPTQ)", count)
        if "reconstruct" in steps:
            from .transforms.recon import reconstruct_

            reconstruct_(model, family.blocks(model), data, config.recon)
    set_quant_mode(model, QuantMode.QUANTIZE)
    return len(data)
