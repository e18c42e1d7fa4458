"""benchmarks/gpu_check.sh on a machine without a CUDA device: one line, status 0, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: the script would measure it")
def test_without_a_gpu_the_script_says_so_and_succeeds(tmp_path) -> None:
    results = tmp_path / "results"
    run = subprocess.run(
        ["bash", str(SCRIPT), str(results)], env={**os.environ, "PYTHON": sys.executable},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"gpu_check: no CUDA device (or no torch) for {sys.executable} here; nothing to measure"
    assert not results.exists()
