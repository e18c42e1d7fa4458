"""Specification of lit_ptq/tools/train_demo.py: input preparation, augmentation, schedule, deterministic training."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lit_ptq.data import eval_transform, load_rgb
from lit_ptq.models import create_model, model_entry
from lit_ptq.tools.make_demo_data import IDX_FILES
from lit_ptq.tools.train_demo import TrainConfig, _warmup_cosine, augment, main, normalize, prepare_images, train_demo

DEMO_VAL = Path(__file__).resolve().parents[2] / "demo_data" / "fashion_mnist" / "val"
EVAL_CFG = model_entry("itpn_tiny")[1]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzip IDX file: magic 0x0000080N, N big-endian sizes, raw bytes."""
    header = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A synthetic Fashion-MNIST training split: 40 random 28x28 images, 4 of each class."""
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(10, dtype=np.uint8), 4)
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    root = tmp_path / "src"
    root.mkdir()
    write_idx(root / IDX_FILES["train"][0], images)
    write_idx(root / IDX_FILES["train"][1], labels)
    return root


def test_prepared_inputs_equal_the_evaluation_path() -> None:
    files = [sorted(d.glob("*.png"))[0] for d in sorted(DEMO_VAL.iterdir())]
    pixels = np.stack([np.asarray(Image.open(f)) for f in files])
    assert pixels.shape == (10, 28, 28) and pixels.dtype == np.uint8

    prepared = prepare_images(pixels, EVAL_CFG)
    assert prepared.shape == (10, 1, 32, 32) and prepared.dtype == torch.uint8
    expected = torch.stack([eval_transform(EVAL_CFG)(load_rgb(str(f))) for f in files])
    torch.testing.assert_close(normalize(prepared, EVAL_CFG), expected, atol=0, rtol=0)


def test_augment_shifts_within_padding_and_flips() -> None:
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    out = augment(images, pad=2, flip=True, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flipped = 0
    for i in range(len(images)):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(out[i], c) for c in crops)
        mirrored = any(torch.equal(out[i], c.flip(-1)) for c in crops)
        assert plain or mirrored, f"image {i} is not a shifted (and possibly flipped) copy"
        flipped += mirrored and not plain
    assert 0 < flipped < len(images)
    assert torch.equal(augment(images, pad=0, flip=False, generator=torch.Generator()), images)


def test_warmup_cosine_schedule() -> None:
    factors = [_warmup_cosine(step, warmup_steps=10, total_steps=110, min_ratio=0.01) for step in range(111)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[9] == factors[10] == 1.0
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[110] == pytest.approx(0.01)


def test_training_writes_a_loadable_deterministic_checkpoint(source: Path, tmp_path: Path) -> None:
    config = TrainConfig(epochs=1, batch_size=16, seed=3)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = train_demo(source, tmp_path / "a" / "model.pt", config, progress=False)
    second = train_demo(source, tmp_path / "b" / "model.pt", config, progress=False)
    assert first.steps == second.steps == 3 and first.images == 40

    payloads = [torch.load(r.out, map_location="cpu", weights_only=True) for r in (first, second)]
    assert all(set(p) == {"model"} for p in payloads)
    a, b = (p["model"] for p in payloads)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between two runs with the same seed"
        assert a[key].dtype in (torch.float32, torch.int64)
    untrained = create_model("itpn_tiny", num_classes=10).state_dict()
    assert not torch.equal(a["head.weight"], untrained["head.weight"])

    model = create_model("itpn_tiny", num_classes=10, checkpoint=str(first.out))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert [p.name for p in first.out.parent.iterdir()] == ["model.pt"], "temporary file left behind"


def test_missing_source_is_one_line_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["--source", str(tmp_path), "--out", str(tmp_path / "m.pt"), "--no-progress"]) == 1
    assert "does not exist" in caplog.text
    assert not (tmp_path / "m.pt").exists()


def test_a_held_out_model_of_another_family_trains_and_loads_with_its_kwargs(source: Path, tmp_path: Path) -> None:
    from lit_ptq.tools.train_demo import main

    kwargs = dict(img_size=32, patch_size=8, depth=1, embed_dim=24, num_heads=2)
    out = tmp_path / "deit.pt"
    assert main(["--source", str(source), "--out", str(out), "--epochs", "1", "--no-progress", "--precision", "32-true",
                 "--model", "deit_tiny_patch16_224", "--model-kwargs", json.dumps(kwargs)]) == 0  # fmt: skip
    model = create_model("deit_tiny_patch16_224", num_classes=10, checkpoint=str(out), **kwargs)
    assert model.eval_cfg.input_size[-1] == 32 and len(model.blocks) == 1
    x = torch.zeros(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    assert not torch.equal(model.head.weight, create_model("deit_tiny_patch16_224", num_classes=10, **kwargs).head.weight)
