"""benchmarks/bench_ptq.py: what it measures and writes (no timing is asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_ptq


def test_peak_bytes_counts_the_tensors_a_function_allocates() -> None:
    mib = 1 << 20

    def two_at_once() -> None:
        a = torch.empty(mib // 4)  # 1 MiB of float32
        b = torch.empty(mib // 2)  # 2 MiB while the first is still alive
        del a, b

    def one_after_the_other() -> None:
        for _ in range(3):
            torch.empty(mib // 4)

    assert bench_ptq.peak_bytes(two_at_once, torch.device("cpu")) == 3 * mib
    assert bench_ptq.peak_bytes(one_after_the_other, torch.device("cpu")) == mib


def test_interleaved_alternates_and_warms_up_each_once() -> None:
    calls: list[str] = []
    ta, tb = bench_ptq.interleaved(lambda: calls.append("a"), lambda: calls.append("b"), 3, torch.device("cpu"))
    assert calls == ["a", "b"] * 4
    assert len(ta) == len(tb) == 3 and all(t >= 0 for t in ta + tb)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_small_run_writes_every_row_and_prints_the_table(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    argv = ["--model", "itpn_tiny", "--batch-size", "2", "--calib-batch-size", "2", "--batches", "2"]
    argv += ["--repeats", "1", "--methods", "minmax", "omse", "--placement", "seed", "full", "--json", str(out)]
    bench_ptq.main(argv)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["placement"], r["method"]) for r in rows] == [
        ("seed", "minmax"),
        ("seed", "omse"),
        ("full", "minmax"),
        ("full", "omse"),
    ]
    for row in rows:
        assert row["eval_ratio"] == pytest.approx(row["eval_quant_s"][0] / row["eval_float_s"][0])
        assert row["calib_ratio"] == pytest.approx(row["calib_quant_s"][0] / row["calib_float_s"][0])
        assert row["mem_calib_bytes"] > 0 and row["mem_float_bytes"] > 0
        assert row["mem_ratio"] == pytest.approx(row["mem_calib_bytes"] / row["mem_float_bytes"])
    assert result["targets"] == bench_ptq.TARGETS
    printed = capsys.readouterr().out
    assert printed.count("| seed | omse |") == 2  # as it goes, then in the final table
    assert "itpn_tiny" in printed and result["machine"] in printed
