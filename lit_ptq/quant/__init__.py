"""Fake quantization of float iTPN models (no Lightning): config, observers, quantizers,
quantized modules, the in-place ``quantize_`` entry point, calibration and reports."""

from .config import METHODS, PLACEMENTS, Arithmetic, Granularity, QuantConfig, QuantSpec, parse_bits
from .observers import OBSERVERS, Observer, build_observer, register_observer
from .quantize import CalibrationError, calibrate, is_quantized, quantize_, quantizers, set_quant_mode
from .quantizer import LogSoftmaxQuantizer, NotCalibratedError, QuantMode, TensorQuantizer, WeightQuantizer
from .report import QuantizerStats, quant_report

__all__ = [
    "Arithmetic",
    "CalibrationError",
    "Granularity",
    "LogSoftmaxQuantizer",
    "METHODS",
    "NotCalibratedError",
    "OBSERVERS",
    "Observer",
    "PLACEMENTS",
    "QuantConfig",
    "QuantMode",
    "QuantSpec",
    "QuantizerStats",
    "TensorQuantizer",
    "WeightQuantizer",
    "build_observer",
    "calibrate",
    "is_quantized",
    "parse_bits",
    "quant_report",
    "quantize_",
    "quantizers",
    "register_observer",
    "set_quant_mode",
]
