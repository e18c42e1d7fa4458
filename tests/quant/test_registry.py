"""lit_ptq/quant/registry.py: families as plugins, placements, per-layer overrides, filter_fn.

A plugin written in this file quantizes a toy model without any change to the core: that is
the contract a new model family relies on.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn as nn

from lit_ptq.errors import ConfigError
from lit_ptq.quant import (
    FAMILIES,
    PLACEMENTS,
    Family,
    Granularity,
    LogSoftmaxQuantizer,
    PointFactory,
    QuantConfig,
    QuantMode,
    QuantPoint,
    Site,
    TensorQuantizer,
    WeightQuantizer,
    calibrate,
    family_of,
    quant_points,
    quantize_,
    register_family,
)
from lit_ptq.quant.layers import maybe_quant, module_mode


class ToyBlock(nn.Module):
    """A residual MLP block: the kind of module a family plugin swaps."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(self.norm(x)))


class ToyNet(nn.Module):
    """Two toy blocks and a head."""

    def __init__(self, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.blocks = nn.Sequential(ToyBlock(dim), ToyBlock(dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(dim=1))


def _toy_everything(site: Site) -> bool:
    """Every point except LayerNorm inputs."""
    return not isinstance(site.module, nn.LayerNorm)


def _toy_outputs_only(site: Site) -> bool:
    """Only the block-output points."""
    return isinstance(site.module, ToyBlock)


TOY = register_family("toy", (ToyNet,), {"seed": _toy_outputs_only, "full": _toy_everything})


@TOY.quant_module(ToyBlock)
class QuantToyBlock(ToyBlock):
    """ToyBlock with a point on its output."""

    def setup_quant(self, points: PointFactory) -> None:
        """Create the output point."""
        self.output = points.act("output")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_quant(self.output, super().forward(x))


def _toy(seed: int = 0) -> ToyNet:
    torch.manual_seed(seed)
    return ToyNet().eval()


def _batches(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 5, 8, generator=g) for _ in range(n)]


def _points(model: nn.Module) -> dict[str, QuantPoint]:
    return dict(quant_points(model))


def test_a_plugin_in_a_test_file_quantizes_its_model() -> None:
    assert FAMILIES["toy"] is TOY and family_of(_toy()) is TOY
    model = quantize_(_toy(), QuantConfig(placement="full"))
    assert type(model.blocks[0]) is QuantToyBlock
    assert sorted(_points(model)) == [
        "blocks.0.fc.input_quantizer",
        "blocks.0.fc.weight_quantizer",
        "blocks.0.output",
        "blocks.1.fc.input_quantizer",
        "blocks.1.fc.weight_quantizer",
        "blocks.1.output",
        "head.input_quantizer",
        "head.weight_quantizer",
    ]
    calibrate(model, _batches())
    reference = _toy()
    with torch.no_grad():
        out, ref = model(_batches()[0]), reference(_batches()[0])
    assert out.shape == ref.shape and not torch.equal(out, ref)
    assert (out - ref).abs().max() < 0.1  # 8 bits everywhere on unit-scale inputs


def test_the_placement_decides_which_points_exist() -> None:
    model = quantize_(_toy(), QuantConfig(placement="seed"))
    assert sorted(_points(model)) == ["blocks.0.output", "blocks.1.output"]
    assert model.blocks[0].fc.weight_quantizer is None and model.head.input_quantizer is None


def test_float_mode_computes_the_float_model_exactly() -> None:
    model = quantize_(_toy(), QuantConfig(placement="full"))
    x = _batches()[0]
    with torch.no_grad():
        assert torch.equal(model(x), _toy()(x))


def test_a_model_without_plugin_fails_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"no quantization plugin handles Sequential models; registered families: .*toy"):
        quantize_(nn.Sequential(nn.Linear(2, 2)), QuantConfig())


def test_a_placement_the_family_lacks_fails_in_one_line() -> None:
    family = register_family("toy_seed_only", (ToyBlock,), {"seed": _toy_outputs_only})
    try:
        with pytest.raises(ConfigError, match=r"placement='full' is not defined for the toy_seed_only model family; it has: seed"):
            quantize_(ToyBlock(4), QuantConfig(placement="full"))
    finally:
        del FAMILIES[family.name]


def test_a_recipe_the_family_cannot_run_fails_before_calibration() -> None:
    family = register_family("toy_no_pairs", (ToyBlock,), {"matmul": _toy_everything})
    try:
        with pytest.raises(ConfigError, match=r"recipe='repq' needs the toy_no_pairs plugin to list its LayerNorm -> Linear pairs"):
            quantize_(ToyBlock(4), QuantConfig(method="mse", placement="matmul", recipe="repq"))
    finally:
        del FAMILIES[family.name]


def test_quantized_class_must_subclass_the_float_one() -> None:
    with pytest.raises(TypeError, match="must subclass ToyBlock"):
        TOY.quant_module(ToyBlock)(nn.Linear)


