"""Write Fashion-MNIST as a small ImageFolder tree of PNGs, the demo dataset shipped in the repository.

Fashion-MNIST: Xiao, Rasul and Vollgraf, "Fashion-MNIST: a Novel Image Dataset for Benchmarking
Machine Learning Algorithms", arXiv:1708.07747 (2017); MIT licence, Zalando SE. The source is the
four IDX gzip files of Debian's ``dataset-fashion-mnist`` package; the IDX format (a big-endian
header of magic number and sizes, then raw bytes) is the one LeCun et al. defined for MNIST.

Output layout (``torchvision.datasets.ImageFolder`` reads it; the label-number prefix makes the
alphabetical class index equal the original label)::

    <out>/val/<k>_<name>/<index:05d>.png     all test images (t10k files)
    <out>/train/<k>_<name>/<index:05d>.png   the first N training images of each class (calibration)
    <out>/LICENSE, <out>/README.md

``<index>`` is the image's position in its IDX file. Re-running with the same inputs gives
byte-identical files. Usage::

    python -m lit_ptq.tools.make_demo_data --source /usr/share/datasets/fashion-mnist \\
        --out demo_data/fashion_mnist --train-per-class 300
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import shlex
import shutil
import struct
import sys
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lit_ptq.errors import DataError, UserError

log = logging.getLogger(__name__)

MODULE = "lit_ptq.tools.make_demo_data"
DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = Path("demo_data/fashion_mnist")
DEFAULT_TRAIN_PER_CLASS = 300

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CLASS_FOLDERS = (
    "0_t-shirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
    "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot",
)  # fmt: skip

# split -> (images file, labels file); "val" is the official test set.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IDX_UBYTE = 0x08  # the IDX type code for unsigned bytes, the only one Fashion-MNIST uses

LICENSE_TEXT = """\
The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT
OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.

