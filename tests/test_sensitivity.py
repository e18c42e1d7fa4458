"""Specification of lit_ptq/quant/sensitivity.py (the per-point sensitivity arithmetic, the activation
histograms and the mixed-precision overrides) and lit_ptq/sensitivity.py (the YAML and table), on the demo's ``itpn_tiny`` (conftest's
``tiny_checkpoint``) and random images."""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import replace

import pytest
import torch
import yaml

from lit_ptq.errors import ConfigError
from lit_ptq.models import create_model
from lit_ptq.quant import QuantConfig, QuantMode, TensorQuantizer, WeightQuantizer, calibrate, quant_points, quantize_
from lit_ptq.quant.sensitivity import (
    PointSensitivity,
    activation_histograms,
    keep_count,
    measure_sensitivity,
    mixed_precision_overrides,
    output_divergence,
)
from lit_ptq.sensitivity import SensitivityResult, overrides_yaml, sensitivity_lines, sensitivity_markdown

SABOTAGED = "blocks.2.mlp.fc2_output"


def _tiny(checkpoint, bits: str = "8/8/8", overrides=None) -> torch.nn.Module:
    model = create_model("itpn_tiny", num_classes=10, checkpoint=str(checkpoint)).eval()
    return quantize_(model, QuantConfig(method="minmax", placement="seed", bits=bits, overrides=overrides))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def clipped_model(images, tiny_checkpoint) -> torch.nn.Module:
    """A calibrated model whose point SABOTAGED has a grid 50 times too narrow (it clips hard)."""
    model = _tiny(tiny_checkpoint)
    calibrate(model, [images[:6], images[6:]])
    point = dict(quant_points(model))[SABOTAGED]
    point.scale /= 50
    return model


class TestOutputDivergence:
    def test_identical_logits_agree_fully_with_no_divergence(self):
        logits = torch.randn(7, 10)
        assert output_divergence(logits, logits.clone()) == (100.0, 0.0)

    def test_values(self):
        reference = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        logits = torch.tensor([[0.0, 2.0], [0.0, 1.0]])  # the first image changes class
        agreement, kl = output_divergence(reference, logits)
        p = torch.tensor([2.0, 0.0], dtype=torch.float64).softmax(0)
        expected = float((p * (p.log() - p.flip(0).log())).sum()) / 2
        assert agreement == 50.0 and kl == pytest.approx(expected, rel=1e-12)

    def test_kl_is_float_to_quantized_on_an_asymmetric_pair(self):
        """``KL(p_f || p_q) = sum_c p_f (log p_f - log p_q)`` per image, averaged: here the two
        directions differ by more than 0.1 nats (the quantized outputs are flatter)."""
        reference = torch.tensor([[4.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.0, 3.0]])
        logits = torch.tensor([[0.2, 0.1, 0.0, 0.0], [0.5, 0.0, 2.0, 1.0]])  # flatter; image 1 changes class (3 -> 2)

        def softmax(row: list[float]) -> list[float]:
            e = [math.exp(v) for v in row]
            return [v / sum(e) for v in e]

        def kl(a: list[float], b: list[float]) -> float:
            return sum(p * (math.log(p) - math.log(q)) for p, q in zip(softmax(a), softmax(b)))

        rows = list(zip(reference.tolist(), logits.tolist()))
        forward = sum(kl(f, q) for f, q in rows) / len(rows)
        backward = sum(kl(q, f) for f, q in rows) / len(rows)
        assert abs(forward - backward) > 0.1
        agreement, divergence = output_divergence(reference, logits)
        assert agreement == 50.0
        assert divergence == pytest.approx(forward, rel=1e-12)

    def test_shapes_must_match(self):
        with pytest.raises(ValueError):
            output_divergence(torch.zeros(3, 10), torch.zeros(2, 10))