class TestOverrides:
    def test_null_leaves_the_matching_points_float(self) -> None:
        model = quantize_(_toy(), QuantConfig(placement="full", overrides={"head.*": None, "*.output": None}))
        assert sorted(_points(model)) == [
            "blocks.0.fc.input_quantizer",
            "blocks.0.fc.weight_quantizer",
            "blocks.1.fc.input_quantizer",
            "blocks.1.fc.weight_quantizer",
        ]

    def test_bits_and_observer_change_only_the_matching_points(self) -> None:
        overrides = {"blocks.1.*": {"bits": 4}, "blocks.1.output": {"observer": "percentile"}}
        points = _points(quantize_(_toy(), QuantConfig(placement="full", bits="8/6/8", overrides=overrides)))
        assert (points["blocks.1.fc.weight_quantizer"].spec.bits, points["blocks.1.output"].spec.bits) == (4, 4)
        assert points["blocks.1.output"].spec.observer == "percentile"
        assert points["blocks.1.fc.weight_quantizer"].spec.signed  # the role's other fields stay
        assert (points["blocks.0.fc.weight_quantizer"].spec.bits, points["blocks.0.output"].spec.bits) == (8, 6)
        assert points["blocks.0.output"].spec.observer == "minmax"

    def test_later_entries_win(self) -> None:
        overrides = {"*": {"bits": 4}, "head.*": {"bits": 8}, "blocks.0.*": None, "blocks.0.output": {}}
        points = _points(quantize_(_toy(), QuantConfig(placement="full", overrides=overrides)))
        assert {n: p.spec.bits for n, p in points.items()} == {
            "blocks.0.output": 4,  # disabled by blocks.0.*, re-enabled by its own entry, 4 bits from "*"
            "blocks.1.fc.input_quantizer": 4,
            "blocks.1.fc.weight_quantizer": 4,
            "blocks.1.output": 4,
            "head.input_quantizer": 8,
            "head.weight_quantizer": 8,
        }

    def test_per_tensor_weights_and_per_channel_inputs(self) -> None:
        overrides = {"*.weight_quantizer": {"granularity": "per_tensor"}, "head.input_quantizer": {"granularity": "per_channel"}}
        points = _points(quantize_(_toy(), QuantConfig(placement="full", overrides=overrides)))
        assert points["head.weight_quantizer"].scale.numel() == 1
        assert points["head.input_quantizer"].spec.granularity is Granularity.PER_CHANNEL
        assert points["head.input_quantizer"].scale.numel() == 8

    @pytest.mark.parametrize("observer", ["percentile", "omse"])
    def test_a_per_tensor_observer_on_per_channel_weights_is_refused(self, observer: str) -> None:
        with pytest.raises(ConfigError, match=rf"^the {observer} observer computes one range per tensor, not per channel; use per_tensor for it$"):
            quantize_(_toy(), QuantConfig(placement="full", overrides={"head.weight_quantizer": {"observer": observer}}))

    def test_per_channel_where_the_channels_are_unknown_is_refused(self) -> None:
        with pytest.raises(ConfigError, match=r"blocks.0.output cannot be quantized per channel"):
            quantize_(_toy(), QuantConfig(placement="full", overrides={"*.output": {"granularity": "per_channel"}}))

    @pytest.mark.parametrize(
        ("overrides", "match"),
        [
            ({"head*": {"bits": 1}}, r"overrides\['head\*'\].bits=1 is outside the supported range 2..16"),
            ({"head*": {"observer": "max"}}, r"overrides\['head\*'\].observer='max' is not one of"),
            ({"head*": {"granularity": "per_row"}}, r"overrides\['head\*'\].granularity='per_row' is not one of"),
            ({"head*": {"width": 4}}, r"overrides\['head\*'\] has unknown field\(s\) width"),
            ({"head*": 8}, r"overrides\['head\*'\]=8 must be null or a mapping"),
            ({"": None}, r"the pattern '' must be a non-empty string"),
            ("head", r"overrides='head' must be a mapping"),
        ],
    )
    def test_bad_overrides_fail_in_one_line(self, overrides: object, match: str) -> None:
        with pytest.raises(ConfigError, match=match):
            QuantConfig(overrides=overrides)

    def test_describe_round_trips_the_overrides(self) -> None:
        overrides = {"blocks.0.*": {"bits": 4, "granularity": "per_tensor"}, "head*": None}
        config = QuantConfig(overrides=overrides)
        assert config.describe()["overrides"] == overrides
        assert QuantConfig(overrides=config.describe()["overrides"]) == config
        assert "overrides" not in QuantConfig().describe()


