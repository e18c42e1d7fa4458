"""Specification of lit_ptq/results.py: the run label and what a config's overrides changed
(:func:`overrides_summary`, the ``mixed: ...`` of a run's summary line), on ``itpn_tiny``."""

from __future__ import annotations

import fnmatch
from typing import Any, Optional

import pytest

from lit_ptq.models import create_model
from lit_ptq.quant import QuantConfig, quant_points, quantize_
from lit_ptq.results import overrides_summary, run_label


def _quantized(bits: str = "4/4/4", overrides: Optional[dict[str, Any]] = None):
    model = create_model("itpn_tiny", num_classes=10)
    return quantize_(model, QuantConfig(method="minmax", placement="seed", bits=bits, overrides=overrides))


@pytest.fixture(scope="module")
def names() -> dict[str, str]:
    """Every quant point of the uniform 4/4/4 model, with its role."""
    return {name: point.role for name, point in quant_points(_quantized())}


def test_no_overrides_say_nothing():
    assert overrides_summary(_quantized()) == ""
    assert overrides_summary(create_model("itpn_tiny", num_classes=10)) == ""  # a float model


def test_points_are_counted_by_what_they_got(names):
    """Counted over the model's points, largest group first; a point two overrides change counts once, under both."""
    acts = sorted(n for n, role in names.items() if role == "act")
    overrides = {acts[0]: {"bits": 8}, acts[1]: {"bits": 8}, "blocks.0.*": {"observer": "mse"}, acts[2]: {"bits": 4}}
    in_block_0 = {n for n in names if fnmatch.fnmatchcase(n, "blocks.0.*")}
    at_8 = {acts[0], acts[1]}  # acts[2] at 4 bits in a 4-bit run: unchanged
    groups = {"at 8 bits": len(at_8 - in_block_0), "observer mse": len(in_block_0 - at_8), "at 8 bits, observer mse": len(at_8 & in_block_0)}
    assert groups["observer mse"] > 1 and sum(groups.values()) == len(at_8 | in_block_0)
    parts = [f"{n} point{'' if n == 1 else 's'} {what}" for what, n in sorted(groups.items(), key=lambda g: -g[1]) if n]
    assert overrides_summary(_quantized(overrides=overrides)) == "mixed: " + ", ".join(parts)


def test_the_sensitivity_config_reads_as_the_issue_says(names):
    acts = sorted(n for n, role in names.items() if role == "act")[:8]
    assert overrides_summary(_quantized(overrides={n: {"bits": 8} for n in acts})) == "mixed: 8 points at 8 bits"


def test_a_null_override_is_named_by_its_pattern(names):
    model = _quantized(overrides={"blocks.0.*": None, "*.fc2_output": {"bits": 8}})
    fc2 = sum(fnmatch.fnmatchcase(n, "*.fc2_output") for n in names)
    assert fc2 > 1 and overrides_summary(model) == f"mixed: {fc2} points at 8 bits, 'blocks.0.*' float"


def test_an_override_that_changes_nothing_says_so(names):
    assert overrides_summary(_quantized(overrides={"blocks.*": {"bits": 4}})) == "mixed: no point changed"


def test_run_label():
    summary = dict(model="itpn_tiny", method="omse", placement="seed", bits="4/4/4")
    assert run_label(summary) == "itpn_tiny omse seed 4/4/4"
    assert run_label(dict(summary, backend="onnxruntime")) == "itpn_tiny omse seed 4/4/4 onnxruntime"
