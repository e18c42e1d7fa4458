"""Every bad input fails clearly: a non-zero exit, one sentence on stderr naming the problem,
no traceback, and no results file; runs are deterministic.

Most cases run ``main.main(argv)`` in-process (the same code path as ``python main.py``);
the exit code, the signal handling and the absence of tracebacks are also checked on real
subprocesses.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lit_ptq.models import create_model
from lit_ptq.quant import CalibrationError, QuantConfig, calibrate, quantize_
from main import main

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo_data" / "fashion_mnist"
TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 3


def _copy_tree(dst: Path, split: str, per_class: int) -> None:
    for class_dir in sorted((DEMO / split).iterdir()):
        out = dst / split / class_dir.name
        out.mkdir(parents=True)
        for f in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy(f, out / f.name)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-class ImageFolder tree of real Fashion-MNIST images: 60 train, 31 val."""
    root = tmp_path_factory.mktemp("fmnist")
    _copy_tree(root, "train", TRAIN_PER_CLASS)
    _copy_tree(root, "val", VAL_PER_CLASS)
    extra = sorted((DEMO / "val" / "3_dress").iterdir())[VAL_PER_CLASS]
    shutil.copy(extra, root / "val" / "3_dress" / extra.name)
    return root


def _copy(tree: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tree, root)
    return root


def _args(root: Path, *extra: str) -> list[str]:
    return [
        "validate",
        "--config", str(REPO / "configs" / "demo.yaml"),
        "--model.checkpoint", "null",
        "--data.root", str(root),
        "--data.calib_batch_size", "8",
        "--data.calib_batches", "2",
        "--data.batch_size", "16",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "false",
        *extra,
    ]  # fmt: skip


