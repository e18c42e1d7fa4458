"""Methods that change a quantized model before or during calibration, one file each; each
registers its calibration step (``lit_ptq.quant.steps``), which the recipes name.

- :mod:`.reparam`: RepQ-ViT's LayerNorm -> Linear scale reparameterization (step ``reparameterize``).
- :mod:`.gptq`: ridge-regression (ERQ) and GPTQ weight error correction, block by block
  (step ``correct_weights``).
- :mod:`.recon`: block reconstruction (BRECQ / QDrop with AdaRound) (step ``reconstruct``).

They name no model: the family plugin says which LayerNorm feeds which Linear and which
modules are the blocks (the facts ``family.fact("norm_linear_pairs", model)`` and
``family.fact("blocks", model)``).
"""

from .capture import capture_inputs, capture_outputs
from .gptq import correct_weights, correct_weights_, gptq_round, ridge_weights
from .recon import reconstruct, reconstruct_
from .reparam import fold_norm_linear_, reparameterize, reparameterize_

__all__ = [
    "capture_inputs",
    "capture_outputs",
    "correct_weights",
    "correct_weights_",
    "fold_norm_linear_",
    "gptq_round",
    "reconstruct",
    "reconstruct_",
    "reparameterize",
    "reparameterize_",
    "ridge_weights",
]
