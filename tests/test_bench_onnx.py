"""benchmarks/bench_onnx.py: what each measurement runs and writes (no timing is asserted).

The parity and static runs use ``itpn_tiny`` on the small tree of real Fashion-MNIST images
(conftest.py); the speed run uses ``itpn_tiny`` with random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("onnxruntime")

from benchmarks import bench_onnx  # noqa: E402


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, fmnist_root, tiny_checkpoint) -> Path:
    config = {
        "seed_everything": 0,
        "model": {"model_name": "itpn_tiny", "checkpoint": str(tiny_checkpoint), "num_classes": 10},
        "data": {"root": str(fmnist_root), "batch_size": 10, "num_workers": 0, "calib_batch_size": 8, "calib_batches": 2},
        "trainer": {"accelerator": "cpu", "devices": 1},
    }
    path = tmp_path_factory.mktemp("bench_onnx") / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_compare_counts_label_agreement_and_the_largest_logit_difference() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    b = torch.tensor([[1.0, 0.5], [0.2, 1.0], [0.5, 1.0], [0.0, 3.0]])
    assert bench_onnx.compare(a, b) == dict(agreement=75.0, max_logit_diff=1.5)


@pytest.mark.slow  # a whole benchmark run; the suite's time budget
def test_parity_row_per_setting_with_both_top1_and_the_recipe_config(tmp_path, tiny_config, capsys) -> None:
    recipe = yaml.safe_load(tiny_config.read_text())
    recipe["model"].update(method="mse", placement="matmul", bits="6/6/6", recipe="repq")
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    out, md = tmp_path / "parity.json", tmp_path / "parity.md"
    bench_onnx.main(["parity", "--config", str(tiny_config), "--methods", "minmax", "--placements", "seed",
                     "--no-fqvit", "--recipe-configs", str(recipe_path), "--json", str(out), "--markdown", str(md)])  # fmt: skip
    rows = json.loads(out.read_text())
    assert [(r["method"], r["placement"], r["bits"], r["recipe"]) for r in rows] == [
        ("minmax", "seed", "8/8/8", None),
        ("mse", "matmul", "6/6/6", "repq"),
    ]
    assert [r["log_points"] for r in rows] == ["raise", "float_ops"]  # log-sqrt2 softmax as float operators
    for r in rows:
        assert r["num_images"] == 59
        assert abs(r["acc1_onnxruntime"] - r["acc1_pytorch"]) <= 100 * 2 / 59  # at most two images move
        assert r["agreement"] >= 95.0 and 0 <= r["max_logit_diff"] < 1.0
    table = md.read_text()
    assert "| minmax | seed | 8/8/8 |" in table and "| mse | matmul + repq | 6/6/6 |" in table
    assert table in capsys.readouterr().out


@pytest.mark.slow  # a whole benchmark run; the suite's time budget
def test_static_row_per_calibration_method(tmp_path, tiny_config) -> None:
    out = tmp_path / "static.json"
    bench_onnx.main(["static", "--config", str(tiny_config), "--methods", "MinMax", "--json", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["calibrate_method"] == "MinMax" and row["calib_images"] == 16 and row["num_images"] == 59
    assert row["agreement"] >= 90.0 and abs(row["acc1"] - row["float_acc1"]) <= 100 * 5 / 59


@pytest.mark.slow  # a whole benchmark run; the suite's time budget
def test_speed_times_every_runtime_at_every_batch_size(tmp_path, capsys) -> None:
    out = tmp_path / "speed.json"
    bench_onnx.main(["speed", "--models", "itpn_tiny", "--placements", "matmul", "--batch-sizes", "2", "1",
                     "--calib-batches", "1", "--calib-batch-size", "2", "--repeats", "1", "--threads", "1",
                     "--json", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    runtimes = ["PyTorch float", "onnxruntime float", "lit_ptq matmul", "quantize_static MinMax"]
    assert [(r["batch_size"], r["runtime"]) for r in result["rows"]] == [(b, r) for b in (2, 1) for r in runtimes]
    by_name = {r["runtime"]: r for r in result["rows"] if r["batch_size"] == 2}
    assert by_name["onnxruntime float"]["speedup_vs_ort_float"] == 1.0
    assert by_name["PyTorch float"]["file_mb"] is None
    assert by_name["lit_ptq matmul"]["file_mb"] < by_name["onnxruntime float"]["file_mb"]
    assert by_name["lit_ptq matmul"]["weights"] == "default"
    assert by_name["lit_ptq matmul"]["integer_linears"].startswith("31/31 ")  # every quantized linear an integer kernel
    assert by_name["onnxruntime float"]["integer_linears"] == "–"
    assert "| itpn_tiny | default | 1 | lit_ptq matmul |" in capsys.readouterr().out
