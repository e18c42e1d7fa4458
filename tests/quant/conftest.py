"""Fixtures for the quantization tests: a seeded ``itpn_tiny`` (10 classes, 32x32 input) and
seeded image batches, small enough that calibrating the whole model takes well under a second."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Callable

import pytest
import torch
import torch.nn as nn

from lit_ptq.models import create_model
from lit_ptq.quant import QuantConfig, calibrate, family_of, quantize_


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run each quantization test module on one intra-op thread (restored afterwards).

    Their tensors are tiny: a second thread only adds synchronization, and on a shared
    machine OpenMP's spinning workers make the suite several times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    """A standard-normal tensor drawn from a generator seeded with ``seed``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def trained_like_(model: nn.Module) -> nn.Module:
    """Fill ``model``'s float tensors in place with trained-like seeded values (generator seed 0,
    in state-dict order) and return it: each matrix ``noise / sqrt(fan_in)``, LayerNorm weights
    ``1 + 0.1 noise``, biases ``0.1 noise``."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if tensor.ndim == 1:
                tensor.copy_(1.0 + 0.1 * noise if key.endswith("weight") else 0.1 * noise)
            else:
                tensor.copy_(noise * tensor[0].numel() ** -0.5)
    return model


@pytest.fixture(scope="session")
def trained_like() -> Callable[[nn.Module], nn.Module]:
    """:func:`trained_like_`, for test modules that build their own models."""
    return trained_like_


OUTLIER_FACTOR = 100.0


def outlier_channels_(model: nn.Module) -> nn.Module:
    """Give every LayerNorm that feeds a Linear (its family's ``norm_linear_pairs``) three
    channels 100x wider than the others, as trained ViTs have, and return ``model``.

    The LayerNorm's weight and bias of channels ``1``, ``C // 2`` and ``C - 3`` are multiplied
    by :data:`OUTLIER_FACTOR` and the matching weight columns of the Linear divided by it:
    the model computes the same function (up to float rounding), but one scale for the whole
    LayerNorm output no longer fits.
    """
    with torch.no_grad():
        for norm_name, linear_name in family_of(model).norm_linear_pairs(model):
            norm, linear = model.get_submodule(norm_name), model.get_submodule(linear_name)
            channels = norm.normalized_shape[-1]
            idx = torch.tensor([1, channels // 2, channels - 3])
            norm.weight[idx] *= OUTLIER_FACTOR
            norm.bias[idx] *= OUTLIER_FACTOR
            linear.weight[:, idx] /= OUTLIER_FACTOR
    return model


@pytest.fixture(scope="session")
def outlier_channels() -> Callable[[nn.Module], nn.Module]:
    """:func:`outlier_channels_`, for the tests of the low-bit recipes."""
    return outlier_channels_


def _channel_ranges(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``max - min`` per channel (last dimension) of the input of each module in ``names``
    over ``batches``."""
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}

    def record(name: str, out: torch.Tensor) -> None:
        rows = out.detach().reshape(-1, out.shape[-1])
        lo[name] = torch.minimum(lo[name], rows.amin(0)) if name in lo else rows.amin(0)
        hi[name] = torch.maximum(hi[name], rows.amax(0)) if name in hi else rows.amax(0)

    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, args, n=n: record(n, args[0])) for n in names
    ]
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: hi[n] - lo[n] for n in names}


@pytest.fixture(scope="session")
def channel_ranges() -> Callable[[nn.Module, list[str], list[torch.Tensor]], dict[str, torch.Tensor]]:
    """``channel_ranges(model, names, batches)``: ``max - min`` per channel (last dimension)
    of the input of each module in ``names`` over ``batches``."""
    return _channel_ranges


def _call_order(model: nn.Module, names: list[str], x: torch.Tensor) -> list[str]:
    """The modules among ``names`` that one forward of ``model`` on ``x`` calls, in call
    order, a name once per call."""
    calls: list[str] = []
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda *_, n=n: calls.append(n)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.fixture(scope="session")
def call_order() -> Callable[[nn.Module, list[str], torch.Tensor], list[str]]:
    """``call_order(model, names, x)``: the modules among ``names`` that one forward of
    ``model`` on ``x`` calls, in call order, a name once per call."""
    return _call_order


