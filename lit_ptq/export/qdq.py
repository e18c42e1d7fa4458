"""The ``onnx`` export backend: a calibrated model as an ONNX file in QDQ form (a float model as
plain ONNX), with a ``lit_ptq`` metadata entry describing the run.

The graph is :func:`lit_ptq.export.onnx.export_onnx`'s (ONNX ``QuantizeLinear`` /
``DequantizeLinear``, https://onnx.ai/onnx/operators/onnx__QuantizeLinear.html; onnxruntime's
QDQ format, https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html); the
metadata is :mod:`lit_ptq.export.runtime`'s, read back by ``main.py validate --model.onnx``.
See docs/onnx.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..backends import ExportBackend, register_export_backend
from ..errors import ConfigError
from ..quant.walk import is_quantized
from .onnx import OPSET, export_onnx
from .runtime import check_exportable, embed_metadata

__all__ = ["OnnxExport"]

LOG_POINTS = ("raise", "float_ops")


@register_export_backend("onnx")
class OnnxExport(ExportBackend):
    """``main.py export --output FILE.onnx``: QDQ ONNX of a quantized model, float ONNX of a float one.

    Options:
        log_points: ``raise`` refuses non-uniform quantizers (log2, log-sqrt2, AdaLog, twin-uniform)
            and log-int-softmax; ``float_ops`` exports
            them as float operators (see :func:`lit_ptq.export.qdq_export_mode`).
    """

    suffix = ".onnx"

    def __init__(self, log_points: str = "raise", **options: Any) -> None:
        if log_points not in LOG_POINTS:
            raise ConfigError(f"--log_points={log_points} is not one of: {', '.join(LOG_POINTS)}")
        super().__init__(log_points=log_points, **options)
        self.log_points = log_points

    def check(self, model: nn.Module, quantized: bool) -> None:
        """Refuse, before calibration, a quant point QDQ cannot express (:func:`check_exportable`)."""
        if quantized:
            check_exportable(model, self.log_points)

    def export(self, model: nn.Module, path: str, example_input: torch.Tensor, metadata: dict[str, Any]) -> dict[str, Any]:
        """Write ``model`` with :func:`~lit_ptq.export.onnx.export_onnx` (the batch dimension is
        dynamic) and embed ``metadata`` plus ``log_points``, ``format`` (``qdq`` or ``float``),
        ``input_size`` and ``opset`` under :data:`~lit_ptq.export.runtime.METADATA_KEY`."""
        full = dict(
            metadata,
            log_points=self.log_points,
            format="qdq" if is_quantized(model) else "float",
            input_size=list(example_input.shape[1:]),
            opset=OPSET,
        )
        export_onnx(model, path, example_input, log_points=self.log_points)
        embed_metadata(path, full)
        return full

    def describe(self, metadata: dict[str, Any]) -> str:
        """``QDQ ONNX`` or ``float ONNX``."""
        return "float ONNX" if metadata["format"] == "float" else "QDQ ONNX"
