"""Shared fixtures for the Lightning tests: a small ImageFolder of real images and a tiny checkpoint.

The tree is copied from the committed Fashion-MNIST demo data (10 classes, 12 train images
per class, 59 val images -- a count divisible by neither 2 nor 3, so ranks get unequal
shares). The checkpoint is the demo's trained ``itpn_tiny`` when the repository has it, else
seeded random weights saved once per session.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from lit_ptq.models import create_model

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "demo_data" / "fashion_mnist"
DEMO_CHECKPOINT = REPO / "demo_data" / "itpn_tiny_fashion_mnist.pt"
TRAIN_PER_CLASS = 12
VAL_PER_CLASS = (5, 6, 7, 5, 6, 7, 5, 6, 7, 5)  # 59 images


def _copy_split(src: Path, dst: Path, counts: tuple[int, ...]) -> int:
    classes = sorted(p for p in src.iterdir() if p.is_dir())
    assert len(classes) == len(counts), f"{src} has {len(classes)} classes, expected {len(counts)}"
    total = 0
    for class_dir, count in zip(classes, counts):
        files = sorted(class_dir.glob("*.png"))[:count]
        assert len(files) == count, f"{class_dir} has fewer than {count} images"
        (dst / class_dir.name).mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, dst / class_dir.name / f.name)
        total += count
    return total


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder root (``train/``, ``val/``) of real Fashion-MNIST PNGs, 10 classes.

    ``train/`` holds 12 images per class (120), ``val/`` 5 to 7 per class (59).
    """
    root = tmp_path_factory.mktemp("fmnist")
    _copy_split(DEMO_DATA / "train", root / "train", (TRAIN_PER_CLASS,) * len(VAL_PER_CLASS))
    n_val = _copy_split(DEMO_DATA / "val", root / "val", VAL_PER_CLASS)
    assert n_val % 2 and n_val % 3
    return root


@pytest.fixture(scope="session")
def num_val_images(fmnist_root: Path) -> int:
    """How many images ``fmnist_root/val`` holds."""
    return sum(1 for _ in (fmnist_root / "val").rglob("*.png"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ``itpn_tiny`` (10 classes) checkpoint: the trained demo model if present, else seeded random weights."""
    if DEMO_CHECKPOINT.is_file():
        return DEMO_CHECKPOINT
    torch.manual_seed(0)
    model = create_model("itpn_tiny", num_classes=10)
    path = tmp_path_factory.mktemp("ckpt") / "itpn_tiny_random.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


def _tiny_config(
    root: Path, checkpoint: Path, calib_batch_size: int, calib_batches: int, logger: Optional[dict[str, Any]] = None
) -> dict[str, Any]:
    trainer: dict[str, Any] = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "enable_model_summary": False}
    if logger is not None:
        trainer["logger"] = logger
    return {
        "seed_everything": 0,
        "model": {
            "model_name": "itpn_tiny",
            "checkpoint": str(checkpoint),
            "num_classes": 10,
            "method": "minmax",
            "placement": "seed",
            "bits": "8/8/8",
        },
        "data": {
            "root": str(root),
            "batch_size": 10,
            "num_workers": 0,
            "calib_batch_size": calib_batch_size,
            "calib_batches": calib_batches,
        },
        "trainer": trainer,
    }


@pytest.fixture(scope="session")
def make_tiny_config() -> Callable[..., dict[str, Any]]:
    """``make_tiny_config(root, checkpoint, calib_batch_size, calib_batches, logger=None)``: a
    ``main.py`` config shaped like configs/demo.yaml (MinMax, seed placement, 8/8/8) for
    ``itpn_tiny`` on a small tree, batches of 10, one CPU process without a progress bar;
    ``logger`` sets ``trainer.logger`` (Lightning's default otherwise)."""
    return _tiny_config


SUBPROCESS_TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _main_subprocess(args: list[str], ddp: bool = False, **env: str) -> subprocess.CompletedProcess:
    if ddp:
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), **env}
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), **env}
    command = [sys.executable, str(REPO / "main.py"), *args]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with subprocess.Popen(command, cwd=REPO, env=environ, start_new_session=True, **pipes) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # DDP ranks Lightning started belong to the group too
            proc.communicate()
            raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@pytest.fixture(scope="session")
def main_subprocess() -> Callable[..., subprocess.CompletedProcess]:
    """``main_subprocess(args, ddp=False, **env)``: run ``python main.py ARGS`` in its own
    process group and return its ``CompletedProcess``; on a timeout the whole group (DDP
    ranks included) is killed. ``ddp=True`` sets ``MASTER_ADDR`` / a free ``MASTER_PORT``.
    ``tests/`` is on the path so that ``--trainer.callbacks`` can name a test module's callback."""
    return _main_subprocess
