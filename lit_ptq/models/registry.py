"""Model registry: names -> factories that carry their evaluation metadata (timm style)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Union

import torch.nn as nn

from ..errors import ConfigError

__all__ = ["EvalConfig", "register_model", "create_model", "list_models", "model_entry"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalConfig:
    """How a model expects its evaluation images to be prepared.

    Attributes:
        input_size: ``(channels, height, width)`` of the network input.
        mean: per-channel normalization mean.
        std: per-channel normalization std.
        crop_pct: center-crop fraction; images are resized to ``int(side / crop_pct)`` first.
        interpolation: resize interpolation, a ``torchvision.transforms.InterpolationMode`` name.
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    eval_cfg: EvalConfig


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, eval_cfg: EvalConfig) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a model factory under ``name`` with its evaluation metadata."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = _Entry(fn, eval_cfg)
        return fn

    return wrap


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def model_entry(name: str) -> tuple[Callable[..., nn.Module], EvalConfig]:
    """The factory and evaluation metadata registered under ``name``.

    Raises:
        ConfigError: for an unknown name, listing the registered ones.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    entry = _REGISTRY[name]
    return entry.factory, entry.eval_cfg


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    img_size: Optional[int] = None,
    checkpoint: Union[str, None] = None,
    strict: bool = True,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally loading a checkpoint.

    Args:
        name: registered model name (see :func:`list_models`).
        num_classes: classifier width.
        img_size: input side; defaults to the registered input size.
        checkpoint: path of a checkpoint to load (see :func:`lit_ptq.models.load_checkpoint`).
        strict: refuse missing, unexpected or wrong-shape keys.
        **overrides: architecture sizes (``embed_dim``, ``mlp_depth``, ``depth``, ``num_heads``,
            ``mlp_ratio``, ``bridge_mlp_ratio``, ``patch_size``, ...).

    Returns:
        The model in eval mode, with ``model.eval_cfg`` (an :class:`EvalConfig`) and
        ``model.model_name`` set.
    """
    from .checkpoint import load_checkpoint

    factory, eval_cfg = model_entry(name)
    img_size = img_size or eval_cfg.input_size[-1]
    try:
        model = factory(num_classes=num_classes, img_size=img_size, **overrides)
    except TypeError as err:
        raise ConfigError(f"model {name!r} does not accept these arguments: {err}") from None
    model.eval_cfg = replace(eval_cfg, input_size=(eval_cfg.input_size[0], img_size, img_size))
    model.model_name = name
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, strict=strict)
    return model.eval()