class TestMeasureSensitivity:
    def test_the_point_that_clips_hard_is_ranked_worst(self, clipped_model, images):
        points = measure_sensitivity(clipped_model, images, batch_size=5)
        assert len(points) == len(list(quant_points(clipped_model)))
        assert points[0].name == SABOTAGED
        assert [p.kl for p in points] == sorted((p.kl for p in points), reverse=True)
        assert all(p.kl >= 0 and 0 <= p.agreement <= 100 for p in points)
        assert points[0].kl > 10 * points[1].kl

    def test_one_point_alone_is_what_is_measured(self, clipped_model, images):
        """The worst point's numbers are those of the model with only that point quantizing."""
        worst = measure_sensitivity(clipped_model, images, batch_size=12)[0]
        modes = {n: p.mode for n, p in quant_points(clipped_model)}
        try:
            for name, point in quant_points(clipped_model):
                point.mode = QuantMode.QUANTIZE if name == worst.name else QuantMode.FLOAT
            alone = clipped_model(images)
            for _, point in quant_points(clipped_model):
                point.mode = QuantMode.FLOAT
            reference = clipped_model(images)
        finally:
            for name, point in quant_points(clipped_model):
                point.mode = modes[name]
        assert output_divergence(reference, alone) == (worst.agreement, worst.kl)

    def test_modes_are_restored_and_runs_repeat_exactly(self, clipped_model, images):
        before = {n: p.mode for n, p in quant_points(clipped_model)}
        a = measure_sensitivity(clipped_model, images[:6], batch_size=6)
        b = measure_sensitivity(clipped_model, images[:6], batch_size=6)
        assert {n: p.mode for n, p in quant_points(clipped_model)} == before
        assert [(p.name, p.kl, p.agreement) for p in a] == [(p.name, p.kl, p.agreement) for p in b]
        # another batch size changes only the last bits of the logits
        c = measure_sensitivity(clipped_model, images[:6], batch_size=4)
        assert c[0].name == a[0].name and c[0].kl == pytest.approx(a[0].kl, rel=1e-4)

    def test_the_report_fills_sqnr_and_clipping(self, clipped_model, images):
        from lit_ptq.quant import quant_report

        report = quant_report(clipped_model, images[:6])
        points = measure_sensitivity(clipped_model, images[:4], batch_size=4, report=report)
        own = {r.name: r for r in report}
        assert points[0].sqnr_db == own[points[0].name].sqnr_db and points[0].clipped == own[points[0].name].clipped
        assert own[SABOTAGED].clipped > 0.3


class TestHistograms:
    def test_histograms_count_every_value_and_span_the_grid(self, clipped_model, images):
        names = [SABOTAGED, "blocks.4.attn.qkv.weight_quantizer", "no.such.point"]
        hists = activation_histograms(clipped_model, images[:4], names)
        assert [h.name for h in hists] == names[:2]
        points = dict(quant_points(clipped_model))
        for h in hists:
            assert sum(h.counts) == h.numel and len(h.edges) == len(h.counts) + 1
            assert h.edges[0] <= min(h.min_val, h.grid[0]) and h.edges[-1] >= max(h.max_val, h.grid[1]) - 1e-6
            assert h.grid == points[h.name].grid_range()
        assert hists[0].clipped > 0.3
        assert all(p.mode is QuantMode.QUANTIZE for _, p in quant_points(clipped_model))

    def test_histogram_summary_is_that_of_the_float_input_of_the_point(self, clipped_model, images):
        """Count, sum, sum of squares, extremes and the share saturated (more than half a step
        outside the grid) of the values the point sees in the float model."""
        point = dict(quant_points(clipped_model))[SABOTAGED]
        seen = []
        handle = point.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().double().flatten()))
        modes = {n: p.mode for n, p in quant_points(clipped_model)}
        try:
            for _, p in quant_points(clipped_model):
                p.mode = QuantMode.FLOAT
            with torch.no_grad():
                clipped_model(images[:4])
        finally:
            handle.remove()
            for n, p in quant_points(clipped_model):
                p.mode = modes[n]
        (x,) = seen
        (h,) = activation_histograms(clipped_model, images[:4], [SABOTAGED])
        s, zp, qmin, qmax = point.scale.double(), point.zero_point.double(), point.spec.qmin, point.spec.qmax
        outside = (x < (qmin - 0.5 - zp) * s) | (x > (qmax + 0.5 - zp) * s)
        assert (h.numel, h.min_val, h.max_val) == (x.numel(), x.min().item(), x.max().item())
        assert h.total == pytest.approx(x.sum().item(), rel=1e-9) and h.total_squares == pytest.approx(x.pow(2).sum().item(), rel=1e-9)
        assert h.clipped == outside.sum().item() / x.numel() and 0.3 < h.clipped < 1

    def test_grid_range_is_the_lowest_and_highest_level(self, clipped_model):
        point = dict(quant_points(clipped_model))[SABOTAGED]
        assert isinstance(point, TensorQuantizer)
        lo, hi = point.grid_range()
        levels = point.fake_quant(torch.linspace(-1e4, 1e4, 10001))
        assert levels.min().item() == pytest.approx(lo) and levels.max().item() == pytest.approx(hi)


