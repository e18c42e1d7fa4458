"""Low-bit recipes: named lists of calibration steps (``docs/lowbit.md``).

A recipe runs in place of the plain calibration (``QuantConfig(recipe=...)``), on the
``matmul`` placement, with the batches kept in memory:

1. ``reparameterize`` (RepQ-ViT, Li et al., ICCV 2023): each LayerNorm output calibrated per
   channel and folded into the LayerNorm and the Linear it feeds
   (:mod:`lit_ptq.quant.transforms.reparam`).
2. ``calibrate_weights``: asymmetric per output channel, the range of least squared error
   (``mse``).
3. ``calibrate_activations_sequential``: in forward order, each point calibrates on the last
   batch with the points before it already quantizing (as RepQ-ViT's calibration pass); the
   softmax output with a log-sqrt2 code.
4. ``correct_weights`` (``repq_gptq``): ERQ's ridge regression and GPTQ rounding, layer by
   layer (:mod:`lit_ptq.quant.transforms.gptq`).
5. ``reconstruct`` (``recon``): block reconstruction with AdaRound and learned step sizes
   (:mod:`lit_ptq.quant.transforms.recon`); ``reconstruct_fisher`` (``recon_fisher``) weights
   the block loss by a diagonal Fisher approximation (FIMA-Q's ``fisher_brecq``); a
   ``reconstruct_joint`` step after either (``recon_joint``, ``recon_fisher_joint``) then tunes
   all blocks together on the KL divergence from the float model's logits.

Each weight step has an output-error variant (:mod:`lit_ptq.quant.transforms.weight_clip`),
so that the clip search can be switched on and off by the recipe's name:
``clip_weights_output`` (``repq_oclip``) chooses each weight row's range by the layer's output
error after step 3, and ``correct_weights_output_clip`` (``repq_gptq_oclip``) is step 4 with
each ridge weight's grid chosen that way before GPTQ rounds within it.

The steps are registered by the modules that implement them (:mod:`lit_ptq.quant.calibration`
and the transforms); this file only names them. Whatever a recipe changes is kept in the
model (folded and rounded weights in the parameters, step sizes in the quantizers' buffers);
the state file of a recipe run holds the parameters too (:mod:`lit_ptq.quant.state`).
"""

from __future__ import annotations

from .steps import register_recipe

__all__ = ["REPQ_STEPS"]

REPQ_STEPS = ("reparameterize", "calibrate_weights", "calibrate_activations_sequential")
"""RepQ-ViT: the fold, then weights, then activations in forward order."""

register_recipe("repq", REPQ_STEPS)
register_recipe("repq_gptq", (*REPQ_STEPS, "correct_weights"))
register_recipe("recon", (*REPQ_STEPS, "reconstruct"))
register_recipe("repq_oclip", (*REPQ_STEPS, "clip_weights_output"))
register_recipe("repq_gptq_oclip", (*REPQ_STEPS, "correct_weights_output_clip"))
register_recipe("recon_fisher", (*REPQ_STEPS, "reconstruct_fisher"))
register_recipe("recon_joint", (*REPQ_STEPS, "reconstruct", "reconstruct_joint"))
register_recipe("recon_fisher_joint", (*REPQ_STEPS, "reconstruct_fisher", "reconstruct_joint"))
