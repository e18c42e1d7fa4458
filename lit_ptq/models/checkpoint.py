"""Loading model weights from the checkpoint formats users bring.

Accepted: the official ``{'model': state_dict, ...}``, ``{'model_ema': state_dict}``,
Lightning's ``{'state_dict': ...}`` with its ``model.`` prefix, a bare state dict, keys
prefixed with ``module.`` (DDP), and ``.safetensors`` files. Pickles are always read with
``torch.load(..., weights_only=True)``: nothing in a checkpoint is executed.

A model family whose published checkpoints use another key layout than its modules registers
a converter with :func:`register_layout_converter` (``timm_models`` does so for the original
Swin Transformer layout); :func:`load_checkpoint` applies it before the strict key check.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from ..errors import CheckpointError

__all__ = ["read_state_dict", "load_checkpoint", "register_layout_converter", "CheckpointError"]

LayoutConverter = Callable[[dict[str, torch.Tensor], nn.Module], tuple[dict[str, torch.Tensor], Optional[str]]]
_CONVERTERS: list[tuple[type, LayoutConverter]] = []
_HEAD_KEYS = ("head.weight", "head.fc.weight")

_CONTAINER_KEYS = ("model", "model_ema", "state_dict", "module")
_PREFIXES = ("module.", "model.", "_orig_mod.")
_SHOW = 5
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")


def _torch_load(path: str) -> object:
    # Official iTPN checkpoints also hold the training `args` (an argparse.Namespace): a plain
    # attribute bag, safe to allow in the weights-only unpickler.
    with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it all
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(_refusal(path, str(err))) from None
        # The unpickler fails on foreign bytes in many ways (EOFError, KeyError, IndexError, ...).
        except Exception as err:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(err).__name__}: {str(err)[:120]})") from None


def _refusal(path: str, message: str) -> str:
    """One sentence for a pickle that ``torch.load(weights_only=True)`` refused."""
    resave = "re-save the weights as torch.save({'model': model.state_dict()}, path)"
    refused = _REFUSED_GLOBAL.search(message)
    if refused is not None:
        return f"{path} holds a {refused.group(1)} object, which a weights-only load refuses; {resave}"
    detail = _UNPICKLER_DETAIL.search(message)
    with open(path, "rb") as f:
        is_pickle = f.read(1) == b"\x80"  # the PROTO opcode that starts every pickle since protocol 2
    if detail is not None and is_pickle:
        return f"{path} is a pickle that a weights-only load refuses ({detail.group(1).strip()}); {resave}"
    return f"{path} is not a PyTorch checkpoint (unreadable pickle stream)"


def _safetensors_load(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({err})") from None


def _unwrap(obj: object, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return _unwrap(obj[key], path)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return dict(tensors)
    raise CheckpointError(
        f"{path} holds no state dict: expected {{'model': state_dict}}, {{'model_ema': ...}}, "
        f"{{'state_dict': ...}} or a bare state dict"
    )


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


def read_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Read a state dict from any accepted checkpoint format, prefixes stripped.

    Raises:
        CheckpointError: the path is missing, or the file is not a checkpoint.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .pth or .safetensors file")
    obj = _safetensors_load(path) if path.endswith(".safetensors") else _torch_load(path)
    return _strip_prefixes(_unwrap(obj, path))


def register_layout_converter(model_type: type, convert: LayoutConverter) -> None:
    """Register a function that rewrites foreign checkpoint layouts for models of a class.

    Args:
        model_type: the model class (instances of subclasses are converted too).
        convert: ``convert(state_dict, model)`` returns the state dict in the model's own layout
            and the name of the layout it recognized (for error messages), or the state dict
            unchanged and ``None`` when it is already in the model's layout. It must not resize
            tensors: a strict load reports shape mismatches instead.
    """
    _CONVERTERS.append((model_type, convert))


def _convert_layout(model: nn.Module, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Optional[str]]:
    for model_type, convert in _CONVERTERS:
        if isinstance(model, model_type):
            return convert(sd, model)
    return sd, None


def _listing(title: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW]) + (", ..." if len(keys) > _SHOW else "")
    return f"{len(keys)} {title} ({shown})"


def load_checkpoint(model: nn.Module, path: Union[str, os.PathLike], strict: bool = True) -> nn.Module:
    """Load a checkpoint into ``model``.

    Args:
        model: the model to fill.
        path: a checkpoint in any accepted format.
        strict: refuse missing, unexpected and wrong-shape keys (default).

    Returns:
        ``model``.

    Raises:
        CheckpointError: missing file, not a checkpoint, or keys and shapes that do not fit;
            the message lists the first few offending keys of each kind with their counts and,
            for a head of another size, the ``num_classes`` that would fit.
    """
    sd, layout = _convert_layout(model, read_state_dict(path))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if strict and (missing or unexpected or wrong):
        parts = []
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if wrong:
            parts.append(
                _listing("wrong-shape keys", [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in wrong])
            )
        hints = []
        for head in _HEAD_KEYS:
            if head in wrong and sd[head].shape[1:] == own[head].shape[1:]:
                classes = sd[head].shape[0]
                hints.append(f"its head has {classes} classes: pass num_classes={classes}")
        if len(missing) + len(wrong) > len(own) // 2:
            hints.append("it looks like a checkpoint of another architecture")
        if layout is not None:
            hints.append(f"keys read from {layout} and renamed to the model's")
        name = getattr(model, "model_name", type(model).__name__)
        raise CheckpointError(f"checkpoint {os.fspath(path)} does not fit {name}: " + "; ".join(parts + hints))
    if not strict:
        sd = {k: v for k, v in sd.items() if k in own and k not in wrong}
    model.load_state_dict(sd, strict=strict)
    return model
