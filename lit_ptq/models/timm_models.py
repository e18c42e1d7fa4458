"""timm's DeiT, ViT and Swin Transformer classifiers in lit_ptq's model registry.

The float models are timm's own modules, unchanged (timm, Wightman et al.,
https://github.com/huggingface/pytorch-image-models): ``create_model(name)`` calls
``timm.create_model`` and only adds ``model.eval_cfg`` and ``model.model_name``. The eight
models FQ-ViT evaluates are registered (FQ-ViT: Lin et al., "FQ-ViT: Post-Training Quantization
for Fully Quantized Vision Transformer", IJCAI 2022, arXiv:2111.13824,
https://github.com/megvii-research/FQ-ViT), plus a few sizes of the same families that other
post-training quantization papers report on.

Each name is tied to one weight release, the one FQ-ViT loads, written as a timm pretrained
tag (``deit_tiny_patch16_224.fb_in1k``):

* DeiT (Touvron et al., "Training data-efficient image transformers & distillation through
  attention", ICML 2021, arXiv:2012.12877, https://github.com/facebookresearch/deit): the
  ``fb_in1k`` release.
* ViT (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, arXiv:2010.11929): the
  AugReg ImageNet-21k pre-trained, ImageNet-1k fine-tuned release ``augreg_in21k_ft_in1k``
  (Steiner et al., "How to train your ViT?", arXiv:2106.10270,
  https://github.com/google-research/vision_transformer).
* Swin (Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
  Windows", ICCV 2021, arXiv:2103.14030, https://github.com/microsoft/Swin-Transformer): the
  ImageNet-1k release ``ms_in1k``.

The evaluation metadata (input size, mean, std, crop fraction, interpolation) is read, offline,
from timm's pretrained config of that tag, except DeiT's crop fraction at 224: 0.875 (resize
256), as DeiT's own evaluation and FQ-ViT use, where timm's config says 0.9. ``pretrained=True`` downloads the tagged weights
with timm's own loader.

Checkpoints (``checkpoint=``) load strictly in these layouts:

* timm's own state dicts, and DeiT's original release ``{'model': state_dict}`` and FQ-ViT's
  DeiT/ViT models, whose keys equal timm's;
* the original Swin Transformer layout, which FQ-ViT's Swin models and timm before 0.6 share:
  ``head.weight`` instead of ``head.fc.weight``, ``layers.i.downsample`` at the end of stage
  ``i`` instead of the start of stage ``i + 1``, and the derived ``relative_position_index`` and
  ``attn_mask`` buffers. It is recognized by the key ``layers.0.downsample.reduction.weight``
  (timm's own test) and renamed by timm's ``swin_transformer.checkpoint_filter_fn``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import timm
import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg
from timm.models import swin_transformer as timm_swin

from ..errors import CheckpointError
from .checkpoint import register_layout_converter
from .registry import EvalConfig, register_model

__all__ = [
    "CROP_PCT",
    "WEIGHT_TAGS",
    "convert_swin_state_dict",
    "deit_base_patch16_224",
    "deit_base_patch16_384",
    "deit_small_patch16_224",
    "deit_tiny_patch16_224",
    "swin_base_patch4_window7_224",
    "swin_small_patch4_window7_224",
    "swin_tiny_patch4_window7_224",
    "timm_eval_config",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
    "vit_small_patch16_224",
    "vit_tiny_patch16_224",
]

#: The timm pretrained tag of the weights each registered name stands for.
WEIGHT_TAGS: dict[str, str] = {
    "deit_tiny_patch16_224": "fb_in1k",
    "deit_small_patch16_224": "fb_in1k",
    "deit_base_patch16_224": "fb_in1k",
    "deit_base_patch16_384": "fb_in1k",
    "vit_tiny_patch16_224": "augreg_in21k_ft_in1k",
    "vit_small_patch16_224": "augreg_in21k_ft_in1k",
    "vit_base_patch16_224": "augreg_in21k_ft_in1k",
    "vit_large_patch16_224": "augreg_in21k_ft_in1k",
    "swin_tiny_patch4_window7_224": "ms_in1k",
    "swin_small_patch4_window7_224": "ms_in1k",
    "swin_base_patch4_window7_224": "ms_in1k",
}

# Keys that timm's Swin filter would resize to fit the model; a strict load reports them instead.
_NOT_RESIZED = ("relative_position_bias_table", "patch_embed.proj.weight")
_ORIGINAL_SWIN_MARK = "layers.0.downsample.reduction.weight"
_SWIN_BUFFERS = ("relative_position_index", "attn_mask")


def timm_eval_config(tagged_name: str) -> EvalConfig:
    """The evaluation metadata of a timm pretrained config, read without a network.

    Args:
        tagged_name: a timm model name with its pretrained tag, e.g. ``"deit_tiny_patch16_224.fb_in1k"``.

    Returns:
        An :class:`EvalConfig` with timm's ``input_size``, ``mean``, ``std``, ``crop_pct`` and
        ``interpolation`` for those weights.
    """
    cfg = get_pretrained_cfg(tagged_name, allow_unregistered=False)
    return EvalConfig(
        input_size=tuple(cfg.input_size),
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        crop_pct=cfg.crop_pct,
        interpolation=cfg.interpolation,
    )


#: Crop fractions that differ from timm's config: DeiT's own evaluation and FQ-ViT's
#: ``test_quant.py`` resize DeiT to 256 (crop 0.875), where timm's config says 0.9.
CROP_PCT: dict[str, float] = {
    "deit_tiny_patch16_224": 0.875,
    "deit_small_patch16_224": 0.875,
    "deit_base_patch16_224": 0.875,
}


def _register(name: str):
    eval_cfg = timm_eval_config(f"{name}.{WEIGHT_TAGS[name]}")
    if name in CROP_PCT:
        eval_cfg = replace(eval_cfg, crop_pct=CROP_PCT[name])
    return register_model(name, eval_cfg, has_pretrained=True)


def _create(name: str, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` for a registered name, with a one-line error when a download fails."""
    tagged = f"{name}.{WEIGHT_TAGS[name]}"
    try:
        return timm.create_model(tagged, pretrained=pretrained, **kwargs)
    except OSError as err:  # URLError, requests' and huggingface_hub's connection errors, a missing cache entry
        if not pretrained:
            raise
        reason = (str(err).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"the pretrained weights of {name} ({tagged}) could not be downloaded ({type(err).__name__}: {reason}); "
            "without a network, pass checkpoint= the path of a local file"
        ) from None


