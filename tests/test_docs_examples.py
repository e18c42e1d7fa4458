"""docs/architecture.md is true: its worked examples run, what they register works through the
public entry points, and its import table allows every import in ``lit_ptq`` and nothing it
forbids is imported.

Each python block of the page that starts with ``# example: NAME`` runs in a fresh namespace
(a python block without the marker continues the example before it). The examples register a
model family, an observer, a calibration step with its recipe and two backends; every registry
is restored when this module's tests end, since other tests read the exact registry contents.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lit_ptq.backends as backends
import lit_ptq.export  # noqa: F401  (registers the onnx backends before the registries are saved)
import lit_ptq.quant.observers as observers
import lit_ptq.quant.registry as registry
import lit_ptq.quant.steps as steps
from lit_ptq.errors import ConfigError
from lit_ptq.models import create_model
from lit_ptq.module import PTQModule
from lit_ptq.quant import (
    FAMILIES,
    METHODS,
    PLACEMENTS,
    RECIPES,
    STEPS,
    QuantConfig,
    QuantMode,
    WeightQuantizer,
    calibrate,
    float_points,
    quant_points,
    quantize_,
    quantizers,
    run_calibration,
)
from lit_ptq.quant.steps import PLAIN_STEPS
from lit_ptq.run import check_export_output
from tests.test_architecture import import_graph

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
MARKER = re.compile(r"^# example: (\w+)$")
REGISTRIES: tuple[dict, ...] = (
    observers.OBSERVERS,
    registry.FAMILIES,
    steps._STEPS,
    steps._RECIPES,
    backends._EXPORT,
    backends._INFERENCE,
)
"""Every registry an example adds to (restored after this module's tests)."""
TRACING = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit:FutureWarning")
"""The TorchScript example traces the fake-quantized model: its branches are constants, as intended."""
BUILTIN_RECIPES = dict(RECIPES)
"""The recipes the package registers (read before any example runs)."""


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced python block of ``text``."""
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M)]


def run_examples(text: str) -> dict[str, dict[str, Any]]:
    """Run the python blocks of ``text`` in order; return each example's namespace by name."""
    spaces: dict[str, dict[str, Any]] = {}
    current = None
    for line, code in python_blocks(text):
        marker = MARKER.match(code.partition("\n")[0])
        if marker:
            current = spaces.setdefault(marker.group(1), {"__name__": f"docs_example_{marker.group(1)}"})
        assert current is not None, f"docs/architecture.md:{line}: a python block before the first '# example:'"
        exec(compile(code, f"{DOC}:{line}", "exec"), current)  # noqa: S102  (the repository's own docs)
    return spaces


@pytest.fixture(scope="module")
def examples() -> Iterator[dict[str, dict[str, Any]]]:
    """The examples' namespaces; every registry is put back as it was afterwards."""
    saved = [dict(r) for r in REGISTRIES]
    torch.manual_seed(0)
    try:
        yield run_examples(DOC.read_text())
    finally:
        for reg, before in zip(REGISTRIES, saved):
            reg.clear()
            reg.update(before)


def _images(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    """Two calibration batches of four 32x32 images."""
    return [_images(4, 3, 32, 32, seed=1), _images(4, 3, 32, 32, seed=2)]


def _itpn_tiny() -> nn.Module:
    torch.manual_seed(0)
    return create_model("itpn_tiny", num_classes=10).eval()


# --------------------------------------------------------------------------- the page itself


def test_the_page_has_the_four_examples_and_runs_them(examples) -> None:
    assert sorted(examples) == ["backend", "family", "observer", "step"]


def _table(heading: str) -> list[list[str]]:
    """The body rows of the first table after ``heading``, cells stripped."""
    section = DOC.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def _rooms() -> list[tuple[str, list[str], set[str]]]:
    """``(room, module patterns, rooms it may import)`` from the import table, in order."""
    return [
        (room, re.findall(r"`([^`]+)`", modules), set() if allowed == "-" else {a.strip() for a in allowed.split(",")})
        for room, modules, allowed in _table("Who may import whom")
    ]


def _matches(module: str, pattern: str) -> bool:
    """``a.b.*``: a module inside ``a.b``; ``a.b*``: ``a.b`` or a module inside it; else the name itself."""
    if pattern.endswith(".*"):
        return fnmatch.fnmatchcase(module, pattern)
    if pattern.endswith("*"):
        return module == pattern[:-1] or module.startswith(pattern[:-1] + ".")
    return module == pattern


def _room_of(module: str, rooms: list[tuple[str, list[str], set[str]]]) -> str:
    for room, patterns, _ in rooms:
        if any(_matches(module, p) for p in patterns):
            return room
    raise AssertionError(f"{module} is in no room of docs/architecture.md's import table")


def test_the_import_table_allows_every_import_of_the_package() -> None:
    rooms = _rooms()
    allowed = {room: may | {room} for room, _, may in rooms}
    assert set().union(*allowed.values()) <= set(allowed)  # every named room is a row
    graph = import_graph()
    breaks = sorted(
        f"{a} ({_room_of(a, rooms)}) imports {b} ({_room_of(b, rooms)})"
        for a, targets in graph.items()
        for b in targets
        if _room_of(b, rooms) not in allowed[_room_of(a, rooms)]
    )
    assert breaks == []


def test_the_import_table_keeps_the_core_and_the_module_apart() -> None:
    rooms = {room: may for room, _, may in _rooms()}
    assert rooms["quant core"] == {"base"}
    assert "export" not in rooms["module"] and "run service" not in rooms["module"]
    assert _room_of("lit_ptq.quant.walk", _rooms()) == "quant core" and _room_of("lit_ptq.quant", _rooms()) == "quant package"


def test_the_recipe_table_is_the_registry() -> None:
    table = {config: tuple(re.findall(r"`(\w+)`", order)) for config, order in _table("The calibration pipeline")}
    expected = {"no recipe (`PLAIN_STEPS`)": PLAIN_STEPS, **{f'`recipe="{n}"`': s for n, s in BUILTIN_RECIPES.items()}}
    assert table == expected


# --------------------------------------------------------------------------- the family


def test_the_family_places_its_own_placement_through_quantize_(examples, batches) -> None:
    ns = examples["family"]
    assert FAMILIES["mlpnet"] is ns["FAMILY"] and "mlp_only" in PLACEMENTS
    torch.manual_seed(0)
    model = ns["MlpNet"]().eval()
    with torch.no_grad():
        reference = model(batches[0])
    quantize_(model, QuantConfig(method="minmax", placement="mlp_only"))
    per_block = ["mlp.fc1.weight_quantizer", "mlp.fc2.weight_quantizer", "mlp.act_output", "mlp.fc2_output", "residual"]
    expected = ["patch_embed.weight_quantizer", *(f"blocks.{i}.{p}" for i in (0, 1) for p in per_block), "head.weight_quantizer"]
    assert [name for name, _ in quant_points(model)] == expected
    with torch.no_grad():
        assert torch.equal(model(batches[0]), reference)  # FLOAT mode: the float model
        assert calibrate(model, batches) == 2
        logits = model(batches[0])
    assert all(p.mode is QuantMode.QUANTIZE for _, p in quant_points(model))
    assert torch.isfinite(logits).all() and not torch.equal(logits, reference)


def test_the_family_runs_a_recipe_with_its_facts_and_reads_the_image_with_its_conv(examples, batches) -> None:
    ns = examples["family"]
    torch.manual_seed(0)
    model = ns["MlpNet"]().eval()
    float_norm = model.blocks[0].norm.weight.clone()
    with torch.no_grad():
        reference = model(batches[0])
    quantize_(model, QuantConfig(method="mse", placement="matmul", recipe="repq"))
    assert dict(quantizers(model))["patch_embed.input_quantizer"].role == "image"
    assert model.blocks[1].residual is None  # matmul leaves the residual stream float
    calibrate(model, batches)
    with torch.no_grad():
        logits = model(batches[0])
    assert not torch.equal(model.blocks[0].norm.weight, float_norm)  # RepQ-ViT's fold read norm_linear_pairs
    assert (logits - reference).norm() / reference.norm() < 0.1


# --------------------------------------------------------------------------- the observer


def _first_point_and_its_float_inputs(model: nn.Module, batches: list[torch.Tensor]) -> tuple[str, list[torch.Tensor]]:
    """The first activation point the forward reaches, and what it receives on each batch with every point float."""
    seen: dict[str, list[torch.Tensor]] = {}
    acts = [(n, q) for n, q in quantizers(model) if not isinstance(q, WeightQuantizer)]
    handles = [q.register_forward_pre_hook(lambda _m, args, n=n: seen.setdefault(n, []).append(args[0].clone())) for n, q in acts]
    try:
        with float_points(model), torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    first = next(iter(seen))
    return first, seen[first]


def test_the_observer_is_a_method_by_name_and_its_range_is_the_largest_magnitude(examples, batches) -> None:
    assert "absmax" in METHODS and observers.OBSERVERS["absmax"] is examples["observer"]["AbsMaxObserver"]
    model = quantize_(_itpn_tiny(), QuantConfig(method="absmax", placement="seed"))
    first, inputs = _first_point_and_its_float_inputs(model, batches)
    calibrate(model, batches)
    acts = {n: q for n, q in quantizers(model) if q.role == "act"}
    assert len(acts) > 10 and all(q.spec.observer == "absmax" for q in acts.values())
    assert all(torch.equal(q.min_val, -q.max_val) and (q.max_val > 0).all() for q in acts.values())
    largest = max(x.abs().max() for x in inputs)
    assert acts[first].max_val.tolist() == [largest.item()]


def test_the_observer_works_per_channel_through_an_override(examples, batches) -> None:
    name = "blocks.0.mlp.fc1.input_quantizer"
    model = quantize_(_itpn_tiny(), QuantConfig(method="absmax", placement="matmul", overrides={name: {"granularity": "per_channel"}}))
    capture: list[torch.Tensor] = []
    point = dict(quantizers(model))[name]
    handle = point.register_forward_pre_hook(lambda _m, args: capture.append(args[0].clone()))
    with float_points(model), torch.no_grad():
        for x in batches:
            model(x)
    handle.remove()
    calibrate(model, batches)
    expected = torch.stack([x.abs().flatten(0, -2).amax(dim=0) for x in capture]).amax(dim=0)
    assert torch.equal(point.max_val, expected) and torch.equal(point.min_val, -expected)


# --------------------------------------------------------------------------- the step and its recipe


def test_the_recipe_runs_the_step_and_each_bias_absorbs_the_mean_weight_error(examples, batches) -> None:
    assert RECIPES["bias_correction"] == ("observe", "calibrate_weights", "correct_bias")
    assert STEPS["correct_bias"].fn is examples["step"]["correct_bias"]
    model = _itpn_tiny()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}
    float_bias = {n: m.bias.clone() for n, m in linears.items()}
    inputs: dict[str, list[torch.Tensor]] = {}  # what each Linear of the float model receives
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: inputs.setdefault(n, []).append(args[0])) for n, m in linears.items()]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    quantize_(model, QuantConfig(method="minmax", placement="matmul", bits="4/8/8", recipe="bias_correction"))
    ctx = run_calibration(model, batches)
    assert ctx.results["corrected_biases"] == len(linears) and ctx.batches == 2
    for name, layer in linears.items():
        x = torch.cat([i.flatten(0, -2) for i in inputs[name]])
        with torch.no_grad():
            quantized = F.linear(x, layer.weight_quantizer(layer.weight), layer.bias).mean(dim=0)
        float_mean = F.linear(x, layer.weight, float_bias[name]).mean(dim=0)
        assert not torch.equal(layer.bias, float_bias[name]), name
        torch.testing.assert_close(quantized, float_mean, rtol=0, atol=2e-5, msg=name)


