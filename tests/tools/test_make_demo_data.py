"""Tests for lit_ptq/tools/make_demo_data.py and the committed demo_data/fashion_mnist tree."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from lit_ptq.errors import DataError, UserError
from lit_ptq.tools.make_demo_data import CLASS_FOLDERS, IDX_FILES, main, make_demo_data, read_idx

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "demo_data" / "fashion_mnist"
DEBIAN_SOURCE = Path("/usr/share/datasets/fashion-mnist")
NUM_CLASSES = len(CLASS_FOLDERS)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzip IDX file: magic 0x0000080N, N big-endian sizes, raw bytes."""
    header = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_source(root: Path, train_per_class: int = 3, val_per_class: int = 2, size: int = 5) -> dict:
    """Synthetic Fashion-MNIST: every class in both splits, labels interleaved, random pixels."""
    rng = np.random.default_rng(0)
    root.mkdir()
    arrays = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        labels = np.tile(np.arange(NUM_CLASSES, dtype=np.uint8), per_class)
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(len(labels), size, size), dtype=np.uint8)
        images_name, labels_name = IDX_FILES[split]
        write_idx(root / images_name, images)
        write_idx(root / labels_name, labels)
        arrays[split] = (images, labels)
    return arrays


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict]:
    arrays = make_source(tmp_path / "src")
    return tmp_path / "src", arrays


def test_read_idx_round_trip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz", ndim=3), array)


def test_tree_labels_and_pixels(source: tuple[Path, dict], tmp_path: Path) -> None:
    src, arrays = source
    out = tmp_path / "out" / "fmnist"
    assert main(["--source", str(src), "--out", str(out), "--train-per-class", "2"]) == 0

    assert sorted(p.name for p in out.iterdir()) == ["LICENSE", "README.md", "train", "val"]
    assert "Zalando SE" in (out / "LICENSE").read_text() and "MIT" in (out / "LICENSE").read_text()
    assert "--train-per-class 2" in (out / "README.md").read_text()
    assert not list(out.parent.glob(".*")), "temporary folder left behind"
    for split, per_class in (("train", 2), ("val", 2)):
        images, labels = arrays[split]
        dataset = ImageFolder(str(out / split))
        assert dataset.class_to_idx == {folder: k for k, folder in enumerate(CLASS_FOLDERS)}
        assert np.bincount([target for _, target in dataset.samples]).tolist() == [per_class] * NUM_CLASSES
        for path, target in dataset.samples:
            index = int(Path(path).stem)
            assert labels[index] == target
            with Image.open(path) as image:
                assert image.mode == "L"
                np.testing.assert_array_equal(np.asarray(image), images[index])
    # train keeps the first two of each class in file order
    train_labels = arrays["train"][1]
    for k, folder in enumerate(CLASS_FOLDERS):
        expected = [f"{i:05d}.png" for i in np.flatnonzero(train_labels == k)[:2]]
        assert sorted(p.name for p in (out / "train" / folder).iterdir()) == expected


def test_deterministic_bytes(source: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = source
    out = tmp_path / "out"
    make_demo_data(src, out, train_per_class=3)
    first = tree_bytes(out)
    make_demo_data(src, out, train_per_class=3, force=True)
    assert tree_bytes(out) == first
    assert len(first) == 2 + 3 * NUM_CLASSES + 2 * NUM_CLASSES


def test_refuses_to_overwrite_unless_forced(source: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = source
    out = tmp_path / "out"
    make_demo_data(src, out, train_per_class=1)
    before = tree_bytes(out)
    with pytest.raises(UserError, match="already exists; pass --force"):
        make_demo_data(src, out, train_per_class=2)
    assert tree_bytes(out) == before
    assert main(["--source", str(src), "--out", str(out)]) == 1

    make_demo_data(src, out, train_per_class=2, force=True)
    assert len(list((out / "train").rglob("*.png"))) == 2 * NUM_CLASSES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda p: p.write_bytes(b"not gzip at all"), "is not a readable gzip file"),
        (lambda p: write_idx(p, np.zeros(7, dtype=np.uint8)), r"magic number 0x00000801, expected 0x00000803"),
        (lambda p: p.write_bytes(gzip.compress(struct.pack(">IIII", 0x0803, 2, 5, 5) + bytes(49))), "needs 66"),
        (lambda p: p.write_bytes(gzip.compress(b"\x00\x00")), "fewer than its 16-byte header"),
        (lambda p: p.unlink(), "does not exist"),
    ],
    ids=["not-gzip", "wrong-magic", "truncated", "short-header", "missing"],
)
def test_corrupt_idx_is_a_clear_error(source: tuple[Path, dict], tmp_path: Path, corrupt, match: str) -> None:
    src, _ = source
    bad = src / IDX_FILES["val"][0]
    corrupt(bad)
    with pytest.raises(DataError, match=match) as excinfo:
        make_demo_data(src, tmp_path / "out", train_per_class=1)
    assert str(bad) in str(excinfo.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], "nothing may be written on failure"


def test_too_few_images_per_class(source: tuple[Path, dict], tmp_path: Path) -> None:
    src, _ = source
    with pytest.raises(DataError, match=r"train_per_class=4 but .* has only 3 images of class 0_t-shirt_top"):
        make_demo_data(src, tmp_path / "out", train_per_class=4)


def test_committed_demo_data_counts() -> None:
    assert (DEMO / "LICENSE").is_file() and (DEMO / "README.md").is_file()
    for split, per_class in (("val", 1000), ("train", 300)):
        folders = sorted(p.name for p in (DEMO / split).iterdir())
        assert folders == list(CLASS_FOLDERS)
        counts = [sum(1 for p in (DEMO / split / f).iterdir() if p.suffix == ".png") for f in folders]
        assert counts == [per_class] * NUM_CLASSES, split


@pytest.mark.parametrize("split", ["val", "train"])
def test_committed_demo_data_decodes(split: str) -> None:
    paths = [sorted((DEMO / split / folder).iterdir())[0] for folder in CLASS_FOLDERS]
    for path in paths:
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (28, 28)
    if not DEBIAN_SOURCE.is_dir():
        pytest.skip(f"{DEBIAN_SOURCE} (Debian package dataset-fashion-mnist) is not installed")
    images = read_idx(DEBIAN_SOURCE / IDX_FILES[split][0], ndim=3)
    labels = read_idx(DEBIAN_SOURCE / IDX_FILES[split][1], ndim=1)
    for k, path in enumerate(paths):
        index = int(path.stem)
        assert labels[index] == k
        np.testing.assert_array_equal(np.asarray(Image.open(path)), images[index])
