"""Fixtures for the model tests: weights filled deterministically by key name, a seeded input."""

from __future__ import annotations

import zlib
from typing import Callable

import pytest
import torch
import torch.nn as nn

from lit_ptq.models import create_model


def _fill_by_key(model: nn.Module) -> nn.Module:
    """Overwrite every floating-point parameter and buffer with values seeded by its key.

    Each tensor is drawn from a ``torch.Generator`` seeded with ``zlib.crc32(key)``, so two
    models with the same keys and shapes (ours and the official one) get identical weights
    whatever their construction order. LayerNorm weights are ``1 + 0.1 * noise``, biases
    ``0.1 * noise``, and matrices ``noise / sqrt(last dim)`` to keep activations near unit scale.
    Integer buffers (``relative_position_index``) keep the values the model built itself.

    Returns:
        ``model``, in place.
    """
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))
            if tensor.ndim == 1:
                value = 1.0 + 0.1 * noise if key.endswith("weight") else 0.1 * noise
            else:
                value = noise * tensor.shape[-1] ** -0.5
            tensor.copy_(value)
    return model


def _fixed_input(*shape: int) -> torch.Tensor:
    """A standard-normal input drawn from a generator seeded with 0."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def fill_by_key() -> Callable[[nn.Module], nn.Module]:
    """The function that fills a model's weights from its key names (see ``_fill_by_key``)."""
    return _fill_by_key


@pytest.fixture(scope="session")
def fixed_input() -> Callable[..., torch.Tensor]:
    """The function that draws the seeded test input of a given shape."""
    return _fixed_input


@pytest.fixture
def tiny_model() -> nn.Module:
    """``itpn_tiny`` with 10 classes and key-seeded weights, in eval mode."""
    return _fill_by_key(create_model("itpn_tiny", num_classes=10))
