"""Export of calibrated lit_ptq models to deployment formats (ONNX in QDQ form), and their evaluation."""

from .onnx import OnnxExportError, export_onnx, ort_session_options, qdq_export_mode
from .runtime import METADATA_KEY, OnnxFileInfo, check_exportable, create_session, embed_metadata, read_onnx_file

__all__ = [
    "export_onnx",
    "qdq_export_mode",
    "ort_session_options",
    "OnnxExportError",
    "METADATA_KEY",
    "OnnxFileInfo",
    "read_onnx_file",
    "embed_metadata",
    "check_exportable",
    "create_session",
]
