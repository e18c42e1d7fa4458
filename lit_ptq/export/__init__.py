"""Export of calibrated lit_ptq models to deployment formats (ONNX in QDQ form)."""

from .onnx import OnnxExportError, export_onnx, qdq_export_mode

__all__ = ["export_onnx", "qdq_export_mode", "OnnxExportError"]
