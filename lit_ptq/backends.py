"""The two backend interfaces of lit_ptq and their registries: what writes a calibrated model to a
deployment file (:class:`ExportBackend`) and what computes the logits of a run (:class:`InferenceBackend`).

A backend is one class registered by name with :func:`register_export_backend` or
:func:`register_inference_backend`. This module imports no backend: the PyTorch fake
quantization is defined here (:class:`PyTorchBackend`), and ``lit_ptq.export`` registers the
ONNX QDQ export and the onnxruntime inference when it is imported (the run service,
:mod:`lit_ptq.run`, imports it, as ``lit_ptq.quant`` imports its plugins). The pattern is
modelopt's registered modes and torchao's handler registry: adding a backend never edits a
central list (see docs/architecture.md, "How to add a backend").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Optional, TypeVar

import torch
import torch.nn as nn

from .errors import ConfigError

__all__ = [
    "EXPORT_BACKENDS",
    "INFERENCE_BACKENDS",
    "ExportBackend",
    "InferenceBackend",
    "PyTorchBackend",
    "export_backend",
    "inference_backend",
    "register_export_backend",
    "register_inference_backend",
]


class ExportBackend(ABC):
    """Writes a calibrated (or float) PyTorch model to a deployment file.

    Subclasses set :attr:`suffix` and implement :meth:`export`; :meth:`check` refuses, before
    calibration, a model the format cannot hold. Construction takes the export options of the
    run (``main.py export --log_points ...``) as keywords; a backend ignores the ones it does
    not use.

    Attributes:
        name: the registered name (``main.py export --format NAME``), set by the registry.
        suffix: the ending the output file must have (``.onnx``).
        options: the export options it was made with.
    """

    name: ClassVar[str] = ""
    suffix: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        self.options = dict(options)

    def check(self, model: nn.Module, quantized: bool) -> None:
        """Raise a one-line :class:`~lit_ptq.errors.UserError` when ``model`` cannot be exported
        (called before calibration; the default accepts every model).

        Args:
            model: the PyTorch model (quantizers placed, not yet calibrated when ``quantized``).
            quantized: whether it carries quantizers.
        """

    @abstractmethod
    def export(self, model: nn.Module, path: str, example_input: torch.Tensor, metadata: dict[str, Any]) -> dict[str, Any]:
        """Write ``model`` to ``path`` and return the metadata the file records.

        Args:
            model: the calibrated model, on the CPU, in eval mode.
            path: the file to write (a temporary path the caller renames when complete).
            example_input: a batch of zero images of the model's input size.
            metadata: what the run records (``summary``, ``calib_images``, ``load_state``).

        Returns:
            ``metadata`` with the backend's own fields (format, version, ...).
        """

    @abstractmethod
    def describe(self, metadata: dict[str, Any]) -> str:
        """What the file is, in a few words (``QDQ ONNX``), for the line export prints."""


class InferenceBackend(ABC):
    """Computes the logits of a batch of images for :class:`~lit_ptq.module.PTQModule`.

    Subclasses implement :meth:`logits`; a backend read from a file checks in :meth:`check`
    that the file fits the run's model and reports the file in :meth:`summary`.

    Attributes:
        name: the registered name (``pytorch``, ``onnxruntime``), set by the registry; the
            results record's ``backend``.
    """

    name: ClassVar[str] = ""

    @property
    def model(self) -> Optional[nn.Module]:
        """The PyTorch model the backend runs, None when it runs something else (a file)."""
        return None

    def check(self, model_name: str, img_size: Optional[int], num_classes: int) -> None:
        """Raise a one-line :class:`~lit_ptq.errors.ConfigError` unless the backend computes
        ``num_classes`` logits of ``model_name``'s images at ``img_size`` (the default accepts)."""

    @abstractmethod
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The logits of ``images``, a tensor on the images' device."""

    def summary(self, config_summary: dict[str, Any]) -> dict[str, Any]:
        """The run's summary for the results record, given the one the config describes.

        A backend read from a file may report the run its file records instead, and name the
        file; the default keeps ``config_summary``.
        """
        return config_summary