def convert_swin_state_dict(
    sd: dict[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], Optional[str]]:
    """Rename an original-layout Swin Transformer state dict to timm's layout.

    Checkpoints with the key ``layers.0.downsample.reduction.weight`` (the original release,
    FQ-ViT's models, timm before 0.6) are passed through timm's
    ``swin_transformer.checkpoint_filter_fn``, which moves ``layers.i.downsample.*`` to
    ``layers.{i+1}.downsample.*``, renames ``head.*`` to ``head.fc.*`` and drops the derived
    ``relative_position_index`` and ``attn_mask`` buffers. The relative-position tables and
    the patch-embedding weight bypass the filter, which would resize them to fit the model: a
    strict load reports a shape mismatch instead. A state dict in timm's layout is returned
    unchanged, less any stray ``relative_position_index`` / ``attn_mask`` buffers.

    Args:
        sd: the checkpoint's state dict.
        model: the timm ``SwinTransformer`` it is loaded into.

    Returns:
        The state dict in timm's layout, and ``"the original Swin layout"`` when it was renamed
        (``None`` otherwise).
    """
    if _ORIGINAL_SWIN_MARK not in sd:
        return {k: v for k, v in sd.items() if not k.endswith(_SWIN_BUFFERS)}, None
    kept = {k: v for k, v in sd.items() if k.endswith(_NOT_RESIZED)}
    renamed = timm_swin.checkpoint_filter_fn({k: v for k, v in sd.items() if k not in kept}, model)
    return {**renamed, **kept}, "the original Swin layout"


