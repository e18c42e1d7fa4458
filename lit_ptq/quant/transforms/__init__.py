"""Methods that change a quantized model before or during calibration, one file each; each
registers its calibration step (``lit_ptq.quant.steps``), which the recipes name.

- :mod:`.reparam`: RepQ-ViT's LayerNorm -> Linear scale reparameterization (step ``reparameterize``).
- :mod:`.gptq`: ridge-regression (ERQ) and GPTQ weight error correction, block by block
  (step ``correct_weights``).
- :mod:`.recon`: block reconstruction (BRECQ / QDrop with AdaRound) (steps ``reconstruct``,
  ``reconstruct_fisher`` with FIMA-Q's Fisher-weighted loss, ``reconstruct_joint``).
- :mod:`.weight_clip`: each weight row's range chosen by the layer's output error (ERQ's
  measure), alone (step ``clip_weights_output``) or as the grid of ridge + GPTQ (step
  ``correct_weights_output_clip``).

They name no model: the family plugin says which LayerNorm feeds which Linear and which
modules are the blocks (the facts ``family.fact("norm_linear_pairs", model)`` and
``family.fact("blocks", model)``).
"""

from .capture import capture_inputs, capture_outputs, for_each_layer_, layer_stats
from .gptq import correct_weights, correct_weights_, gptq_round, ridge_weights
from .recon import reconstruct, reconstruct_, reconstruct_fisher, reconstruct_joint, reconstruct_joint_
from .reparam import fold_norm_linear_, reparameterize, reparameterize_
from .weight_clip import clip_weights_output, clip_weights_output_, correct_weights_output_clip, output_clip_

__all__ = [
    "capture_inputs",
    "capture_outputs",
    "clip_weights_output",
    "clip_weights_output_",
    "correct_weights",
    "correct_weights_",
    "correct_weights_output_clip",
    "fold_norm_linear_",
    "for_each_layer_",
    "gptq_round",
    "layer_stats",
    "output_clip_",
    "reconstruct",
    "reconstruct_",
    "reconstruct_fisher",
    "reconstruct_joint",
    "reconstruct_joint_",
    "reparameterize",
    "reparameterize_",
    "ridge_weights",
]
