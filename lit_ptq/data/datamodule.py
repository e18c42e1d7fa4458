"""The ImageNet DataModule of lit_ptq: calibration, evaluation and prediction loaders.

The protocol is the one of FQ-ViT (Lin et al., "FQ-ViT: Post-Training Quantization for Fully
Quantized Vision Transformer", IJCAI 2022) and its iTPN fork: calibration takes the first
``calib_batches`` batches of a shuffled loader over ``train/`` with the *evaluation*
transform; evaluation reads every image of ``val/`` (or, for ``main.py test``, ``test/``)
once, split over ranks without padding (:class:`UnpaddedDistributedSampler`). Prediction
reads every image under any folder (flat or nested), unlabelled. The folders are listed and
checked by :mod:`lit_ptq.data.folders`; images are read by :mod:`lit_ptq.data.images`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from pytorch_lightning import LightningDataModule
from torch.utils.data import Dataset, DistributedSampler, Subset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from ..errors import ConfigError, DataError
from ..models import EvalConfig, model_entry
from .folders import check_root, check_test_split, class_folders, read_class_names, scan_image_folder, scan_images
from .images import CheckedDataLoader, ImageFileDataset

__all__ = ["ImageNetDataModule", "UnpaddedDistributedSampler", "eval_transform"]

_SHOW = 5  # how many names an error message lists


def eval_transform(eval_cfg: EvalConfig) -> transforms.Compose:
    """The evaluation transform of a model: resize, center crop, to tensor, normalize.

    The image is resized to ``int(side / crop_pct)`` on its shorter edge (both edges for a
    non-square input) with ``eval_cfg.interpolation``, then center-cropped to the input size:
    for iTPN at 224 that is Resize(256, bicubic), CenterCrop(224).

    Args:
        eval_cfg: the model's evaluation metadata (``model.eval_cfg`` or
            ``lit_ptq.models.model_entry(name)[1]``).

    Returns:
        A transform from an RGB PIL image to a normalized ``(3, H, W)`` float tensor.

    Raises:
        ConfigError: for an unknown interpolation name or a non-positive crop_pct.
    """
    try:
        interpolation = InterpolationMode(eval_cfg.interpolation)
    except ValueError:
        names = ", ".join(mode.value for mode in InterpolationMode)
        raise ConfigError(f"interpolation={eval_cfg.interpolation!r} is not one of {names}") from None
    if not eval_cfg.crop_pct > 0:
        raise ConfigError(f"crop_pct={eval_cfg.crop_pct} must be positive, e.g. 0.875")
    height, width = eval_cfg.input_size[-2:]
    if height == width:
        resize: Union[int, tuple[int, int]] = math.floor(height / eval_cfg.crop_pct)
    else:
        resize = (math.floor(height / eval_cfg.crop_pct), math.floor(width / eval_cfg.crop_pct))
    return transforms.Compose(
        [
            transforms.Resize(resize, interpolation=interpolation),
            transforms.CenterCrop((height, width)),
            transforms.ToTensor(),
            transforms.Normalize(eval_cfg.mean, eval_cfg.std),
        ]
    )


class UnpaddedDistributedSampler(DistributedSampler):
    """Strided split of a dataset over ranks without padding: every index exactly once.

    Rank ``r`` of ``W`` gets ``r, r + W, r + 2W, ...`` in order, so ranks may get one index
    more or fewer than each other. Torch's DistributedSampler instead repeats indices to
    even the ranks out, which counts some validation images twice. Being a
    DistributedSampler subclass, Lightning leaves it in place.

    With fewer indices than ranks, the last ranks get none, and Lightning would skip their loop
    (hooks included) while the others wait for them in collective calls. The validation and
    test loaders give such a rank one empty batch instead (``empty_batch`` of
    :class:`~lit_ptq.data.images.CheckedDataLoader`), so every image still counts once;
    ``fill_empty=True`` gives it index 0, a duplicate its consumer must drop (``main.py
    predict`` keeps each image's first row).

    Args:
        dataset: the dataset to split.
        num_replicas: world size (default: from torch.distributed).
        rank: this process's rank (default: from torch.distributed).
        fill_empty: give a rank that would get no index the index 0 (a non-empty dataset's).
    """

    def __init__(
        self, dataset: Dataset, num_replicas: Optional[int] = None, rank: Optional[int] = None, fill_empty: bool = False
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.total_size = len(dataset)  # type: ignore[arg-type]
        self.indices = range(self.rank, self.total_size, self.num_replicas)
        if fill_empty and not self.indices and self.total_size:
            self.indices = range(1)
        self.num_samples = len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


class ImageNetDataModule(LightningDataModule):
    """Calibration, evaluation and prediction loaders over an ImageFolder dataset (``ROOT/train``, ``ROOT/val``).

    Batches are ``(images, targets)``: float ``(B, 3, H, W)`` normalized with the model's
    mean/std, and int64 class indices (sorted class-folder order).

    * :meth:`calib_dataloader`: the first ``calib_batches`` batches (of ``calib_batch_size``)
      of ``train/`` shuffled with ``torch.Generator().manual_seed(seed)`` -- the order a
      ``DataLoader(shuffle=True, generator=...)`` would give -- with the evaluation
      transform; identical on every rank and on every iteration.
    * :meth:`val_dataloader`: every image of ``val/`` exactly once across all ranks, rank
      ``r`` of ``W`` reading images ``r, r+W, ...`` (:class:`UnpaddedDistributedSampler`);
      a rank left without images (fewer images than ranks) gets one batch of zero images.
    * :meth:`test_dataloader`: the same over ``test/`` (``main.py test``).
    * :meth:`predict_dataloader`: every image under ``predict_root`` (:func:`scan_images`,
      sorted paths) exactly once across ranks; its "targets" are the images' indices into
      :attr:`predict_dataset`, whose ``samples[i][0]`` is the path.

    Unreadable images raise :class:`~lit_ptq.errors.DataError` naming the file, in the main
    process. With ``skip_unreadable=True`` they are dropped from their batch instead and their
    paths appended to :attr:`skipped_files`.

    Args:
        root: folder holding ``train/`` and ``val/`` in ImageFolder layout (``train/`` is
            needed only when ``calib_batches > 0``, or to name the classes of a prediction;
            ``test/`` only for ``main.py test``).
        model_name: registered model whose evaluation transform to use.
        img_size: input side, overriding the registered one.
        batch_size: validation batch size (also for test and predict).
        num_workers: DataLoader worker processes.
        calib_batch_size: calibration batch size.
        calib_batches: number of calibration batches (0: no calibration).
        seed: seed of the calibration shuffle.
        num_classes: when set, every split (and the class names of a prediction) must have
            this many classes.
        skip_unreadable: drop unreadable images (and count them) instead of raising.
        pin_memory: pin batches in page-locked memory (for GPU runs).
        predict_root: the folder ``main.py predict`` runs the model on: every image in it or
            in its sub-folders (flat or ImageFolder layout), unlabelled.
        class_names: a text file with one class name per line, in class-index order, naming
            the classes of a prediction; by default the class folders of ``root/train``.

    Attributes:
        eval_cfg: the model's :class:`~lit_ptq.models.EvalConfig`, with ``img_size`` applied.
        transform: ``eval_transform(eval_cfg)``.
        classes: class names after :meth:`setup` (index order).
        skipped_files: paths of the images dropped so far in this process, one entry per drop
            (a file read in two passes appears twice); the count is ``len(skipped_files)``.
            Each rank records its own drops.
    """

    def __init__(
        self,
        root: str,
        model_name: str = "itpn_base",
        img_size: Optional[int] = None,
        batch_size: int = 100,
        num_workers: int = 8,
        calib_batch_size: int = 100,
        calib_batches: int = 10,
        seed: int = 0,
        num_classes: Optional[int] = None,
        skip_unreadable: bool = False,
        pin_memory: bool = False,
        predict_root: Optional[str] = None,
        class_names: Optional[str] = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("calib_batch_size", calib_batch_size)):
            if value < 1:
                raise ConfigError(f"data.{name}={value} must be at least 1")
        for name, value in (("calib_batches", calib_batches), ("num_workers", num_workers)):
            if value < 0:
                raise ConfigError(f"data.{name}={value} must be 0 or more")
        if num_classes is not None and num_classes < 1:
            raise ConfigError(f"data.num_classes={num_classes} must be at least 1, or null to accept any count")
        if img_size is not None and img_size < 1:
            raise ConfigError(f"data.img_size={img_size} must be at least 1, or null for the model's own size")
        try:
            _, eval_cfg = model_entry(model_name)
        except ValueError as err:
            raise ConfigError(f"data.model_name: {err}") from None
        self.save_hyperparameters()
        self.root = root
        self.model_name = model_name
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.calib_batch_size = calib_batch_size
        self.calib_batches = calib_batches
        self.seed = seed
        self.num_classes = num_classes
        self.skip_unreadable = skip_unreadable
        self.pin_memory = pin_memory
        self.predict_root = predict_root
        self.class_names = class_names
        if img_size is not None:
            eval_cfg = replace(eval_cfg, input_size=(eval_cfg.input_size[0], img_size, img_size))
        self.eval_cfg = eval_cfg
        self.transform = eval_transform(eval_cfg)
        self.classes: list[str] = []
        self.skipped_files: list[str] = []
        self._train: Optional[ImageFileDataset] = None
        self._train_scanned = False
        self._splits: dict[str, ImageFileDataset] = {}

    def setup(self, stage: Optional[str] = None) -> None:
        """List and check the folders a stage reads (once per split; no image is decoded).

        ``stage`` ``"test"`` reads ``test/``, ``"predict"`` reads ``predict_root`` (see
        :meth:`_setup_predict`), any other stage ``val/``; ``train/`` is read too when
        ``calib_batches > 0``.

        Raises:
            DataError: root or a split missing, a split without class folders, an empty class
                folder, a class count other than ``num_classes``, different class folders in
                ``train/`` and the evaluated split, or a ``train/`` too small for the
                calibration batches; for predict, see :meth:`_setup_predict`.
        """
        split = {"test": "test", "predict": "predict"}.get(stage or "", "val")
        if split in self._splits:
            return
        if split == "predict":
            self._setup_predict()
            return
        root = self.root
        if split == "test":
            check_test_split(root)
        else:
            check_root(root)
        scanned = {}
        if self.calib_batches > 0:
            scanned["train"] = scan_image_folder(os.path.join(root, "train"))
        scanned[split] = scan_image_folder(os.path.join(root, split))
        for name, (classes, _) in scanned.items():
            self._check_class_count(os.path.join(root, name), len(classes))
        classes, samples = scanned[split]
        if "train" in scanned:
            if scanned["train"][0] != classes:
                raise DataError(self._class_mismatch(scanned["train"][0], classes, split))
            self._set_train(*scanned["train"])
        self._splits[split] = ImageFileDataset(samples, classes, self.transform)
        self.classes = list(classes)

    def _setup_predict(self) -> None:
        """List ``predict_root`` and name its classes; with calibration, list ``train/`` too.

        The class names are ``class_names``' lines when it is set, else the class folders of
        ``root/train``.

        Raises:
            ConfigError: ``predict_root`` is not set.
            DataError: ``predict_root`` is missing or holds no images; ``class_names`` is
                unusable; ``root/train`` is missing when it is needed; the class count
                differs from ``num_classes``; or ``train/`` is too small for calibration.
        """
        paths = scan_images(self.predict_root)  # type: ignore[arg-type]
        if self.calib_batches > 0:
            self._setup_train()
        if self.class_names is not None:
            classes = read_class_names(self.class_names)
            if self.num_classes is not None and len(classes) != self.num_classes:
                raise DataError(
                    f"data.class_names={self.class_names} lists {len(classes)} class names but data.num_classes="
                    f"{self.num_classes}; give one name per class, in class-index order"
                )
        elif self._train is not None:
            classes = list(self._train.classes)
        else:
            classes = self._train_class_folders()
        samples = [(path, index) for index, path in enumerate(paths)]
        self._splits["predict"] = ImageFileDataset(samples, classes, self.transform)
        self.classes = list(classes)

    def _train_class_folders(self) -> list[str]:
        """The class folders of ``root/train`` (names only), for a prediction's class names."""
        train_dir = os.path.join(self.root, "train")
        if not os.path.isdir(train_dir):
            raise DataError(
                f"{train_dir} is missing, and predictions name their classes after its class folders; "
                "set data.root to the training data's root, or data.class_names to a file with one class name per line"
            )
        classes = class_folders(train_dir)
        if not classes:
            raise DataError(
                f"{train_dir} holds no class folders to name the predicted classes after; "
                "set data.class_names to a file with one class name per line"
            )
        self._check_class_count(train_dir, len(classes))
        return classes

    def _setup_train(self) -> None:
        """List and check ``train/`` alone (the calibration images), once."""
        if self._train_scanned:
            return
        check_root(self.root)
        train_dir = os.path.join(self.root, "train")
        classes, samples = scan_image_folder(train_dir)
        self._check_class_count(train_dir, len(classes))
        self._set_train(classes, samples)

    def _set_train(self, classes: list[str], samples: list[tuple[str, int]]) -> None:
        needed = self.calib_batches * self.calib_batch_size
        if len(samples) < needed:
            raise DataError(
                f"calib_batches={self.calib_batches} x calib_batch_size={self.calib_batch_size} needs "
                f"{needed} images but {os.path.join(self.root, 'train')} has {len(samples)}; "
                "lower data.calib_batches or data.calib_batch_size, or add images"
            )
        self._train = ImageFileDataset(samples, classes, self.transform)
        self._train_scanned = True

    def _check_class_count(self, split_dir: str, count: int) -> None:
        if self.num_classes is not None and count != self.num_classes:
            raise DataError(
                f"{split_dir} has {count} class folders but data.num_classes="
                f"{self.num_classes}; point data.root at a dataset with {self.num_classes} classes "
                "or change data.num_classes"
            )

    def _class_mismatch(self, train_classes: list[str], split_classes: list[str], split: str = "val") -> str:
        def show(names: list[str]) -> str:
            more = f" and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
            return (", ".join(names[:_SHOW]) or "none") + more

        only_train = sorted(set(train_classes) - set(split_classes))
        only_split = sorted(set(split_classes) - set(train_classes))
        train_dir, split_dir = os.path.join(self.root, "train"), os.path.join(self.root, split)
        return (
            f"{train_dir} and {split_dir} hold different class folders (only in train/: {show(only_train)}; "
            f"only in {split}/: {show(only_split)}); give both splits the same class folders"
        )

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> CheckedDataLoader:
        return CheckedDataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            skip_unreadable=self.skip_unreadable,
            skipped_files=self.skipped_files,
            **kwargs,
        )

    def calib_indices(self) -> list[int]:
        """Indices into ``train/`` of the calibration images, in loading order."""
        if self.calib_batches > 0:
            self._setup_train()
        if self._train is None:
            return []
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(self._train), generator=generator)
        return order[: self.calib_batches * self.calib_batch_size].tolist()

    def calib_dataloader(self) -> CheckedDataLoader:
        """The calibration batches: exactly ``calib_batches`` batches of seeded-shuffled ``train/``.

        The same on every rank, on every iteration and for any ``num_workers`` (the transform
        is deterministic). With ``calib_batches=0`` it yields nothing. Only ``train/`` is read.
        """
        indices = self.calib_indices()
        dataset = Subset(self._train, indices) if self._train is not None else ImageFileDataset([], [], self.transform)
        return self._loader(
            dataset, self.calib_batch_size, shuffle=False, generator=torch.Generator().manual_seed(self.seed)
        )

    def _split_loader(self, stage: str) -> CheckedDataLoader:
        """Every image of a stage's dataset exactly once across ranks (rank ``r``: ``r, r+W, ...``);
        for validate and test, a rank left without images gets one empty batch."""
        self.setup(stage)
        dataset = self._splits[{"validate": "val"}.get(stage, stage)]
        rank, world_size = self._rank_and_world_size()
        predict = stage == "predict"
        sampler = UnpaddedDistributedSampler(dataset, num_replicas=world_size, rank=rank, fill_empty=predict)
        empty_batch = None if predict else self.eval_cfg.input_size  # a rank without images runs one empty step
        return self._loader(dataset, self.batch_size, sampler=sampler, empty_batch=empty_batch)

    def val_dataloader(self) -> CheckedDataLoader:
        """Every ``val/`` image exactly once across ranks, in a fixed order (rank ``r``: ``r, r+W, ...``)."""
        return self._split_loader("validate")

    def test_dataloader(self) -> CheckedDataLoader:
        """Every ``test/`` image exactly once across ranks, as :meth:`val_dataloader` does for ``val/``."""
        return self._split_loader("test")

    def predict_dataloader(self) -> CheckedDataLoader:
        """Every image under ``predict_root`` across ranks, in sorted-path order (rank ``r``:
        ``r, r+W, ...``); batches are ``(images, indices into predict_dataset)``. Exactly once,
        except that with fewer images than ranks the ranks left without one read image 0 again
        (``fill_empty``)."""
        return self._split_loader("predict")

    @property
    def train_dataset(self) -> Optional[ImageFileDataset]:
        """The ``train/`` split after :meth:`setup` (None when ``calib_batches == 0``)."""
        return self._train

    @property
    def val_dataset(self) -> Optional[ImageFileDataset]:
        """The ``val/`` split after :meth:`setup`."""
        return self._splits.get("val")

    @property
    def test_dataset(self) -> Optional[ImageFileDataset]:
        """The ``test/`` split after ``setup("test")``."""
        return self._splits.get("test")

    @property
    def predict_dataset(self) -> Optional[ImageFileDataset]:
        """The images under ``predict_root`` after ``setup("predict")``: ``samples[i]`` is
        ``(path, i)``, ``classes`` the class names the predictions use."""
        return self._splits.get("predict")
