"""Typed quantization configuration.

``QuantConfig(method="minmax", placement="seed", bits="8/8/8")`` is all a run needs; every
other field has the default of the PTQ-for-iTPN seed (FQ-ViT's arithmetic): weights int8
symmetric per output channel with MinMax, activations uint8 asymmetric per tensor with the
chosen observer, the softmax output quantized like an activation (or log2 with LIS).
Per-layer settings are ordered ``overrides``: module-name patterns mapped to a partial
setting, or to ``None`` to leave the matching quant points float (see ``docs/quantization.md``).
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

from ..errors import ConfigError

__all__ = [
    "Granularity",
    "Arithmetic",
    "QuantSpec",
    "QuantConfig",
    "PointOverride",
    "METHODS",
    "PLACEMENTS",
    "parse_bits",
]

METHODS = ("minmax", "ema", "percentile", "omse")
PLACEMENTS = ("seed", "full")


class Granularity(str, enum.Enum):
    """One scale for the whole tensor, or one per channel (the output channel of a weight)."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"


class Arithmetic(str, enum.Enum):
    """How activations are fake-quantized.

    ``SEED`` divides by the scale and rounds ``x / s + zp`` exactly as the seed does;
    ``FUSED`` uses ``torch.fake_quantize_per_tensor_affine`` (multiplies by ``1/s`` and rounds
    before adding ``zp``), one kernel instead of six, which moves a value to the next level
    when it lies within a rounding error of a level boundary.
    """

    SEED = "seed"
    FUSED = "fused"


def _choice(field_name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{field_name}={value!r} is not one of: {', '.join(allowed)}")
    return value


@dataclass(frozen=True)
class QuantSpec:
    """How one role (weights, activations, softmax output, LayerNorm inputs) is quantized.

    Attributes:
        bits: bit width, 2 to 16.
        signed: signed integer grid (symmetric, zero point 0) or unsigned (asymmetric).
        granularity: per tensor or per channel.
        observer: name of a registered observer (see ``lit_ptq.quant.observers.OBSERVERS``).
    """

    bits: int = 8
    signed: bool = False
    granularity: Granularity = Granularity.PER_TENSOR
    observer: str = "minmax"

    def __post_init__(self) -> None:
        from .observers import OBSERVERS

        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ConfigError(f"bits={self.bits!r} is outside the supported range 2..16")
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        _choice("observer", self.observer, tuple(sorted(OBSERVERS)))

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1


@dataclass(frozen=True)
class PointOverride:
    """A partial setting for the quant points whose names match one pattern.

    Attributes:
        enabled: ``False`` leaves the matching points float (``null`` in YAML).
        bits: bit width, or ``None`` to keep the role's width.
        observer: observer name, or ``None`` to keep the role's observer.
        granularity: per tensor or per channel, or ``None`` to keep the role's.
    """

    enabled: bool = True
    bits: Optional[int] = None
    observer: Optional[str] = None
    granularity: Optional[Granularity] = None

    FIELDS = ("bits", "observer", "granularity")

    @classmethod
    def parse(cls, pattern: str, value: Union[None, "PointOverride", Mapping[str, Any]]) -> "PointOverride":
        """Read one override entry (``None`` or a mapping of :attr:`FIELDS`), with one-line errors."""
        if value is None:
            return cls(enabled=False)
        if isinstance(value, PointOverride):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"overrides[{pattern!r}]={value!r} must be null or a mapping of {', '.join(cls.FIELDS)}"
            )
        unknown = sorted(set(value) - set(cls.FIELDS))
        if unknown:
            raise ConfigError(f"overrides[{pattern!r}] has unknown field(s) {', '.join(unknown)}; use {', '.join(cls.FIELDS)}")
        bits, observer, granularity = (value.get(k) for k in cls.FIELDS)
        if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16):
            raise ConfigError(f"overrides[{pattern!r}].bits={bits!r} is outside the supported range 2..16")
        if observer is not None:
            from .observers import OBSERVERS

            _choice(f"overrides[{pattern!r}].observer", observer, tuple(sorted(OBSERVERS)))
        if granularity is not None:
            _choice(f"overrides[{pattern!r}].granularity", str(getattr(granularity, "value", granularity)), tuple(g.value for g in Granularity))
            granularity = Granularity(granularity)
        return cls(True, bits, observer, granularity)

    def apply(self, spec: QuantSpec) -> QuantSpec:
        """``spec`` with the fields this override sets."""
        changes = {k: getattr(self, k) for k in self.FIELDS if getattr(self, k) is not None}
        return replace(spec, **changes) if changes else spec

    def describe(self) -> Optional[dict[str, Any]]:
        """The override as it is written in a config: ``None`` or the fields it sets."""
        if not self.enabled:
            return None
        return {k: getattr(getattr(self, k), "value", getattr(self, k)) for k in self.FIELDS if getattr(self, k) is not None}