def _fails(capsys: pytest.CaptureFixture, argv: list[str], *needles: str) -> str:
    """Run main(argv): exit code 2, one 'error:' line naming every needle, no traceback."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _no_results(tmp_path: Path) -> list[str]:
    return [p.name for p in tmp_path.rglob("*.json")]


# -- data -----------------------------------------------------------------------------------


def test_missing_root(capsys, tmp_path):
    _fails(capsys, _args(tmp_path / "nowhere", "--results_path", str(tmp_path / "r.json")), "nowhere", "data.root")
    assert not _no_results(tmp_path)


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split(capsys, tree, tmp_path, split):
    root = _copy(tree, tmp_path)
    shutil.rmtree(root / split)
    _fails(capsys, _args(root, "--results_path", str(tmp_path / "r.json")), str(root / split))
    assert not _no_results(tmp_path)


def test_empty_class_folder(capsys, tree, tmp_path):
    root = _copy(tree, tmp_path)
    for f in (root / "val" / "4_coat").iterdir():
        f.unlink()
    _fails(capsys, _args(root), "4_coat")


def test_class_count_differs_from_model(capsys, tree):
    _fails(capsys, _args(tree, "--model.num_classes", "7"), "10 class folders", "num_classes=7")


def test_calibration_larger_than_train_split(capsys, tree):
    _fails(capsys, _args(tree, "--data.calib_batches", "8"), "calib_batches=8", "64", "60")


def test_calib_batches_zero_with_quantization(capsys, tree):
    _fails(capsys, _args(tree, "--data.calib_batches", "0"), "calib_batches=0")


def _truncate_one(root: Path) -> Path:
    victim = sorted((root / "val" / "2_pullover").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:60])
    return victim


def test_unreadable_image_names_the_file(capsys, tree, tmp_path):
    root = _copy(tree, tmp_path)
    victim = _truncate_one(root)
    _fails(capsys, _args(root, "--results_path", str(tmp_path / "r.json")), str(victim), "skip_unreadable")
    assert not _no_results(tmp_path)


def test_unreadable_image_skipped_and_counted(capsys, tree, tmp_path):
    root = _copy(tree, tmp_path)
    _truncate_one(root)
    out = tmp_path / "r.json"
    assert main(_args(root, "--data.skip_unreadable", "true", "--results_path", str(out))) == 0
    result = json.loads(out.read_text())
    assert result["skipped_files"] == 1
    assert result["num_images"] == 10 * VAL_PER_CLASS + 1 - 1
    assert "skipped 1 unreadable image" in capsys.readouterr().out


# -- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_missing(capsys, tree, tmp_path):
    path = tmp_path / "missing.pth"
    _fails(capsys, _args(tree, "--model.checkpoint", str(path)), str(path), "does not exist")


def test_checkpoint_of_another_architecture(capsys, tree, tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": create_model("itpn_tiny", num_classes=10, embed_dim=64, num_heads=2).state_dict()}, path)
    _fails(capsys, _args(tree, "--model.checkpoint", str(path)), str(path), "wrong-shape keys")


def test_checkpoint_with_another_head_size(capsys, tree, tmp_path):
    path = tmp_path / "head.pth"
    torch.save({"model": create_model("itpn_tiny", num_classes=100).state_dict()}, path)
    _fails(capsys, _args(tree, "--model.checkpoint", str(path)), str(path), "num_classes=100")


def test_file_that_is_not_a_checkpoint(capsys, tree, tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    _fails(capsys, _args(tree, "--model.checkpoint", str(path)), str(path), "not a PyTorch checkpoint")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch should-not-exist",))


def test_pickle_refused_by_weights_only(capsys, tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    _fails(capsys, _args(tree, "--model.checkpoint", str(path)), str(path), "weights-only load refuses")
    assert not (tmp_path / "should-not-exist").exists()


def test_nan_weights_name_the_first_quantizer(capsys, tree, tmp_path):
    model = create_model("itpn_tiny", num_classes=10)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.bias[0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save({"model": model.state_dict()}, path)
    _fails(capsys, _args(tree, "--model.checkpoint", str(path)), "blocks.0.mlp.act_output", "NaN or Inf")


# -- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, needles",
    [
        ("--model.model_name", "itpn_huge", ("itpn_huge", "itpn_base", "itpn_large", "itpn_tiny")),
        ("--model.method", "kmeans", ("kmeans", "minmax", "ema", "percentile", "omse")),
        ("--model.placement", "everywhere", ("everywhere", "seed", "full")),
        ("--model.bits", "8/8/1", ("8/8/1", "2..16")),
        ("--model.bits", "8/17/8", ("8/17/8", "2..16")),
        ("--model.bits", "8/8", ("8/8",)),
        ("--model.num_classes", "ten", ("model.num_classes", "ten")),
    ],
)
def test_bad_option_values(capsys, tree, option, value, needles):
    _fails(capsys, _args(tree, option, value), *needles)


def test_unknown_option(capsys, tree):
    _fails(capsys, _args(tree, "--model.colour", "blue"), "colour")


def test_missing_config_file(capsys, tmp_path):
    _fails(capsys, ["validate", "--config", str(tmp_path / "nope.yaml")], "nope.yaml")


@pytest.mark.parametrize("where", ["missing_folder", "file_as_folder"])
def test_results_path_not_writable(capsys, tree, tmp_path, where):
    base = tmp_path / "absent" if where == "missing_folder" else tmp_path / "plain_file"
    if where == "file_as_folder":
        base.write_text("x")
    path = base / "r.json"
    start = time.perf_counter()
    _fails(capsys, _args(tree, "--results_path", str(path)), "--results_path", str(path))
    assert time.perf_counter() - start < 30


def test_state_file_from_another_config(capsys, tree, tmp_path):
    state = tmp_path / "state.pt"
    assert main(_args(tree, "--calibration.save_state", str(state))) == 0
    capsys.readouterr()
    _fails(
        capsys,
        _args(tree, "--calibration.load_state", str(state), "--model.method", "ema", "--results_path", str(tmp_path / "r.json")),
        str(state),
        "method",
    )
    _fails(capsys, _args(tree, "--calibration.load_state", str(state), "--model.bits", "6/6/6"), "bits")
    assert not _no_results(tmp_path)


def test_state_file_that_is_not_a_state(capsys, tree, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"model": {}}, path)
    _fails(capsys, _args(tree, "--calibration.load_state", str(path)), str(path))


def test_nan_inputs_in_calibration_name_the_first_quantizer():
    model = quantize_(create_model("itpn_tiny", num_classes=10), QuantConfig(placement="full"))
    batch = torch.randn(2, 3, 32, 32)
    batch[0, 0, 0, 0] = float("inf")
    with pytest.raises(CalibrationError, match=r"patch_embed\.proj\.input_quantizer saw NaN or Inf"):
        calibrate(model, [batch])


# -- subprocesses: exit codes, tracebacks, signals ------------------------------------------------


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=120, **kwargs)


def test_subprocess_user_error_exit_code_and_debug(tree, tmp_path):
    bad = _args(tree, "--model.method", "kmeans")
    proc = _run(bad)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "kmeans" in proc.stderr
    assert "Traceback" not in proc.stderr
    debug = _run([*bad, "--debug"])
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_interrupted_run_leaves_nothing(tree, tmp_path, sig):
    results, state = tmp_path / "r.json", tmp_path / "state.pt"
    argv = _args(tree, "--results_path", str(results), "--calibration.save_state", str(state))
    argv += ["--data.calib_batch_size", "1", "--data.calib_batches", "60", "--trainer.enable_progress_bar", "true"]
    proc = subprocess.Popen(
        [sys.executable, "main.py", *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seen = ""
    deadline = time.monotonic() + 120
    while "Calibration" not in seen and time.monotonic() < deadline:  # Lightning's bars write to stdout
        char = proc.stdout.read(1)
        if not char:
            break
        seen += char
    assert "Calibration" in seen, seen
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, seen + out + err
    assert "Traceback" not in err
    assert "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- determinism ----------------------------------------------------------------------------------


def test_same_seed_same_metrics_with_any_worker_count(tree, tmp_path):
    runs = []
    for i, workers in enumerate(["0", "2", "0"]):
        out = tmp_path / f"r{i}.json"
        assert main(_args(tree, "--data.num_workers", workers, "--results_path", str(out))) == 0
        runs.append(json.loads(out.read_text()))
    keys = ("acc1", "acc5", "loss", "num_images", "calib_images")
    assert [{k: r[k] for k in keys} for r in runs[1:]] == [{k: runs[0][k] for k in keys}] * 2


def test_same_seed_bit_identical_logits():
    def run() -> torch.Tensor:
        torch.manual_seed(0)
        model = quantize_(create_model("itpn_tiny", num_classes=10), QuantConfig(method="omse"))
        gen = torch.Generator().manual_seed(1)
        calibrate(model, [torch.randn(4, 3, 32, 32, generator=gen) for _ in range(3)])
        with torch.no_grad():
            return model(torch.randn(4, 3, 32, 32, generator=gen))

    assert torch.equal(run(), run())
