"""Float models, the model registry and checkpoint loading (no Lightning, no quantization).

Registered models (:func:`list_models`):

* iTPN (``itpn_base``, ``itpn_large``, ``itpn_tiny``): this package's own implementation of the
  iTPN classifier (Tian et al., CVPR 2023, https://github.com/sunsmarterjie/iTPN).
* DeiT, ViT and Swin Transformer (``deit_*``, ``vit_*``, ``swin_*``): timm's own modules
  (https://github.com/huggingface/pytorch-image-models), tied to the weight releases FQ-ViT
  evaluates (https://github.com/megvii-research/FQ-ViT); see :mod:`lit_ptq.models.timm_models`.

:func:`create_model` builds a registered model, loads ``checkpoint=`` strictly (official,
timm and original Swin layouts) or downloads ``pretrained=True`` weights (timm models), and
sets ``model.eval_cfg`` and ``model.model_name``.
"""

from . import factories  # noqa: F401  (registers the iTPN models)
from . import timm_models  # noqa: F401  (registers the timm DeiT / ViT / Swin models)
from .checkpoint import load_checkpoint, read_state_dict, register_layout_converter
from .itpn import Attention, Block, Mlp, PatchEmbed, PatchMerge, iTPN
from .registry import EvalConfig, create_model, list_models, model_entry, register_model
from .timm_models import WEIGHT_TAGS, convert_swin_state_dict, timm_eval_config

__all__ = [
    "Attention",
    "Block",
    "EvalConfig",
    "Mlp",
    "PatchEmbed",
    "PatchMerge",
    "WEIGHT_TAGS",
    "convert_swin_state_dict",
    "create_model",
    "iTPN",
    "list_models",
    "load_checkpoint",
    "model_entry",
    "read_state_dict",
    "register_layout_converter",
    "register_model",
    "timm_eval_config",
]