class TestFilterFn:
    def test_filtered_modules_keep_their_float_class(self) -> None:
        model = quantize_(_toy(), QuantConfig(placement="full"), filter_fn=lambda m, name: name != "head")
        assert type(model.head) is nn.Linear
        assert not any(name.startswith("head") for name in _points(model))

    def test_filter_sees_every_swappable_module_with_its_name(self) -> None:
        seen = []
        quantize_(_toy(), QuantConfig(placement="full"), filter_fn=lambda m, name: seen.append((name, type(m).__name__)) or True)
        assert seen == [
            ("blocks.0", "ToyBlock"),
            ("blocks.0.norm", "LayerNorm"),
            ("blocks.0.fc", "Linear"),
            ("blocks.1", "ToyBlock"),
            ("blocks.1.norm", "LayerNorm"),
            ("blocks.1.fc", "Linear"),
            ("head", "Linear"),
        ]


def test_module_mode_follows_the_points() -> None:
    model = quantize_(_toy(), QuantConfig(placement="full"))
    assert module_mode(model.blocks[0]) is QuantMode.FLOAT
    calibrate(model, _batches())
    assert module_mode(model.blocks[0]) is QuantMode.QUANTIZE
    assert module_mode(nn.Linear(2, 2)) is QuantMode.FLOAT


def test_every_point_shares_one_base_class() -> None:
    assert issubclass(TensorQuantizer, QuantPoint) and issubclass(WeightQuantizer, QuantPoint)
    assert issubclass(LogSoftmaxQuantizer, QuantPoint)


class ConvNet(nn.Module):
    """A stem convolution that reads the image, a second one that does not, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, kernel_size=2, stride=2)
        self.mid = nn.Conv2d(4, 4, kernel_size=3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.stem(x)).mean(dim=(2, 3)))


def _convs_only(site: Site) -> bool:
    """A placement of the conv family's own: the inputs and weights of the convolutions."""
    return isinstance(site.module, nn.Conv2d)


@pytest.fixture
def conv_family() -> Iterator[Family]:
    """A family registered for one test, with a placement of its own (``convs``) and its
    image convolution (``stem``); its facts: the blocks."""
    family = register_family(
        "toy_conv",
        (ConvNet,),
        {"convs": _convs_only, "matmul": _toy_everything},
        image_convs=lambda model: ["stem"],
        blocks=lambda model: ["stem", "mid", "head"],
    )
    yield family
    del FAMILIES[family.name]


def _conv_net() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet().eval()


class TestFamilyExtensions:
    def test_a_family_adds_a_placement_of_its_own(self, conv_family: Family) -> None:
        assert "convs" in PLACEMENTS
        model = quantize_(_conv_net(), QuantConfig(placement="convs"))
        assert sorted(_points(model)) == [
            "mid.input_quantizer",
            "mid.weight_quantizer",
            "stem.input_quantizer",
            "stem.weight_quantizer",
        ]
        calibrate(model, [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))])
        with pytest.raises(ConfigError, match=r"placement='convs' is not defined for the toy model family; it has: seed, full$"):
            quantize_(_toy(), QuantConfig(placement="convs"))

    def test_placements_lists_every_registered_familys_placements(self, conv_family: Family) -> None:
        assert tuple(PLACEMENTS) == ("seed", "full", "matmul", "convs")

    def test_only_the_image_convolution_has_an_image_point(self, conv_family: Family) -> None:
        points = _points(quantize_(_conv_net(), QuantConfig(placement="matmul", bits="8/4/8")))
        image, other = points["stem.input_quantizer"], points["mid.input_quantizer"]
        assert (image.role, image.spec.bits) == ("image", 8)  # the matmul placement's image: 8 bits at least
        assert (other.role, other.spec.bits) == ("act", 4)

    def test_without_image_convs_every_convolution_is_an_activation(self) -> None:
        family = register_family("toy_conv_plain", (ConvNet,), {"full": _toy_everything})
        try:
            points = _points(quantize_(_conv_net(), QuantConfig(placement="full", bits="8/4/8")))
        finally:
            del FAMILIES[family.name]
        assert {points[n].role for n in ("stem.input_quantizer", "mid.input_quantizer")} == {"act"}

    def test_facts_are_read_by_name(self, conv_family: Family) -> None:
        model = _conv_net()
        assert conv_family.fact("blocks", model) == ["stem", "mid", "head"]
        assert conv_family.blocks(model) == ["stem", "mid", "head"]
        with pytest.raises(ConfigError, match=r"^the toy_conv model family does not list its norm_linear_pairs; "):
            conv_family.fact("norm_linear_pairs", model)
        with pytest.raises(AttributeError, match="has no attribute or fact 'widgets'"):
            conv_family.widgets  # noqa: B018

    def test_a_recipe_needs_only_the_facts_its_steps_read(self, conv_family: Family) -> None:
        with pytest.raises(ConfigError, match=r"^recipe='repq_gptq' needs the toy_conv plugin to list its LayerNorm -> Linear pairs$"):
            quantize_(_conv_net(), QuantConfig(method="mse", placement="matmul", recipe="repq_gptq"))
