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


# Scripted measurements for a small run (see ``scripted``). Per row, the calibration pairs come
# first, then the evaluation pairs, each as float, quantized, float, quantized, ...
CALIB_FLOAT_S, CALIB_QUANT_S = [1.0, 3.0, 2.0], [2.0, 9.0, 3.0]
EVAL_FLOAT_S, EVAL_QUANT_S = [2.0, 4.0, 8.0], [3.0, 4.0, 2.0]
FLOAT_PEAK = 4 << 20
CALIB_PEAKS = [6 << 20, 5 << 20, 7 << 20, 8 << 20]  # one per row


@pytest.fixture
def scripted(monkeypatch):
    """Replace the clock and the memory probe of bench_ptq with the numbers above.

    ``timed`` returns the next scripted duration (without calling the function: the
    warm-up calls of ``interleaved`` still run every function once), ``peak_bytes`` the
    float forward's peak first, then one calibration peak per row.
    """
    pairs = lambda f, q: [t for pair in zip(f, q) for t in pair]  # noqa: E731
    row_durations = pairs(CALIB_FLOAT_S, CALIB_QUANT_S) + pairs(EVAL_FLOAT_S, EVAL_QUANT_S)
    clock = iter(row_durations * len(CALIB_PEAKS))
    peaks = iter([FLOAT_PEAK, *CALIB_PEAKS])
    monkeypatch.setattr(bench_ptq, "timed", lambda fn, device: next(clock))
    monkeypatch.setattr(bench_ptq, "peak_bytes", lambda fn, device: next(peaks))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_small_run_writes_every_row_and_prints_the_table(scripted, tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    argv = ["--model", "itpn_tiny", "--batch-size", "2", "--calib-batch-size", "2", "--batches", "2"]
    argv += ["--repeats", "3", "--methods", "minmax", "omse", "--placement", "seed", "full", "--json", str(out)]
    bench_ptq.main(argv)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["placement"], r["method"]) for r in rows] == [
        ("seed", "minmax"),
        ("seed", "omse"),
        ("full", "minmax"),
        ("full", "omse"),
    ]
    for row, calib_peak in zip(rows, CALIB_PEAKS):
        assert (row["calib_float_s"], row["calib_quant_s"]) == (CALIB_FLOAT_S, CALIB_QUANT_S)
        assert (row["eval_float_s"], row["eval_quant_s"]) == (EVAL_FLOAT_S, EVAL_QUANT_S)
        # ratio: median over median; paired: median of the ratios of the pairs
        assert (row["calib_ratio"], row["calib_paired"]) == (3.0 / 2.0, 2.0)  # ratios 2, 3, 1.5
        assert (row["eval_ratio"], row["eval_paired"]) == (3.0 / 4.0, 1.0)  # ratios 1.5, 1, 0.25
        assert (row["mem_float_bytes"], row["mem_calib_bytes"]) == (FLOAT_PEAK, calib_peak)
        assert row["mem_ratio"] == calib_peak / FLOAT_PEAK
    assert [r["mem_ratio"] for r in rows] == [1.5, 1.25, 1.75, 2.0]
    assert result["targets"] == bench_ptq.TARGETS
    printed = capsys.readouterr().out
    # medians: eval 4 s float, 3 s quantized; calibration 2 s float, 3 s quantized; peaks in MiB
    assert printed.count("| seed | omse | seed | 4.000 | 3.000 | 0.75 | 2.000 | 3.000 | 1.50 | 4 | 5 | 1.25 |") == 2
    assert "itpn_tiny" in printed and result["machine"] in printed


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compile_adds_the_compiled_columns(monkeypatch, tmp_path, capsys) -> None:
    """``--compile``: the compiled forward (here the model itself: nothing is compiled) timed
    against the float one, the compile seconds, and the logits compared with eager's."""
    durations = iter([1.0, 2.0, 1.0, 2.0, 1.0, 2.0] + [4.0, 5.0, 4.0, 5.0, 4.0, 5.0])  # eval pairs, then compiled pairs
    monkeypatch.setattr(bench_ptq, "timed", lambda fn, device: next(durations))
    monkeypatch.setattr(bench_ptq, "compile_quantized", lambda model: model)
    out = tmp_path / "bench.json"
    argv = ["--model", "itpn_tiny", "--batch-size", "2", "--repeats", "3", "--methods", "minmax", "--placement", "seed"]
    bench_ptq.main(argv + ["--skip", "calib", "mem", "--compile", "--batches", "1", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["eval_compiled_float_s"], row["eval_compiled_s"], row["compiled_ratio"]) == ([4.0] * 3, [5.0] * 3, 1.25)
    assert (row["compiled_equal"], row["compiled_max_abs"]) == (True, 0.0) and row["compile_s"] >= 0
    printed = capsys.readouterr().out
    assert "| eval compiled s | compiled ratio | compile s | logits = eager |" in printed
    compile_s = f"{row['compile_s']:.0f}"  # the one real time: the first (uncompiled) call
    assert printed.count(f"| seed | minmax | seed | 1.000 | 2.000 | 2.00 | - | - | - | - | - | - | 5.000 | 1.25 | {compile_s} | yes |") == 2
