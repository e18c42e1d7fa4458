"""Float iTPN models, the model registry and checkpoint loading (no Lightning, no quantization)."""

from . import factories  # noqa: F401  (registers the models)
from .checkpoint import load_checkpoint, read_state_dict
from .itpn import Attention, Block, Mlp, PatchEmbed, PatchMerge, iTPN
from .registry import EvalConfig, create_model, list_models, model_entry, register_model

__all__ = [
    "Attention",
    "Block",
    "EvalConfig",
    "Mlp",
    "PatchEmbed",
    "PatchMerge",
    "create_model",
    "iTPN",
    "list_models",
    "load_checkpoint",
    "model_entry",
    "read_state_dict",
    "register_model",
]