def parse_bits(bits: str) -> tuple[int, int, int]:
    """Parse ``"W/A/Attn"`` (e.g. ``"8/8/4"``) into three integers in 2..16."""
    parts = str(bits).split("/")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ConfigError(f"bits={bits!r} must be three integers 'weights/activations/attention', e.g. '8/8/8'")
    for name, v in zip(("weight", "activation", "attention"), values):
        if not 2 <= v <= 16:
            raise ConfigError(f"bits={bits!r}: the {name} width {v} is outside the supported range 2..16")
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize, where, and how.

    Attributes:
        method: activation observer, one of ``minmax``, ``ema``, ``percentile``, ``omse``.
        placement: ``seed`` (the PTQ-for-iTPN quant points) or ``full`` (FQ-ViT style: every
            Linear/Conv input and weight including head and patch embedding, every LayerNorm input).
        bits: ``"weights/activations/attention"``; attention is the softmax output.
        ptf: FQ-ViT's power-of-two factors for LayerNorm inputs (only ``full`` quantizes them).
        lis: FQ-ViT's log-int-softmax: the softmax output as a log2 code of ``attention`` bits.
        arithmetic: ``seed`` (exact division, as the seed) or ``fused`` (torch's fused kernel)
            for activations; weights always divide (see ``docs/quantization.md``).
        overrides: ordered ``{pattern: setting}``; each pattern (``fnmatch``) is matched against
            the full name of every quant point (``blocks.0.attn.qkv_output``,
            ``head.weight_quantizer``), and every matching entry applies in order, so later
            entries win. A setting is ``None`` (leave the point float) or a mapping of
            ``bits``, ``observer``, ``granularity``. Stored as ``(pattern, PointOverride)`` pairs.
        weight: derived from ``bits``; int, symmetric, per channel, MinMax.
        act: derived; uint, asymmetric, per tensor, observer ``method``.
        attn: derived; the softmax output.
        norm: derived; LayerNorm inputs (per channel with PTF).
    """

    method: str = "minmax"
    placement: str = "seed"
    bits: str = "8/8/8"
    ptf: bool = False
    lis: bool = False
    arithmetic: Arithmetic = Arithmetic.SEED
    overrides: Any = ()
    weight: QuantSpec = field(init=False)
    act: QuantSpec = field(init=False)
    attn: QuantSpec = field(init=False)
    norm: QuantSpec = field(init=False)

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("placement", self.placement, PLACEMENTS)
        try:
            object.__setattr__(self, "arithmetic", Arithmetic(self.arithmetic))
        except ValueError:
            raise ConfigError(
                f"arithmetic={self.arithmetic!r} is not one of: {', '.join(a.value for a in Arithmetic)}"
            ) from None
        w, a, s = parse_bits(self.bits)
        set_ = object.__setattr__
        set_(self, "overrides", _parse_overrides(self.overrides))
        set_(self, "weight", QuantSpec(w, True, Granularity.PER_CHANNEL, "minmax"))
        set_(self, "act", QuantSpec(a, False, Granularity.PER_TENSOR, self.method))
        set_(self, "attn", QuantSpec(s, False, Granularity.PER_TENSOR, "minmax" if self.lis else self.method))
        set_(
            self,
            "norm",
            QuantSpec(a, False, Granularity.PER_CHANNEL, "ptf") if self.ptf else QuantSpec(a, False, observer=self.method),
        )

    def spec_for(self, role: str, name: str) -> Optional[QuantSpec]:
        """The spec of the quant point ``name`` of ``role`` (``weight``, ``act``, ``attn``,
        ``norm``) after the overrides that match ``name``; ``None`` when one leaves it float."""
        spec: QuantSpec = getattr(self, role)
        enabled = True
        for pattern, override in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                enabled = override.enabled
                spec = override.apply(spec)
        return spec if enabled else None

    def describe(self) -> dict[str, object]:
        """The user-facing fields, for logs and result files (``overrides`` only when set)."""
        fields: dict[str, object] = dict(
            method=self.method,
            placement=self.placement,
            bits=self.bits,
            ptf=self.ptf,
            lis=self.lis,
            arithmetic=self.arithmetic.value,
        )
        if self.overrides:
            fields["overrides"] = {pattern: o.describe() for pattern, o in self.overrides}
        return fields


def _parse_overrides(value: Any) -> tuple[tuple[str, PointOverride], ...]:
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = [(pattern, setting) for pattern, setting in items]
    except (TypeError, ValueError):
        raise ConfigError(f"overrides={value!r} must be a mapping from module-name patterns to settings") from None
    out = []
    for pattern, setting in pairs:
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"overrides: the pattern {pattern!r} must be a non-empty string such as 'blocks.0.*'")
        out.append((pattern, PointOverride.parse(pattern, setting)))
    return tuple(out)
