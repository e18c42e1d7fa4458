"""Quantizer state: save a calibrated model's quant buffers once, load them for every later run.

A state file is ``torch.save({"format", "version", "meta", "state"})``: ``state`` holds the
buffers of every quantizer (scale, zero point, range, calibrated flag); a run with a low-bit
recipe, which changes the weights (folded LayerNorms, corrected or reconstructed weights),
also stores every parameter under ``params``. ``meta`` says what
they were made for (the quantization config, the model, the SHA-256 of its float weights,
and whatever the caller adds). :func:`load_quant_state` refuses a file whose meta differs
from the run's in any key, either way, so a state is never applied to another model,
checkpoint or config. Files are read with ``weights_only=True`` and written atomically.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import CheckpointError
from ..io import atomic_path
from .walk import quant_points, set_quant_mode

__all__ = [
    "STATE_FORMAT",
    "STATE_VERSION",
    "weights_fingerprint",
    "quant_state",
    "changed_params",
    "state_meta",
    "save_quant_state",
    "load_quant_state",
    "broadcast_quant_state",
]

STATE_FORMAT = "lit_ptq.quant_state"
STATE_VERSION = 2
"""2: meta keys from the quantization config plus the caller's (version 1 files are refused)."""


def _float_fingerprint(model: nn.Module) -> str:
    """The fingerprint of the weights the model was built with (recipes record it before
    they change the weights)."""
    return getattr(model, "float_weights_sha256", None) or weights_fingerprint(model)


def _recipe_changes_weights(model: nn.Module) -> bool:
    """Whether the model's config has a recipe, whose calibration changes the weights."""
    return bool(getattr(getattr(model, "quant_config", None), "recipe", None))


def changed_params(model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """CPU copies of every parameter when the model's recipe changed its weights, else ``None``."""
    if not _recipe_changes_weights(model):
        return None
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's float parameters (names, shapes and bytes), to tie a state to its weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies (on CPU) of every quant-point buffer of ``model``, keyed by their state-dict names."""
    state = {}
    for name, q in quant_points(model):
        for key, buf in q.named_buffers():
            state[f"{name}.{key}"] = buf.detach().cpu().clone()
    return state


def state_meta(model: nn.Module, extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """What a state is made for: the model's quantization config, its weights' hash, and ``extra``.

    Args:
        model: a model prepared with ``quantize_``.
        extra: further keys from the caller (for example the model name and input size).
    """
    meta: dict[str, Any] = dict(model.quant_config.describe())
    meta.update(extra or {})
    meta["weights_sha256"] = _float_fingerprint(model)
    return meta


def save_quant_state(model: nn.Module, path: str, extra_meta: Optional[Mapping[str, Any]] = None) -> None:
    """Write the calibrated quantizer state of ``model`` to ``path`` (atomically).

    Args:
        model: a calibrated model.
        path: the file to write.
        extra_meta: keys added to :func:`state_meta`; :func:`load_quant_state` must be given
            the same ones.
    """
    payload = dict(
        format=STATE_FORMAT,
        version=STATE_VERSION,
        meta=state_meta(model, extra_meta),
        state=quant_state(model),
    )
    params = changed_params(model)
    if params is not None:
        payload["params"] = params
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_quant_state(
    model: nn.Module, path: str, extra_meta: Optional[Mapping[str, Any]] = None, option: str = "state file"
) -> None:
    """Load a state written by :func:`save_quant_state` into ``model`` and switch it to quantizing.

    Args:
        model: a model prepared with ``quantize_`` with the same config and weights.
        path: the state file.
        extra_meta: the keys given to :func:`save_quant_state` when the file was written.
        option: how the path is named in error messages (``calibration.load_state``).

    Raises:
        CheckpointError: the file is not a state file, its meta differs from this model's in
            any key (a key missing on either side included), or it holds other quantizers.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler fails on foreign bytes in many ways
        raise CheckpointError(f"{option}={path} is not a lit_ptq quantizer state ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{option}={path} is not a lit_ptq quantizer state file")
    if payload.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"{option}={path} is a version {payload.get('version')} state file and this lit_ptq reads version "
            f"{STATE_VERSION}; calibrate again with save_state"
        )
    want, have = state_meta(model, extra_meta), payload.get("meta")
    have = have if isinstance(have, dict) else {}
    missing = object()
    diff = [
        f"{k}: file {have.get(k, '<missing>')!r}, run {want.get(k, '<missing>')!r}"
        for k in sorted(set(want) | set(have))
        if have.get(k, missing) != want.get(k, missing)
    ]
    if diff:
        raise CheckpointError(
            f"{option}={path} was made for another model or config ({'; '.join(diff)}); "
            "calibrate again or use the matching state file"
        )
    own = quant_state(model)
    state = payload.get("state")
    if not isinstance(state, dict) or set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise CheckpointError(f"{option}={path} does not hold this model's quantizers")
    params = payload.get("params")
    if (params is None) == _recipe_changes_weights(model):
        raise CheckpointError(f"{option}={path} does not hold the weights this recipe needs")
    if params is not None:
        _load_params(model, params, f"{option}={path}")
    model.load_state_dict(state, strict=False)
    set_quant_mode(model, "quantize")


def _load_params(model: nn.Module, params: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy ``params`` into the model, adding the biases a recipe gave to bias-free layers."""
    own = dict(model.named_parameters())
    for name in sorted(set(params) - set(own)):
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if leaf != "bias" or getattr(owner, "bias", 0) is not None:
            raise CheckpointError(f"{where} holds a parameter {name} this model does not have")
        owner.bias = nn.Parameter(torch.zeros_like(params[name], device=owner.weight.device))
    own = dict(model.named_parameters())
    if set(own) != set(params) or any(own[k].shape != params[k].shape for k in own):
        raise CheckpointError(f"{where} does not hold this model's parameters")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(params[name])


def broadcast_quant_state(model: nn.Module, src: int = 0) -> None:
    """Make every rank's quantizer buffers (and, after a recipe, parameters) equal to rank
    ``src``'s (a no-op without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for _, q in quant_points(model):
        for buf in q.buffers():
            if buf.is_floating_point():
                dist.broadcast(buf, src=src)
    if _recipe_changes_weights(model):
        with torch.no_grad():
            for p in model.parameters():
                received = p.detach().clone()
                dist.broadcast(received, src=src)
                p.copy_(received)  # an in-place write the weight quantizers' caches see
