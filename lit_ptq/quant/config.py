"""Typed quantization configuration.

``QuantConfig(method="minmax", placement="seed", bits="8/8/8")`` is all a run needs; every
other field has the default of the PTQ-for-iTPN seed (FQ-ViT's arithmetic): weights int8
symmetric per output channel with MinMax, activations uint8 asymmetric per tensor with the
chosen observer, the softmax output quantized like an activation (or log2 with LIS).
Low-bit recipes (``recipe="repq"``, ``"repq_gptq"``, ``"recon"``; ``docs/quantization.md``)
switch the weights to asymmetric per-channel ranges found by an MSE clip search and the
softmax output to a log-sqrt2 code, and add the transforms of ``lit_ptq.quant.transforms``.
Per-layer settings are ordered ``overrides``: module-name patterns mapped to a partial
setting, or to ``None`` to leave the matching quant points float (see ``docs/quantization.md``).
"""

from __future__ import annotations

import difflib
import enum
import fnmatch
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

from ..errors import ConfigError
from .observers import GELU_QUANTIZERS, METHODS, OBSERVERS, SOFTMAX_QUANTIZERS
from .steps import RECIPES

__all__ = [
    "Granularity",
    "Arithmetic",
    "QuantSpec",
    "QuantConfig",
    "PointOverride",
    "ReconSettings",
    "parse_bits",
]


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


def _choice(field_name: str, value: str, allowed: Collection[str]) -> str:
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

    def summary(self) -> str:
        """What the override does, in words: ``float``, ``bits 8, observer mse`` or ``the role's setting``."""
        fields = self.describe()
        if fields is None:
            return "float"
        return ", ".join(f"{k} {v}" for k, v in fields.items()) or "the role's setting"


def _is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


RECON_STEPS = ("reconstruct", "reconstruct_fisher", "reconstruct_joint")
"""The steps that read :class:`ReconSettings` (``lit_ptq.quant.transforms.recon``)."""


