"""RepQ-ViT's reparameterization (lit_ptq/quant/transforms/reparam.py): the folded float model
computes the same function, and one scale on the folded output is the old per-channel grid."""

from __future__ import annotations

import torch
import torch.nn as nn

from lit_ptq.quant import QuantConfig, family_of, quantize_
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
