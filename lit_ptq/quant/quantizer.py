"""Quantizer modules: scale and zero point in buffers, three modes switched by one helper.

Every quant point of a model is a :class:`QuantPoint`: a uniform :class:`TensorQuantizer`
(per tensor or per channel), a :class:`WeightQuantizer`, a :class:`NonUniformQuantizer` (the
logarithmic :class:`LogQuantizer` of RepQ-ViT here; AdaLog's and PTQ4ViT's twin-uniform codes
in ``adalog.py`` and ``twin_uniform.py``, found through :data:`CODE_QUANTIZERS`), or FQ-ViT's
:class:`LogSoftmaxQuantizer`. A quant point passes its input through (``FLOAT``), records
it (``CALIBRATE``), or fake-quantizes it (``QUANTIZE``). Qparams are registered buffers,
so ``state_dict``, ``.to(device)`` and DDP broadcasts carry them.
"""

from __future__ import annotations

import enum
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..errors import CalibrationError
from .config import Arithmetic, Granularity, QuantSpec
from .observers import build_observer
from .primitives import (
    fake_quant_fused,
    fake_quant_log,
    fake_quant_per_channel_divide,
    fake_quant_seed,
    fake_quant_seed_,
    log_int_softmax,
)

__all__ = [
    "QuantMode",
    "QuantPoint",
    "TensorQuantizer",
    "WeightQuantizer",
    "NonUniformQuantizer",
    "CODE_QUANTIZERS",
    "register_code_quantizer",
    "LogQuantizer",
    "LogSoftmaxQuantizer",
    "NotCalibratedError",
]


class QuantMode(str, enum.Enum):
    """What every quantizer of a model does in ``forward``."""

    FLOAT = "float"
    CALIBRATE = "calibrate"
    QUANTIZE = "quantize"


class NotCalibratedError(RuntimeError):
    """A quantizer was asked to quantize before it was calibrated or loaded."""