@dataclass(frozen=True)
class ReconSettings:
    """Block reconstruction (BRECQ / QDrop with AdaRound) settings.

    Attributes:
        iters: optimizer steps per block (BRECQ and QDrop take 20000; 500 keep the
            reconstruction of a small model to minutes on a CPU).
        batch_size: images per step.
        images: calibration images used (``None``: all of them).
        weight_lr: Adam learning rate of the rounding variables.
        act_lr: Adam learning rate of the activation step sizes (0 keeps them fixed).
        round_weight: weight of AdaRound's rounding regularizer.
        drop_prob: QDrop's probability of keeping an activation float during a step.
        seed: seed of the image sampling and of QDrop's masks.
        joint_iters: optimizer steps of the joint stage (the ``reconstruct_joint`` step, which
            tunes all blocks together on the model's logits; read by no other step).
    """

    iters: int = 500
    batch_size: int = 32
    images: Optional[int] = None
    weight_lr: float = 1e-3
    act_lr: float = 4e-5
    round_weight: float = 0.01
    drop_prob: float = 0.5
    seed: int = 0
    joint_iters: int = 200

    def __post_init__(self) -> None:
        for name in ("iters", "batch_size", "joint_iters"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"recon.{name}={getattr(self, name)!r} must be a positive integer")
        if self.images is not None and (not _is_int(self.images) or self.images < 1):
            raise ConfigError(f"recon.images={self.images!r} must be a positive integer or null")
        for name in ("weight_lr", "act_lr", "round_weight"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value < float("inf"):
                raise ConfigError(f"recon.{name}={value!r} must be a finite number >= 0")
        if not _is_real(self.drop_prob) or not 0.0 <= self.drop_prob < 1.0:
            raise ConfigError(f"recon.drop_prob={self.drop_prob!r} must be a number in [0, 1)")
        if not _is_int(self.seed):
            raise ConfigError(f"recon.seed={self.seed!r} must be an integer")

    @classmethod
    def parse(cls, value: Any) -> "ReconSettings":
        """Settings from ``None`` (the defaults), an instance, or a mapping of field names."""
        if value is None:
            return cls()
        if isinstance(value, ReconSettings):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"recon={value!r} must be a mapping of {', '.join(cls.__dataclass_fields__)}")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"recon has unknown field(s) {', '.join(unknown)}; use {', '.join(cls.__dataclass_fields__)}")
        return cls(**value)

    def describe(self) -> dict[str, Any]:
        """The settings as a plain mapping."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


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
        method: activation observer, any registered observer usable as a method
            (:data:`~lit_ptq.quant.observers.METHODS`): ``minmax``, ``ema``, ``percentile``,
            ``omse``, ``mse`` (per-tensor clip search of least squared error) and those
            registered outside the package.
        placement: a placement of the model's family, checked by ``quantize_``: ``seed`` (the
            PTQ-for-iTPN quant points), ``full`` (FQ-ViT style: every Linear/Conv input and
            weight including head and patch embedding, every LayerNorm input) or ``matmul``
            (the benchmark protocol of PTQ4ViT / RepQ-ViT: every Linear input and weight and
            both operands of the two attention products; LayerNorms and the residual stream
            float), or one the family adds.
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
        recipe: a registered recipe (:data:`~lit_ptq.quant.steps.RECIPES`; ``repq``,
            ``repq_gptq``, ``recon``, ``repq_oclip``, ``repq_gptq_oclip``, ``recon_fisher``,
            ``recon_joint``, ``recon_fisher_joint``; needs
            ``placement="matmul"``): RepQ-ViT's LayerNorm reparameterization, then GPTQ/ridge
            weight correction, or block reconstruction; the ``_oclip`` recipes choose the
            weight ranges by the layer's output error (see ``lit_ptq.quant.recipes``).
        softmax: the softmax-output quantizer, ``uniform`` or a registered non-uniform code:
            ``log2`` or ``log_sqrt2`` (RepQ-ViT), ``adalog`` (AdaLog), ``twin_uniform``
            (PTQ4ViT); ``None`` picks ``log_sqrt2`` with a recipe and ``uniform`` without.
        gelu: the quantizer of the post-GELU activation (the input of each MLP's ``fc2``, or
            the MLP's ``act_output`` point in the ``seed`` placement): ``uniform`` (the
            activation spec, the default) or a registered non-uniform code, ``adalog`` or
            ``twin_uniform``, at the activation width (``docs/lowbit.md``).
        recon: block-reconstruction settings (a mapping of :class:`ReconSettings` fields) for
            a recipe that reconstructs (``recipe="recon"``).
        weight: derived from ``bits``; int, symmetric, per channel, MinMax (with a recipe:
            asymmetric per channel, MSE clip search).
        act: derived; uint, asymmetric, per tensor, observer ``method``.
        attn: derived; the softmax output.
        norm: derived; LayerNorm inputs (per channel with PTF).
        image: derived; the input of the patch-embedding convolution (8 bits at least in the
            ``matmul`` placement, as RepQ-ViT; the activation spec otherwise).
    """

    method: str = "minmax"
    placement: str = "seed"
    bits: str = "8/8/8"
    ptf: bool = False
    lis: bool = False
    arithmetic: Arithmetic = Arithmetic.SEED
    overrides: Any = ()
    recipe: Optional[str] = None
    softmax: Optional[str] = None
    recon: Any = None
    gelu: str = "uniform"
    weight: QuantSpec = field(init=False)
    act: QuantSpec = field(init=False)
    attn: QuantSpec = field(init=False)
    norm: QuantSpec = field(init=False)
    image: QuantSpec = field(init=False)

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        if not isinstance(self.placement, str) or not self.placement:
            raise ConfigError(
                f"placement={self.placement!r} must name a placement of the model's family, e.g. seed, full or matmul"
            )
        try:
            object.__setattr__(self, "arithmetic", Arithmetic(self.arithmetic))
        except ValueError:
            raise ConfigError(
                f"arithmetic={self.arithmetic!r} is not one of: {', '.join(a.value for a in Arithmetic)}"
            ) from None
        w, a, s = parse_bits(self.bits)
        set_ = object.__setattr__
        self._check_recipe()
        set_(self, "softmax", self.softmax or ("log_sqrt2" if self.recipe else "uniform"))
        set_(self, "recon", ReconSettings.parse(self.recon) if self._reconstructs() else None)
        set_(self, "overrides", _parse_overrides(self.overrides))
        if self.recipe:
            set_(self, "weight", QuantSpec(w, False, Granularity.PER_CHANNEL, "mse"))
        else:
            set_(self, "weight", QuantSpec(w, True, Granularity.PER_CHANNEL, "minmax"))
        set_(self, "act", QuantSpec(a, False, Granularity.PER_TENSOR, self.method))
        set_(self, "attn", QuantSpec(s, False, Granularity.PER_TENSOR, "minmax" if self.lis else self.method))
        set_(
            self,
            "norm",
            QuantSpec(a, False, Granularity.PER_CHANNEL, "ptf") if self.ptf else QuantSpec(a, False, observer=self.method),
        )
        set_(self, "image", QuantSpec(max(a, 8), False, observer=self.method) if self.placement == "matmul" else self.act)

    def _check_recipe(self) -> None:
        if self.recipe is not None:
            _choice("recipe", self.recipe, RECIPES)
            if self.placement != "matmul":
                raise ConfigError(f"recipe={self.recipe!r} needs placement='matmul' (got {self.placement!r})")
            if self.ptf or self.lis:
                raise ConfigError(f"recipe={self.recipe!r} cannot be combined with FQ-ViT's ptf or lis")
        if self.softmax is not None:
            _choice("softmax", self.softmax, SOFTMAX_QUANTIZERS)
            if self.lis and self.softmax != "uniform":
                raise ConfigError(f"softmax={self.softmax!r} and lis=True both quantize the softmax output; pick one")
        _choice("gelu", self.gelu, GELU_QUANTIZERS)
        if self.recon is not None and not self._reconstructs():
            raise ConfigError(f"recon settings are for recipe='recon' or another reconstructing recipe (got recipe={self.recipe!r})")

    def _reconstructs(self) -> bool:
        """Whether the recipe runs a reconstruction step (:data:`RECON_STEPS`), which reads ``recon``."""
        return self.recipe is not None and any(step in RECON_STEPS for step in RECIPES[self.recipe])

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

    def override_counts(self, names: Collection[str]) -> list[tuple[str, PointOverride, int]]:
        """``(pattern, override, count)`` for every override: how many of ``names`` its pattern matches.

        Args:
            names: the full names of the quant points the placement places in a model (those an
                override leaves float included), as ``quantize_`` collects them.

        Raises:
            ConfigError: a pattern matches none of ``names`` (a typo, or a point this placement
                does not place); the message names the closest point names.
        """
        counts = []
        for pattern, override in self.overrides:
            count = sum(fnmatch.fnmatchcase(name, pattern) for name in names)
            if count == 0:
                raise ConfigError(_unmatched_override(pattern, names, self.placement))
            counts.append((pattern, override, count))
        return counts

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
        if self.recipe:
            fields["recipe"] = self.recipe
        if self.softmax != "uniform":
            fields["softmax"] = self.softmax
        if self.gelu != "uniform":
            fields["gelu"] = self.gelu
        if self.recon is not None:
            recon = self.recon.describe()
            if "reconstruct_joint" not in RECIPES[self.recipe]:
                del recon["joint_iters"]  # read by the joint stage only: records and state files as before
            fields["recon"] = recon
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


def _unmatched_override(pattern: str, names: Collection[str], placement: str) -> str:
    """The sentence refusing an override ``pattern`` that matches none of ``names``: the three
    closest names, with block and layer indices written ``*`` (``blocks.*.attn.qkv_output``)."""
    if not names:
        return f"overrides: the pattern {pattern!r} matches no quant point: placement {placement!r} places none in this model"
    shapes = sorted({re.sub(r"(?<![^.])\d+(?![^.])", "*", name) for name in names})
    closest = difflib.get_close_matches(pattern, shapes, n=3, cutoff=0.0)
    return (
        f"overrides: the pattern {pattern!r} matches no quant point of this model (placement {placement!r}); "
        f"the closest point names are {', '.join(map(repr, closest))}"
    )
