"""Train the demo model: ``itpn_tiny`` on the 60,000 Fashion-MNIST training images.

The float checkpoint the demo quantizes (``demo_data/itpn_tiny_fashion_mnist.pt``) comes from
this script. It reads the IDX gzip files of Debian's ``dataset-fashion-mnist`` package with
:func:`lit_ptq.tools.make_demo_data.read_idx` and fits ``itpn_tiny`` (10 classes) with a
PyTorch Lightning ``Trainer`` on the CPU. Images are prepared exactly as the evaluation path
prepares the demo PNGs (:func:`lit_ptq.data.eval_transform` of the model's ``EvalConfig``:
grayscale to RGB, resize 28 -> 32 bilinear, normalize with mean 0.286 and std 0.353); for
training they are also flipped left-right at random (random shifts are available but off).

Recipe: AdamW with decoupled weight decay (Loshchilov and Hutter, ICLR 2019), a linear warmup
then a cosine decay (Loshchilov and Hutter, "SGDR", ICLR 2017) stepped every batch, label
smoothing (Szegedy et al., CVPR 2016), stochastic depth (Huang et al., ECCV 2016), and bf16
autocast on the CPU. Runs are deterministic: the same seed gives the same weights.

The checkpoint is the official iTPN format, ``{'model': state_dict}`` in float32, written
atomically. Usage::

    python -m lit_ptq.tools.train_demo --source /usr/share/datasets/fashion-mnist \\
        --epochs 12 --out demo_data/itpn_tiny_fashion_mnist.pt --seed 0

Held-out models for the low-bit recipes (checkpoints the recipes were not chosen on) come from
the same script with another seed, fewer epochs or another registered model and its
architecture (``--model-kwargs``, as ``main.py``'s ``--model.model_kwargs`` takes it)::

    python -m lit_ptq.tools.train_demo --model deit_tiny_patch16_224 --epochs 2 --seed 1 \
        --model-kwargs '{"img_size": 32, "patch_size": 4, "depth": 4, "embed_dim": 96, "num_heads": 3}' \
        --out /tmp/deit4x96.pt

``main.py`` evaluates it with the input side as its own option: ``--model.model_name
deit_tiny_patch16_224 --model.img_size 32 --model.model_kwargs '{"patch_size": 4, "depth": 4,
"embed_dim": 96, "num_heads": 3}' --model.checkpoint /tmp/deit4x96.pt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning import LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset
from torchvision import transforms

from lit_ptq.data import eval_transform
from lit_ptq.errors import UserError
from lit_ptq.io import atomic_path, check_writable
from lit_ptq.models import EvalConfig, create_model
from lit_ptq.tools.make_demo_data import CLASS_FOLDERS, DEFAULT_SOURCE
from lit_ptq.tools.make_demo_data import read_split as idx_split

__all__ = [
    "DemoTrainModule",
    "TrainConfig",
    "TrainResult",
    "augment",
    "main",
    "normalize",
    "prepare_images",
    "read_split",
    "train_demo",
]

log = logging.getLogger(__name__)

MODULE = "lit_ptq.tools.train_demo"
MODEL_NAME = "itpn_tiny"
DEFAULT_OUT = Path("demo_data/itpn_tiny_fashion_mnist.pt")


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe.

    Attributes:
        epochs: passes over the training images.
        batch_size: images per optimizer step.
        lr: peak learning rate of AdamW.
        min_lr_ratio: the cosine decays from ``lr`` to ``lr * min_lr_ratio``.
        warmup_epochs: linear warmup length, in epochs (may be fractional).
        weight_decay: AdamW weight decay, applied to matrices only (not to norms, biases,
            position embeddings or the relative position bias tables).
        label_smoothing: cross-entropy label smoothing.
        drop_path: stochastic depth rate of the last block (linearly increasing over blocks).
        pad: random shift of up to ``pad`` pixels each way (crop of the zero-padded image). Off by
            default: with patch 8 and a few epochs, shifts of 2 pixels cost ~8 points of top-1.
        flip: random left-right flip.
        precision: Lightning precision, ``bf16-mixed`` (autocast) or ``32-true``.
        seed: seed of the initialization, the shuffling, the augmentation and stochastic depth.
    """

    epochs: int = 12
    batch_size: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.01
    warmup_epochs: float = 0.5
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    drop_path: float = 0.05
    pad: int = 0
    flip: bool = True
    precision: str = "bf16-mixed"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UserError(f"epochs={self.epochs} must be at least 1")
        if self.batch_size < 1:
            raise UserError(f"batch_size={self.batch_size} must be at least 1")
        if not self.lr > 0:
            raise UserError(f"lr={self.lr} must be positive")
        if self.pad < 0:
            raise UserError(f"pad={self.pad} must be 0 or more")
        if self.precision not in ("bf16-mixed", "32-true"):
            raise UserError(f"precision={self.precision!r} is not one of: bf16-mixed, 32-true")


