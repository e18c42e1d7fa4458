"""Fake quantization of float vision transformers (no Lightning, no model names).

Config, arithmetic, observers, quant points, generic quantized layers, the in-place
``quantize_`` entry point, calibration (and the low-bit recipes, ``recipes`` and
``transforms``), state files and reports. Model families are
plugins (``lit_ptq.quant.plugins``), loaded when this package is imported.
"""

from .config import (
    METHODS,
    PLACEMENTS,
    RECIPES,
    SOFTMAX_QUANTIZERS,
    Arithmetic,
    Granularity,
    PointOverride,
    QuantConfig,
    QuantSpec,
    ReconSettings,
    parse_bits,
)
from .observers import OBSERVERS, Observer, build_observer, register_observer
from .quantize import CalibrationError, calibrate, float_points, is_quantized, quant_points, quantize_, quantizers, set_quant_mode
from .quantizer import LogQuantizer, LogSoftmaxQuantizer, NotCalibratedError, QuantMode, QuantPoint, TensorQuantizer, WeightQuantizer
from .registry import FAMILIES, Family, PointFactory, Site, family_of, register_family
from .report import QuantizerStats, quant_report
from .state import broadcast_quant_state, load_quant_state, quant_state, save_quant_state, state_meta, weights_fingerprint
from . import layers  # noqa: F401  (registers the generic quantized layers)
from .plugins import load_plugins

load_plugins()

__all__ = [
    "Arithmetic",
    "CalibrationError",
    "FAMILIES",
    "Family",
    "Granularity",
    "LogQuantizer",
    "LogSoftmaxQuantizer",
    "METHODS",
    "NotCalibratedError",
    "OBSERVERS",
    "Observer",
    "PLACEMENTS",
    "PointFactory",
    "PointOverride",
    "QuantConfig",
    "QuantMode",
    "QuantPoint",
    "QuantSpec",
    "QuantizerStats",
    "RECIPES",
    "ReconSettings",
    "SOFTMAX_QUANTIZERS",
    "Site",
    "TensorQuantizer",
    "WeightQuantizer",
    "broadcast_quant_state",
    "build_observer",
    "calibrate",
    "family_of",
    "is_quantized",
    "load_quant_state",
    "parse_bits",
    "quant_points",
    "quant_report",
    "quant_state",
    "quantize_",
    "quantizers",
    "register_family",
    "register_observer",
    "save_quant_state",
    "set_quant_mode",
    "float_points",
    "state_meta",
    "weights_fingerprint",
]
