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
from lit_ptq.quant import QuantConfig, calibrate, quantize_


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
