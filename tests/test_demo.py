"""The committed demo end to end through main.py: the figures README.md states, and repeatability.

The demo evaluates the trained ``itpn_tiny`` checkpoint on all 10,000 Fashion-MNIST test images,
in float (configs/demo_fp32.yaml) and with 8/8/8 MinMax at the seed placement (configs/demo.yaml).
README.md states both top-1 figures; these tests fail when a run disagrees with them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import main as main_script

REPO = Path(__file__).resolve().parents[1]
METRICS = ("acc1", "acc5", "loss", "num_images")
TEST_IMAGES = 10_000


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One thread: the demo's metrics are identical with one and two, and on an oversubscribed
    machine OpenMP threads spin-waiting for each other slow a CPU run down ten times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CROSS_CPU_POINTS = 0.05
"""How far (in top-1 points: 5 of 10,000 images) a quantized demo run on another CPU may land
from the figure README.md documents."""


def documented_top1(label: str) -> float:
    """The top-1 figure README.md gives for ``label``, in a line ``- <label> top-1 ...: **89.12 %**``."""
    text = (REPO / "README.md").read_text()
    found = re.findall(rf"^- {re.escape(label)} top-1[^*\n]*\*\*(\d+\.\d\d) %\*\*", text, flags=re.MULTILINE)
    assert len(found) == 1, f"README.md should state the {label} top-1 once as '- {label} top-1 ...: **NN.NN %**'"
    return float(found[0])


def run_demo(config: str, results: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``python main.py validate --config <config> --results_path <results>`` from the repository root."""
    monkeypatch.chdir(REPO)
    argv = ["validate", "--config", config, "--results_path", str(results),
            "--trainer.logger=false", "--trainer.enable_progress_bar=false"]  # fmt: skip
    assert main_script.main(argv) == 0
    return json.loads(results.read_text())


def test_float_top1_is_the_documented_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = run_demo("configs/demo_fp32.yaml", tmp_path / "fp32.json", monkeypatch)
    assert record["method"] == "fp32" and record["num_images"] == TEST_IMAGES
    assert round(record["acc1"], 2) == documented_top1("Float (fp32)")


def test_quantized_top1_is_documented_and_within_half_a_point_of_float(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = run_demo("configs/demo.yaml", tmp_path / "q.json", monkeypatch)
    assert (record["method"], record["placement"], record["bits"]) == ("minmax", "seed", "8/8/8")
    assert record["num_images"] == TEST_IMAGES and record["calib_images"] == 1000
    # README's figure was measured on an AMD EPYC; another CPU's matrix kernels change the last
    # bits of some activations, and the few that sit on a rounding boundary move one level:
    # on an Intel Xeon (AVX-512, AMX) one of the 10,000 images flips (90.09). Five may.
    assert abs(record["acc1"] - documented_top1("8/8/8 MinMax (seed placement)")) <= CROSS_CPU_POINTS
    assert abs(record["acc1"] - documented_top1("Float (fp32)")) <= 0.5


@pytest.mark.slow
def test_two_runs_with_the_same_seed_give_identical_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = run_demo("configs/demo.yaml", tmp_path / "a.json", monkeypatch)
    second = run_demo("configs/demo.yaml", tmp_path / "b.json", monkeypatch)
    assert {k: first[k] for k in METRICS} == {k: second[k] for k in METRICS}


# The low-bit targets, in top-1 points below the float model's (the margins of the
# benchmark placement's recipes; README.md states the measured figures).
LOWBIT_MARGINS = {"demo_w6a6.yaml": 0.3, "demo_w4a4.yaml": 2.0, "demo_w4a4_recon.yaml": 1.0}


RECON_POINTS = 0.15
"""How far a reconstruction run may land from README's figure: 500 Adam steps per block
amplify the last-bit differences of another thread count or CPU (README's 89.75 was measured
with two threads; these tests run one, which gave 89.68)."""


GPTQ_POINTS = 0.1
"""How far the W4A4 ridge + GPTQ run may land from README's figure on another CPU: each column's
rounding decision feeds the next columns' error compensation, so the last-bit differences of
another CPU's kernels move more weights to the neighbouring level at 4 bits than at 6 (README's
89.78 was measured on an Intel Xeon with AMX; an AMD EPYC (Zen 4) gives 89.71, seven images)."""


def check_lowbit(
    config: str, label: str, bits: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, points: float = CROSS_CPU_POINTS
) -> None:
    record = run_demo(f"configs/{config}", tmp_path / "q.json", monkeypatch)
    assert (record["placement"], record["bits"]) == ("matmul", bits)
    assert record["num_images"] == TEST_IMAGES and record["calib_images"] == 1000
    assert abs(record["acc1"] - documented_top1(label)) <= points
    assert record["acc1"] >= documented_top1("Float (fp32)") - LOWBIT_MARGINS[config]


@pytest.mark.slow  # 10,000 images twice; the W4A4 run keeps the recipes' figures in the fast suite
def test_w6a6_recipe_is_documented_and_within_its_margin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_lowbit("demo_w6a6.yaml", "W6A6 repq_gptq (matmul placement)", "6/6/6", tmp_path, monkeypatch)


def test_w4a4_recipe_is_documented_and_within_its_margin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_lowbit("demo_w4a4.yaml", "W4A4 repq_gptq (matmul placement)", "4/4/4", tmp_path, monkeypatch, GPTQ_POINTS)


@pytest.mark.slow
def test_w4a4_reconstruction_is_documented_and_within_its_margin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_lowbit("demo_w4a4_recon.yaml", "W4A4 recon (matmul placement)", "4/4/4", tmp_path, monkeypatch, RECON_POINTS)
