"""Model families as plugins: which float modules are swapped, and which quant points exist.

The quantization core names no model. A model family (iTPN, timm's ViT, timm's Swin, ...)
is one file in ``lit_ptq/quant/plugins/`` that registers a :class:`Family`: the model
classes it handles, its quantized module classes (subclasses of the float ones, swapped in
place by ``quantize_``, in the style of modelopt's ``QuantModuleRegistry``), and its
placements. A placement is a rule that says, for every quant point a quantized module
*could* create (a :class:`Site`), whether it does.

Quantized modules create their quant points in ``setup_quant(points)`` through a
:class:`PointFactory`, which applies the placement and the config's per-layer overrides,
and returns ``None`` for a point that is not placed.

A family also states facts about its models that methods need (the LayerNorm -> Linear
pairs of RepQ-ViT's reparameterization, the blocks that error correction and reconstruction
work through, ...): named functions of the model, passed to :func:`register_family` as
keywords and read with :meth:`Family.fact`, so that a new method reads a new fact without a
change here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch.nn as nn

from ..errors import ConfigError
from .config import Granularity, QuantConfig, QuantSpec
from .names import NameView
from .quantizer import CODE_QUANTIZERS, LogSoftmaxQuantizer, QuantPoint, TensorQuantizer, WeightQuantizer

__all__ = [
    "Site",
    "Placement",
    "Fact",
    "Family",
    "FAMILIES",
    "PLACEMENTS",
    "register_family",
    "family_of",
    "PointFactory",
    "GENERIC_MODULES",
]


@dataclass(frozen=True)
class Site:
    """A quant point that a quantized module could create, for a placement rule to decide on.

    Attributes:
        module_name: path of the owning module in the model (``blocks.3.attn``; ``""`` for the root).
        point: attribute name of the point in that module (``qkv_output``, ``weight_quantizer``).
        module: the owning module (already of its quantized class).
        role: ``weight``, ``act``, ``attn`` (softmax output), ``norm`` (LayerNorm input) or
            ``image`` (the patch embedding's input).
        root: the whole model (for rules that depend on the model's variant).
    """

    module_name: str
    point: str
    module: nn.Module
    role: str
    root: nn.Module

    @property
    def name(self) -> str:
        """Full name of the point: ``module_name.point``."""
        return f"{self.module_name}.{self.point}" if self.module_name else self.point

    @property
    def leaf(self) -> str:
        """The last component of ``module_name`` (``qkv`` for ``blocks.3.attn.qkv``)."""
        return self.module_name.rsplit(".", 1)[-1]


Placement = Callable[[Site], bool]
"""A placement rule: whether a site becomes a quant point."""

GENERIC_MODULES: dict[type[nn.Module], type[nn.Module]] = {}
"""Float layer type -> generic quantized subclass, shared by every family (filled by ``layers``)."""


Fact = Callable[[nn.Module], Any]
"""A fact a family states about its models: a function of the (float or quantized) model."""


def _no_image_convs(model: nn.Module) -> tuple[str, ...]:
    """No convolution reads the image (the default of a family that names none)."""
    return ()


@dataclass
class Family:
    """A model family: the models it handles, its quantized modules, its placements and facts.

    Attributes:
        name: short name (``itpn``, ``timm_vit``, ...).
        model_types: root model classes of the family (``isinstance`` decides).
        placements: placement name -> rule; a family may define placements of its own.
        modules: float module type -> quantized subclass (on top of :data:`GENERIC_MODULES`).
        image_convs: ``model -> [module name, ...]``: the convolutions that read the input
            image (their input point has the role ``image``); any other convolution's input
            is an ordinary activation.
        facts: name -> :data:`Fact`, what methods read through :meth:`fact`. The built-in
            recipes read ``norm_linear_pairs`` (``model -> [(layernorm name, linear name),
            ...]``: every LayerNorm whose output feeds only one Linear through
            channel-wise-neutral operations, for RepQ-ViT's reparameterization) and ``blocks``
            (``model -> [module name, ...]``: the units, in forward order, that error
            correction and block reconstruction work through). ``family.blocks(model)`` is
            ``family.fact("blocks", model)``.
    """

    name: str
    model_types: tuple[type[nn.Module], ...]
    placements: dict[str, Placement]
    modules: dict[type[nn.Module], type[nn.Module]] = field(default_factory=dict)
    image_convs: Callable[[nn.Module], Sequence[str]] = _no_image_convs
    facts: dict[str, Fact] = field(default_factory=dict)

    def fact(self, name: str, model: nn.Module) -> Any:
        """The fact ``name`` about ``model``.

        Raises:
            ConfigError: the family's plugin does not state it.
        """
        if name not in self.facts:
            raise ConfigError(
                f"the {self.name} model family does not list its {name}; its plugin can pass "
                f"register_family(..., {name}=...)"
            )
        return self.facts[name](model)

    def __getattr__(self, name: str) -> Fact:
        facts = self.__dict__.get("facts", {})
        if name in facts:
            return facts[name]
        raise AttributeError(f"{type(self).__name__} {self.__dict__.get('name')!r} has no attribute or fact {name!r}")

    def quant_module(self, float_cls: type[nn.Module]) -> Callable[[type[nn.Module]], type[nn.Module]]:
        """Class decorator: register a quantized subclass of ``float_cls`` for this family."""

        def wrap(qcls: type[nn.Module]) -> type[nn.Module]:
            if not issubclass(qcls, float_cls):
                raise TypeError(f"{qcls.__name__} must subclass {float_cls.__name__} to be swapped in for it")
            self.modules[float_cls] = qcls
            return qcls

        return wrap

    def swap_table(self) -> dict[type[nn.Module], type[nn.Module]]:
        """Float type -> quantized class for this family (its own classes win over the generic ones)."""
        return {**GENERIC_MODULES, **self.modules}

    def placement(self, name: str) -> Placement:
        """The rule of placement ``name``.

        Raises:
            ConfigError: the family does not define it.
        """
        if name not in self.placements:
            raise ConfigError(
                f"placement={name!r} is not defined for the {self.name} model family; it has: {', '.join(self.placements)}"
            )
        return self.placements[name]


FAMILIES: dict[str, Family] = {}
"""Registered families by name, in registration order."""
PLACEMENTS = NameView(
    lambda: list(dict.fromkeys(p for family in FAMILIES.values() for p in family.placements)), "placements"
)
"""The placements of every registered family, in order of first registration (live)."""


def register_family(
    name: str,
    model_types: tuple[type[nn.Module], ...],
    placements: dict[str, Placement],
    image_convs: Callable[[nn.Module], Sequence[str]] = _no_image_convs,
    **facts: Fact,
) -> Family:
    """Register a model family (called once at import by its plugin file) and return it.

    Args:
        name: the family's name.
        model_types: the root model classes it handles.
        placements: placement name -> rule.
        image_convs: which convolutions read the image (see :class:`Family`).
        **facts: what methods read about the models (see :class:`Family`); a family without
            the facts a recipe's steps need supports the placements only.
    """
    if name in FAMILIES:
        raise ValueError(f"a model family named {name!r} is already registered")
    family = Family(name, tuple(model_types), dict(placements), image_convs=image_convs, facts=dict(facts))
    FAMILIES[name] = family
    return family


def family_of(model: nn.Module) -> Family:
    """The registered family whose model types include ``model``'s class.

    Raises:
        ConfigError: no plugin handles this model class.
    """
    for family in FAMILIES.values():
        if isinstance(model, family.model_types):
            return family
    known = ", ".join(f"{f.name} ({', '.join(t.__name__ for t in f.model_types)})" for f in FAMILIES.values())
    raise ConfigError(
        f"no quantization plugin handles {type(model).__name__} models; registered families: {known}. "
        "Add a plugin file to lit_ptq/quant/plugins/"
    )


class PointFactory:
    """Creates the quant points of one module, as its placement and the config's overrides say.

    Every method returns ``None`` for a point the placement leaves out or an override sets
    to ``None``.

    Args:
        config: the quantization config.
        placement: the family's rule for ``config.placement``.
        module_name: path of the module in the model.
        module: the module (of its quantized class).
        root: the whole model.
        reads_image: the module is one of the family's ``image_convs``.
        reads_gelu: the module is one of the family's ``gelu_linears`` (its input point is
            the post-GELU activation).
        placed: when given, the full name of every point the placement places is appended
            to it, overridden to ``None`` or not (``quantize_`` checks the overrides' patterns
            against them).
    """

    def __init__(
        self,
        config: QuantConfig,
        placement: Placement,
        module_name: str,
        module: nn.Module,
        root: nn.Module,
        reads_image: bool = False,
        placed: Optional[list[str]] = None,
        reads_gelu: bool = False,
    ) -> None:
        self.config, self.placement = config, placement
        self.module_name, self.module, self.root = module_name, module, root
        self.reads_image, self.reads_gelu = reads_image, reads_gelu
        self.placed = placed

    def spec(self, point: str, role: str) -> Optional[QuantSpec]:
        """The spec of ``point`` when it is placed and not disabled, else ``None``."""
        site = Site(self.module_name, point, self.module, role, self.root)
        if not self.placement(site):
            return None
        if self.placed is not None:
            self.placed.append(site.name)
        return self.config.spec_for(role, site.name)

    def act(self, point: str, inplace: bool = False, channels: Optional[int] = None) -> Optional[TensorQuantizer]:
        """A uniform activation point (per tensor unless an override asks per channel).

        Args:
            point: attribute name.
            inplace: the module computed the tensor itself and nothing else reads it.
            channels: size of the last dimension, needed for per-channel quantization.
        """
        return self._uniform(point, "act", inplace, channels)

    def norm(self, point: str, channels: int) -> Optional[TensorQuantizer]:
        """A LayerNorm-input point (per channel with PTF)."""
        return self._uniform(point, "norm", False, channels)

    def weight(self, point: str, out_channels: int) -> Optional[WeightQuantizer]:
        """A symmetric weight point (per output channel unless an override says per tensor)."""
        spec = self.spec(point, "weight")
        return WeightQuantizer(spec, out_channels) if spec is not None else None

    def image(self, point: str) -> Optional[TensorQuantizer]:
        """The input of the patch embedding (role ``image``), with the config's ``image`` spec."""
        return self._uniform(point, "image", False, None)

    def softmax(self, point: str, inplace: bool = True) -> Optional[QuantPoint]:
        """The softmax-output point: FQ-ViT's log-int-softmax under ``lis``, the non-uniform
        code ``config.softmax`` names (``log2``, ``log_sqrt2``, ``adalog``, ``twin_uniform``),
        else uniform."""
        if not self.config.lis and self.config.softmax == "uniform":
            return self._uniform(point, "attn", inplace, None)
        spec = self.spec(point, "attn")
        if spec is None:
            return None
        if self.config.lis:
            return LogSoftmaxQuantizer(spec.bits)
        return self._code(spec, self.config.softmax, "attn")

    def gelu(self, point: str, inplace: bool = False, channels: Optional[int] = None) -> Optional[TensorQuantizer]:
        """The post-GELU activation point: uniform (exactly :meth:`act`) under ``gelu="uniform"``,
        else the non-uniform code ``config.gelu`` names at the activation width (role ``act``)."""
        if self.config.gelu == "uniform":
            return self.act(point, inplace, channels)
        spec = self.spec(point, "act")
        return self._code(spec, self.config.gelu, "act") if spec is not None else None

    def _code(self, spec: QuantSpec, observer: str, role: str) -> TensorQuantizer:
        """The per-tensor non-uniform quantizer of ``observer`` with ``spec``'s width."""
        return CODE_QUANTIZERS[observer](replace(spec, observer=observer, granularity=Granularity.PER_TENSOR), role)

    def _uniform(self, point: str, role: str, inplace: bool, channels: Optional[int]) -> Optional[TensorQuantizer]:
        spec = self.spec(point, role)
        if spec is None:
            return None
        if spec.granularity is Granularity.PER_CHANNEL and channels is None:
            raise ConfigError(
                f"{self.module_name}.{point} cannot be quantized per channel: its channel count is not known "
                "before calibration; use per_tensor for it"
            )
        return TensorQuantizer(spec, role, channels=channels or 1, arithmetic=self.config.arithmetic, inplace=inplace)
