"""Helpers shared by the family tests: which tensors a float model's modules see, which
arguments each quant point receives, and a seeded perturbation (as fixtures, since the test
files import nothing from each other)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn as nn

from lit_ptq.quant import QuantMode, QuantPoint, quant_points, set_quant_mode


def _capture_float(model: nn.Module, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name -> (first input, output)`` of every submodule of the float ``model`` on ``images``
    (a module called twice fails)."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str, args: tuple, out: object) -> None:
        assert name not in seen, f"{name} called twice"
        seen[name] = (args[0].detach().clone() if args else None, out.detach().clone())

    handles = [m.register_forward_hook(lambda _m, args, out, n=n: record(n, args, out)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return seen


def _observe_points(model: nn.Module, images: torch.Tensor) -> dict[str, tuple]:
    """``name -> arguments`` each quant point of ``model`` receives on one forward of ``images``
    in ``CALIBRATE`` mode (every point passes its input through; a point called twice fails)."""
    set_quant_mode(model, QuantMode.CALIBRATE)
    seen: dict[str, tuple] = {}

    def record(name: str, args: tuple) -> None:
        assert name not in seen, f"{name} called twice"
        seen[name] = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)

    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: record(n, args)) for n, m in quant_points(model)]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return seen


def _perturbed(x: torch.Tensor) -> torch.Tensor:
    """``x`` times seeded factors in [1, 1.5) (no constant shift, which a LayerNorm or a softmax would undo)."""
    return x * (1 + 0.5 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0)))


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Same shape and equal up to float rounding (``rtol=1e-5``, ``atol=1e-6``)."""
    return got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="session")
def capture_float() -> Callable[[nn.Module, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``capture_float(model, images)``: ``name -> (first input, output)`` of every submodule."""
    return _capture_float


@pytest.fixture(scope="session")
def observe_points() -> Callable[[nn.Module, torch.Tensor], dict[str, tuple]]:
    """``observe_points(model, images)``: ``name -> arguments`` of every quant point in ``CALIBRATE`` mode."""
    return _observe_points


@pytest.fixture(scope="session")
def perturbed() -> Callable[[torch.Tensor], torch.Tensor]:
    """``perturbed(x)``: ``x`` times seeded factors in [1, 1.5)."""
    return _perturbed


@pytest.fixture(scope="session")
def close() -> Callable[[torch.Tensor, torch.Tensor], bool]:
    """``close(got, expected)``: same shape and equal up to float rounding."""
    return _close


def points_of(model: nn.Module) -> dict[str, QuantPoint]:
    """Every quant point of ``model`` by name."""
    return dict(quant_points(model))


@pytest.fixture(scope="session")
def points() -> Callable[[nn.Module], dict[str, QuantPoint]]:
    """``points(model)``: every quant point of ``model`` by name."""
    return points_of
