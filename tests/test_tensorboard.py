"""Specification of lit_ptq/tensorboard.py and the ``--sensitivity.*`` options of the CLI: run
names, typed hparams and the experiment config in the event files, the sensitivity chart,
tables and histograms, the results JSON, and a validate run of the mixed-precision config the
sensitivity run writes. Runs use ``itpn_tiny`` on conftest's small Fashion-MNIST tree."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

import main as main_script
from lit_ptq.cli import cli_main
from lit_ptq.quant import QuantConfig
from lit_ptq.figures import DPI, OVERRIDDEN_COLOR, ROW, WIDTH, histogram_figure, sensitivity_figure, sqnr_figure
from lit_ptq.quant import QuantizerStats
from lit_ptq.sensitivity import ActivationHistogram, PointSensitivity, SensitivityResult
from lit_ptq.tensorboard import (
    HPARAM_COLUMNS,
    VISIBLE,
    histogram_tag,
    log_sensitivity,
    name_logger,
    overridden_points,
    run_hparams,
    run_name,
)

SENSITIVITY_IMAGES = 16
KEEP = 3
HISTOGRAMS = 6  # sensitivity.histograms' default


@pytest.fixture(scope="module")
def config(tmp_path_factory, fmnist_root, tiny_checkpoint) -> Path:
    """itpn_tiny, MinMax at 4/4/4 on the seed placement, 2 calibration batches of 16 images."""
    config = {
        "seed_everything": 0,
        "model": {"model_name": "itpn_tiny", "checkpoint": str(tiny_checkpoint), "num_classes": 10,
                  "method": "minmax", "placement": "seed", "bits": "4/4/4"},
        "data": {"root": str(fmnist_root), "batch_size": 10, "num_workers": 0, "calib_batch_size": 16, "calib_batches": 2},
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "pytorch_lightning.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": "tb_logs", "name": "tiny", "default_hp_metric": False}}},
    }  # fmt: skip
    path = tmp_path_factory.mktemp("config") / "tiny_w4.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(config: Path, out: Path, *extra: str) -> dict[str, Any]:
    """An in-process validate run logging under ``out/tb``; its record and stdout."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["validate", "--config", str(config), "--results_path", str(out / "results.json"),
            "--trainer.logger.init_args.save_dir", str(out / "tb"), *extra]  # fmt: skip
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        cli_main(args)
    return dict(record=json.loads((out / "results.json").read_text()), out=out, stdout=stdout.getvalue())


def _events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return acc


def _hparams(acc: EventAccumulator) -> tuple[dict[str, Any], api_pb2.Experiment]:
    """The session's hparams (``{name: (kind, value)}``) and the experiment config of a run."""
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    values = {k: (v.WhichOneof("kind"), getattr(v, v.WhichOneof("kind"))) for k, v in start.hparams.items()}
    return values, experiment


def _text(acc: EventAccumulator, tag: str) -> str:
    return acc.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


