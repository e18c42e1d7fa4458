"""Folder scanning and checks for image datasets: ImageFolder splits, prediction folders, class names.

Nothing here decodes an image. An ImageFolder split (torchvision's layout, as FQ-ViT
(Lin et al., IJCAI 2022) and its iTPN fork read ImageNet) has one sub-folder per class, the
classes indexed in sorted order; a prediction folder holds images flat or nested, unlabelled.
Hidden files and folders (names starting with ``.``) are ignored everywhere. Every failure is
a one-sentence :class:`~lit_ptq.errors.DataError` (or :class:`~lit_ptq.errors.ConfigError`
for an option that is not set) naming the folder and what would fix it.
"""

from __future__ import annotations

import os
from typing import Optional

from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import ConfigError, DataError

__all__ = [
    "check_predict_root",
    "check_root",
    "check_test_split",
    "class_folders",
    "read_class_names",
    "scan_image_folder",
    "scan_images",
]


def _visible(name: str) -> bool:
    return not name.startswith(".")


def scan_image_folder(split_dir: str) -> tuple[list[str], list[tuple[str, int]]]:
    """List an ImageFolder split without decoding anything.

    Classes are the sorted sub-folder names; images are files with an image extension
    (case-insensitive), searched recursively in each class folder in sorted order. Hidden
    folders and files (names starting with ``.``, e.g. ``.ipynb_checkpoints``, macOS ``._*``
    files) are ignored.

    Args:
        split_dir: the split folder, e.g. ``ROOT/val``.

    Returns:
        ``(classes, samples)`` with ``samples`` a list of ``(path, class_index)``.

    Raises:
        DataError: when the folder is missing, holds no class folders, or a class folder
            holds no images.
    """
    if not os.path.isdir(split_dir):
        raise DataError(
            f"{split_dir} is missing; data.root must hold train/ and val/ folders with one sub-folder per class"
        )
    classes = class_folders(split_dir)
    if not classes:
        raise DataError(
            f"{split_dir} holds no class folders; put each class's images in its own sub-folder (ImageFolder layout)"
        )
    extensions = tuple(IMG_EXTENSIONS)
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        count = len(samples)
        for dirpath, dirnames, filenames in sorted(os.walk(class_dir, followlinks=True)):
            dirnames[:] = [d for d in dirnames if _visible(d)]
            for fname in sorted(filenames):
                if _visible(fname) and fname.lower().endswith(extensions):
                    samples.append((os.path.join(dirpath, fname), index))
        if len(samples) == count:
            raise DataError(
                f"class folder {class_dir} holds no images ({', '.join(extensions)}); add images or remove the folder"
            )
    return classes, samples


def class_folders(split_dir: str) -> list[str]:
    """The sorted names of the visible sub-folders of ``split_dir`` (an ImageFolder split's classes)."""
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir() and _visible(e.name))


def check_predict_root(folder: Optional[str]) -> None:
    """Fail unless ``folder`` (``data.predict_root``) is set and is a folder (nothing is listed).

    Raises:
        ConfigError: ``folder`` is None.
        DataError: ``folder`` does not exist or is not a folder.
    """
    if folder is None:
        raise ConfigError("predict needs data.predict_root: set --data.predict_root to a folder of images")
    if not os.path.isdir(folder):
        raise DataError(
            f"data.predict_root={folder} does not exist or is not a folder; "
            "set it to a folder of images (flat or in sub-folders)"
        )


def scan_images(folder: str) -> list[str]:
    """Every image under ``folder`` (``data.predict_root``), recursively, sorted by path.

    Images are files with an image extension (case-insensitive) in ``folder`` or any
    sub-folder, at any depth; hidden folders and files (names starting with ``.``) are
    ignored. Nothing is decoded. Each path is ``os.path.join(folder, relative_path)``.

    Raises:
        ConfigError, DataError: as :func:`check_predict_root`; or the folder holds no images.
    """
    check_predict_root(folder)
    extensions = tuple(IMG_EXTENSIONS)
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if _visible(d)]
        paths += [os.path.join(dirpath, f) for f in filenames if _visible(f) and f.lower().endswith(extensions)]
    if not paths:
        raise DataError(
            f"data.predict_root={folder} holds no images ({', '.join(extensions)}), not even in sub-folders; "
            "add images or point data.predict_root at another folder"
        )
    return sorted(paths)


def check_test_split(root: str) -> None:
    """Fail unless ``root`` holds a ``test/`` folder (what ``main.py test`` evaluates).

    Raises:
        DataError: ``root`` or ``root/test`` is missing.
    """
    check_root(root)
    if not os.path.isdir(os.path.join(root, "test")):
        raise DataError(
            f"data.root={root} has no test/ folder; main.py test evaluates ROOT/test (ImageFolder layout): "
            "add a test/ split, or run main.py validate to evaluate ROOT/val"
        )


def read_class_names(path: str) -> list[str]:
    """Class names from a text file (``data.class_names``): one per line, in class-index order.

    Surrounding whitespace is stripped and trailing empty lines are ignored.

    Raises:
        DataError: the file is missing or unreadable, holds no names, or has an empty line
            among the names.
    """
    option = f"data.class_names={path}"
    if not os.path.isfile(path):
        raise DataError(f"{option} does not exist; give a text file with one class name per line, in class-index order")
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f.read().splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise DataError(f"cannot read {option} ({reason}); give a UTF-8 text file with one class name per line") from None
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DataError(f"{option} holds no class names; write one class name per line, in class-index order")
    if "" in names:
        raise DataError(f"{option}: line {names.index('') + 1} is empty; write one class name per line, with no blank lines")
    return names


def check_root(root: str) -> None:
    """Fail unless ``root`` (``data.root``) is a folder.

    Raises:
        DataError: ``root`` does not exist or is not a folder.
    """
    if not os.path.isdir(root):
        raise DataError(
            f"dataset root {root} does not exist or is not a folder; "
            "set data.root to a folder holding train/ and val/ in ImageFolder layout"
        )
