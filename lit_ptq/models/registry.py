"""Model registry: names -> factories that carry their evaluation metadata (timm style).

The registry follows timm's ``register_model`` / ``create_model`` pattern
(https://github.com/huggingface/pytorch-image-models): a factory is registered under a name
together with the :class:`EvalConfig` its evaluation transform is built from.
"""

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
    has_pretrained: bool = False


_REGISTRY: dict[str, _Entry] = {}


def register_model(
    name: str, eval_cfg: EvalConfig, *, has_pretrained: bool = False
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a model factory under ``name`` with its evaluation metadata.

    Args:
        name: the name :func:`create_model` accepts.
        eval_cfg: how the model's evaluation images are prepared.
        has_pretrained: the factory accepts ``pretrained=True`` and then downloads published
            weights; without it, ``create_model(name, pretrained=True)`` is refused.

    Returns:
        A decorator that registers the factory and returns it unchanged. The factory is called
        with ``num_classes``, ``img_size``, the architecture overrides and, only when asked for,
        ``pretrained=True``.
    """

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = _Entry(fn, eval_cfg, has_pretrained)
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
    pretrained: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally loading a checkpoint.

    Args:
        name: registered model name (see :func:`list_models`).
        num_classes: classifier width.
        img_size: input side; defaults to the registered input size.
        checkpoint: path of a checkpoint to load (see :func:`lit_ptq.models.load_checkpoint`).
        strict: refuse missing, unexpected or wrong-shape keys.
        pretrained: download the model's published weights (timm models only; needs a network
            or a filled download cache).
        **overrides: architecture sizes, passed to the factory (iTPN: ``embed_dim``,
            ``mlp_depth``, ``depth``, ``num_heads``, ``mlp_ratio``, ``bridge_mlp_ratio``,
            ``patch_size``, ...; timm models: any keyword of the timm model class, such as
            ``depth``, ``depths``, ``embed_dim``, ``num_heads``, ``window_size``).

    Returns:
        The model in eval mode, with ``model.eval_cfg`` (an :class:`EvalConfig`) and
        ``model.model_name`` set.

    Raises:
        ConfigError: an unknown name or architecture argument, ``pretrained=True`` together with
            ``checkpoint``, or ``pretrained=True`` for a model without published weights.
        CheckpointError: the checkpoint does not load, or the pretrained weights could not be
            downloaded.
    """
    from .checkpoint import load_checkpoint

    factory, eval_cfg = model_entry(name)
    if pretrained and checkpoint is not None:
        raise ConfigError(f"pass either pretrained=True or checkpoint={checkpoint!r} for {name}, not both")
    if pretrained and not _REGISTRY[name].has_pretrained:
        raise ConfigError(
            f"model {name!r} has no published weights that lit_ptq can download; "
            "pass checkpoint= the path of a local file"
        )
    if pretrained:
        overrides["pretrained"] = True
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