def test_the_recipe_by_name_through_calibrate_leaves_the_model_quantizing(examples, batches) -> None:
    model = quantize_(_itpn_tiny(), QuantConfig(method="minmax", placement="matmul", bits="8/4/8", recipe="bias_correction"))
    assert calibrate(model, batches) == 2
    assert all(p.mode is QuantMode.QUANTIZE for _, p in quant_points(model))
    with pytest.raises(ConfigError, match=r"^recipe='bias_correction' needs placement='matmul' \(got 'seed'\)$"):
        QuantConfig(method="minmax", recipe="bias_correction")


# --------------------------------------------------------------------------- the backends


@pytest.fixture(scope="module")
def exported(examples, batches, tmp_path_factory) -> tuple[nn.Module, str, dict[str, Any]]:
    """A calibrated ``itpn_tiny``, the file the example's export backend wrote through the
    registry and the run service's suffix check, and the metadata it returned."""
    model = quantize_(_itpn_tiny(), QuantConfig(method="minmax", placement="seed"))
    calibrate(model, batches)
    path = str(tmp_path_factory.mktemp("torchscript") / "model.pt")
    exporter = check_export_output(path, "torchscript")()
    metadata = exporter.export(model, path, torch.zeros(2, 3, 32, 32), {"summary": {"model": "itpn_tiny"}, "calib_images": 8})
    return model, path, metadata