class QuantPoint(nn.Module):
    """Base class of every quant point: a mode, a report role, and its name in the model.

    Subclasses implement ``forward``; code that walks a model finds its quant points with
    ``isinstance(m, QuantPoint)`` and never lists quantizer classes.

    Attributes:
        mode: what ``forward`` does (see :class:`QuantMode`).
        role: a short label for reports (``act``, ``attn``, ``norm``, ``weight``).
        qualname: the point's module path in the model (set by ``quantize_``).
        bits: the bit width of its integer grid.
    """

    bits: int

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role
        self.mode = QuantMode.FLOAT
        self.qualname = ""

    def set_mode(self, mode: QuantMode) -> None:
        """Switch between pass-through, calibration and fake quantization."""
        self.mode = QuantMode(mode)

    def error_terms(self, args: tuple, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a report: from the arguments and output of a ``FLOAT``-mode call, the float
        tensor, its fake-quantized copy and a mask of the values the grid saturates."""
        raise NotImplementedError

    def range_summary(self) -> tuple[float, float, float]:
        """For a report: the calibrated ``(min, max, scale)`` (min and max over channels, mean scale)."""
        return 0.0, 1.0, float("nan")

    def grid_range(self) -> Optional[tuple[float, float]]:
        """For a report: the smallest and largest value the calibrated grid represents (the
        widest over channels), or ``None`` when the point has no fixed range."""
        return None


class TensorQuantizer(QuantPoint):
    """Fake-quantizes an activation with a calibrated scale and zero point.

    Args:
        spec: bits, signedness, granularity and observer.
        role: a short label for reports (``act``, ``attn``, ``norm``, ``weight``, ...).
        channels: number of channels for per-channel quantization (along ``channel_axis``).
        channel_axis: the channel dimension of the tensors it sees.
        arithmetic: ``seed`` (divide, round ``x / s + zp``) or ``fused`` (torch's kernel).
        inplace: in ``QUANTIZE`` mode with ``seed`` arithmetic, overwrite the input with its
            fake-quantized values instead of allocating a new tensor (as ``nn.ReLU(inplace=True)``;
            the numbers are the same). Only for inputs nothing else reads: the quantized
            modules set it on the quant points at the outputs they compute themselves.
    """

    def __init__(
        self,
        spec: QuantSpec,
        role: str,
        channels: int = 1,
        channel_axis: int = -1,
        arithmetic: Arithmetic = Arithmetic.SEED,
        inplace: bool = False,
    ) -> None:
        super().__init__(role)
        self.spec, self.channel_axis = spec, channel_axis
        self.arithmetic = Arithmetic(arithmetic)
        self.inplace = inplace
        per_channel = spec.granularity is Granularity.PER_CHANNEL
        size = channels if per_channel else 1
        self.register_buffer("scale", torch.ones(size))
        self.register_buffer("zero_point", torch.zeros(size))
        self.register_buffer("min_val", torch.zeros(size))
        self.register_buffer("max_val", torch.zeros(size))
        self.register_buffer("calibrated", torch.tensor(False))
        self.observer = build_observer(spec.observer, spec.qmin, spec.qmax, spec.signed, per_channel, channel_axis)
        self.last_batch = False
        self.ready = False  # mirrors the `calibrated` buffer without a device sync in forward
        self.sequential = False  # fake-quantize in CALIBRATE mode once calibrated (set by recipes)

    @property
    def bits(self) -> int:  # type: ignore[override]
        """The bit width of the spec."""
        return self.spec.bits

    def extra_repr(self) -> str:
        s = self.spec
        return f"role={self.role}, bits={s.bits}, signed={s.signed}, {s.granularity.value}, observer={s.observer}"

    def set_mode(self, mode: QuantMode) -> None:
        """Switch between pass-through, calibration (observer reset) and fake quantization."""
        super().set_mode(mode)
        if self.mode is QuantMode.CALIBRATE:
            self.observer.reset()
            self.last_batch = False
            self.calibrated.fill_(False)
            self.ready = False

    def finish_calibration(self) -> None:
        """Turn the observer's statistics into buffers.

        Raises:
            CalibrationError: the observed range is NaN or infinite (names the quantizer).
            RuntimeError: the quantizer saw no data.
        """
        if self.observer.min_val is None:
            raise RuntimeError(f"quantizer {self.qualname or self.role} saw no data during calibration")
        scale, zp, lo, hi = self.observer.compute()
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise CalibrationError(
                f"quantizer {self.qualname or self.role} saw NaN or Inf values during calibration; "
                "check the input images and the checkpoint"
            )
        for name, value in (("scale", scale), ("zero_point", zp), ("min_val", lo), ("max_val", hi)):
            getattr(self, name).copy_(value.reshape(-1).expand_as(getattr(self, name)))
        self.calibrated.fill_(True)
        self.ready = True

    def broadcast_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` shaped to broadcast against ``x`` (per channel along ``channel_axis``)."""
        if self.scale.numel() == 1:
            return self.scale, self.zero_point
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return self.scale.view(shape), self.zero_point.view(shape)

    def clip_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Where ``x`` lies more than half a step outside the grid (saturated, not merely rounded)."""
        scale, zp = self.broadcast_qparams(x)
        lo = (self.spec.qmin - 0.5 - zp) * scale
        hi = (self.spec.qmax + 0.5 - zp) * scale
        return (x < lo) | (x > hi)

    def error_terms(self, args: tuple, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The input, its fake-quantized copy and its clip mask."""
        x = args[0].detach().float()
        return x, self.fake_quant(x), self.clip_mask(x)

    def range_summary(self) -> tuple[float, float, float]:
        """``(min over channels, max over channels, mean scale)`` of the calibrated buffers."""
        return float(self.min_val.min()), float(self.max_val.max()), float(self.scale.mean())

    def grid_range(self) -> Optional[tuple[float, float]]:
        """``((qmin - zp) * scale, (qmax - zp) * scale)``, the lowest and highest level (the
        widest over channels when per channel)."""
        lo = (self.spec.qmin - self.zero_point) * self.scale
        hi = (self.spec.qmax - self.zero_point) * self.scale
        return float(lo.min()), float(hi.max())

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` with the calibrated buffers (``x`` is left unchanged)."""
        s = self.spec
        if self.arithmetic is Arithmetic.FUSED:
            return fake_quant_fused(x, self.scale, self.zero_point, s.qmin, s.qmax, self.channel_axis)
        scale, zero_point = self.broadcast_qparams(x)
        return fake_quant_seed(x, scale, zero_point, s.qmin, s.qmax)

    def _check_calibrated(self) -> None:
        if not self.ready:
            raise NotCalibratedError(
                f"quantizer {self.qualname or self.role} is not calibrated: run lit_ptq.quant.calibrate(model, batches) "
                "or load a calibrated state before quantized evaluation"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is QuantMode.FLOAT:
            return x
        if self.mode is QuantMode.CALIBRATE:
            self.observer.update(x, last=self.last_batch)
            if self.last_batch:  # as FQ-ViT: the qparams exist as soon as the last batch has passed
                self.finish_calibration()
                if self.sequential:  # the points after this one calibrate on its quantized output
                    return self.fake_quant(x)
            return x
        self._check_calibrated()
        if self.inplace and self.arithmetic is Arithmetic.SEED:
            scale, zero_point = self.broadcast_qparams(x)
            return fake_quant_seed_(x, scale, zero_point, self.spec.qmin, self.spec.qmax)
        return self.fake_quant(x)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.ready = bool(self.calibrated)


class WeightQuantizer(TensorQuantizer):
    """Per-output-channel symmetric weight quantizer; divides by the scale as the seed does.

    Calibration reads the weight itself (MinMax), after the activation pass. The
    fake-quantized weight is cached and recomputed only when the weight or the scale change.
    """

    def __init__(self, spec: QuantSpec, out_channels: int) -> None:
        super().__init__(spec, "weight", channels=out_channels, channel_axis=0)
        self._cache: Optional[torch.Tensor] = None
        self._cache_key: Optional[tuple] = None
        self._frozen: Optional[torch.Tensor] = None

    def freeze(self, weight: Optional[torch.Tensor]) -> None:
        """Keep the fake-quantized ``weight`` for forwards traced by ``torch.compile`` (None: forget it).

        A traced forward cannot check the cache's key (storage and version counter), so it
        reads this copy instead, made once, eagerly, with the same arithmetic; the compiled
        graph then holds no weight quantization at all. Freeze again after changing the weight
        or the qparams (:func:`lit_ptq.quant.compile_quantized` does, each time it compiles).
        """
        if weight is None:
            self._frozen = None
            return
        self._check_calibrated()
        with torch.no_grad():
            self._frozen = self._fake_quant_weight(weight.detach())

    def calibrate_weight(self, weight: torch.Tensor) -> None:
        """Compute the qparams from ``weight`` (replaces anything observed)."""
        self.observer.reset()
        self.observer.update(weight.detach(), last=True)
        self.finish_calibration()

    def quantized_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The fake-quantized ``weight``, cached between calls.

        The cache is keyed on the storage and version counter of the weight and the scale.
        Tensors made under ``torch.inference_mode`` have no version counter, so a change to
        them could not be seen: for those the weight is fake-quantized on every call.
        """
        self._check_calibrated()
        if torch.compiler.is_compiling():
            return self._frozen if self._frozen is not None else self._fake_quant_weight(weight)
        if weight.is_inference() or self.scale.is_inference():
            self._cache = self._cache_key = None
            return self._fake_quant_weight(weight)
        key = (weight.data_ptr(), weight._version, self.scale.data_ptr(), self.scale._version, weight.dtype)
        if self._cache is None or self._cache_key != key:
            self._cache, self._cache_key = self._fake_quant_weight(weight), key
        return self._cache

    def _fake_quant_weight(self, weight: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.granularity is Granularity.PER_CHANNEL and s.signed:
            return fake_quant_per_channel_divide(weight.detach(), self.scale, s.qmin, s.qmax)
        scale, zero_point = self.broadcast_qparams(weight)
        return fake_quant_seed(weight.detach(), scale, zero_point, s.qmin, s.qmax)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.quantized_weight(weight) if self.mode is QuantMode.QUANTIZE else weight


CODE_QUANTIZERS: dict[str, type["NonUniformQuantizer"]] = {}
"""Observer name -> the :class:`NonUniformQuantizer` subclass that holds its code (``log2``,
``log_sqrt2``: :class:`LogQuantizer`; ``adalog``, ``twin_uniform``: their files)."""


def register_code_quantizer(*observers: str) -> Callable[[type["NonUniformQuantizer"]], type["NonUniformQuantizer"]]:
    """Class decorator: ``cls`` holds the codes of the observers named ``observers``."""

    def wrap(cls: type["NonUniformQuantizer"]) -> type["NonUniformQuantizer"]:
        for name in observers:
            CODE_QUANTIZERS[name] = cls
        return cls

    return wrap


class NonUniformQuantizer(TensorQuantizer):
    """A per-tensor point whose grid is not one uniform scale and zero point (a logarithmic or
    twin-uniform code): ONNX's QuantizeLinear/DequantizeLinear cannot express it.

    Built from a spec whose observer is registered for the class (:data:`CODE_QUANTIZERS`).
    Besides the uniform buffers, the observer's :meth:`code_params` (a mapping of names to
    one-element tensors) are copied into buffers of the same names (``code_buffers``) when
    calibration ends, so state files carry them.

    Attributes:
        kind: what the code is, in words, for error messages (``logarithmic quantizer``).
        code_buffers: the names of the extra buffers.
    """

    kind = "non-uniform quantizer"
    code_buffers: tuple[str, ...] = ()

    def __init__(self, spec: QuantSpec, role: str) -> None:
        if CODE_QUANTIZERS.get(spec.observer) is not type(self):
            mine = sorted(n for n, c in CODE_QUANTIZERS.items() if c is type(self))
            raise ValueError(f"a {type(self).__name__} needs the observer {' or '.join(mine)}, not {spec.observer!r}")
        super().__init__(spec, role)
        for name in self.code_buffers:
            self.register_buffer(name, torch.zeros(1))

    def finish_calibration(self) -> None:
        """The uniform buffers, then the observer's code parameters."""
        super().finish_calibration()
        for name, value in self.observer.code_params().items():
            getattr(self, name).copy_(value.reshape(-1))


@register_code_quantizer("log2", "log_sqrt2")
class LogQuantizer(NonUniformQuantizer):
    """A log2 or log-sqrt2 code of a non-negative tensor, the softmax output of RepQ-ViT
    (Li et al., "RepQ-ViT: Scale Reparameterization for Post-Training Quantization of Vision
    Transformers", ICCV 2023; zkkli/RepQ-ViT, ``quant/quantizer.py``).

    ``scale`` holds ``delta``, the value of code 0 (see
    :func:`lit_ptq.quant.primitives.fake_quant_log`); the observer is ``log2`` or ``log_sqrt2``.
    """

    kind = "logarithmic quantizer"

    def __init__(self, spec: QuantSpec, role: str = "attn") -> None:
        super().__init__(spec, role)
        self.steps_per_octave = self.observer.steps_per_octave

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """The log-coded copy of ``x``."""
        return fake_quant_log(x, self.scale, self.spec.bits, self.steps_per_octave)

    def grid_range(self) -> Optional[tuple[float, float]]:
        """``(0, delta)``: the largest level is ``delta`` (code 0), the others lie below it down to 0."""
        return 0.0, float(self.scale.max())

    def clip_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Where a positive ``x`` underflows to 0 or lies above ``delta`` (both saturate)."""
        return ((self.fake_quant(x) == 0) & (x > 0)) | (x > self.scale)


class LogSoftmaxQuantizer(QuantPoint):
    """FQ-ViT's log-int-softmax (LIS): softmax of quantized logits as a ``bits``-bit log2 code.

    It is called with the logits quantizer that feeds it and uses that quantizer's scale (see
    :func:`lit_ptq.quant.primitives.log_int_softmax`); it has no state of its own. As in
    FQ-ViT, it is already applied during calibration once the logits quantizer has its
    scale, that is on the last calibration batch, so the points after it see its output there.
    """

    def __init__(self, bits: int) -> None:
        super().__init__("attn")
        self.bits = bits

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

    def error_terms(self, args: tuple, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The float softmax, its log2-coded copy, and where the code underflows to 0."""
        fq = log_int_softmax(args[0], args[1].scale, self.bits)
        return out.float(), fq, fq == 0

    def forward(self, logits: torch.Tensor, source: TensorQuantizer) -> torch.Tensor:
        if self.mode is QuantMode.QUANTIZE or (self.mode is QuantMode.CALIBRATE and source.ready):
            return log_int_softmax(logits, source.scale, self.bits)
        return logits.softmax(dim=-1)