---
The images in this folder are Fashion-MNIST (https://github.com/zalandoresearch/fashion-mnist),
converted to PNG from the IDX files of Debian's dataset-fashion-mnist package, whose
/usr/share/doc/dataset-fashion-mnist/copyright file gives the copyright and licence above
(Files: *, Copyright: 2017, Zalando SE, License: Expat, i.e. MIT).
"""

__all__ = ["CLASS_FOLDERS", "CLASS_NAMES", "main", "make_demo_data", "read_idx"]


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes.

    Args:
        path: The ``.gz`` file.
        ndim: The number of dimensions the file must have (3 for images, 1 for labels).

    Returns:
        A ``uint8`` array with the sizes the header declares.

    Raises:
        DataError: If the file is missing, not gzip, has the wrong magic number, or its size
            does not match its header. The message names the file.
    """
    if not path.is_file():
        raise DataError(f"IDX file {path} does not exist; pass --source the folder that holds it")
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"IDX file {path} is not a readable gzip file ({err})") from err
    header_size = 4 + 4 * ndim
    expected_magic = (IDX_UBYTE << 8) | ndim
    magic = int.from_bytes(data[:4], "big")
    if len(data) >= 4 and magic != expected_magic:  # checked first: it tells swapped files apart
        raise DataError(
            f"IDX file {path} has magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    if len(data) < header_size:
        raise DataError(f"IDX file {path} has {len(data)} bytes, fewer than its {header_size}-byte header")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    expected_size = header_size + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected_size:
        raise DataError(
            f"IDX file {path} has {len(data)} bytes but its header {tuple(shape)} needs {expected_size}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def read_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, H, W)`` and labels ``(N,)`` (uint8) of a Fashion-MNIST split (``train`` or ``val``).

    Raises:
        DataError: a file is missing or malformed, the counts differ, or a label is not 0..9.
    """
    images_name, labels_name = IDX_FILES[split]
    images = read_idx(source / images_name, ndim=3)
    labels = read_idx(source / labels_name, ndim=1)
    if len(images) != len(labels):
        raise DataError(
            f"{source / images_name} has {len(images)} images but {source / labels_name} has {len(labels)} labels"
        )
    if labels.size and labels.max() >= len(CLASS_FOLDERS):
        raise DataError(
            f"{source / labels_name} has label {labels.max()}; Fashion-MNIST labels are 0..{len(CLASS_FOLDERS) - 1}"
        )
    return images, labels


def _first_per_class(labels: np.ndarray, n: int, labels_path: Path) -> np.ndarray:
    """Indices of the first ``n`` images of each class, in file order."""
    chosen = []
    for k, folder in enumerate(CLASS_FOLDERS):
        found = np.flatnonzero(labels == k)
        if len(found) < n:
            raise DataError(f"train_per_class={n} but {labels_path} has only {len(found)} images of class {folder}")
        chosen.append(found[:n])
    return np.sort(np.concatenate(chosen))


def _write_images(root: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> list[int]:
    """Write ``images[indices]`` as ``root/<class>/<index:05d>.png``; return the count per class."""
    counts = [0] * len(CLASS_FOLDERS)
    for k, folder in enumerate(CLASS_FOLDERS):
        (root / folder).mkdir(parents=True)
    for i in indices.tolist():
        k = int(labels[i])
        # No text chunks and no timestamp: PIL's PNG writer adds neither unless asked.
        Image.fromarray(images[i]).save(root / CLASS_FOLDERS[k] / f"{i:05d}.png", format="PNG", optimize=True)
        counts[k] += 1
    missing = [CLASS_FOLDERS[k] for k, c in enumerate(counts) if c == 0]
    if missing:
        raise DataError(f"{root.name} split has no images of class(es) {', '.join(missing)}; ImageFolder needs all ten")
    return counts


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _readme(command: str, source: Path, counts: dict[str, list[int]], image_shape: tuple[int, int]) -> str:
    rows = "\n".join(
        f"| {k} | `{folder}` | {name} | {counts['train'][k]} | {counts['val'][k]} |"
        for k, (folder, name) in enumerate(zip(CLASS_FOLDERS, CLASS_NAMES))
    )
    checksums = "\n".join(
        f"    {_sha256(source / name)}  {name}" for split in ("train", "val") for name in IDX_FILES[split]
    )
    height, width = image_shape
    return f"""\
# Fashion-MNIST demo data

A compact real dataset for the lit_ptq demo: Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017,
arXiv:1708.07747; https://github.com/zalandoresearch/fashion-mnist), {height}x{width} 8-bit grayscale
images of Zalando articles in ten classes, stored as PNG in the layout
`torchvision.datasets.ImageFolder` reads.

- `val/` holds all {sum(counts['val']):,} images of the official test set (`t10k-*` files).
- `train/` holds the first {counts['train'][0]} images of each class of the official training set,
  {sum(counts['train']):,} in all: the calibration split.
- File names are the image's index in its IDX file: `val/3_dress/00013.png` is test image 13.
- Class folders carry the label number as a prefix, so ImageFolder's alphabetical class index
  equals the original Fashion-MNIST label.

| label | folder | class | train | val |
|---|---|---|---|---|
{rows}
| | | **total** | **{sum(counts['train']):,}** | **{sum(counts['val']):,}** |

## Provenance

Made from the IDX gzip files of Debian's `dataset-fashion-mnist` package by

    {command}

The pixels are the original bytes, unchanged; re-running the command gives byte-identical files.
SHA-256 of the source files:

{checksums}

## Licence

MIT, Copyright (c) 2017 Zalando SE; see `LICENSE` (taken from the package's
`/usr/share/doc/dataset-fashion-mnist/copyright` and the upstream README).
"""


def make_demo_data(
    source: Path = DEFAULT_SOURCE,
    out: Path = DEFAULT_OUT,
    train_per_class: int = DEFAULT_TRAIN_PER_CLASS,
    force: bool = False,
) -> dict[str, list[int]]:
    """Convert Fashion-MNIST IDX files into the demo ImageFolder tree.

    Everything is written to a temporary sibling of ``out`` that is renamed to ``out`` at the
    end, so a failure leaves no half-written tree behind.

    Args:
        source: Folder holding the four ``*-ubyte.gz`` IDX files.
        out: Output folder; must not exist unless ``force``.
        train_per_class: How many training images to keep per class (the first in file order).
        force: Replace an existing ``out``.

    Returns:
        The number of images written per class, keyed by split (``"train"``, ``"val"``).

    Raises:
        UserError: If ``out`` exists and ``force`` is false, or ``train_per_class`` is below 1.
        DataError: If an IDX file is missing or malformed, or a class has too few images.
    """
    source, out = Path(source), Path(out)
    if train_per_class < 1:
        raise UserError(f"train_per_class={train_per_class} must be at least 1")
    if out.exists() and not force:
        raise UserError(f"output {out} already exists; pass --force to replace it")
    splits = {split: read_split(source, split) for split in ("val", "train")}
    train_labels_path = source / IDX_FILES["train"][1]
    selected = {
        "val": np.arange(len(splits["val"][1])),
        "train": _first_per_class(splits["train"][1], train_per_class, train_labels_path),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        counts = {split: _write_images(tmp / split, *splits[split], selected[split]) for split in ("val", "train")}
        command = shlex.join(
            ["python", "-m", MODULE, "--source", str(source), "--out", str(out),
             "--train-per-class", str(train_per_class)]
        )  # fmt: skip
        image_shape = splits["val"][0].shape[1:]
        (tmp / "README.md").write_text(_readme(command, source, counts, image_shape), encoding="utf-8")
        (tmp / "LICENSE").write_text(LICENSE_TEXT, encoding="utf-8")
        tmp.chmod(0o755)  # mkdtemp makes it 0o700
        if out.exists():  # --force: swap the old tree out first, so `out` is never half-written
            old = tmp.with_name(f"{tmp.name}-old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s: %d val and %d train images", out, sum(counts["val"]), sum(counts["train"]))
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 with a one-line message on a user error)."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with the four IDX .gz files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output ImageFolder root")
    parser.add_argument("--train-per-class", type=int, default=DEFAULT_TRAIN_PER_CLASS,
                        help="training (calibration) images kept per class")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        make_demo_data(args.source, args.out, args.train_per_class, args.force)
    except UserError as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
