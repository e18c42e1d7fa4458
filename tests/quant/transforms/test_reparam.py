"""RepQ-ViT's reparameterization (lit_ptq/quant/transforms/reparam.py): the folded float model
computes the same function, and one scale on the folded output is the old per-channel grid."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

from lit_ptq.quant import QuantConfig, calibrate, family_of, quantize_
from lit_ptq.quant.config import QuantSpec, Granularity
from lit_ptq.quant.observers import build_observer
from lit_ptq.quant.primitives import fake_quant_seed
from lit_ptq.quant.transforms import fold_norm_linear_, reparameterize_


def test_folding_keeps_the_float_logits(make_tiny, outlier_channels, calib_batches, eval_images) -> None:
    model = outlier_channels(quantize_(make_tiny(), QuantConfig("mse", "matmul", "4/4/4", recipe="repq")))
    pairs = family_of(model).norm_linear_pairs(model)
    with torch.no_grad():
        before = model(eval_images)
        reparameterize_(model, calib_batches, pairs, model.quant_config.act)
        after = model(eval_images)
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()
    assert not torch.equal(model.get_submodule(pairs[0][0]).weight, make_tiny().get_submodule(pairs[0][0]).weight)


def test_one_scale_on_the_folded_output_is_the_per_channel_grid() -> None:
    torch.manual_seed(0)
    norm, linear = nn.LayerNorm(16), nn.Linear(16, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.weight[3] *= 100
        norm.bias.normal_()
    x = torch.randn(64, 16)
    spec = QuantSpec(4, False, Granularity.PER_CHANNEL, "minmax")
    obs = build_observer("minmax", spec.qmin, spec.qmax, False, True, -1)
    with torch.no_grad():
        y = norm(x)
        obs.update(y)
        scale, zp, _, _ = obs.compute()
        per_channel = linear(fake_quant_seed(y, scale, zp, spec.qmin, spec.qmax))
        fold_norm_linear_(norm, linear, scale, zp)
        s, z = scale.double().mean().float(), zp.double().mean().round().float()
        per_tensor = linear(fake_quant_seed(norm(x), s, z, spec.qmin, spec.qmax))
    assert torch.allclose(per_tensor, per_channel, atol=1e-4)


def test_a_bias_free_linear_gets_the_folded_bias() -> None:
    norm, linear = nn.LayerNorm(4), nn.Linear(4, 2, bias=False)
    fold_norm_linear_(norm, linear, torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert isinstance(linear.bias, nn.Parameter) and linear.bias.shape == (2,)


def observed_qparams(
    model: nn.Module, linears: list[str], batches: list[torch.Tensor], observer: str, qmax: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per channel ``(scale, zero point)`` of the input of each of ``linears`` in the float
    ``model``, from an asymmetric ``observer`` fed the batches in order (the last one marked)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0].detach().clone()))
        for name in linears
    ]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for h in handles:
        h.remove()
    qparams = {}
    for name, inputs in seen.items():
        obs = build_observer(observer, 0, qmax, False, True, -1)
        for i, x in enumerate(inputs):
            obs.update(x, last=i == len(inputs) - 1)
        scale, zero_point, _, _ = obs.compute()
        qparams[name] = scale, zero_point
    return qparams


@pytest.mark.parametrize("method, observer", [("mse", "mse"), ("ema", "ema"), ("minmax", "minmax"), ("percentile", "mse")])
def test_reparameterize_folds_the_qparams_an_observer_finds_on_the_float_inputs(
    make_tiny: Callable[[], nn.Module], outlier_channels: Callable[[nn.Module], nn.Module], calib_batches: list[torch.Tensor],
    method: str, observer: str,
) -> None:
    wide = outlier_channels(make_tiny())
    model = quantize_(copy.deepcopy(wide), QuantConfig("minmax", "matmul", "4/4/4"))
    calibrate(model, calib_batches)  # quantizing: the fold's pass must switch its points to float
    pairs = family_of(model).norm_linear_pairs(model)
    qparams = observed_qparams(wide, [linear for _, linear in pairs], calib_batches, observer, 15)
    reparameterize_(model, calib_batches, pairs, QuantSpec(4, False, Granularity.PER_TENSOR, method))
    expected = {name: p.detach().double() for name, p in wide.named_parameters()}
    for norm, linear in pairs:
        s_c, z_c = (t.double() for t in qparams[linear])
        s, z = s_c.mean(), z_c.mean().round()  # the one scale and (integer) zero point after the fold
        r, shift = s_c / s, (z - z_c) * s  # round(y / s_c + z_c) = round((y / r - shift) / s + z)
        expected[f"{norm}.weight"] = expected[f"{norm}.weight"] / r
        expected[f"{norm}.bias"] = expected[f"{norm}.bias"] / r - shift
        weight = expected[f"{linear}.weight"] = expected[f"{linear}.weight"] * r
        bias = expected.get(f"{linear}.bias", torch.zeros(len(weight), dtype=torch.float64))  # patch merging has none
        expected[f"{linear}.bias"] = bias + weight @ shift
    params = dict(model.named_parameters())
    assert params.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(params[name].double(), value, rtol=1e-6, atol=1e-7, msg=name)


def test_folding_refuses_a_layernorm_without_affine_parameters() -> None:
    with pytest.raises(ValueError, match="without affine"):
        fold_norm_linear_(nn.LayerNorm(4, elementwise_affine=False), nn.Linear(4, 2), torch.ones(4), torch.zeros(4))
