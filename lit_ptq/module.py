"""The LightningModule: a float or fake-quantized vision transformer evaluated with torchmetrics,
or whatever inference backend it is given (:mod:`lit_ptq.backends`; an exported ONNX file run by
onnxruntime is one)."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from torchmetrics import SumMetric

from .backends import InferenceBackend, PyTorchBackend, inference_backend
from .errors import ConfigError
from .metrics import ExactMean, PercentAccuracy
from .models import create_model
from .quant import QuantConfig, compile_quantized, is_quantized, quantize_

__all__ = ["PTQModule"]


class PTQModule(LightningModule):
    """A model from the registry, optionally fake-quantized, evaluated on top-1 / top-5 / loss.

    Calibration is not done here: :class:`lit_ptq.callbacks.CalibrationCallback` calibrates
    the quantizers before validation, test or predict. ``val/acc1`` and ``val/acc5`` (and
    ``test/*``) are logged in percent (:class:`~lit_ptq.metrics.PercentAccuracy`), the loss
    as the mean cross-entropy, ``num_images`` as a count.

    The logits come from an inference backend (:class:`lit_ptq.backends.InferenceBackend`):
    by default :class:`~lit_ptq.backends.PyTorchBackend` over the model built from the
    arguments. Given ``backend`` (or ``onnx``, the registered ``onnxruntime`` backend of that
    file), the module evaluates it instead: no PyTorch model is built and no checkpoint is
    read, nothing is calibrated (:attr:`quantized` is False), and :meth:`run_summary` reports
    what the backend says (for an ONNX file, the run recorded in its ``lit_ptq`` metadata).
    ``model_name``, ``img_size`` and ``num_classes`` must still describe it: the data module
    takes its transform from them, and the backend checks them here.

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
            reconstruction), ``repq_oclip`` / ``repq_gptq_oclip`` (the weight ranges chosen by
            the layer's output error), ``recon_fisher`` / ``recon_joint`` /
            ``recon_fisher_joint`` (a Fisher-weighted block loss, a joint stage on the logits);
            see ``lit_ptq.quant.recipes``.
        softmax: the softmax-output quantizer (``uniform``, ``log2``, ``log_sqrt2``, ``adalog``,
            ``twin_uniform``; default ``log_sqrt2`` with a recipe, ``uniform`` without).
        recon: block-reconstruction settings for ``recipe: recon`` and the other reconstructing
            recipes (``iters``, ``batch_size``, ``images``, ``weight_lr``, ``act_lr``,
            ``round_weight``, ``drop_prob``, ``seed``, ``joint_iters``).
        gelu: the post-GELU activation's quantizer (the input of ``fc2``): ``uniform`` (default),
            ``adalog`` or ``twin_uniform``.
        onnx: path of an exported ``.onnx`` file to evaluate with onnxruntime instead of the
            PyTorch model. Its session is made at the first forward, on the module's device:
            ``CUDAExecutionProvider`` on a GPU (a ``ConfigError`` when onnxruntime lacks it),
            the CPU otherwise. Needs the ``onnxruntime`` backend registered (importing
            ``lit_ptq.export`` registers it; the CLI does).
        backend: an inference backend to evaluate instead of the PyTorch model.
        compile: evaluate the model through ``torch.compile`` (Inductor, ``dynamic=False``;
            :func:`lit_ptq.quant.compile_quantized`). Calibration stays eager; the model is
            compiled at the first evaluation batch after it, which takes a while (once per
            input shape). The logits are those of eager evaluation to the bit on the demo
            (``docs/quantization.md``, "Compiled evaluation").

    Raises:
        ConfigError: with ``onnx`` or ``backend``: the file is missing, not an image
            classifier, or made for another input size, class count or model; ``compile``
            with ``onnx`` or ``backend`` (there is no PyTorch model to compile).
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
        gelu: str = "uniform",
        onnx: Optional[str] = None,
        backend: Optional[InferenceBackend] = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backend"])
        if compile and (onnx is not None or backend is not None):
            given = f"model.onnx={onnx}" if onnx is not None else "model.backend"
            raise ConfigError(f"model.compile=true compiles the PyTorch model, but {given} evaluates another backend; remove one")
        if onnx is not None:
            if backend is not None:
                raise ConfigError(f"model.onnx={onnx} and model.backend are both set; give one backend")
            backend = inference_backend("onnxruntime", option="model.onnx")(onnx, option="model.onnx")
        if backend is not None:
            backend.check(model_name, img_size, num_classes)
        own = sorted(set(model_kwargs or {}) & {"img_size", "num_classes", "checkpoint", "pretrained"})
        if own:
            raise ConfigError(
                f"model.model_kwargs sets {', '.join(own)}, which are options of their own: "
                + ", ".join(f"use --model.{k}" for k in own)
            )
        self.quant_config = (
            QuantConfig(
                method=method, placement=placement, bits=bits, ptf=ptf, lis=lis, arithmetic=arithmetic,
                overrides=overrides, recipe=recipe, softmax=softmax, recon=recon, gelu=gelu,
            )
            if method is not None
            else None
        )
        if backend is None:
            model = create_model(
                model_name, num_classes=num_classes, img_size=img_size, checkpoint=checkpoint, pretrained=pretrained,
                **(model_kwargs or {}),
            )
            if self.quant_config is not None:
                quantize_(model, self.quant_config)
            backend = PyTorchBackend(model, compiler=compile_quantized if compile else None)
        self.model: Optional[torch.nn.Module] = backend.model
        self.inference_backend = backend
        top5 = min(5, num_classes)
        self.acc1 = PercentAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.acc5 = PercentAccuracy(num_classes=num_classes, top_k=top5, average="micro")
        self.loss = ExactMean()
        self.num_images = SumMetric()

    @property
    def quantized(self) -> bool:
        """Whether the PyTorch model carries quantizers (False for a backend without one: nothing to calibrate)."""
        return self.model is not None and is_quantized(self.model)

    @property
    def backend(self) -> str:
        """What computes the logits: the inference backend's name (``"pytorch"``, ``"onnxruntime"``, ...)."""
        return self.inference_backend.name

    def run_summary(self) -> dict[str, Any]:
        """Model and quantization settings, for hparams and result files.

        The backend may replace them with what its file records and name the file
        (:meth:`lit_ptq.backends.InferenceBackend.summary`): an ONNX file's summary recorded at
        export, plus ``onnx`` (the path) and ``onnx_calib_images`` (how many images calibrated
        the file; None when unknown).
        """
        hp = self.hparams
        quant = self.quant_config.describe() if self.quant_config else dict(method="fp32", placement=None, bits="32/32/32")
        summary = dict(model=hp.model_name, checkpoint=hp.checkpoint, num_classes=hp.num_classes, **quant)
        return self.inference_backend.summary(summary)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images, computed by the inference backend (a tensor on ``x``'s device)."""
        return self.inference_backend.logits(x)

    def _recompile(self) -> None:
        """Have a compiled backend compile again at its next batch: the calibration that the
        callback has just run (before this hook) may have changed the quant points and weights."""
        if isinstance(self.inference_backend, PyTorchBackend):
            self.inference_backend.reset()

    def on_validation_start(self) -> None:
        self._recompile()

    def on_test_start(self) -> None:
        self._recompile()

    def on_predict_start(self) -> None:
        self._recompile()

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
        # an empty batch (a rank without images) updates nothing but still logs: the metrics' sync needs every rank
        if images.numel():
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

    def predict_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> Optional[dict[str, torch.Tensor]]:
        """Top-5 (at most ``num_classes``) classes of each image and their softmax probabilities.

        ``batch`` is ``(images, indices)`` as :meth:`~lit_ptq.data.ImageNetDataModule.predict_dataloader`
        yields it. The logits are :meth:`predict_logits`' (the validation batch size), so an
        image gets the class validation would score it with; the classes are ranked on the
        logits, ties as ``argmax`` breaks them.

        Returns:
            ``{"index": (B,), "classes": (B, k), "probs": (B, k)}`` on the CPU (int64, int64,
            float32), or None for an empty batch.
        """
        images, indices = batch
        if images.numel() == 0:
            return None
        logits = self.predict_logits(images)
        k = min(5, logits.shape[1])
        classes = logits.topk(k, dim=1).indices
        probs = logits.softmax(dim=1).gather(1, classes)
        return dict(index=indices.cpu(), classes=classes.cpu(), probs=probs.cpu())