def prepare_images(images: np.ndarray, eval_cfg: EvalConfig) -> torch.Tensor:
    """Resize grayscale images as the evaluation transform does, keeping 8-bit pixels.

    Each image goes through the PIL steps of ``eval_transform(eval_cfg)`` (conversion to RGB,
    resize, center crop) exactly as :class:`lit_ptq.data.ImageFileDataset` reads a demo PNG;
    the three channels of a grayscale image stay equal, so one is kept.

    Args:
        images: ``(N, H, W)`` uint8 grayscale images.
        eval_cfg: the model's evaluation metadata.

    Returns:
        ``(N, 1, size, size)`` uint8 tensor; :func:`normalize` turns it into network input.
    """
    resize_crop = transforms.Compose(eval_transform(eval_cfg).transforms[:-2])  # drop ToTensor, Normalize
    height, width = eval_cfg.input_size[-2:]
    out = np.empty((len(images), 1, height, width), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i, 0] = np.asarray(resize_crop(Image.fromarray(image).convert("RGB")))[..., 0]
    return torch.from_numpy(out)


def normalize(images: torch.Tensor, eval_cfg: EvalConfig) -> torch.Tensor:
    """``(B, 1, H, W)`` uint8 -> ``(B, 3, H, W)`` float, the numbers ``eval_transform`` gives.

    The arithmetic is ``ToTensor`` (divide by 255) then ``Normalize`` on three equal channels.
    """
    channels = eval_cfg.input_size[0]
    x = images.float().div(255).expand(-1, channels, -1, -1)
    return transforms.functional.normalize(x, list(eval_cfg.mean), list(eval_cfg.std))