def _points(*specs: tuple[str, int]) -> list[PointSensitivity]:
    return [PointSensitivity(name, "act", bits, kl=1.0 / (i + 1), agreement=100.0 - i) for i, (name, bits) in enumerate(specs)]


class TestMixedPrecision:
    @pytest.mark.parametrize(
        "keep, candidates, expected",
        [(0.1, 78, 8), (0.1, 10, 1), (0.1, 12, 2), (1.0, 5, 5), (3, 78, 3), (0, 78, 0), (100, 7, 7), (0.5, 0, 0)],
    )
    def test_keep_count(self, keep, candidates, expected):
        assert keep_count(keep, candidates) == expected

    @pytest.mark.parametrize("keep", [-1, 1.5, 0.0, True, "3"])
    def test_keep_count_refuses(self, keep):
        with pytest.raises(ConfigError, match="sensitivity.keep"):
            keep_count(keep, 10)

    def test_the_worst_points_below_keep_bits_are_kept_after_the_configs_overrides(self):
        config = QuantConfig(bits="4/4/4", overrides={"head.*": None, "blocks.0.*": {"bits": 6}})
        points = _points(("a.x", 8), ("b.y", 4), ("c[1].z", 4), ("d.w", 4))
        overrides, kept = mixed_precision_overrides(points, config, keep=2, keep_bits=8)
        assert kept == ["b.y", "c[1].z"]  # a.x is already at 8 bits
        assert list(overrides) == ["head.*", "blocks.0.*", "b.y", "c[[]1].z"]
        assert overrides["head.*"] is None and overrides["blocks.0.*"] == {"bits": 6}
        assert fnmatch.fnmatchcase("c[1].z", "c[[]1].z") and not fnmatch.fnmatchcase("c1.z", "c[[]1].z")
        with pytest.raises(ConfigError, match="keep_bits"):
            mixed_precision_overrides(points, config, keep=1, keep_bits=17)

    def test_a_kept_point_the_config_names_moves_after_its_wildcards_keeping_its_settings(self):
        config = QuantConfig(bits="4/4/4", overrides={"b.y": {"observer": "mse"}, "*.y": {"bits": 4}})
        overrides, kept = mixed_precision_overrides(_points(("b.y", 4)), config, keep=1, keep_bits=8)
        assert kept == ["b.y"]
        assert list(overrides) == ["*.y", "b.y"]  # later entries win: the kept width is not undone
        assert overrides["b.y"] == {"observer": "mse", "bits": 8}

    def test_the_yaml_round_trips_through_quant_config(self, clipped_model, images, tiny_checkpoint):
        # the ranking of the 8-bit model, as if measured at 4 bits
        ranked = [replace(p, bits=4) for p in measure_sensitivity(clipped_model, images[:4], batch_size=4)]
        config = QuantConfig(method="minmax", bits="4/4/4")
        overrides, kept = mixed_precision_overrides(ranked, config, keep=0.1, keep_bits=8)
        assert len(kept) == math.ceil(0.1 * len(ranked))
        text = overrides_yaml(overrides, ["a comment"])
        assert text.startswith("# a comment\nmodel:\n  overrides:\n")
        loaded = yaml.safe_load(text)["model"]["overrides"]
        assert loaded == {name: {"bits": 8} for name in kept}
        model = _tiny(tiny_checkpoint, "4/4/4", overrides=loaded)
        bits = {name: point.bits for name, point in quant_points(model)}
        assert set(bits) == {p.name for p in ranked}
        assert {n for n, b in bits.items() if b == 8} == set(kept)
        assert all(b == 4 for n, b in bits.items() if n not in kept)
        assert any(isinstance(p, WeightQuantizer) for _, p in quant_points(model))

    def test_markdown_lists_the_worst_first(self):
        text = sensitivity_markdown(_points(("a.x", 4), ("b.y", 4), ("c.z", 4)), top=2)
        lines = text.splitlines()
        assert lines[0].startswith("| rank | quant point | role | bits | KL")
        assert len(lines) == 4 and lines[2].startswith("| 1 | a.x |") and lines[3].startswith("| 2 | b.y |")


