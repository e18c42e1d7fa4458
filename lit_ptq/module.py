"""The LightningModule: a float or fake-quantized vision transformer evaluated with torchmetrics."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from torchmetrics import SumMetric
from torchmetrics.classification import MulticlassAccuracy

from .metrics import ExactMean
from .models import create_model
from .quant import QuantConfig, is_quantized, quantize_

__all__ = ["PTQModule"]


class PTQModule(LightningModule):
    """A model from the registry, optionally fake-quantized, evaluated on top-1 / top-5 / loss.

    Calibration is not done here: :class:`lit_ptq.callbacks.CalibrationCallback` calibrates
    the quantizers before validation.

    Args:
        model_name: registered model (``itpn_base``, ``deit_small_patch16_224``, ...; see
            ``lit_ptq.models.list_models``).
        checkpoint: path of the float weights (see ``lit_ptq.models.load_checkpoint``).
        pretrained: download the registered weights with timm (timm families only; needs a network).
        num_classes: classifier width; must match the checkpoint and the dataset.
        img_size: input side (defaults to the registered one).
        model_kwargs: architecture arguments passed to ``create_model`` (``embed_dim``, ``depth``, ...).
        method: activation observer (``minmax``, ``ema``, ``percentile``, ``omse``, ``mse``); None
            evaluates the float model.
        placement: ``seed``, ``full`` or ``matmul``.
        bits: ``"weights/activations/attention"``.
        ptf: power-of-two factors for LayerNorm inputs (FQ-ViT).
        lis: log-int-softmax (FQ-ViT).
        arithmetic: ``seed`` (exact, as the seed) or ``fused`` (torch's fused kernel).
        overrides: per-layer quantization settings, ``{pattern: null | {bits, observer,
            granularity}}`` in order, later entries winning (see ``QuantConfig.overrides``).
        recipe: a low-bit preset for ``placement: matmul``: ``repq`` (RepQ-ViT),
            ``repq_gptq`` (+ ridge regression and GPTQ rounding) or ``recon`` (+ block
            reconstruction); see ``lit_ptq.quant.recipes``.
        softmax: the softmax-output quantizer (``uniform``, ``log2``, ``log_sqrt2``; default
            ``log_sqrt2`` with a recipe, ``uniform`` without).
        recon: block-reconstruction settings for ``recipe: recon`` (``iters``, ``batch_size``,
            ``images``, ``weight_lr``, ``act_lr``, ``round_weight``, ``drop_prob``, ``seed``).
    """

    def __init__(
        self,
        model_name: str = "itpn_base",
        checkpoint: Optional[str] = None,
        pretrained: bool = False,
        num_classes: int = 1000,
        img_size: Optional[int] = None,
        model_kwargs: Optional[dict[str, Any]] = None,
        method: Optional[str] = None,
        placement: str = "seed",
        bits: str = "8/8/8",
        ptf: bool = False,
        lis: bool = False,
        arithmetic: str = "seed",
        overrides: Optional[dict[str, Optional[dict[str, Any]]]] = None,
        recipe: Optional[str] = None,
        softmax: Optional[str] = None,
        recon: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.quant_config = (
            QuantConfig(
                method=method, placement=placement, bits=bits, ptf=ptf, lis=lis, arithmetic=arithmetic,
                overrides=overrides, recipe=recipe, softmax=softmax, recon=recon,
            )
            if method is not None
            else None
        )
        self.model = create_model(
            model_name, num_classes=num_classes, img_size=img_size, checkpoint=checkpoint, pretrained=pretrained,
            **(model_kwargs or {}),
        )
        if self.quant_config is not None:
            quantize_(self.model, self.quant_config)
        top5 = min(5, num_classes)
        self.acc1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.acc5 = MulticlassAccuracy(num_classes=num_classes, top_k=top5, average="micro")
        self.loss = ExactMean()
        self.num_images = SumMetric()

    @property
    def quantized(self) -> bool:
        """Whether the model carries quantizers."""
        return is_quantized(self.model)

    def run_summary(self) -> dict[str, Any]:
        """Model and quantization settings, for hparams and result files."""
        hp = self.hparams
        quant = self.quant_config.describe() if self.quant_config else dict(method="fp32", placement=None, bits="32/32/32")
        return dict(model=hp.model_name, checkpoint=hp.checkpoint, num_classes=hp.num_classes, **quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _full_batch_size(self) -> int:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return int(getattr(datamodule, "batch_size", 0) or 0)

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of ``images``, computed in a batch of the configured validation size.

        A short batch (the last one of a rank) is padded with zero images whose logits are
        dropped. Matrix kernels may pick another code path for another batch size and change
        the last bits of an image's logits, which a quantizer can then round to a different
        level; with every forward at one size, an image gets the same logits whichever batch
        and however many processes it is evaluated in.
        """
        n, full = images.shape[0], self._full_batch_size()
        if 0 < n < full:
            images = torch.cat([images, images.new_zeros((full - n, *images.shape[1:]))])
        return self(images)[:n].float()

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str) -> None:
        images, targets = batch
        if images.numel() == 0:
            return
        logits = self.predict_logits(images)
        self.acc1.update(logits, targets)
        self.acc5.update(logits, targets)
        self.loss.update(F.cross_entropy(logits, targets, reduction="none"))
        self.num_images.update(torch.tensor(float(targets.numel()), device=logits.device))
        self.log(f"{prefix}/acc1", self.acc1, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{prefix}/acc5", self.acc5, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{prefix}/loss", self.loss, on_step=False, on_epoch=True)
        self.log(f"{prefix}/num_images", self.num_images, on_step=False, on_epoch=True, reduce_fx="sum")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")
