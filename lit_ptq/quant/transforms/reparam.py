"""RepQ-ViT's scale reparameterization of post-LayerNorm activations.

Li et al., "RepQ-ViT: Scale Reparameterization for Post-Training Quantization of Vision
Transformers", ICCV 2023 (zkkli/RepQ-ViT, ``classification/test_quant.py``). The output of a
LayerNorm has a few channels far wider than the others, so one scale for the whole tensor
fails at low bit widths. The input of the Linear the LayerNorm feeds is calibrated per
channel (scale ``s_c``,
zero point ``z_c``); with the target ``s = mean(s_c)``, ``z = round(mean(z_c))``,
``r = s_c / s`` and ``b = -z_c s_c / r + z s``, the LayerNorm's affine parameters become
``gamma / r`` and ``beta / r - b`` and the next Linear's weight ``W r`` (column-wise) and
bias ``bias + (W r) b``. The float model computes the same function, and one scale per
tensor on the new LayerNorm output is the per-channel quantization of the old one (exactly,
with the integer target zero point). The weights are calibrated after the fold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ...errors import ConfigError
from ..calibration import CalibrationContext
from ..config import QuantSpec
from ..observers import OBSERVERS, build_observer
from ..quantizer import QuantMode
from ..steps import register_step
from ..walk import set_quant_mode

__all__ = ["reparameterize", "reparameterize_", "fold_norm_linear_"]


@register_step("reparameterize", needs={"norm_linear_pairs": "LayerNorm -> Linear pairs"})
def reparameterize(model: nn.Module, batches: Sequence[torch.Tensor], ctx: CalibrationContext) -> None:
    """The recipe step: :func:`reparameterize_` over the family's LayerNorm -> Linear pairs,
    with the config's activation spec."""
    reparameterize_(model, batches, ctx.family.fact("norm_linear_pairs", model), ctx.config.act)


@torch.no_grad()
def reparameterize_(
    model: nn.Module, batches: Sequence[torch.Tensor], pairs: Sequence[tuple[str, str]], spec: QuantSpec
) -> None:
    """Calibrate the input of each paired Linear (its LayerNorm's output, after any pooling or
    token selection) per channel on ``batches`` and fold the scales (in place).

    Args:
        model: a quantized model (its quant points are switched to ``FLOAT`` for the pass).
        batches: calibration inputs.
        pairs: ``(layernorm name, linear name)`` pairs from the family plugin.
        spec: the activation spec (bits, and the observer when it works per channel; ``mse``
            for one that does not, see ``Observer.supports_per_channel``).
    """
    observer_name = spec.observer if OBSERVERS[spec.observer].supports_per_channel else "mse"
    observers = {norm: build_observer(observer_name, spec.qmin, spec.qmax, False, True, -1) for norm, _ in pairs}
    last = [False]
    # The Linear's input, which is the LayerNorm's output after channel-wise operations only
    # (token selection, pooling): the values its input quantizer will see.
    handles = [
        model.get_submodule(linear).register_forward_pre_hook(
            lambda _m, args, obs=observers[norm]: obs.update(args[0].detach().float(), last=last[0])
        )
        for norm, linear in pairs
    ]
    set_quant_mode(model, QuantMode.FLOAT)
    try:
        for i, x in enumerate(batches):
            last[0] = i == len(batches) - 1
            model(x)
    finally:
        for h in handles:
            h.remove()
    for norm, linear in pairs:
        scale, zero_point, _, _ = observers[norm].compute()
        fold_norm_linear_(model.get_submodule(norm), model.get_submodule(linear), scale, zero_point)


@torch.no_grad()
def fold_norm_linear_(norm: nn.LayerNorm, linear: nn.Linear, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
    """Fold per-channel activation qparams of ``norm``'s output into ``norm`` and ``linear``.

    After the fold, ``norm``'s output quantized with one scale ``mean(scale)`` and zero point
    ``round(mean(zero_point))`` equals the old output quantized per channel, mapped through
    the new ``linear`` weights; in float the pair computes what it did.

    Raises:
        ConfigError: ``norm`` has no affine parameters to fold into.
    """
    if norm.weight is None or norm.bias is None:
        raise ConfigError(f"cannot reparameterize a LayerNorm without affine parameters ({norm})")
    s_c, z_c = scale.double().reshape(-1), zero_point.double().reshape(-1)
    target_s, target_z = s_c.mean(), z_c.mean().round()
    r = s_c / target_s
    b = -z_c * s_c / r + target_z * target_s
    weight = linear.weight.double() * r
    bias = (linear.bias.double() if linear.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device))
    bias = bias + weight @ b
    norm.weight.copy_((norm.weight.double() / r).to(norm.weight.dtype))
    norm.bias.copy_((norm.bias.double() / r - b).to(norm.bias.dtype))
    linear.weight.copy_(weight.to(linear.weight.dtype))
    if linear.bias is None:
        linear.bias = nn.Parameter(bias.to(linear.weight.dtype))
    else:
        linear.bias.copy_(bias.to(linear.bias.dtype))
