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
from lit_ptq.tensorboard import HPARAM_COLUMNS, VISIBLE, run_hparams, run_name

SENSITIVITY_IMAGES = 16
KEEP = 3


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
    def test_event_files_hold_the_chart_tables_and_histograms(self, sensitivity_run):
        acc = _events(sensitivity_run["out"] / "tb" / "itpn_tiny" / "minmax-seed-w4a4a4" / "version_0")
        tags = acc.Tags()
        assert {"sensitivity/chart", "activations/worst"} <= set(tags["images"])
        chart = acc.Images("sensitivity/chart")[-1]
        assert chart.encoded_image_string.startswith(b"\x89PNG") and chart.height > 300
        worst = sensitivity_run["record"]["sensitivity"]["points"]
        table = _text(acc, "sensitivity/worst").splitlines()
        assert table[0].startswith("| rank | quant point |") and len(table) == 2 + 10
        assert table[2].startswith(f"| 1 | {worst[0]['name']} |")
        assert f"activations/{worst[0]['name']}" in tags["histograms"]
        assert "blocks.0.mlp.fc2_output" in _text(acc, "quantizers/report")
        mixed = _text(acc, "sensitivity/mixed_precision")
        assert "```yaml" in mixed and worst[0]["name"] in mixed
        assert {"hp/acc1", "sqnr_by_layer/act", "sqnr_by_layer/weight"} <= set(tags["scalars"])

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