B = TypeVar("B", bound=type)

_EXPORT: dict[str, type[ExportBackend]] = {}
_INFERENCE: dict[str, type[InferenceBackend]] = {}

EXPORT_BACKENDS: Mapping[str, type[ExportBackend]] = MappingProxyType(_EXPORT)
"""Registered export backends by name (read-only; add one with :func:`register_export_backend`)."""

INFERENCE_BACKENDS: Mapping[str, type[InferenceBackend]] = MappingProxyType(_INFERENCE)
"""Registered inference backends by name (read-only; add one with :func:`register_inference_backend`)."""


def _register(registry: dict[str, Any], base: type, kind: str, name: str) -> Callable[[B], B]:
    def decorator(cls: B) -> B:
        if not issubclass(cls, base):
            raise TypeError(f"{cls.__name__} is not an {base.__name__}")
        if name in registry and registry[name] is not cls:
            raise ValueError(f"an {kind} backend named {name!r} is already registered ({registry[name].__name__})")
        cls.name = name
        registry[name] = cls
        return cls

    return decorator


def register_export_backend(name: str) -> Callable[[B], B]:
    """Class decorator: register an :class:`ExportBackend` subclass as ``main.py export --format name``."""
    return _register(_EXPORT, ExportBackend, "export", name)


def register_inference_backend(name: str) -> Callable[[B], B]:
    """Class decorator: register an :class:`InferenceBackend` subclass under ``name``."""
    return _register(_INFERENCE, InferenceBackend, "inference", name)


def export_backend(name: str, option: str = "--format") -> type[ExportBackend]:
    """The export backend registered as ``name``.

    Raises:
        ConfigError: none is (naming the registered ones).
    """
    if name not in _EXPORT:
        raise ConfigError(f"{option}={name} is not an export backend; registered: {', '.join(sorted(_EXPORT)) or 'none'}")
    return _EXPORT[name]


def inference_backend(name: str, option: str = "backend") -> type[InferenceBackend]:
    """The inference backend registered as ``name``.

    Raises:
        ConfigError: none is (``lit_ptq.export`` registers ``onnxruntime`` when imported).
    """
    if name not in _INFERENCE:
        raise ConfigError(
            f"{option} needs the {name} inference backend, which is not registered (registered: "
            f"{', '.join(sorted(_INFERENCE))}); import the module that registers it (lit_ptq.export for onnxruntime)"
        )
    return _INFERENCE[name]


@register_inference_backend("pytorch")
class PyTorchBackend(InferenceBackend):
    """The PyTorch model itself, float or fake-quantized (:func:`lit_ptq.quant.quantize_`).

    Args:
        model: the model; the caller owns it (a LightningModule registers it as a submodule).
        compiler: turns the model into the callable that computes the logits (for instance
            :func:`lit_ptq.quant.compile_quantized`, through ``torch.compile``), at the first
            batch after :meth:`reset`, that is after calibration; None runs the model eagerly.
    """

    def __init__(self, model: nn.Module, compiler: Optional[Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]]] = None) -> None:
        self._model = model
        self._compiler = compiler
        self._compiled: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @property
    def model(self) -> nn.Module:
        """The PyTorch model."""
        return self._model

    @property
    def compiled(self) -> bool:
        """Whether the logits come through the compiler."""
        return self._compiler is not None

    def reset(self) -> None:
        """Forget the compiled callable: the next batch compiles the model as it is then
        (after a calibration changed its quant points or weights)."""
        self._compiled = None

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The model's output on ``images`` (through the compiled callable when there is a compiler)."""
        if self._compiler is None:
            return self._model(images)
        if self._compiled is None:
            self._compiled = self._compiler(self._model)
        return self._compiled(images)
