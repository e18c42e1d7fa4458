"""Registered iTPN configurations (sizes from the official ``itpn_base`` / ``itpn_large``)."""

from __future__ import annotations

from typing import Any

from .itpn import iTPN
from .registry import EvalConfig, register_model

__all__ = ["itpn_base", "itpn_large", "itpn_tiny"]

_IMAGENET_EVAL = EvalConfig()
# The demo model reads 28x28 grayscale Fashion-MNIST images as RGB and resizes them to 32.
_DEMO_EVAL = EvalConfig(input_size=(3, 32, 32), mean=(0.286,) * 3, std=(0.353,) * 3, crop_pct=1.0, interpolation="bilinear")


def _build(defaults: dict[str, Any], overrides: dict[str, Any]) -> iTPN:
    return iTPN(**{**defaults, **overrides})


@register_model("itpn_base", _IMAGENET_EVAL)
def itpn_base(**kwargs: Any) -> iTPN:
    """iTPN-B: embed_dim 512, 3+3 MLP blocks, 24 attention blocks, 8 heads (78.6 M params)."""
    return _build(dict(embed_dim=512, mlp_depth=3, depth=24, num_heads=8, bridge_mlp_ratio=3.0, mlp_ratio=4.0), kwargs)


@register_model("itpn_large", _IMAGENET_EVAL)
def itpn_large(**kwargs: Any) -> iTPN:
    """iTPN-L: embed_dim 768, 2+2 MLP blocks, 40 attention blocks, 12 heads (288.5 M params)."""
    return _build(dict(embed_dim=768, mlp_depth=2, depth=40, num_heads=12, bridge_mlp_ratio=3.0, mlp_ratio=4.0), kwargs)


@register_model("itpn_tiny", _DEMO_EVAL)
def itpn_tiny(**kwargs: Any) -> iTPN:
    """A small iTPN for demos and CPU tests: 32x32 input, patch 8, embed_dim 128, 1+1 MLP blocks, depth 6, 4 heads."""
    return _build(
        dict(patch_size=8, embed_dim=128, mlp_depth=1, depth=6, num_heads=4, bridge_mlp_ratio=3.0, mlp_ratio=4.0),
        kwargs,
    )