def augment(images: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random shift (crop of the zero-padded batch) and left-right flip, drawn per image.

    Args:
        images: ``(B, C, H, W)`` batch.
        pad: largest shift in pixels, each way.
        flip: whether to flip half of the images (at random).
        generator: the source of randomness (keeps runs reproducible).

    Returns:
        A new ``(B, C, H, W)`` batch.
    """
    b, _, h, w = images.shape
    if pad:
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
        batch = torch.arange(b)[:, None, None, None]
        channel = torch.arange(images.shape[1])[None, :, None, None]
        images = padded[batch, channel, rows, cols]
    if flip:
        flipped = torch.rand(b, generator=generator) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    return images


def read_split(source: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, H, W)`` uint8 and labels ``(N,)`` int64 of a Fashion-MNIST split (``train`` or ``val``).

    Raises:
        DataError: a file is missing or malformed, the counts differ, or a label is not 0..9.
    """
    images, labels = idx_split(source, split)
    return images, labels.astype(np.int64)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate factor: linear from ~0 to 1 over ``warmup_steps``, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class DemoTrainModule(LightningModule):
    """Supervised training of a classifier on uint8 image batches (augment, normalize, cross-entropy).

    Args:
        model: the network to train.
        config: the recipe.
        eval_cfg: how inputs are normalized (the model's evaluation metadata).
        steps_per_epoch: optimizer steps in one epoch, for the learning-rate schedule.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, eval_cfg: EvalConfig, steps_per_epoch: int) -> None:
        super().__init__()
        self.save_hyperparameters(asdict(config))
        self.model = model
        self.config = config
        self.eval_cfg = eval_cfg
        self.steps_per_epoch = steps_per_epoch
        self.generator = torch.Generator().manual_seed(config.seed)
        self._started = 0.0
        self._epoch_loss = 0.0
        self._epoch_images = 0
        self.epoch_losses: list[float] = []

    def on_train_start(self) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_start(self) -> None:
        self._epoch_loss, self._epoch_images = 0.0, 0

    def on_train_epoch_end(self) -> None:
        self.epoch_losses.append(self._epoch_loss / max(1, self._epoch_images))
        log.info(
            "epoch %d/%d: mean training loss %.4f (%.0f s so far)",
            self.current_epoch + 1,
            self.config.epochs,
            self.epoch_losses[-1],
            time.perf_counter() - self._started,
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        images = augment(images, self.config.pad, self.config.flip, self.generator)
        logits = self.model(normalize(images, self.eval_cfg))
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.config.label_smoothing)
        acc = (logits.argmax(-1) == targets).float().mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc1", acc, prog_bar=True)
        self._epoch_loss += float(loss.detach()) * len(targets)
        self._epoch_images += len(targets)
        return loss

    def configure_optimizers(self) -> dict:
        skip = set(getattr(self.model, "no_weight_decay", lambda: set())())
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.ndim < 2 or name in skip or "relative_position_bias_table" in name:
                no_decay.append(p)
            else:
                decay.append(p)
        cfg = self.config
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
        )
        total = cfg.epochs * self.steps_per_epoch
        warmup = max(1, round(cfg.warmup_epochs * self.steps_per_epoch))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: _warmup_cosine(step, warmup, total, cfg.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    out: Path
    seconds: float
    images: int
    steps: int
    epoch_losses: list[float]


def train_demo(
    source: Path = DEFAULT_SOURCE,
    out: Path = DEFAULT_OUT,
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
    model_name: str = MODEL_NAME,
    model_kwargs: Optional[dict[str, Any]] = None,
) -> TrainResult:
    """Train a registered model (``itpn_tiny`` by default) on the Fashion-MNIST training images
    and save ``{'model': state_dict}``.

    Args:
        source: folder holding the IDX gzip files (``train-images-idx3-ubyte.gz``, ...).
        out: checkpoint path; written atomically (nothing is left behind on failure).
        config: the recipe.
        progress: show Lightning's progress bar.
        model_name: a registered model (``lit_ptq.models``); the images are prepared with its
            evaluation settings (input side, normalization).
        model_kwargs: architecture arguments for ``create_model`` (``img_size``, ``depth``,
            ``embed_dim``, ...), as ``main.py``'s ``--model.model_kwargs`` takes them; a model
            that is not the demo's (held-out models for the low-bit recipes, docs/lowbit.md).

    Returns:
        The checkpoint path, wall time in seconds (preparation and training), image and step counts,
        and the mean training loss of each epoch.

    Raises:
        DataError: an IDX file is missing or malformed.
        UserError: ``out`` cannot be written.
    """
    start = time.perf_counter()
    out = Path(out)
    check_writable(str(out), "--out")
    seed_everything(config.seed, workers=True, verbose=False)
    # create_model returns eval mode, and Lightning keeps the modes it finds.
    model = create_model(
        model_name, num_classes=len(CLASS_FOLDERS), drop_path_rate=config.drop_path, **(model_kwargs or {})
    ).train()
    eval_cfg = model.eval_cfg
    images, labels = read_split(Path(source), "train")
    dataset = TensorDataset(prepare_images(images, eval_cfg), torch.from_numpy(labels))
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(config.seed),
    )
    module = DemoTrainModule(model, config, eval_cfg, steps_per_epoch=len(loader))
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=config.epochs,
        precision=config.precision,
        deterministic=True,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        log_every_n_steps=50,
    )
    log.info("training %s on %d images from %s for %d epochs", model_name, len(dataset), source, config.epochs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")  # num_workers=0 on purpose
        warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\).*")  # inside Lightning
        trainer.fit(module, loader)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    with atomic_path(str(out)) as tmp:
        torch.save({"model": state}, tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # the temporary file is private (0600); the checkpoint is not
    seconds = time.perf_counter() - start
    log.info("wrote %s after %.1f s (%d steps)", out, seconds, trainer.global_step)
    return TrainResult(out, seconds, len(dataset) * config.epochs, trainer.global_step, module.epoch_losses)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 with a one-line message on a user error)."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with the four IDX .gz files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint to write")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training images")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the whole run")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    parser.add_argument("--precision", default=defaults.precision, choices=("bf16-mixed", "32-true"),
                        help="bf16 autocast (twice as fast on CPUs with bf16 instructions) or float32")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--model", default=MODEL_NAME, help="a registered model name")
    parser.add_argument("--model-kwargs", type=json.loads, default=None,
                        help='architecture arguments as JSON, e.g. \'{"img_size": 32, "patch_size": 4, "depth": 6}\'')  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        config = TrainConfig(epochs=args.epochs, seed=args.seed, lr=args.lr, precision=args.precision)
        result = train_demo(args.source, args.out, config, not args.no_progress, args.model, args.model_kwargs)
    except UserError as err:
        log.error("%s", err)
        return 1
    print(
        f"{result.out}: {result.steps} steps on {result.images:,} images in {result.seconds:.0f} s, "
        f"last epoch's mean training loss {result.epoch_losses[-1]:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
