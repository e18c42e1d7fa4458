"""Robust image loading: decoding that never raises in a worker, and a loader that reports in the main process.

A DataLoader worker cannot raise a clean exception: the DataLoader re-raises it in the main
process wrapped in a traceback text. So decoding never raises here: :class:`ImageFileDataset`
returns an :class:`UnreadableImage` marker in place of the image, :func:`collate_checked` moves
the markers out of the batch, and the main-process iterator of :class:`CheckedDataLoader`
either raises :class:`~lit_ptq.errors.DataError` (one sentence naming the file) or, with
``skip_unreadable=True``, drops the image and records its path.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError

__all__ = ["CheckedDataLoader", "ImageFileDataset", "UnreadableImage", "collate_checked", "load_rgb"]

log = logging.getLogger(__name__)

# What PIL raises on a truncated, corrupt or foreign file (UnidentifiedImageError and
# "image file is truncated" are OSErrors; some plugins raise the others).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, Image.DecompressionBombError)


def load_rgb(path: str) -> Image.Image:
    """Decode an image file completely and convert it to RGB.

    PIL identifies the format by content, so CMYK and grayscale JPEGs and PNG files named
    ``.JPEG`` (all present in ImageNet) decode alike.

    Raises:
        OSError, SyntaxError, ValueError, ...: whatever PIL raises for an unreadable file.
    """
    with Image.open(path) as img:
        return img.convert("RGB")  # convert() loads the whole file, so truncation shows here


@dataclass(frozen=True)
class UnreadableImage:
    """Marker that :class:`ImageFileDataset` returns in place of an image it could not decode."""

    path: str
    reason: str


class ImageFileDataset(Dataset):
    """Images listed as ``(path, class_index)``, decoded as RGB and transformed.

    ``dataset[i]`` is ``(image_tensor, class_index)``, or ``(UnreadableImage, class_index)``
    when the file cannot be decoded: it never raises for a bad file, so the main process can
    report it cleanly (see :class:`CheckedDataLoader`).

    Attributes:
        samples: the ``(path, class_index)`` list, in index order.
        classes: class names, ``classes[class_index]``.
    """

    def __init__(
        self, samples: Sequence[tuple[str, int]], classes: Sequence[str], transform: Callable[[Image.Image], Any]
    ) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Union[torch.Tensor, UnreadableImage], int]:
        path, target = self.samples[index]
        try:
            image = load_rgb(path)
        except UnidentifiedImageError:
            return UnreadableImage(path, "not an image format PIL recognizes"), target
        except _DECODE_ERRORS as err:
            return UnreadableImage(path, str(err) or type(err).__name__), target
        return self.transform(image), target


def collate_checked(
    batch: Sequence[tuple[Union[torch.Tensor, UnreadableImage], int]],
) -> tuple[torch.Tensor, torch.Tensor, tuple[tuple[str, str], ...]]:
    """Stack the decoded samples of a batch and set the unreadable ones aside.

    Returns:
        ``(images, targets, failures)``: ``images`` ``(B, 3, H, W)`` and ``targets`` ``(B,)``
        int64 of the readable samples (``B`` may be 0), and ``failures`` a tuple of
        ``(path, reason)`` for the others.
    """
    good = [(image, target) for image, target in batch if not isinstance(image, UnreadableImage)]
    failures = tuple((image.path, image.reason) for image, _ in batch if isinstance(image, UnreadableImage))
    if good:
        images = torch.stack([image for image, _ in good])
    else:
        images = torch.empty(0)
    targets = torch.tensor([target for _, target in good], dtype=torch.int64)
    return images, targets, failures


class CheckedDataLoader(DataLoader):
    """A DataLoader over :class:`ImageFileDataset` that reports unreadable images in the main process.

    It yields ``(images, targets)``. For each unreadable image of a batch it raises
    ``DataError("cannot read image PATH: REASON; remove or replace the file, or set
    data.skip_unreadable=true")``, or, with ``skip_unreadable=True``, logs a warning, drops
    the image from its batch and appends its path to ``skipped_files``. A batch left with no
    image is not yielded. The same holds for any ``num_workers``, since the check runs here
    and not in the workers.

    With ``empty_batch`` set, a loader that would yield no batch at all (a rank whose share of
    the images is empty, or all unreadable) yields one batch of zero images instead, shaped
    ``(0, *empty_batch)`` with ``(0,)`` targets, and its ``len`` is at least 1: Lightning then
    runs that rank's evaluation loop (its hooks and the metrics' sync across ranks) instead of
    skipping it while the other ranks wait for it.

    Args:
        dataset: an :class:`ImageFileDataset` or a ``Subset`` of one.
        skip_unreadable: drop unreadable images instead of raising.
        skipped_files: the list that receives the paths of dropped images (a new one if None).
        empty_batch: the image shape ``(C, H, W)`` of the empty batch yielded when there is
            nothing else to yield; None: yield nothing then.
        **kwargs: DataLoader arguments; ``collate_fn`` defaults to :func:`collate_checked`.
    """

    def __init__(
        self,
        dataset: Dataset,
        *args: Any,
        skip_unreadable: bool = False,
        skipped_files: Optional[list[str]] = None,
        empty_batch: Optional[Sequence[int]] = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("collate_fn", collate_checked)
        super().__init__(dataset, *args, **kwargs)
        self.skip_unreadable = skip_unreadable
        self.skipped_files = [] if skipped_files is None else skipped_files
        self.empty_batch = None if empty_batch is None else tuple(empty_batch)

    def __len__(self) -> int:
        length = super().__len__()
        return max(length, 1) if self.empty_batch is not None else length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        yielded = False
        for images, targets in self._checked_batches():
            yielded = True
            yield images, targets
        if not yielded and self.empty_batch is not None:
            yield torch.empty((0, *self.empty_batch)), torch.empty(0, dtype=torch.int64)

    def _checked_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of readable images (unreadable ones raised or dropped); no empty batch."""
        for images, targets, failures in super().__iter__():
            for path, reason in failures:
                if not self.skip_unreadable:
                    raise DataError(
                        f"cannot read image {path}: {reason}; remove or replace the file, "
                        "or set data.skip_unreadable=true"
                    )
                log.warning("skipping unreadable image %s: %s", path, reason)
                self.skipped_files.append(path)
            if len(targets):
                yield images, targets
