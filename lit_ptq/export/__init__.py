"""Export of calibrated lit_ptq models to deployment formats (ONNX in QDQ form)."""

from .onnx import OnnxExportError, export_onnx, ort_session_options, qdq_export_mode

__all__ = ["export_onnx", "qdq_export_mode", "ort_session_options", "OnnxExportError"]