@TRACING
def test_the_backends_are_registered_and_run_back_the_calibrated_model(examples, exported) -> None:
    ns, (model, path, metadata) = examples["backend"], exported
    assert backends.EXPORT_BACKENDS["torchscript"] is ns["TorchScriptExport"]
    assert backends.INFERENCE_BACKENDS["torchscript"] is ns["TorchScriptBackend"]
    assert metadata == {"summary": {"model": "itpn_tiny"}, "calib_images": 8, "format": "torchscript", "input_size": [3, 32, 32]}
    backend = backends.inference_backend("torchscript")(path)
    images = _images(3, 3, 32, 32, seed=5)
    with torch.no_grad():
        assert torch.equal(backend.logits(images), model(images))
    assert backend.summary({"model": "other"}) == {"model": "itpn_tiny", "format": "torchscript"}


def test_the_run_service_checks_the_export_backends_suffix(examples, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"must end in \.pt$"):
        check_export_output(str(tmp_path / "model.onnx"), "torchscript")


@TRACING
def test_ptqmodule_evaluates_the_file_it_is_given(examples, exported, batches) -> None:
    model, path, _ = exported
    module = PTQModule(model_name="itpn_tiny", num_classes=10, backend=examples["backend"]["TorchScriptBackend"](path))
    assert module.model is None and module.backend == "torchscript"
    with torch.no_grad():
        assert torch.equal(module(batches[0]), model(batches[0]))
