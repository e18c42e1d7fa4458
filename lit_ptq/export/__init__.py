"""Export of calibrated lit_ptq models to deployment formats (ONNX in QDQ form), and their evaluation.

Importing the package registers its backends (:mod:`lit_ptq.backends`): the ``onnx`` export
backend (:class:`~lit_ptq.export.qdq.OnnxExport`) and the ``onnxruntime`` inference backend
(:class:`~lit_ptq.export.runtime.OnnxRuntimeBackend`).
"""

from .onnx import OnnxExportError, export_onnx, ort_session_options, qdq_export_mode
from .qdq import OnnxExport
from .runtime import (
    METADATA_KEY,
    OnnxFileInfo,
    OnnxRuntimeBackend,
    check_exportable,
    create_session,
    embed_metadata,
    read_onnx_file,
)

__all__ = [
    "export_onnx",
    "qdq_export_mode",
    "ort_session_options",
    "OnnxExportError",
    "OnnxExport",
    "OnnxRuntimeBackend",
    "METADATA_KEY",
    "OnnxFileInfo",
    "read_onnx_file",
    "embed_metadata",
    "check_exportable",
    "create_session",
]
