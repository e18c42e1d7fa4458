"""The compiled evaluation path (:mod:`lit_ptq.quant.compiled`): one graph, the eager logits to the bit.

The traced forward is checked on a one-block ``itpn_tiny`` (Dynamo only, seconds); the
compiled logits on the demo model with its trained weights and real images (Inductor compiles
C++ kernels: tens of seconds, so ``slow``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_ptq.errors import ConfigError
from lit_ptq.models import create_model
from lit_ptq.quant import QuantConfig, QuantMode, calibrate, compile_quantized, freeze_weights, quantize_, set_quant_mode
from lit_ptq.quant.quantizer import WeightQuantizer

from .conftest import seeded


def small_quantized(placement: str = "seed") -> torch.nn.Module:
    """A calibrated one-block ``itpn_tiny`` (random weights)."""
    torch.manual_seed(0)
    model = create_model("itpn_tiny", num_classes=10, depth=1).eval()
    quantize_(model, QuantConfig(method="minmax", placement=placement))
    calibrate(model, [seeded(4, 3, 32, 32, seed=1)])
    return model


@pytest.mark.parametrize("placement", ["seed", "full"])
def test_the_traced_forward_is_one_graph_without_breaks(placement: str) -> None:
    model = small_quantized(placement)
    freeze_weights(model)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(seeded(4, 3, 32, 32, seed=2))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_frozen_weights_are_the_eager_fake_quantized_weights() -> None:
    model = small_quantized()
    freeze_weights(model)
    points = [(name, p) for name, p in model.named_modules() if isinstance(p, WeightQuantizer)]
    assert points
    for name, point in points:
        weight = model.get_submodule(name.rsplit(".", 1)[0]).weight
        assert torch.equal(point._frozen, point(weight)), name


def test_compiling_a_calibrating_model_is_refused() -> None:
    model = small_quantized()
    set_quant_mode(model, QuantMode.CALIBRATE)
    with pytest.raises(ConfigError, match="is calibrating: compile the model after calibration"):
        compile_quantized(model)


def test_compiling_an_uncalibrated_model_is_refused() -> None:
    torch.manual_seed(0)
    model = quantize_(create_model("itpn_tiny", num_classes=10, depth=1).eval(), QuantConfig(method="minmax"))
    set_quant_mode(model, QuantMode.QUANTIZE)
    with pytest.raises(ConfigError, match="is not calibrated: calibrate or load a state before compiling"):
        compile_quantized(model)


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["seed", "full"])
def test_compiled_logits_are_the_eager_logits_on_the_demo(placement: str, fmnist_root: Path, tiny_checkpoint: Path) -> None:
    """8/8/8 MinMax on the trained demo model, calibrated and evaluated on real images: equal to the bit."""
    from lit_ptq.data import ImageNetDataModule

    data = ImageNetDataModule(root=str(fmnist_root), model_name="itpn_tiny", batch_size=59, num_workers=0, calib_batch_size=30, calib_batches=2)
    data.setup("validate")
    model = create_model("itpn_tiny", num_classes=10, checkpoint=str(tiny_checkpoint)).eval()
    quantize_(model, QuantConfig(method="minmax", placement=placement))
    calibrate(model, (images for images, _ in data.calib_dataloader()))
    images = torch.cat([x for x, _ in data.val_dataloader()])
    with torch.no_grad():
        eager = model(images)
        compiled = compile_quantized(model)(images)
    assert torch.equal(compiled, eager)
