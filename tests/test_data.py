"""Specification of lit_ptq/data/: folder checks, decoding, unreadable files, samplers, calibration."""

from __future__ import annotations

import ast
import functools
import io
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data import RandomSampler
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

from lit_ptq.data import (
    CheckedDataLoader,
    ImageNetDataModule,
    UnpaddedDistributedSampler,
    eval_transform,
    load_rgb,
)
from lit_ptq.errors import ConfigError, DataError
from lit_ptq.models import model_entry

DEMO = Path(__file__).resolve().parents[1] / "demo_data" / "fashion_mnist" / "train"


def _drawn_image(i: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A natural-ish RGB picture: a colour gradient with an ellipse and a bar that vary with i."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    rgb = np.stack([x, y, (x + y + 0.1 * i) % 1.0], axis=-1) * 255
    img = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse([i % 7, i % 5, w // 2 + i % 11, h // 2 + i % 3], fill=(200 - 7 * i % 200, 40, 90))
    draw.rectangle([w // 3, h // 2, w // 3 + 4, h - 2], fill=(10, 160, 10 + 13 * i % 240))
    return img


@functools.lru_cache(maxsize=None)
def _image_files() -> tuple[bytes, ...]:
    """Encoded real images: Fashion-MNIST demo PNGs when the repository has them, else drawn ones."""
    if DEMO.is_dir():
        files = sorted(p for c in sorted(DEMO.iterdir()) if c.is_dir() for p in sorted(c.iterdir())[:4])
        if len(files) >= 20:
            return tuple(p.read_bytes() for p in files)
    out = []
    for i in range(24):
        buf = io.BytesIO()
        _drawn_image(i).save(buf, format="PNG")
        out.append(buf.getvalue())
    return tuple(out)


def make_split(split_dir: Path, counts: dict[str, int]) -> list[Path]:
    """Write an ImageFolder split with counts[class] images per class; return the paths in ImageFolder order."""
    pool = _image_files()
    paths, k = [], 0
    for name in sorted(counts):
        (split_dir / name).mkdir(parents=True, exist_ok=True)
        for j in range(counts[name]):
            path = split_dir / name / f"{j:04d}.png"
            path.write_bytes(pool[k % len(pool)])
            paths.append(path)
            k += 1
    return paths


def make_root(tmp_path: Path, train: dict[str, int], val: dict[str, int]) -> Path:
    root = tmp_path / "imagenet"
    make_split(root / "train", train)
    make_split(root / "val", val)
    return root


def datamodule(root: Path, **kwargs) -> ImageNetDataModule:
    """A small, fast DataModule: the 32x32 demo model, tiny batches, no workers unless asked."""
    args = dict(model_name="itpn_tiny", batch_size=4, num_workers=0, calib_batch_size=4, calib_batches=2)
    args.update(kwargs)
    return ImageNetDataModule(root=str(root), **args)


def truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    _drawn_image(3, (64, 48)).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """train/: 3 classes x 5 images; val/: 3 classes x 3, 4, 2 images."""
    return make_root(tmp_path, {"a": 5, "b": 5, "c": 5}, {"a": 3, "b": 4, "c": 2})


# --------------------------------------------------------------------------- transform


def test_itpn_base_transform_resizes_256_bicubic_and_crops_224():
    tf = eval_transform(model_entry("itpn_base")[1])
    resize, crop = tf.transforms[0], tf.transforms[1]
    assert isinstance(resize, Resize) and resize.size == 256 and resize.interpolation == InterpolationMode.BICUBIC
    assert isinstance(crop, CenterCrop) and crop.size == (224, 224)
    out = tf(_drawn_image(0, (500, 375)))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32


def test_img_size_overrides_the_registered_input_side(tmp_path: Path):
    dm = ImageNetDataModule(root=str(tmp_path), model_name="itpn_base", img_size=64)
    assert dm.eval_cfg.input_size == (3, 64, 64)
    assert dm.transform.transforms[0].size == int(64 / 0.875)
    assert dm.transform(_drawn_image(1, (100, 80))).shape == (3, 64, 64)


@pytest.mark.parametrize(
    ("model_name", "mean", "resize_to"),
    [
        ("deit_tiny_patch16_224", (0.485, 0.456, 0.406), 256),  # crop 0.875, as DeiT and FQ-ViT evaluate
        ("vit_base_patch16_224", (0.5, 0.5, 0.5), 248),
        ("swin_tiny_patch4_window7_224", (0.485, 0.456, 0.406), 248),
    ],
)
def test_timm_models_get_timms_eval_transform(model_name: str, mean: tuple, resize_to: int, tmp_path: Path):
    import timm
    from timm.data import create_transform, resolve_data_config

    from lit_ptq.models import WEIGHT_TAGS

    dm = ImageNetDataModule(root=str(tmp_path), model_name=model_name)
    resize, crop, _, normalize = dm.transform.transforms
    assert isinstance(resize, Resize) and resize.size == resize_to and resize.interpolation == InterpolationMode.BICUBIC
    assert isinstance(crop, CenterCrop) and crop.size == (224, 224)
    assert tuple(normalize.mean) == mean
    cfg = timm.models.get_pretrained_cfg(f"{model_name}.{WEIGHT_TAGS[model_name]}").to_dict()
    reference = create_transform(**resolve_data_config(pretrained_cfg={**cfg, "crop_pct": dm.eval_cfg.crop_pct}))
    img = _drawn_image(3, (320, 250))
    torch.testing.assert_close(dm.transform(img), reference(img), atol=0, rtol=0)


def test_itpn_tiny_transform_normalizes_with_its_own_statistics():
    cfg = model_entry("itpn_tiny")[1]
    img = Image.new("RGB", (28, 28), (73, 73, 73))
    out = eval_transform(cfg)(img)
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out, torch.full((3, 32, 32), (73 / 255 - 0.286) / 0.353))


# --------------------------------------------------------------------------- decoding


def test_cmyk_grayscale_and_misnamed_png_decode_as_rgb(tmp_path: Path):
    root = make_root(tmp_path, {"a": 2}, {"a": 1})
    val_dir = root / "val" / "a"
    picture = _drawn_image(5, (48, 40))
    picture.convert("CMYK").save(val_dir / "cmyk.JPEG", format="JPEG")
    picture.convert("L").save(val_dir / "gray.JPEG", format="JPEG")
    picture.save(val_dir / "png_inside.JPEG", format="PNG")
    dm = datamodule(root, calib_batches=0)
    dm.setup()
    tf = eval_transform(dm.eval_cfg)
    for name in ("cmyk.JPEG", "gray.JPEG", "png_inside.JPEG"):
        path = str(val_dir / name)
        index = [p for p, _ in dm.val_dataset.samples].index(path)
        image, target = dm.val_dataset[index]
        with Image.open(path) as raw:
            expected = tf(raw.convert("RGB"))
        assert image.shape == (3, 32, 32) and target == 0
        torch.testing.assert_close(image, expected, atol=0, rtol=0)
    assert load_rgb(str(val_dir / "cmyk.JPEG")).mode == "RGB"


# --------------------------------------------------------------------------- unreadable images


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_jpeg_raises_one_sentence_data_error(root: Path, num_workers: int):
    bad = truncated_jpeg(root / "val" / "b" / "broken.JPEG")
    dm = datamodule(root, num_workers=num_workers)
    with pytest.raises(DataError) as err:
        for _ in dm.val_dataloader():
            pass
    assert type(err.value) is DataError
    assert str(err.value).startswith(f"cannot read image {bad}: image file is truncated")
    assert str(err.value).endswith("; remove or replace the file, or set data.skip_unreadable=true")
    assert "\n" not in str(err.value)


def test_file_pil_cannot_identify_raises_data_error(root: Path):
    bad = root / "val" / "a" / "notes.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match=f"^cannot read image {bad}: not an image format PIL recognizes; "):
        list(datamodule(root).val_dataloader())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_unreadable_drops_and_counts_in_the_main_process(root: Path, num_workers: int):
    bad_jpeg = truncated_jpeg(root / "val" / "b" / "broken.JPEG")
    bad_text = root / "val" / "c" / "zzz.JPEG"
    bad_text.write_bytes(b"not an image")
    dm = datamodule(root, num_workers=num_workers, skip_unreadable=True)
    batches = list(dm.val_dataloader())
    assert sum(len(t) for _, t in batches) == 9
    assert all(x.shape[1:] == (3, 32, 32) and len(x) == len(t) for x, t in batches)
    assert sorted(dm.skipped_files) == sorted([str(bad_jpeg), str(bad_text)])
    list(dm.val_dataloader())
    assert len(dm.skipped_files) == 4  # a running count: one entry per drop


def test_batch_of_only_unreadable_images_is_not_yielded(tmp_path: Path):
    root = make_root(tmp_path, {"a": 4}, {"a": 4})
    for j in range(4):
        truncated_jpeg(root / "val" / "a" / f"x{j}.jpg")  # sorted after the PNGs: the second batch
    dm = datamodule(root, skip_unreadable=True, calib_batches=0)
    batches = list(dm.val_dataloader())
    assert [len(t) for _, t in batches] == [4]
    assert len(dm.skipped_files) == 4


# --------------------------------------------------------------------------- setup checks


def test_missing_root(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        datamodule(missing).setup()
    assert str(err.value) == (
        f"dataset root {missing} does not exist or is not a folder; "
        "set data.root to a folder holding train/ and val/ in ImageFolder layout"
    )


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split(root: Path, split: str):
    shutil.rmtree(root / split)
    with pytest.raises(DataError) as err:
        datamodule(root).setup()
    assert str(err.value) == (
        f"{root / split} is missing; data.root must hold train/ and val/ folders with one sub-folder per class"
    )


def test_train_split_is_not_needed_without_calibration(root: Path):
    shutil.rmtree(root / "train")
    dm = datamodule(root, calib_batches=0)
    dm.setup()
    assert dm.train_dataset is None and len(dm.val_dataset) == 9
    assert list(dm.calib_dataloader()) == []


def test_split_without_class_folders(tmp_path: Path):
    root = make_root(tmp_path, {"a": 8}, {})
    (root / "val").mkdir()
    (root / "val" / "stray.png").write_bytes(_image_files()[0])
    with pytest.raises(DataError) as err:
        datamodule(root).setup()
    assert str(err.value) == (
        f"{root / 'val'} holds no class folders; put each class's images in its own sub-folder (ImageFolder layout)"
    )


def test_empty_class_folder_is_named(root: Path):
    (root / "val" / "d").mkdir()
    (root / "val" / "d" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"^class folder {root / 'val' / 'd'} holds no images "):
        datamodule(root).setup()


def test_hidden_folders_and_files_are_ignored(root: Path):
    (root / "val" / ".ipynb_checkpoints").mkdir()
    (root / "val" / "a" / "._0000.png").write_bytes(b"macOS resource fork")
    dm = datamodule(root)
    dm.setup()
    assert dm.classes == ["a", "b", "c"] and len(dm.val_dataset) == 9


def test_class_count_must_equal_num_classes(root: Path):
    with pytest.raises(DataError) as err:
        datamodule(root, num_classes=1000).setup()
    assert str(err.value) == (
        f"{root / 'train'} has 3 class folders but data.num_classes=1000; "
        "point data.root at a dataset with 1000 classes or change data.num_classes"
    )
    datamodule(root, num_classes=3).setup()


def test_train_and_val_must_hold_the_same_classes(tmp_path: Path):
    root = make_root(tmp_path, {"a": 4, "b": 4, "x": 4}, {"a": 1, "b": 1, "y": 1, "z": 1})
    with pytest.raises(DataError) as err:
        datamodule(root).setup()
    assert str(err.value) == (
        f"{root / 'train'} and {root / 'val'} hold different class folders "
        "(only in train/: x; only in val/: y, z); give both splits the same class folders"
    )


def test_train_split_must_hold_the_calibration_images(root: Path):
    with pytest.raises(DataError) as err:
        datamodule(root, calib_batches=10, calib_batch_size=100).setup()
    assert str(err.value) == (
        f"calib_batches=10 x calib_batch_size=100 needs 1000 images but {root / 'train'} has 15; "
        "lower data.calib_batches or data.calib_batch_size, or add images"
    )
    datamodule(root, calib_batches=3, calib_batch_size=5).setup()  # exactly enough


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(calib_batches=-1), "calib_batches"),
        (dict(batch_size=0), "batch_size"),
        (dict(calib_batch_size=0), "calib_batch_size"),
        (dict(num_workers=-2), "num_workers"),
        (dict(num_classes=0), "num_classes"),
        (dict(img_size=0), "img_size"),
        (dict(model_name="resnet50"), "model_name"),
    ],
)
def test_invalid_options_raise_config_error(tmp_path: Path, kwargs: dict, field: str):
    with pytest.raises(ConfigError, match=f"^data.{field}"):
        datamodule(tmp_path, **kwargs)


# --------------------------------------------------------------------------- samplers and loaders


@pytest.mark.parametrize("n", [7, 10, 13])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_unpadded_sampler_gives_every_index_exactly_once(n: int, world_size: int):
    dataset = list(range(n))
    per_rank = [list(UnpaddedDistributedSampler(dataset, num_replicas=world_size, rank=r)) for r in range(world_size)]
    assert sorted(i for indices in per_rank for i in indices) == list(range(n))
    for r, indices in enumerate(per_rank):
        assert indices == list(range(r, n, world_size))
        assert len(UnpaddedDistributedSampler(dataset, num_replicas=world_size, rank=r)) == len(indices)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_val_loaders_of_all_ranks_read_every_image_once(root: Path, world_size: int):
    seen = []
    for rank in range(world_size):
        dm = datamodule(root, batch_size=2)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
        loader = dm.val_dataloader()
        assert isinstance(loader.sampler, UnpaddedDistributedSampler)
        assert isinstance(loader, CheckedDataLoader)
        seen += [dm.val_dataset.samples[i][0] for i in loader.sampler]
        targets = torch.cat([t for _, t in loader])
        assert targets.tolist() == [dm.val_dataset.samples[i][1] for i in loader.sampler]
    assert len(seen) == 9 and sorted(seen) == sorted(p for p, _ in dm.val_dataset.samples)



@pytest.mark.parametrize("split", ["val", "test"])
def test_a_rank_without_images_gets_one_empty_batch(tmp_path: Path, split: str):
    """1 image, 2 ranks: rank 0 reads it, rank 1 gets one batch of zero images (so Lightning runs its loop)."""
    root = make_root(tmp_path, {"a": 4}, {"a": 1})
    make_split(root / "test", {"a": 1})
    per_rank = []
    for rank in (0, 1):
        dm = datamodule(root, calib_batches=0)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
        assert len(loader) == 1
        per_rank.append(list(loader))
    (one,), (empty,) = per_rank
    assert one[0].shape == (1, 3, 32, 32) and one[1].tolist() == [0]
    assert empty[0].shape == (0, 3, 32, 32) and empty[1].shape == (0,) and empty[1].dtype == torch.int64


def test_a_rank_whose_images_are_all_unreadable_gets_one_empty_batch(tmp_path: Path):
    root = make_root(tmp_path, {"a": 4}, {"a": 2})
    truncated_jpeg(root / "val" / "a" / "x.jpg")  # index 2, after the two PNGs
    dm = datamodule(root, calib_batches=0, skip_unreadable=True, batch_size=1)
    dm.trainer = SimpleNamespace(global_rank=1, world_size=3)  # rank 1 of 3 reads index 1 alone: a good image
    assert [len(t) for _, t in dm.val_dataloader()] == [1]
    dm.trainer = SimpleNamespace(global_rank=2, world_size=3)  # rank 2 of 3 reads index 2 alone: unreadable
    assert [(tuple(x.shape), len(t)) for x, t in dm.val_dataloader()] == [((0, 3, 32, 32), 0)]
    assert dm.skipped_files == [str(root / "val" / "a" / "x.jpg")]


def test_the_empty_batch_is_asked_for_only(tmp_path: Path):
    """Without ``empty_batch`` an empty loader yields nothing; predict fills an empty rank with image 0."""
    assert len(CheckedDataLoader([], batch_size=2)) == 0 and list(CheckedDataLoader([], batch_size=2)) == []
    root = make_root(tmp_path, {"a": 4}, {"a": 1})
    dm = datamodule(root, calib_batches=0, predict_root=str(root / "val"))
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)
    ((images, indices),) = list(dm.predict_dataloader())
    assert images.shape == (1, 3, 32, 32) and indices.tolist() == [0]


def _calib(root: Path, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(datamodule(root, calib_batches=3, calib_batch_size=4, **kwargs).calib_dataloader())


def test_calibration_is_the_seeded_shuffle_of_train(root: Path):
    dm = datamodule(root, calib_batches=3, calib_batch_size=4, seed=7)
    expected = list(RandomSampler(range(15), generator=torch.Generator().manual_seed(7)))[:12]
    assert dm.calib_indices() == expected
    batches = list(dm.calib_dataloader())
    assert [len(t) for _, t in batches] == [4, 4, 4]
    train = dm.train_dataset
    assert torch.cat([t for _, t in batches]).tolist() == [train.samples[i][1] for i in expected]
    torch.testing.assert_close(batches[0][0][1], train[expected[1]][0], atol=0, rtol=0)


@pytest.mark.parametrize("model_name", ["itpn_tiny", "itpn_base"])
def test_calibration_images_are_the_evaluation_transform_of_the_files(tmp_path: Path, model_name: str):
    """Calibration reads each chosen train/ image as evaluation reads an image: the model's
    evaluation transform (resize the shorter edge, centre crop, normalize), no train-time resize
    or crop. The files are 45x37, neither square nor of the input size, so any other resize or
    crop gives other pixels."""
    root = tmp_path / "imagenet"
    for split, per_class in (("train", 5), ("val", 1)):
        for c, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for j in range(per_class):
                _drawn_image(7 * c + j, (45, 37)).save(root / split / name / f"{j:04d}.png")
    dm = datamodule(root, model_name=model_name, calib_batches=2, calib_batch_size=4)
    transform = eval_transform(model_entry(model_name)[1])
    paths = [dm.train_dataset.samples[i][0] for i in dm.calib_indices()]
    expected = torch.stack([transform(load_rgb(path)) for path in paths])
    images = torch.cat([x for x, _ in dm.calib_dataloader()])
    assert images.shape == expected.shape == (8, *model_entry(model_name)[1].input_size)
    assert torch.equal(images, expected)


def test_calibration_batches_repeat_for_a_seed_and_change_with_it(root: Path):
    first = _calib(root, seed=0)
    for again in (_calib(root, seed=0), _calib(root, seed=0, num_workers=2)):
        assert len(again) == 3
        for (x0, t0), (x1, t1) in zip(first, again):
            assert torch.equal(x0, x1) and torch.equal(t0, t1)
    other = _calib(root, seed=1)
    assert not all(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(first, other))


def test_calibration_loader_is_the_same_on_every_rank_and_iteration(root: Path):
    loaders = []
    for rank in range(2):
        dm = datamodule(root, calib_batches=3, calib_batch_size=4)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        loaders.append(dm.calib_dataloader())
    a, b, again = list(loaders[0]), list(loaders[1]), list(loaders[0])
    for (x0, t0), (x1, t1), (x2, t2) in zip(a, b, again):
        assert torch.equal(x0, x1) and torch.equal(x0, x2) and torch.equal(t0, t1) and torch.equal(t0, t2)


# --------------------------------------------------------------------------- with a Lightning Trainer


def test_trainer_validate_sees_every_image_once_and_reports_skips(root: Path):
    import pytorch_lightning as pl

    bad = truncated_jpeg(root / "val" / "a" / "broken.jpg")

    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.targets: list[int] = []

        def validation_step(self, batch, batch_idx):
            images, targets = batch
            assert images.shape[1:] == (3, 32, 32)
            self.targets += targets.tolist()

    dm = datamodule(root, batch_size=4, skip_unreadable=True)
    model = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(model, datamodule=dm, verbose=False)
    assert sorted(model.targets) == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert isinstance(trainer.val_dataloaders.sampler, UnpaddedDistributedSampler)
    assert dm.skipped_files == [str(bad)]


PACKAGE = Path(__file__).resolve().parents[1] / "lit_ptq" / "data"


def _imported_modules(path: Path) -> set[str]:
    """The modules a file imports, relative ones as written (``..errors``, ``.images``)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add("." * node.level + (node.module or ""))
    return modules


@pytest.mark.parametrize("module", ["folders", "images"])
def test_folders_and_images_need_no_lightning_no_model_and_no_datamodule(module):
    imported = _imported_modules(PACKAGE / f"{module}.py")
    lightning = {m for m in imported if m.split(".")[0] in ("pytorch_lightning", "lightning")}
    assert imported and not lightning and not imported & {"..models", ".datamodule"}


def test_folders_decode_nothing():
    assert not _imported_modules(PACKAGE / "folders.py") & {"torch", "PIL", ".images"}


def test_the_package_exports_every_name_of_its_modules():
    import lit_ptq.data as package
    from lit_ptq.data import datamodule, folders, images

    modules = (datamodule, folders, images)
    assert sorted(package.__all__) == sorted(name for module in modules for name in module.__all__)
    for module in modules:
        for name in module.__all__:
            assert getattr(package, name) is getattr(module, name), name
