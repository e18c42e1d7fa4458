"""Specification of lit_ptq/cli.py and main.py: configs, results JSON, TensorBoard, DDP on CPU.

The runs use ``itpn_tiny`` on a small tree of real Fashion-MNIST images (see conftest.py):
59 validation images, a count that neither 2 nor 3 ranks divide evenly.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pytorch_lightning import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import main as main_script
from lit_ptq.cli import TRAINING_ONLY, cli_main
from lit_ptq.quant import quantizers
from lit_ptq.tensorboard import run_name

REPO = Path(__file__).resolve().parents[1]
RESULT_FIELDS = {
    "model", "checkpoint", "method", "placement", "bits", "calib_images", "acc1", "acc5", "loss", "num_images",
    "world_size", "seconds",
}  # fmt: skip
CALIB_BATCH_SIZE = 16
CALIB_BATCHES = 2


class DumpQuantState(Callback):
    """Test-only: after validation, each rank saves its quantizer buffers to ``folder/rank{r}.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_validation_end(self, trainer, pl_module) -> None:
        state = {f"{n}.{k}": b.detach().cpu() for n, q in quantizers(pl_module.model) for k, b in q.named_buffers()}
        torch.save(state, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory, fmnist_root, tiny_checkpoint, make_tiny_config) -> Path:
    """A config shaped like configs/models/itpn_base.yaml + configs/methods/minmax.yaml, for itpn_tiny on the small tree."""
    config = make_tiny_config(fmnist_root, tiny_checkpoint, CALIB_BATCH_SIZE, CALIB_BATCHES, logger={
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "tb_logs", "name": "tiny", "default_hp_metric": False},
    })
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run_args(config: Path, out: Path, *extra: str) -> list[str]:
    """Arguments of a validate run whose results, state and TensorBoard logs go under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    return [
        "validate",
        "--config", str(config),
        "--results_path", str(out / "results.json"),
        "--calibration.save_state", str(out / "state.qstate"),
        "--trainer.logger.init_args.save_dir", str(out / "tb"),
        *extra,
    ]  # fmt: skip


def _print_config(args: list[str], capsys) -> dict[str, Any]:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args + ["--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _check_record(record: dict[str, Any], num_val_images: int, method: str, world_size: int) -> None:
    assert RESULT_FIELDS <= set(record), RESULT_FIELDS - set(record)
    assert record["model"] == "itpn_tiny"
    assert record["method"] == method
    assert record["num_images"] == num_val_images
    assert record["world_size"] == world_size
    assert record["seconds"] > 0
    for key in ("acc1", "acc5"):  # percent: a whole number of images out of num_images
        assert 0 <= record[key] <= 100
        hits = record[key] * num_val_images / 100
        assert abs(hits - round(hits)) < 1e-4, (key, record[key])
    assert record["acc5"] >= record["acc1"]
    assert record["loss"] > 0
    if method == "fp32":
        assert record["placement"] is None and record["bits"] == "32/32/32" and record["calib_images"] == 0
    else:
        assert record["placement"] == "seed" and record["bits"] == "8/8/8"
        assert record["calib_images"] == CALIB_BATCHES * CALIB_BATCH_SIZE


@pytest.fixture(scope="module")
def one_process_run(tiny_config, tmp_path_factory):
    """``(method, *extra_args) -> run``: an in-process 1-process validate run, made once per
    method and extra arguments.

    A run is a dict with ``record`` (the results JSON), ``out`` (its folder), ``stdout``,
    ``state`` (the saved quantizer state), ``metrics`` (the trainer's callback metrics) and
    ``cli`` (the finished CLI, with its calibrated model and data module).
    """
    runs: dict[tuple[str, ...], dict[str, Any]] = {}

    def get(method: str, *extra: str) -> dict[str, Any]:
        key = (method, *extra)
        if key not in runs:
            out = tmp_path_factory.mktemp(f"one_process_{method}")
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                cli = cli_main(_run_args(tiny_config, out, "--model.method", method, *extra))
            runs[key] = dict(
                record=json.loads((out / "results.json").read_text()),
                out=out,
                stdout=stdout.getvalue(),
                state=torch.load(out / "state.qstate", map_location="cpu", weights_only=True)["state"],
                metrics={k: float(v) for k, v in cli.trainer.callback_metrics.items()},
                cli=cli,
            )
        return runs[key]

    return get


class TestPrintConfig:
    def test_print_config_shows_the_whole_run_with_overrides(self, capsys, tmp_path):
        printed = _print_config(
            [
                "validate",
                "--config", str(REPO / "configs" / "models" / "itpn_base.yaml"),
                "--config", str(REPO / "configs" / "methods" / "minmax.yaml"),
                "--data.root", "/data/imagenet",
                "--model.checkpoint", "/ckpt/itpn_base.pth",
                "--model.method", "omse",
                "--model.bits", "8/8/4",
                "--data.batch_size", "50",
                "--trainer.devices", "8",
                "--trainer.strategy", "ddp",
                "--calibration.save_state", str(tmp_path / "omse.qstate"),
                "--results_path", str(tmp_path / "omse.json"),
            ],
            capsys,
        )  # fmt: skip
        assert printed["model"]["method"] == "omse" and printed["model"]["bits"] == "8/8/4"
        assert printed["model"]["checkpoint"] == "/ckpt/itpn_base.pth"
        assert printed["data"]["root"] == "/data/imagenet" and printed["data"]["batch_size"] == 50
        assert str(printed["trainer"]["devices"]) == "8" and printed["trainer"]["strategy"] == "ddp"
        assert printed["calibration"]["save_state"] == str(tmp_path / "omse.qstate")
        assert printed["results_path"] == str(tmp_path / "omse.json")


def _help(subcommand: str, capsys) -> list[str]:
    with pytest.raises(SystemExit) as exit_info:
        cli_main([subcommand, "--help"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out.splitlines()


class TestHelp:
    DESCRIPTIONS = {
        "validate": "Calibrate on data.root/train, then evaluate every image of data.root/val",
        "test": "Calibrate as validate does, then evaluate every image of data.root/test",
        "predict": "Calibrate as validate does, then write the top-5 classes of every image",
        "export": "Calibrate the model as validate does and write it to a deployment file",
    }

    @pytest.mark.parametrize("subcommand", ["validate", "test", "predict", "export"])
    def test_lit_ptq_options_come_first_and_training_options_are_left_out(self, subcommand, capsys):
        lines = _help(subcommand, capsys)
        text = "\n".join(lines)
        assert " ".join(text.split("\n\n")[1].split()).startswith(self.DESCRIPTIONS[subcommand])
        options = [line.split()[0] for line in lines if line.startswith("  --")]
        first = {prefix: next(i for i, o in enumerate(options) if o.startswith(prefix)) for prefix in (
            "--model.", "--data.", "--calibration.", "--sensitivity.", "--results_path", "--trainer.")}  # fmt: skip
        assert max(v for k, v in first.items() if k != "--trainer.") < first["--trainer."]
        assert first["--model."] < first["--data."] < first["--calibration."] < first["--sensitivity."]
        assert [o for o in options if o.removeprefix("--trainer.").split(".")[0] in TRAINING_ONLY] == []
        for gone in ("--ckpt_path", "--weights_only", "--model.backend", "--return_predictions"):
            assert gone not in options and f"[{gone} " not in text
        kept = ("accelerator", "strategy", "devices", "num_nodes", "precision", "logger", "callbacks", "limit_val_batches")
        assert {f"--trainer.{k}" for k in kept} <= set(options)
        model_line = next(i for i, line in enumerate(lines) if line.startswith("  --model.model_name"))
        assert model_line < 100 and len(lines) < 500  # 669 before the training options went; --model.compile and --model.gelu add a few

    def test_batch_limits_read_an_integer_as_a_number_of_batches(self, capsys, tiny_config):
        printed = _print_config(["validate", "--config", str(tiny_config), "--trainer.limit_val_batches", "1"], capsys)
        assert printed["trainer"]["limit_val_batches"] == 1 and isinstance(printed["trainer"]["limit_val_batches"], int)
        printed = _print_config(["test", "--config", str(tiny_config), "--trainer.limit_test_batches", "0.5"], capsys)
        assert printed["trainer"]["limit_test_batches"] == 0.5

    @pytest.mark.parametrize(
        "args, message",
        [
            (["validate", "--ckpt_path", "x.pt"], "error: --ckpt_path is Lightning's option for resuming from a training checkpoint, not an option of lit_ptq: pass the float weights to quantize as --model.checkpoint FILE"),
            (["test", "--weights_only=true"], "error: --weights_only is Lightning's option for resuming"),
            (["validate", "--trainer.max_epochs", "3"], "error: --trainer.max_epochs only acts on training, and lit_ptq does not train"),
            (["predict", "--trainer.gradient_clip_val=1"], "error: --trainer.gradient_clip_val only acts on training"),
            (["validate", "--model.backend", "lit_ptq.backends.PyTorchBackend"], "error: unrecognized arguments: --model.backend"),
        ],
    )
    def test_training_options_are_refused_in_one_line(self, tiny_config, capsys, args, message):
        code = main_script.main([*args, "--config", str(tiny_config)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(message), err

    @pytest.mark.parametrize("subcommand", ["validate", "test", "predict", "export"])
    def test_a_missing_config_hints_at_one(self, subcommand, capsys):
        code = main_script.main([subcommand])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err == [
            f"error: {subcommand} needs data.root (and a model): pass a config, e.g. "
            f"`main.py {subcommand} --config configs/demo.yaml`, or --data.root FOLDER"
        ]


class TestOneProcess:
    def test_in_process_run_writes_the_results_json(self, one_process_run, num_val_images):
        run = one_process_run("minmax")
        record = run["record"]
        _check_record(record, num_val_images, "minmax", world_size=1)
        assert record["acc1"] == run["metrics"]["val/acc1"]  # logged in percent, 4 decimals, as the JSON
        assert run["cli"].trainer.checkpoint_callback is None  # no checkpoint: TRAINER_FIXED
        assert run["metrics"]["calibration/seconds"] == round(run["metrics"]["calibration/seconds"], 2)
        assert record["loss"] == run["metrics"]["val/loss"]
        assert "itpn_tiny minmax seed 8/8/8: acc1" in run["stdout"]
        assert f"on {num_val_images} images" in run["stdout"]

    def test_record_fields_are_the_logits_scored_by_hand(self, one_process_run, num_val_images):
        """acc1 / acc5 (percent), loss and the counts of the results JSON equal those computed here
        from the calibrated model's logits of every val image: an image counts in top-k when fewer
        than k classes score above its target; the loss is the mean cross-entropy."""
        run = one_process_run("minmax")
        record, cli = run["record"], run["cli"]
        cli.model.eval()
        with torch.no_grad():
            scored = [(cli.model.predict_logits(x).double(), y) for x, y in cli.datamodule.val_dataloader()]
        logits, targets = torch.cat([z for z, _ in scored]), torch.cat([y for _, y in scored])
        above = (logits > logits.gather(1, targets[:, None])).sum(1)  # classes scored above the target
        n = len(targets)
        hits1, hits5 = int((above < 1).sum()), int((above < 5).sum())
        assert hits1 < hits5  # acc5 != acc1 on these images
        loss = float((logits.logsumexp(1) - logits.gather(1, targets[:, None])[:, 0]).mean())
        assert record["num_images"] == n == num_val_images
        assert record["acc1"] == pytest.approx(100 * hits1 / n, abs=1e-4)
        assert record["acc5"] == pytest.approx(100 * hits5 / n, abs=1e-4)
        assert record["loss"] == pytest.approx(loss, rel=1e-6)
        assert (record["acc5"], record["loss"]) == (run["metrics"]["val/acc5"], run["metrics"]["val/loss"])
        calib = cli.calibration.result
        assert record["calib_images"] == calib.calib_images == CALIB_BATCHES * CALIB_BATCH_SIZE
        assert record["calibration_seconds"] == round(calib.seconds, 3)

    def test_tensorboard_has_hparams_report_and_sqnr(self, one_process_run):
        run = one_process_run("minmax")
        versions = list((run["out"] / "tb" / "itpn_tiny" / "minmax-seed-w8a8a8").iterdir())  # <model>/<settings>
        assert [v.name for v in versions] == ["version_0"]
        acc = EventAccumulator(str(versions[0]), size_guidance={"tensors": 0, "scalars": 0})
        acc.Reload()
        tags = acc.Tags()
        hparams = acc.PluginTagToContent("hparams")
        assert "_hparams_/session_start_info" in hparams
        start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
        logged = {k: v.string_value or v.number_value or v.bool_value for k, v in start.hparams.items()}
        assert logged["model"] == "itpn_tiny" and logged["method"] == "minmax" and logged["bits"] == "8/8/8"
        assert logged["calib_images"] == CALIB_BATCHES * CALIB_BATCH_SIZE
        assert {"hp/acc1", "hp/acc5", "hp/loss", "val/acc1", "val/acc5", "val/loss"} <= set(tags["scalars"])
        assert acc.Scalars("hp/acc1")[-1].value == pytest.approx(run["record"]["acc1"], rel=1e-6)
        for key in ("acc1", "acc5"):  # percent, as the JSON and the summary line
            assert acc.Scalars(f"val/{key}")[-1].value == pytest.approx(run["record"][key], rel=1e-6)
        seconds = acc.Scalars("calibration/seconds")[-1].value
        assert abs(seconds - run["record"]["calibration_seconds"]) <= 0.0051  # rounded to 2 decimals
        assert abs(seconds * 100 - round(seconds * 100)) < 1e-3
        report = [t for t in tags["tensors"] if t.startswith("quantizers/report")]
        assert report
        text = acc.Tensors(report[0])[-1].tensor_proto.string_val[0].decode()
        assert text.startswith("| quantizer | role | bits |") and "blocks.0.mlp.fc2_output" in text
        assert {"sqnr_by_layer/weight", "sqnr_by_layer/act"} <= set(tags["images"])  # one figure per role
        assert not [t for t in tags["scalars"] if t.startswith("sqnr_by_layer/")]

    def test_subprocess_run_with_overrides(self, tiny_config, tmp_path, num_val_images, main_subprocess):
        """main.py end to end, here turning the config's minmax run into a float one from the command line."""
        out = tmp_path / "fp32"
        overrides = ["--model.method", "null", "--data.batch_size", "7", "--trainer.logger", "false"]
        args = _run_args(tiny_config, out, *overrides)
        args.remove("--calibration.save_state")
        args.remove(str(out / "state.qstate"))
        proc = main_subprocess(args)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        record = json.loads((out / "results.json").read_text())
        _check_record(record, num_val_images, "fp32", world_size=1)
        assert f"itpn_tiny fp32  32/32/32: acc1 {record['acc1']:.2f}" in proc.stdout
        assert not (out / "tb").exists()  # --trainer.logger false: no TensorBoard files

    def test_load_state_reproduces_the_run(self, one_process_run, tiny_config, tmp_path):
        """Calibrate once, evaluate many: a run that loads the saved state reports the same numbers."""
        reference = one_process_run("minmax")
        out = tmp_path / "loaded"
        args = _run_args(tiny_config, out, "--calibration.load_state", str(reference["out"] / "state.qstate"))
        args.remove("--calibration.save_state")
        args.remove(str(out / "state.qstate"))
        cli_main(args)
        record = json.loads((out / "results.json").read_text())
        assert record["calib_images"] == 0
        for key in ("acc1", "acc5", "loss", "num_images"):
            assert record[key] == reference["record"][key], key

    @pytest.mark.parametrize(
        "extra, message",
        [
            (["--data.root", "/no/such/imagenet"], "error: dataset root /no/such/imagenet does not exist"),
            (
                ["--calibration.load_state", "/no/such.qstate"],
                "error: calibration.load_state=/no/such.qstate does not exist",
            ),
            (["--data.calib_batches", "0"], "error: data.calib_batches=0 but model.method is set"),
            (["--model.method", "kmeans"], "error: "),
            (
                ["--model.overrides", '{"blokcs.*.qkv*": {"bits": 8}}'],
                "error: overrides: the pattern 'blokcs.*.qkv*' matches no quant point of this model (placement "
                "'seed'); the closest point names are 'blocks.*.attn.qkv_output', ",
            ),
        ],
    )
    def test_user_errors_end_in_one_line(self, tiny_config, tmp_path, capsys, extra, message):
        code = main_script.main(["validate", "--config", str(tiny_config), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert err and err[-1].startswith(message), err
        assert not any("Traceback" in line for line in err)


def _ddp_run(main_subprocess: Callable[..., Any], tiny_config: Path, out: Path, method: str, *extra: str) -> tuple[dict[str, Any], list[dict[str, torch.Tensor]]]:
    dump = json.dumps({"class_path": "test_cli.DumpQuantState", "init_args": {"folder": str(out)}})
    args = _run_args(
        tiny_config,
        out,
        "--model.method", method,
        *extra,
        "--trainer.strategy", "ddp",
        "--trainer.devices", "2",
        "--trainer.accelerator", "cpu",
        f"--trainer.callbacks+={dump}",
    )  # fmt: skip
    proc = main_subprocess(args, ddp=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("calibration took") == 1, proc.stdout  # rank 0 alone logs
    record = json.loads((out / "results.json").read_text())
    states = [torch.load(out / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in (0, 1)]
    return record, states


def _check_ddp_equals_one_process(one: dict[str, Any], record: dict[str, Any], states, out: Path, num_val_images: int):
    assert record["world_size"] == 2
    assert record["num_images"] == one["record"]["num_images"] == num_val_images
    for key in ("acc1", "acc5", "loss"):
        assert record[key] == one["record"][key], (key, record[key], one["record"][key])
    assert record["calib_images"] == one["record"]["calib_images"]
    rank0, rank1 = states
    assert set(rank0) == set(rank1) == set(one["state"])
    for key, value in one["state"].items():
        assert torch.equal(rank0[key], value), key
        assert torch.equal(rank1[key], value), key
    saved = torch.load(out / "state.qstate", map_location="cpu", weights_only=True)["state"]
    assert all(torch.equal(saved[k], v) for k, v in one["state"].items())
    run_dir = out / "tb" / run_name(record)  # <model>/<settings>
    assert [v.name for v in run_dir.iterdir()] == ["version_0"]  # rank 0 logs alone


class TestTwoProcesses:
    def test_ddp_minmax_equals_one_process(self, one_process_run, tiny_config, tmp_path, num_val_images, main_subprocess):
        one = one_process_run("minmax")
        record, states = _ddp_run(main_subprocess, tiny_config, tmp_path / "ddp_minmax", "minmax")
        _check_ddp_equals_one_process(one, record, states, tmp_path / "ddp_minmax", num_val_images)

    @pytest.mark.slow  # test_callbacks' two-rank recipe test pins the broadcast in the fast suite
    def test_ddp_with_a_recipe_equals_one_process(self, one_process_run, tiny_config, tmp_path, num_val_images, main_subprocess):
        recipe = ("--model.placement", "matmul", "--model.bits", "4/4/4", "--model.recipe", "repq_gptq")
        one = one_process_run("mse", *recipe)
        record, states = _ddp_run(main_subprocess, tiny_config, tmp_path / "ddp_recipe", "mse", *recipe)
        _check_ddp_equals_one_process(one, record, states, tmp_path / "ddp_recipe", num_val_images)
        saved = torch.load(tmp_path / "ddp_recipe" / "state.qstate", map_location="cpu", weights_only=True)
        one_saved = torch.load(one["out"] / "state.qstate", map_location="cpu", weights_only=True)
        assert saved["params"].keys() == one_saved["params"].keys()  # the folded and corrected weights
        assert all(torch.equal(saved["params"][k], v) for k, v in one_saved["params"].items())

    @pytest.mark.slow
    def test_ddp_omse_equals_one_process(self, one_process_run, tiny_config, tmp_path, num_val_images, main_subprocess):
        one = one_process_run("omse")
        record, states = _ddp_run(main_subprocess, tiny_config, tmp_path / "ddp_omse", "omse")
        _check_ddp_equals_one_process(one, record, states, tmp_path / "ddp_omse", num_val_images)
