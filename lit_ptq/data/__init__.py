"""ImageNet-style data for post-training quantization: folder checks, robust image loading, the DataModule.

* :mod:`lit_ptq.data.folders`: listing and checking ImageFolder splits, prediction folders
  and class-name files (nothing decoded).
* :mod:`lit_ptq.data.images`: decoding that never raises in a worker, and
  :class:`CheckedDataLoader`, which reports or skips unreadable images in the main process.
* :mod:`lit_ptq.data.datamodule`: :class:`ImageNetDataModule` with FQ-ViT's calibration and
  evaluation protocol (Lin et al., IJCAI 2022), :func:`eval_transform` and
  :class:`UnpaddedDistributedSampler`.
"""

from .datamodule import ImageNetDataModule, UnpaddedDistributedSampler, eval_transform
from .folders import (
    check_predict_root,
    check_root,
    check_test_split,
    class_folders,
    read_class_names,
    scan_image_folder,
    scan_images,
)
from .images import CheckedDataLoader, ImageFileDataset, UnreadableImage, collate_checked, load_rgb

__all__ = [
    "CheckedDataLoader",
    "ImageFileDataset",
    "ImageNetDataModule",
    "UnpaddedDistributedSampler",
    "UnreadableImage",
    "check_predict_root",
    "check_root",
    "check_test_split",
    "class_folders",
    "collate_checked",
    "eval_transform",
    "load_rgb",
    "read_class_names",
    "scan_image_folder",
    "scan_images",
]
