"""Methods that change a quantized model before or during calibration, one file each.

- :mod:`.reparam`: RepQ-ViT's LayerNorm -> Linear scale reparameterization.
- :mod:`.gptq`: ridge-regression (ERQ) and GPTQ weight error correction, block by block.
- :mod:`.recon`: block reconstruction (BRECQ / QDrop with AdaRound).

They name no model: the family plugin says which LayerNorm feeds which Linear and which
modules are the blocks (``Family.norm_linear_pairs``, ``Family.blocks``).
"""

from .capture import capture_inputs, capture_outputs
from .gptq import correct_weights_, gptq_round, ridge_weights
from .recon import reconstruct_
from .reparam import fold_norm_linear_, reparameterize_

__all__ = [
    "capture_inputs",
    "capture_outputs",
    "correct_weights_",
    "fold_norm_linear_",
    "gptq_round",
    "reconstruct_",
    "reparameterize_",
    "ridge_weights",
]
