"""Fake quantization of float vision transformers (no Lightning, no model names).

Config, arithmetic, observers, quant points, generic quantized layers, the model-walk
helpers (``walk``), the in-place ``quantize_`` entry point, calibration as registered steps
(``steps``, ``calibration``; the low-bit ``recipes`` and the ``transforms`` that register
their steps), state files and reports. Model families are plugins
(``lit_ptq.quant.plugins``); the plugins and the transforms are loaded when this package is
imported (the core modules never import them).
"""

from ..errors import CalibrationError
from .calibration import CalibrationContext, calibrate, run_calibration
from .compiled import compile_quantized, freeze_weights
from .config import Arithmetic, Granularity, PointOverride, QuantConfig, QuantSpec, ReconSettings, parse_bits
from .observers import GELU_QUANTIZERS, METHODS, OBSERVERS, SOFTMAX_QUANTIZERS, Observer, build_observer, register_observer
from .quantize import quantize_
from .quantizer import (
    CODE_QUANTIZERS,
    LogQuantizer,
    LogSoftmaxQuantizer,
    NonUniformQuantizer,
    NotCalibratedError,
    QuantMode,
    QuantPoint,
    TensorQuantizer,
    WeightQuantizer,
    register_code_quantizer,
)
from .registry import FAMILIES, PLACEMENTS, Family, PointFactory, Site, family_of, register_family
from .report import QuantizerStats, quant_report
from .state import broadcast_quant_state, load_quant_state, quant_state, save_quant_state, state_meta, weights_fingerprint
from .steps import RECIPES, STEPS, Step, register_recipe, register_step
from .walk import as_input, float_points, is_quantized, owner_weight, quant_points, quantizers, set_quant_mode
from .adalog import AdaLogObserver, AdaLogQuantizer
from .twin_uniform import TwinUniformObserver, TwinUniformQuantizer
from . import layers  # noqa: F401  (registers the generic quantized layers)
from . import recipes  # noqa: F401  (registers the low-bit recipes)
from . import transforms  # noqa: F401  (registers the transforms' calibration steps)
from .plugins import load_plugins

load_plugins()

__all__ = [
    "AdaLogObserver",
    "AdaLogQuantizer",
    "Arithmetic",
    "CODE_QUANTIZERS",
    "CalibrationContext",
    "CalibrationError",
    "FAMILIES",
    "GELU_QUANTIZERS",
    "Family",
    "Granularity",
    "LogQuantizer",
    "LogSoftmaxQuantizer",
    "METHODS",
    "NonUniformQuantizer",
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
    "STEPS",
    "Site",
    "Step",
    "TensorQuantizer",
    "TwinUniformObserver",
    "TwinUniformQuantizer",
    "WeightQuantizer",
    "as_input",
    "broadcast_quant_state",
    "build_observer",
    "calibrate",
    "compile_quantized",
    "family_of",
    "float_points",
    "freeze_weights",
    "is_quantized",
    "load_quant_state",
    "owner_weight",
    "parse_bits",
    "quant_points",
    "quant_report",
    "quant_state",
    "quantize_",
    "quantizers",
    "register_code_quantizer",
    "register_family",
    "register_observer",
    "register_recipe",
    "register_step",
    "run_calibration",
    "save_quant_state",
    "set_quant_mode",
    "state_meta",
    "weights_fingerprint",
]