def _check_fold_keeps_float(original: nn.Module, batches: list[torch.Tensor], images: torch.Tensor) -> None:
    """On ``original`` with outlier channels: RepQ-ViT's fold of every pair equalizes the
    paired Linears' input ranges and keeps the float logits (1e-4)."""
    from lit_ptq.quant.transforms import reparameterize_

    wide = outlier_channels_(copy.deepcopy(original))
    model = quantize_(copy.deepcopy(wide), QuantConfig(placement="matmul"))
    pairs = family_of(model).norm_linear_pairs(model)
    linears = [linear for _, linear in pairs]  # their inputs: the LayerNorm outputs the fold equalizes
    before = _channel_ranges(wide, linears, batches)
    assert all(r.max() / r.min() > 10 for r in before.values())  # the outlier channels
    reparameterize_(model, batches, pairs, model.quant_config.act)
    after = _channel_ranges(model, linears, batches)
    assert all(r.max() / r.min() < 1.001 for r in after.values())  # one scale fits every channel now
    with torch.no_grad():
        ref = original(images)
        assert torch.allclose(wide(images), ref, atol=1e-4, rtol=0)
        assert torch.allclose(model(images), ref, atol=1e-4, rtol=0)


@pytest.fixture(scope="session")
def check_fold_keeps_float() -> Callable[[nn.Module, list[torch.Tensor], torch.Tensor], None]:
    """``check_fold_keeps_float(float_model, batches, images)`` (see :func:`_check_fold_keeps_float`)."""
    return _check_fold_keeps_float


def _recipe_errors(original: nn.Module, recipe: str, batches: list[torch.Tensor], images: torch.Tensor) -> tuple[float, float]:
    """On ``original`` with outlier channels at 8/8/8 ``matmul``: the relative logit error of
    ``recipe`` and of the placement without a recipe (after checking the recipe calibrated
    every point and left it quantizing, with finite logits)."""
    from lit_ptq.quant import QuantMode, quantizers

    wide = outlier_channels_(copy.deepcopy(original))
    plain = quantize_(copy.deepcopy(wide), QuantConfig(method="mse", placement="matmul"))
    calibrate(plain, batches)
    model = quantize_(copy.deepcopy(wide), QuantConfig(method="mse", placement="matmul", recipe=recipe))
    assert calibrate(model, batches) == len(batches)
    assert all(q.ready and q.mode is QuantMode.QUANTIZE for _, q in quantizers(model))
    with torch.no_grad():
        out, ref = model(images), wide(images)
        plain_out = plain(images)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    relative = lambda a: ((a - ref).norm() / ref.norm()).item()  # noqa: E731
    return relative(out), relative(plain_out)


@pytest.fixture(scope="session")
def recipe_errors() -> Callable[[nn.Module, str, list[torch.Tensor], torch.Tensor], tuple[float, float]]:
    """``recipe_errors(float_model, recipe, batches, images)`` (see :func:`_recipe_errors`)."""
    return _recipe_errors


@pytest.fixture(scope="session")
def tiny_float() -> nn.Module:
    """An ``itpn_tiny(num_classes=10)`` with trained-like, seeded weights, in eval mode.

    The default initialization (std 0.02) leaves every attention row nearly uniform, which no
    trained model does; here each matrix is ``noise / sqrt(fan_in)`` so activations are of
    unit scale and attention is peaked, LayerNorm weights ``1 + 0.1 noise`` and biases
    ``0.1 noise``. Tests get copies (see ``make_tiny``); this one is never modified.
    """
    return trained_like_(create_model("itpn_tiny", num_classes=10).eval())


@pytest.fixture
def make_tiny(tiny_float: nn.Module) -> Callable[[], nn.Module]:
    """Builds a fresh copy of the seeded float ``itpn_tiny``, in eval mode."""
    return lambda: copy.deepcopy(tiny_float)


@pytest.fixture
def tiny_model(make_tiny: Callable[[], nn.Module]) -> nn.Module:
    """A fresh float ``itpn_tiny`` with the seeded weights, in eval mode."""
    return make_tiny()


@pytest.fixture(scope="session")
def calib_batches() -> list[torch.Tensor]:
    """Two seeded calibration batches of four 32x32 images."""
    return [seeded(4, 3, 32, 32, seed=1), seeded(4, 3, 32, 32, seed=2)]


@pytest.fixture(scope="session")
def eval_images() -> torch.Tensor:
    """Four seeded evaluation images, distinct from the calibration batches."""
    return seeded(4, 3, 32, 32, seed=3)


@pytest.fixture
def make_quantized(
    make_tiny: Callable[[], nn.Module], calib_batches: list[torch.Tensor]
) -> Callable[..., nn.Module]:
    """``make_quantized(**config_fields)``: a fresh ``itpn_tiny``, ``quantize_``-d and calibrated."""

    def make(calibrated: bool = True, **fields: object) -> nn.Module:
        model = quantize_(make_tiny(), QuantConfig(**fields))
        if calibrated:
            calibrate(model, calib_batches)
        return model

    return make