class _Bar:
    """A progress bar that records what it is told."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.closed = total, 0, False

    def update(self, n: int) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True


def test_the_progress_bar_counts_the_points_and_changes_nothing(clipped_model, images):
    bars: list[_Bar] = []
    with_bar = measure_sensitivity(clipped_model, images[:6], batch_size=6, progress=lambda total: bars.append(_Bar(total)) or bars[-1])
    without = measure_sensitivity(clipped_model, images[:6], batch_size=6)
    points = len(list(quant_points(clipped_model)))
    assert [(b.total, b.n, b.closed) for b in bars] == [(points, points, True)]
    assert [(p.name, p.kl, p.agreement) for p in with_bar] == [(p.name, p.kl, p.agreement) for p in without]


def test_the_printed_lines_are_an_aligned_table_and_the_yaml_path():
    points = [replace(p, kl=kl, agreement=agreement) for p, kl, agreement in zip(
        _points(*((f"blocks.{i}.mlp.act_output", 4) for i in range(6))), (0.00893, 0.0005, 2e-5, 1e-5, 1e-6, 0.0), (98.4375, 100, 100, 100, 100, 100)
    )]  # fmt: skip
    result = SensitivityResult(256, 9.58, points, kept=["blocks.0.mlp.act_output"], output="/tmp/mixed.yaml")
    assert sensitivity_lines(result) == [
        "sensitivity of 6 quant points on 256 images (9.6 s); the 5 worst:",
        "  quant point              KL (nats)  top-1 changed %",
        "  blocks.0.mlp.act_output    0.00893             1.56",
        "  blocks.1.mlp.act_output     0.0005             0.00",
        "  blocks.2.mlp.act_output      2e-05             0.00",
        "  blocks.3.mlp.act_output      1e-05             0.00",
        "  blocks.4.mlp.act_output      1e-06             0.00",
        "mixed-precision config (1 point at 8 bits) written to /tmp/mixed.yaml; pass it back with --config /tmp/mixed.yaml",
    ]
    unwritten = sensitivity_lines(replace(result, output=None, kept=[], keep_bits=6), worst=2)
    assert len(unwritten) == 5 and unwritten[-1] == "mixed-precision config: 0 points at 6 bits; write it with --sensitivity.output FILE.yaml"


def test_a_sensitivity_run_shows_a_bar_then_the_worst_points_and_the_yaml(fmnist_root, tiny_checkpoint, make_tiny_config, tmp_path):
    """``main.py validate --sensitivity.enabled true`` at 4/4/4: a bar over the quant points, the
    five worst of the results JSON's ranking, the YAML's path; the run with that YAML says it is mixed."""
    import contextlib
    import io

    import main as main_script

    config = make_tiny_config(fmnist_root, tiny_checkpoint, 16, 2, logger=False)
    config["model"]["bits"] = "4/4/4"
    config["trainer"]["enable_progress_bar"] = True
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run = ["validate", "--config", str(tmp_path / "run.yaml"), "--results_path", str(tmp_path / "r.json")]

    def main(*extra: str) -> str:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert main_script.main([*run, *extra]) == 0
        return stdout.getvalue()

    out = main("--sensitivity.enabled", "true", "--sensitivity.images", "8", "--sensitivity.keep", "3",
               "--sensitivity.output", str(tmp_path / "mixed.yaml"))  # fmt: skip
    sensitivity = json.loads((tmp_path / "r.json").read_text())["sensitivity"]
    points = len(sensitivity["points"])
    assert re.search(rf"\rSensitivity: 100%\|\S{{10}}\| {points}/{points} ", out)  # tqdm draws '#' into a StringIO
    lines = out.rstrip("\n").splitlines()
    assert lines[-9].startswith("itpn_tiny minmax seed 4/4/4: acc1 ")
    assert lines[-8].startswith(f"sensitivity of {points} quant points on 8 images (")
    assert lines[-7].split() == ["quant", "point", "KL", "(nats)", "top-1", "changed", "%"]
    rows = lines[-6:-1]
    assert [line.split() for line in rows] == [
        [p["name"], f"{p['kl']:.3g}", f"{p['top1_drop']:.2f}"] for p in sensitivity["points"][:5]
    ]
    assert len({len(line) for line in lines[-7:-1]}) == 1  # aligned
    assert lines[-1] == f"mixed-precision config (3 points at 8 bits) written to {tmp_path / 'mixed.yaml'}; " \
                        f"pass it back with --config {tmp_path / 'mixed.yaml'}"  # fmt: skip
    mixed = main("--config", str(tmp_path / "mixed.yaml"), "--trainer.enable_progress_bar", "false")
    assert mixed.strip().splitlines()[-1].startswith("itpn_tiny minmax seed 4/4/4 mixed: 3 points at 8 bits: acc1 ")