register_layout_converter(timm_swin.SwinTransformer, convert_swin_state_dict)


@_register("deit_tiny_patch16_224")
def deit_tiny_patch16_224(**kwargs: Any) -> nn.Module:
    """DeiT-Ti/16 at 224 (timm ``VisionTransformer``, 5.7 M params; weights ``fb_in1k``)."""
    return _create("deit_tiny_patch16_224", **kwargs)


@_register("deit_small_patch16_224")
def deit_small_patch16_224(**kwargs: Any) -> nn.Module:
    """DeiT-S/16 at 224 (timm ``VisionTransformer``, 22.1 M params; weights ``fb_in1k``)."""
    return _create("deit_small_patch16_224", **kwargs)


@_register("deit_base_patch16_224")
def deit_base_patch16_224(**kwargs: Any) -> nn.Module:
    """DeiT-B/16 at 224 (timm ``VisionTransformer``, 86.6 M params; weights ``fb_in1k``)."""
    return _create("deit_base_patch16_224", **kwargs)


@_register("deit_base_patch16_384")
def deit_base_patch16_384(**kwargs: Any) -> nn.Module:
    """DeiT-B/16 at 384 (timm ``VisionTransformer``, 86.9 M params; weights ``fb_in1k``)."""
    return _create("deit_base_patch16_384", **kwargs)


@_register("vit_tiny_patch16_224")
def vit_tiny_patch16_224(**kwargs: Any) -> nn.Module:
    """ViT-Ti/16 at 224 (timm ``VisionTransformer``, 5.7 M params; weights ``augreg_in21k_ft_in1k``)."""
    return _create("vit_tiny_patch16_224", **kwargs)


@_register("vit_small_patch16_224")
def vit_small_patch16_224(**kwargs: Any) -> nn.Module:
    """ViT-S/16 at 224 (timm ``VisionTransformer``, 22.1 M params; weights ``augreg_in21k_ft_in1k``)."""
    return _create("vit_small_patch16_224", **kwargs)


@_register("vit_base_patch16_224")
def vit_base_patch16_224(**kwargs: Any) -> nn.Module:
    """ViT-B/16 at 224 (timm ``VisionTransformer``, 86.6 M params; weights ``augreg_in21k_ft_in1k``)."""
    return _create("vit_base_patch16_224", **kwargs)


@_register("vit_large_patch16_224")
def vit_large_patch16_224(**kwargs: Any) -> nn.Module:
    """ViT-L/16 at 224 (timm ``VisionTransformer``, 304.3 M params; weights ``augreg_in21k_ft_in1k``)."""
    return _create("vit_large_patch16_224", **kwargs)


@_register("swin_tiny_patch4_window7_224")
def swin_tiny_patch4_window7_224(**kwargs: Any) -> nn.Module:
    """Swin-T, patch 4, window 7, at 224 (timm ``SwinTransformer``, 28.3 M params; weights ``ms_in1k``)."""
    return _create("swin_tiny_patch4_window7_224", **kwargs)


@_register("swin_small_patch4_window7_224")
def swin_small_patch4_window7_224(**kwargs: Any) -> nn.Module:
    """Swin-S, patch 4, window 7, at 224 (timm ``SwinTransformer``, 49.6 M params; weights ``ms_in1k``)."""
    return _create("swin_small_patch4_window7_224", **kwargs)


@_register("swin_base_patch4_window7_224")
def swin_base_patch4_window7_224(**kwargs: Any) -> nn.Module:
    """Swin-B, patch 4, window 7, at 224 (timm ``SwinTransformer``, 87.8 M params; weights ``ms_in1k``)."""
    return _create("swin_base_patch4_window7_224", **kwargs)