@pytest.fixture(scope="module")
def sensitivity_run(config, tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("sensitivity")
    return _run(
        config, out,
        "--sensitivity.enabled", "true", "--sensitivity.images", str(SENSITIVITY_IMAGES), "--sensitivity.batch_size", "8",
        "--sensitivity.keep", str(KEEP), "--sensitivity.output", str(out / "mixed.yaml"), "--sensitivity.top", "10",
        "--calibration.save_state", str(out / "state.qstate"),
    )  # fmt: skip


class TestNamesAndHparams:
    @pytest.mark.parametrize(
        "summary, name",
        [
            (dict(model="itpn_tiny", method="fp32", placement=None, bits="32/32/32"), "itpn_tiny/fp32"),
            (dict(model="itpn_tiny", method="omse", placement="seed", bits="4/4/4", ptf=False, lis=False), "itpn_tiny/omse-seed-w4a4a4"),
            (dict(model="deit_tiny_patch16_224", method="minmax", placement="full", bits="8/8/4", ptf=True, lis=True),
             "deit_tiny_patch16_224/minmax-full-w8a8a4-ptf-lis"),
            (dict(model="m", method="mse", placement="matmul", bits="4/4/4", recipe="repq_gptq", softmax="log_sqrt2"),
             "m/mse-matmul-w4a4a4-repq_gptq"),
            (dict(model="m", method="mse", placement="matmul", bits="4/4/4", recipe="repq", softmax="uniform"), "m/mse-matmul-w4a4a4-repq-uniform"),
            (dict(model="m", method="minmax", placement="seed", bits="8/8/8", arithmetic="fused", overrides={"a": None, "b": {"bits": 8}}),
             "m/minmax-seed-w8a8a8-fused-mixed2"),
            (dict(model="m", method="minmax", placement="seed", bits="8/8/8", backend="onnxruntime"), "m/minmax-seed-w8a8a8-onnx"),
        ],
    )  # fmt: skip
    def test_run_name_says_the_settings(self, summary, name):
        assert run_name(summary) == name

    def test_every_run_has_every_column_with_its_type(self):
        float_run = run_hparams(dict(model="itpn_tiny", method="fp32", placement=None, bits="32/32/32", calib_images=0))
        quantized = run_hparams(QuantConfig(method="omse", bits="4/4/4").describe() | dict(model="itpn_tiny", calib_images=32))
        for hparams in (float_run, quantized):
            assert list(hparams) == [c.name for c in HPARAM_COLUMNS]
            for column in HPARAM_COLUMNS:
                assert type(hparams[column.name]) is column.kind, column.name
        assert float_run["ptf"] is False and float_run["placement"] == "none" and float_run["arithmetic"] == "none"
        assert 1 <= len(VISIBLE) <= 5  # the HPARAMS tab shows five columns by default

    def test_sensitivity_run_logs_typed_hparams_under_its_name(self, sensitivity_run):
        runs = sorted(p.relative_to(sensitivity_run["out"] / "tb") for p in (sensitivity_run["out"] / "tb").glob("*/*/version_*"))
        assert runs == [Path("itpn_tiny/minmax-seed-w4a4a4/version_0")]
        run_dir = sensitivity_run["out"] / "tb" / runs[0]
        values, experiment = _hparams(_events(run_dir))
        assert values["ptf"] == ("bool_value", False) and values["lis"] == ("bool_value", False)
        assert values["method"] == ("string_value", "minmax") and values["bits"] == ("string_value", "4/4/4")
        assert values["calib_images"] == ("number_value", 32.0) and values["overrides"] == ("string_value", "none")
        assert set(values) == {c.name for c in HPARAM_COLUMNS}
        shown = {info.name for info in experiment.hparam_infos if info.differs}
        assert shown == set(VISIBLE) and {"method", "placement", "bits", "ptf"} <= shown
        types = {info.name: info.type for info in experiment.hparam_infos}
        assert types["ptf"] == api_pb2.DATA_TYPE_BOOL and types["calib_images"] == api_pb2.DATA_TYPE_FLOAT64
        assert [m.name.tag for m in experiment.metric_infos] == ["hp/acc1", "hp/acc5", "hp/loss", "hp/skipped_files"]
        saved = yaml.safe_load((run_dir / "hparams.yaml").read_text())
        assert saved["ptf"] is False and saved["calib_images"] == 32 and saved["bits"] == "4/4/4"

    def test_float_run_logs_every_hparam(self, config, tmp_path):
        run = _run(config, tmp_path, "--model.method", "null")
        run_dir = tmp_path / "tb" / "itpn_tiny" / "fp32" / "version_0"
        values, _ = _hparams(_events(run_dir))
        assert values["ptf"] == ("bool_value", False) and values["placement"] == ("string_value", "none")
        assert values["bits"] == ("string_value", "32/32/32") and values["method"] == ("string_value", "fp32")
        saved = yaml.safe_load((run_dir / "hparams.yaml").read_text())
        assert saved["bits"] == "32/32/32" and saved["placement"] == "none"
        assert "sensitivity" not in run["record"]


class TestSensitivityRun:
    def test_event_files_hold_the_charts_tables_and_histograms(self, sensitivity_run):
        acc = _events(sensitivity_run["out"] / "tb" / "itpn_tiny" / "minmax-seed-w4a4a4" / "version_0")
        tags = acc.Tags()
        worst = sensitivity_run["record"]["sensitivity"]["points"]
        histograms = [histogram_tag(rank, p["name"], HISTOGRAMS) for rank, p in enumerate(worst[:HISTOGRAMS], 1)]
        charts = ["sensitivity/chart", "sensitivity/top1_changed", "sqnr_by_layer/act", "sqnr_by_layer/attn", "sqnr_by_layer/weight"]
        assert sorted(tags["images"]) == sorted(charts + histograms)
        assert sorted(histograms) == histograms  # TensorBoard's name order is the ranking
        table = _text(acc, "sensitivity/worst").splitlines()
        assert table[0].startswith("| rank | quant point |") and len(table) == 2 + 10
        assert table[2].startswith(f"| 1 | {worst[0]['name']} |")
        assert "blocks.0.mlp.fc2_output" in _text(acc, "quantizers/report")
        mixed = _text(acc, "sensitivity/mixed_precision")
        assert "```yaml" in mixed and worst[0]["name"] in mixed

    def test_figures_are_one_card_wide_and_a_row_per_point(self, sensitivity_run):
        """Each image is WIDTH pixels wide (TensorBoard's card, so not scaled down) and tall
        enough for its rows: 10 for the charts (``--sensitivity.top 10``), one per point of the role."""
        acc = _events(sensitivity_run["out"] / "tb" / "itpn_tiny" / "minmax-seed-w4a4a4" / "version_0")
        points = sensitivity_run["record"]["sensitivity"]["points"]
        rows = {f"sqnr_by_layer/{role}": sum(p["role"] == role for p in points) for role in ("act", "attn", "weight")}
        rows |= {"sensitivity/chart": 10, "sensitivity/top1_changed": 10}
        for tag in acc.Tags()["images"]:
            [image] = acc.Images(tag)
            assert image.encoded_image_string.startswith(b"\x89PNG") and image.width == WIDTH, tag
            assert image.height >= rows.get(tag, 0) * ROW * DPI, tag
        assert rows["sqnr_by_layer/act"] > 20

    def test_nothing_empty_or_constant_gets_a_card(self, sensitivity_run):
        """No one-step histogram (an empty DISTRIBUTIONS chart), no step-indexed per-layer
        scalars, no ``epoch`` (always 0)."""
        acc = _events(sensitivity_run["out"] / "tb" / "itpn_tiny" / "minmax-seed-w4a4a4" / "version_0")
        tags = acc.Tags()
        assert tags["histograms"] == [] and tags["distributions"] == []
        assert "epoch" not in tags["scalars"] and not [t for t in tags["scalars"] if t.startswith("sqnr_by_layer")]
        assert {"hp/acc1", "hp/acc5", "hp/loss", "val/acc1"} <= set(tags["scalars"])

    def test_results_json_ranks_every_point(self, sensitivity_run):
        record = sensitivity_run["record"]
        sensitivity = record["sensitivity"]
        points = sensitivity["points"]
        assert sensitivity["images"] == SENSITIVITY_IMAGES and sensitivity["ranking"] == "kl"
        assert len(points) > 50 and [p["kl"] for p in points] == sorted((p["kl"] for p in points), reverse=True)
        assert {"name", "role", "bits", "kl", "agreement", "top1_drop", "sqnr_db", "clipped"} <= set(points[0])
        mixed = sensitivity["mixed_precision"]
        assert mixed["kept"] == [p["name"] for p in points[:KEEP]]
        assert mixed["overrides"] == {name: {"bits": 8} for name in mixed["kept"]}

    def test_the_written_config_runs_with_the_kept_points_at_8_bits(self, sensitivity_run, config, tmp_path):
        written = sensitivity_run["out"] / "mixed.yaml"
        overrides = yaml.safe_load(written.read_text())["model"]["overrides"]
        assert overrides == sensitivity_run["record"]["sensitivity"]["mixed_precision"]["overrides"]
        run = _run(config, tmp_path, "--config", str(written))
        assert run["record"]["overrides"] == overrides and run["record"]["bits"] == "4/4/4"
        values, _ = _hparams(_events(tmp_path / "tb" / "itpn_tiny" / f"minmax-seed-w4a4a4-mixed{KEEP}" / "version_0"))
        assert values["overrides"] == ("string_value", f"{KEEP} x {{bits: 8}}")
        assert (tmp_path / "tb" / "itpn_tiny" / f"minmax-seed-w4a4a4-mixed{KEEP}" / "version_0").is_dir()

    def test_a_loaded_state_is_measured_on_the_same_images(self, sensitivity_run, config, tmp_path):
        """Calibrate once, measure many: with calibration.load_state the calibration images are still read."""
        run = _run(
            config, tmp_path, "--calibration.load_state", str(sensitivity_run["out"] / "state.qstate"),
            "--sensitivity.enabled", "true", "--sensitivity.images", str(SENSITIVITY_IMAGES), "--sensitivity.batch_size", "8",
        )  # fmt: skip
        assert run["record"]["calib_images"] == 0 and run["record"]["acc1"] == sensitivity_run["record"]["acc1"]
        measured = [(p["name"], p["kl"], p["agreement"]) for p in run["record"]["sensitivity"]["points"]]
        assert measured == [(p["name"], p["kl"], p["agreement"]) for p in sensitivity_run["record"]["sensitivity"]["points"]]

    @pytest.mark.parametrize(
        "extra, message",
        [
            (["--model.method", "null", "--sensitivity.enabled", "true"], "error: sensitivity.enabled=true measures quant points"),
            (["--sensitivity.output", "x.yaml"], "error: sensitivity.output=x.yaml is written by a sensitivity run"),
            (["--sensitivity.enabled", "true", "--sensitivity.keep", "1.5"], "error: sensitivity.keep=1.5"),
            (["--sensitivity.enabled", "true", "--sensitivity.keep_bits", "20"], "error: sensitivity.keep_bits=20"),
            (["--sensitivity.enabled", "true", "--sensitivity.output", "/no/such/dir/m.yaml"], "error: sensitivity.output=/no/such/dir/m.yaml"),
        ],
    )  # fmt: skip
    def test_bad_options_end_in_one_line_before_compute(self, config, capsys, extra, message):
        code = main_script.main(["validate", "--config", str(config), "--trainer.logger", "false", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err and err[-1].startswith(message), err


def _stats(name: str, role: str, bits: int = 4, sqnr: float = 20.0, clipped: float = 0.01) -> QuantizerStats:
    return QuantizerStats(name, role, bits, -1.0, 1.0, 0.1, clipped, sqnr, 100)


def _texts(fig: Any) -> list[Any]:
    """Every text the figure draws: titles, axis titles, tick labels in view, bar labels,
    legend entries and the figure's own texts (its caption)."""
    fig.canvas.draw()
    texts = [t for t in (fig._suptitle, fig._supxlabel) if t is not None]
    for ax in fig.axes:
        (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
        ticks = [label for label in ax.get_xticklabels() if x0 <= label.get_position()[0] <= x1]
        ticks += [label for label in ax.get_yticklabels() if y0 <= label.get_position()[1] <= y1]
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ticks, *ax.texts]
    for legend in fig.legends:
        texts += legend.get_texts()
    return [t for t in texts if t.get_text() and t.get_visible()]


def _check_layout(fig: Any) -> None:
    """No legend covers a bar, a tick or bar label or an axis title; every text lies inside the image."""
    renderer = fig.canvas.get_renderer()
    texts = _texts(fig)
    legends = [legend.get_window_extent(renderer) for legend in fig.legends]
    for ax in fig.axes:
        legends += [ax.get_legend().get_window_extent(renderer)] if ax.get_legend() else []
    for t in texts:
        box = t.get_window_extent(renderer)
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1), t.get_text()
        in_legend = any(legend.contains(box.x0 + 1, box.y0 + 1) for legend in legends)
        assert in_legend or not any(legend.overlaps(box) for legend in legends), t.get_text()
    for ax in fig.axes:
        for bar in ax.patches:
            assert not any(legend.overlaps(bar.get_window_extent(renderer)) for legend in legends)


class _Recorder:
    """A SummaryWriter stand-in that keeps what it is given."""

    def __init__(self) -> None:
        self.figures: dict[str, Any] = {}
        self.texts: dict[str, str] = {}

    def add_figure(self, tag: str, figure: Any, step: int) -> None:
        self.figures[tag] = figure

    def add_text(self, tag: str, text: str) -> None:
        self.texts[tag] = text


def _histogram(name: str, clipped: float) -> ActivationHistogram:
    return ActivationHistogram(name, "act", 4, [0.0, 1.0, 2.0, 3.0], [5.0, 3.0, 2.0], (0.5, 2.0), clipped, 10, 12.0, 20.0, 0.1, 2.9)


class TestFigures:
    def test_sqnr_figure_names_every_point_of_the_role_in_model_order_and_marks_overrides(self):
        report = [_stats(f"blocks.{i}.mlp.act_output", "act", 8 if i == 2 else 4, 10.0 + i) for i in range(4)]
        report.insert(1, _stats("blocks.0.attn.qkv.weight_quantizer", "weight"))
        report.append(_stats("blocks.9.mlp.act_output", "act", sqnr=float("inf")))
        report.append(_stats("blocks.10.mlp.act_output", "act", sqnr=float("-inf")))
        fig = sqnr_figure(report, "act", {"blocks.2.mlp.act_output"})
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels == [f"blocks.{i}.mlp.act_output ({8 if i == 2 else 4}b)" for i in range(4)] + ["blocks.9.mlp.act_output (4b)", "blocks.10.mlp.act_output (4b)"]
        assert [t.get_text() for t in ax.texts] == ["10.0", "11.0", "12.0", "13.0", "lossless", "no signal"]
        assert "SQNR (dB)" in ax.get_xlabel() and "each act quant point" in fig.get_suptitle()
        bars = ax.patches[:6]
        assert [bar.get_hatch() for bar in bars] == [None, None, "///", None, None, None]
        assert bars[2].get_facecolor()[:3] == pytest.approx(matplotlib_rgb(OVERRIDDEN_COLOR))
        assert bars[0].get_y() < bars[1].get_y()  # model order, top to bottom (the y axis is inverted)
        assert ax.yaxis_inverted()
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["act, the run's bits", "set by model.overrides"]
        _check_layout(fig)
        assert round(fig.get_figwidth() * fig.dpi) == WIDTH

    def test_sensitivity_figures_put_the_worst_at_the_top_and_the_legend_below(self):
        points = [PointSensitivity(f"blocks.{i}.reduction_output", "act" if i % 2 else "attn", 4, 0.01 / (i + 1), 99.0 - i) for i in range(12)]
        fig = sensitivity_figure(points, 10, 256)
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_yticklabels()][:2] == ["blocks.0.reduction_output", "blocks.1.reduction_output"]
        assert len(ax.get_yticklabels()) == 10 and "KL" in ax.get_xlabel() and "256 images" in fig.get_suptitle()
        assert "alone at 4 bits" in fig.get_suptitle()  # one width: said once, not on every row
        points[3].bits = 8
        mixed = sensitivity_figure(points, 10, 256).axes[0]
        assert [t.get_text() for t in mixed.get_yticklabels()][2:4] == ["blocks.2.reduction_output (4b)", "blocks.3.reduction_output (8b)"]
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legend = fig.legends[0].get_window_extent(renderer)
        assert legend.y1 <= ax.xaxis.label.get_window_extent(renderer).y0  # below the x axis title
        _check_layout(fig)

    def test_histogram_figure_labels_its_axes_and_gives_both_clipped_shares(self):
        fig = histogram_figure(_histogram("blocks.4.mlp.act_output", 0.2863), 0.2951)
        ax = fig.axes[0]
        assert ax.get_xlabel() and "log" in ax.get_ylabel() and ax.get_yscale() == "log"
        caption = " ".join(t.get_text() for t in _texts(fig))
        assert "clipped here: 28.63 % (the first batch of the sensitivity images)" in caption
        assert "in the text tables: 29.51 % (the last calibration batch)" in caption
        without = " ".join(t.get_text() for t in _texts(histogram_figure(_histogram("p", 0.5), None)))
        assert "50.00 %" in without and "text tables" not in without
        _check_layout(fig)

    def test_log_sensitivity_captions_each_histogram_with_its_own_points_report_share(self):
        names = [f"blocks.{i}.mlp.act_output" for i in range(11)]
        result = SensitivityResult(
            16, 1.0, [PointSensitivity(n, "act", 4, 1.0 / (i + 1), 90.0) for i, n in enumerate(names)],
            [_histogram(n, 0.01 * i) for i, n in enumerate(names)],
        )  # fmt: skip
        report = [_stats(n, "act", clipped=0.1 + 0.01 * i) for i, n in enumerate(reversed(names))]
        writer = _Recorder()
        log_sensitivity(writer, result, 5, report)
        tags = [t for t in writer.figures if t.startswith("activations/")]
        assert tags == [f"activations/{i + 1:02d}_{n}" for i, n in enumerate(names)] == sorted(tags)
        table = {r.name: f"in the text tables: {100 * r.clipped:.2f} %" for r in report}
        for tag, name in zip(tags, names):
            caption = " ".join(t.get_text() for t in _texts(writer.figures[tag]))
            assert table[name] in caption, name
        assert {"sensitivity/chart", "sensitivity/top1_changed"} <= set(writer.figures)
        assert set(writer.texts) == {"sensitivity/worst", "sensitivity/mixed_precision"}

    def test_overridden_points_are_those_a_pattern_matches(self):
        report = [_stats(n, "act") for n in ("blocks.0.attn.qkv_output", "blocks.1.attn.qkv_output", "blocks.10.mlp.act_output")]
        overrides = {"blocks.1.*": {"bits": 8}, "*.act_output": None}
        assert overridden_points(report, overrides) == {"blocks.1.attn.qkv_output", "blocks.10.mlp.act_output"}
        assert overridden_points(report, {}) == set()


def matplotlib_rgb(color: str) -> tuple[float, float, float]:
    """``#rrggbb`` as matplotlib's RGB floats."""
    return tuple(int(color[i : i + 2], 16) / 255 for i in (1, 3, 5))  # type: ignore[return-value]


def test_name_logger_drops_lightnings_epoch_scalar(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="x", default_hp_metric=False)
    name_logger(logger, dict(model="itpn_tiny", method="fp32", bits="32/32/32"))
    logger.log_metrics(metrics={"epoch": 0, "val/acc1": 90.0}, step=0)
    logger.log_metrics(metrics={"epoch": 0}, step=0)
    logger.finalize("success")
    acc = _events(tmp_path / "itpn_tiny" / "fp32" / "version_0")
    assert acc.Tags()["scalars"] == ["val/acc1"] and acc.Scalars("val/acc1")[0].value == 90.0
