"""Block reconstruction: learned weight rounding and activation step sizes, block by block.

- BRECQ (Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block
  Reconstruction", ICLR 2021): the quantized model is tuned one block at a time, in forward
  order, so that each block's output matches the float block's output on the float model's
  input; the block's own input comes from the quantized model as reconstructed so far. The
  loss is the squared error summed over channels and averaged over images and positions.
- AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization",
  ICML 2020): each weight ``w`` on the grid of scale ``s`` and zero point ``z`` becomes
  ``s (clamp(floor(w / s) + h(V) + z) - z)`` with the rectified sigmoid
  ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, ``V`` initialized so that
  ``h(V)`` is the fractional part of ``w / s``; after a warm-up the regularizer
  ``sum(1 - |2 h - 1|^beta)``, ``beta`` annealed from 20 to 2, pushes every ``h`` to 0 or 1,
  and at the end ``h >= 0.5`` rounds up.
- LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020): the step size of every
  uniform activation quantizer in the block is learned, the gradient passed through the
  rounding (straight-through estimator); the zero point is kept. The logarithmic softmax
  quantizer keeps its ``delta`` and passes the gradient straight through.
- QDrop (Wei et al., "QDrop: Randomly Dropping Quantization for Extremely Low-bit
  Post-Training Quantization", ICLR 2022): during each step every element of the block's
  input is the float model's with probability ``drop_prob`` (the quantized model's
  otherwise), and every activation quant point in the block leaves each element of its
  input unquantized with the same probability.

After each block its rounded weights are written into the layers' ``weight`` (they lie on
the weight quantizers' grids, which map them to themselves) and the learned step sizes into
the quantizers' ``scale`` buffers; nothing else of the model changes.

Two opt-in additions (``docs/lowbit.md``), each a step of its own so that a recipe switches it on:

- ``reconstruct_fisher``: the block loss weights each element of the block's output error by a
  diagonal Fisher approximation, the squared gradient of the loss at the block's output
  (BRECQ's ``fisher_brecq`` loss as FIMA-Q's ``utils/block_recon.py`` implements it, Wang et
  al., "FIMA-Q: Post-Training Quantization for Vision Transformers by Fisher Information
  Matrix Approximation", CVPR 2025, ShiheWang/FIMA-Q). The gradient here is that of the
  float model's cross-entropy against its own argmax (label-free, nonzero at the float
  model), computed once per block on the calibration images; FIMA-Q's own loss adds a
  low-rank term to the diagonal, which is not implemented.
- ``reconstruct_joint``: after the block stage, every block's AdaRound variables and learned
  step sizes, resumed where the block stage left them, are trained together on
  ``KL(softmax(float logits) || softmax(quantized logits))`` of the whole model, with QDrop's
  dropping in every activation quant point, then rounded as the block stage does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from tqdm import tqdm

from ...errors import CalibrationError
from ..calibration import CalibrationContext
from ..config import ReconSettings
from ..primitives import EPS
from ..quantizer import NonUniformQuantizer, QuantMode, QuantPoint, TensorQuantizer, WeightQuantizer
from ..steps import RECIPES, register_step
from ..walk import set_quant_mode
from .capture import capture_inputs, capture_outputs

__all__ = [
    "BETA",
    "BLOCK_LOSSES",
    "GAMMA",
    "WARMUP",
    "ZETA",
    "Rounding",
    "reconstruct",
    "reconstruct_",
    "reconstruct_fisher",
    "reconstruct_joint",
    "reconstruct_joint_",
]

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1
"""Stretch of AdaRound's rectified sigmoid ``h(V) = clamp(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1)``."""
BETA = (20.0, 2.0)
"""AdaRound's regularizer exponent: its value when the warm-up ends, and the value its linear
decay reaches at step ``iters`` (the last step run, ``iters - 1``, is one decrement above it,
as in BRECQ's schedule)."""
WARMUP = 0.2
"""Fraction of the steps before the rounding regularizer starts and ``beta`` decays."""
BLOCK_LOSSES = ("mse", "fisher")
"""The block losses: BRECQ's squared error, or the squared error weighted by the diagonal Fisher."""


class _Drop:
    """QDrop's random choice, element by element, between a float and a quantized tensor."""

    def __init__(self, prob: float, generator: torch.Generator) -> None:
        self.prob, self.generator = prob, generator

    def mask(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Where ``x`` stays float: a uniform draw below ``prob`` (``None`` when ``prob`` is 0)."""
        if self.prob == 0:
            return None
        return torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype) < self.prob

    def __call__(self, x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        """``x`` where it stays float, else ``quantized``."""
        keep = self.mask(x)
        return quantized if keep is None else torch.where(keep, x, quantized)


class _LsqFakeQuant(torch.autograd.Function):
    """LSQ's fake quantization ``(clamp(round(x / s + z)) - z) s`` with the rounding's
    gradient passed straight through, and QDrop's float elements, in one node.

    Gradients, as LSQ's with ``u = x / s + z``: to ``x``, 1 where ``qmin < u < qmax`` or the
    element stays float, else 0; to ``s``, ``round(u) - u`` where ``qmin < u < qmax``,
    ``clamp(round(u)) - z`` where ``u`` is clipped, nothing where the element stays float,
    summed to the shape of ``s``.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        step: torch.Tensor,
        zero_point: torch.Tensor,
        qmin: int,
        qmax: int,
        keep: Optional[torch.Tensor],
    ) -> torch.Tensor:
        scaled = x / step
        code = scaled + zero_point
        inside = (code > qmin) & (code < qmax)
        code.round_().clamp_(qmin, qmax).sub_(zero_point)
        out = code * step
        if keep is not None:
            out = torch.where(keep, x, out)
            inside_or_float = inside | keep
        else:
            inside_or_float = inside
        ctx.save_for_backward(scaled, code, inside, inside_or_float, keep, step)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        scaled, code, inside, inside_or_float, keep, step = ctx.saved_tensors
        grad_x = grad * inside_or_float if ctx.needs_input_grad[0] else None
        grad_step = None
        if ctx.needs_input_grad[1]:
            local = code - scaled * inside
            if keep is not None:
                local.mul_(~keep)
            grad_step = (grad * local).sum_to_size(step.shape)
        return grad_x, grad_step, None, None, None, None


def _along(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-tensor or per-channel qparam shaped to broadcast against ``x`` along ``axis``."""
    if t.numel() == 1:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.view(shape)


class _AdaRoundWeight(QuantPoint):
    """Stands in for a weight quantizer during reconstruction: the weight on the quantizer's
    grid, rounded down plus the learned ``h(V)`` (AdaRound).

    Args:
        quantizer: the calibrated weight quantizer (its scale and zero point are kept).
        weight: the layer's weight, rounded from.
    """

    def __init__(self, quantizer: WeightQuantizer, weight: torch.Tensor) -> None:
        super().__init__("weight")
        self.mode = QuantMode.QUANTIZE
        self.qmin, self.qmax = quantizer.spec.qmin, quantizer.spec.qmax
        scale, zero_point = quantizer.broadcast_qparams(weight)
        scaled = weight.detach() / scale
        self.register_buffer("step", scale.detach().clone())
        self.register_buffer("zero_point", zero_point.detach().clone())
        self.register_buffer("down", scaled.floor())
        rest = scaled - self.down
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def h(self) -> torch.Tensor:
        """The rectified sigmoid of ``V``, in [0, 1]."""
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h - 1|^beta)``: zero once every ``h`` is 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def on_grid(self, up: torch.Tensor) -> torch.Tensor:
        """The weight rounded down plus ``up``, clamped to the grid (as the quantizer computes it)."""
        code = (self.down + up + self.zero_point).clamp(self.qmin, self.qmax)
        return (code - self.zero_point) * self.step

    def hard(self) -> torch.Tensor:
        """The weight rounded up where ``h >= 0.5``, down elsewhere."""
        return self.on_grid((self.h() >= 0.5).to(self.down.dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.on_grid(self.h())


class _LearnedStep(QuantPoint):
    """Stands in for a uniform activation quantizer: LSQ's fake quantization with the step
    size as a parameter (fixed when ``learn`` is False), and QDrop's random dropping.

    Args:
        quantizer: the calibrated quantizer (its scale is the initial step, its zero point kept).
        drop: QDrop's element-wise choice.
        learn: whether the step size is trained.
    """

    def __init__(self, quantizer: TensorQuantizer, drop: _Drop, learn: bool) -> None:
        super().__init__(quantizer.role)
        self.mode = QuantMode.QUANTIZE
        self.qmin, self.qmax, self.axis = quantizer.spec.qmin, quantizer.spec.qmax, quantizer.channel_axis
        self.drop = drop
        self.step = nn.Parameter(quantizer.scale.detach().clone(), requires_grad=learn)
        self.register_buffer("zero_point", quantizer.zero_point.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = _along(self.step.clamp(min=EPS), x, self.axis)
        zero_point = _along(self.zero_point, x, self.axis)
        return _LsqFakeQuant.apply(x, step, zero_point, self.qmin, self.qmax, self.drop.mask(x))


class _StraightThrough(QuantPoint):
    """Stands in for any other quantizer (the log-coded softmax output): its own fake
    quantization with a straight-through gradient, and QDrop's random dropping."""

    def __init__(self, quantizer: TensorQuantizer, drop: _Drop) -> None:
        super().__init__(quantizer.role)
        self.mode = QuantMode.QUANTIZE
        self.fake_quant: Callable[[torch.Tensor], torch.Tensor] = quantizer.fake_quant
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            shift = self.drop(x, self.fake_quant(x)) - x
        return x + shift


@dataclass
class _Swap:
    """A quantizer of the block replaced by its stand-in while the block is reconstructed."""

    parent: nn.Module
    attr: str
    original: TensorQuantizer
    stand_in: QuantPoint


def _stand_in(parent: nn.Module, quantizer: TensorQuantizer, drop: _Drop, learn_steps: bool) -> QuantPoint:
    if isinstance(quantizer, WeightQuantizer):
        return _AdaRoundWeight(quantizer, parent.weight)
    if isinstance(quantizer, NonUniformQuantizer):
        return _StraightThrough(quantizer, drop)
    return _LearnedStep(quantizer, drop, learn_steps)


def _swap_in(block: nn.Module, drop: _Drop, learn_steps: bool) -> list[_Swap]:
    """Replace every calibrated tensor quantizer of ``block`` by its stand-in."""
    found = [
        (parent, attr, child)
        for parent in block.modules()
        for attr, child in parent.named_children()
        if isinstance(child, TensorQuantizer)
    ]
    swaps = [_Swap(parent, attr, q, _stand_in(parent, q, drop, learn_steps)) for parent, attr, q in found]
    for s in swaps:
        setattr(s.parent, s.attr, s.stand_in)
    return swaps


def _restore(swaps: Sequence[_Swap]) -> None:
    """Put the original quantizers back."""
    for s in swaps:
        setattr(s.parent, s.attr, s.original)


@torch.no_grad()
def _commit(swaps: Sequence[_Swap]) -> None:
    """Write the hard-rounded weights into the layers and the learned steps into the quantizers."""
    for s in swaps:
        if isinstance(s.stand_in, _AdaRoundWeight):
            s.parent.weight.copy_(s.stand_in.hard().to(s.parent.weight.dtype))
        elif isinstance(s.stand_in, _LearnedStep) and s.stand_in.step.requires_grad:
            s.original.scale.copy_(s.stand_in.step.clamp(min=EPS))


@dataclass
class _BlockData:
    """What one block is reconstructed on, cached on the model's device.

    Attributes:
        quantized_input: the block's input in the quantized model (first argument), all images.
        float_input: the block's input in the float model.
        target: the float block's output on ``float_input``.
        args: the block's other positional arguments (the same for every batch).
        kwargs: its keyword arguments.
        fisher: the loss weight of each element of ``target`` (:func:`_fisher_weights`);
            ``None`` for the plain squared error.
    """

    quantized_input: torch.Tensor
    float_input: torch.Tensor
    target: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    fisher: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.quantized_input.shape[0]


def _same(a: Any, b: Any) -> bool:
    """Whether two call arguments are equal (tensors by shape and values, containers item by item)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


_BlockCall = tuple[tuple[Any, ...], dict[str, Any]]
"""The ``(args, kwargs)`` of one call of a block."""


def _split_inputs(name: str, calls: Sequence[_BlockCall]) -> tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]:
    """The first positional argument of every call, concatenated, and the other arguments.

    Raises:
        RuntimeError: the other arguments differ between batches (they are replayed from the first).
    """
    extras = [(args[1:], kwargs) for args, kwargs in calls]
    if not all(_same(e, extras[0]) for e in extras[1:]):
        raise RuntimeError(
            f"block {name} gets arguments besides its input that change between batches; it cannot be reconstructed"
        )
    return torch.cat([args[0] for args, _ in calls]), *extras[0]


@contextmanager
def _float_model(model: nn.Module, float_weights: dict[str, torch.Tensor]) -> Iterator[Callable[[torch.Tensor], Any]]:
    """The float model as a function of its input: quant points passing through, and the
    weights as they were before reconstruction."""
    set_quant_mode(model, QuantMode.FLOAT)
    try:
        yield lambda x: functional_call(model, float_weights, (x,))
    finally:
        set_quant_mode(model, QuantMode.QUANTIZE)


@torch.no_grad()
def _capture(
    model: nn.Module, name: str, batches: Sequence[torch.Tensor], float_weights: dict[str, torch.Tensor]
) -> _BlockData:
    """The float input and output of block ``name`` and its input in the quantized model."""
    block = model.get_submodule(name)
    with _float_model(model, float_weights) as run:
        captured = list(capture_outputs(run, block, batches))
    float_in, _, _ = _split_inputs(name, [(args, kwargs) for args, kwargs, _ in captured])
    target = torch.cat([out for _, _, out in captured])
    quantized, args, kwargs = _split_inputs(name, list(capture_inputs(model, block, batches)))
    return _BlockData(quantized, float_in, target, args, kwargs)


def _rec_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (the last dimension), averaged over the rest (BRECQ)."""
    return (out - target).pow(2).sum(-1).mean()


def _fisher_loss(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Squared error weighted element by element by ``weight`` (the diagonal Fisher), summed
    over channels and averaged over the rest (FIMA-Q's ``fisher_brecq``)."""
    return ((out - target).pow(2) * weight).sum(-1).mean()


@torch.no_grad()
def _fisher_weights(
    model: nn.Module, name: str, batches: Sequence[torch.Tensor], float_weights: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The diagonal Fisher approximation at the output of block ``name``, one weight per element.

    For each image, ``g`` is the gradient, at the block's output, of the float model's
    cross-entropy against its own top class (``-log softmax(z)[argmax z]``, no label needed).
    The weight is ``g ** 2``, scaled over all images so that its root mean square is 1 (as
    FIMA-Q scales its squared gradients); the scale leaves the minimizer unchanged and keeps
    the loss comparable to the squared error.

    Raises:
        CalibrationError: every gradient is zero (the float model saturates on every image).
    """
    block = model.get_submodule(name)
    held: list[torch.Tensor] = []

    def leaf(_: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        held.append(out.detach().requires_grad_())
        return held[-1]

    grads = []
    handle = block.register_forward_hook(leaf)
    try:
        with _float_model(model, float_weights) as run, torch.enable_grad():
            for x in batches:
                held.clear()
                logits = run(x)
                loss = F.cross_entropy(logits, logits.detach().argmax(-1), reduction="sum")
                grads.append(torch.autograd.grad(loss, held[0])[0])
    finally:
        handle.remove()
    squared = torch.cat(grads).pow(2)
    total = squared.pow(2).sum()
    if not total > 0:
        raise CalibrationError(f"the Fisher weights of block {name} are all zero: the float model saturates on every image")
    return squared * torch.sqrt(squared.numel() / total)


@torch.no_grad()
def _block_mse(block: nn.Module, data: _BlockData, batch_size: int) -> float:
    """The mean squared error of the block's output on the quantized inputs against the targets."""
    total = 0.0
    for start in range(0, len(data), batch_size):
        out = block(data.quantized_input[start : start + batch_size], *data.args, **data.kwargs)
        total += float((out - data.target[start : start + batch_size]).pow(2).sum())
    return total / data.target.numel()


def _beta(step: int, settings: ReconSettings) -> Optional[float]:
    """The regularizer's exponent at ``step``; ``None`` during the warm-up (no regularizer)."""
    warmup = int(WARMUP * settings.iters)
    if step < warmup:
        return None
    progress = (step - warmup) / max(1, settings.iters - warmup)
    start, end = BETA
    return end + (start - end) * (1 - progress)


class _Optimizers:
    """Adam on the rounding variables; Adam with cosine-decaying rate on the step sizes (QDrop)."""

    def __init__(
        self, rounding: Sequence[nn.Parameter], steps: Sequence[nn.Parameter], settings: ReconSettings
    ) -> None:
        self.params = [*rounding, *steps]
        self.optimizers = [torch.optim.Adam(rounding, lr=settings.weight_lr)] if rounding else []
        self.schedulers = []
        if steps:
            adam = torch.optim.Adam(steps, lr=settings.act_lr)
            self.optimizers.append(adam)
            self.schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(adam, T_max=settings.iters, eta_min=0.0))

    def step(self, loss: torch.Tensor) -> None:
        """One update from ``loss`` (gradients only for the learned tensors)."""
        for p, g in zip(self.params, torch.autograd.grad(loss, self.params)):
            p.grad = g
        for opt in self.optimizers:
            opt.step()
        for sched in self.schedulers:
            sched.step()


def _train(
    block: nn.Module, data: _BlockData, swaps: Sequence[_Swap], settings: ReconSettings, drop: _Drop, bar: tqdm
) -> None:
    """``settings.iters`` steps of the reconstruction loss on random batches of ``data``."""
    rounding = [s.stand_in for s in swaps if isinstance(s.stand_in, _AdaRoundWeight)]
    steps = [s.stand_in.step for s in swaps if isinstance(s.stand_in, _LearnedStep) and s.stand_in.step.requires_grad]
    optimizers = _Optimizers([r.v for r in rounding], steps, settings)
    if not optimizers.params:
        bar.update(settings.iters)
        return
    batch = min(settings.batch_size, len(data))
    for i in range(settings.iters):
        idx = torch.randperm(len(data), generator=drop.generator, device=data.quantized_input.device)[:batch]
        with torch.no_grad():
            x = drop(data.float_input[idx], data.quantized_input[idx])
        out = block(x, *data.args, **data.kwargs)
        if data.fisher is None:
            loss = _rec_loss(out, data.target[idx])
        else:
            loss = _fisher_loss(out, data.target[idx], data.fisher[idx])
        beta = _beta(i, settings)
        if beta is not None and rounding and settings.round_weight > 0:
            loss = loss + settings.round_weight * sum(r.regularizer(beta) for r in rounding)
        optimizers.step(loss)
        bar.update()


def _float_weights(model: nn.Module, blocks: Sequence[str]) -> dict[str, torch.Tensor]:
    """Copies of the weights reconstruction rounds, by parameter name."""
    weights = {}
    for name in blocks:
        for sub, module in model.get_submodule(name).named_modules():
            if isinstance(getattr(module, "weight_quantizer", None), WeightQuantizer):
                weights[".".join(p for p in (name, sub, "weight") if p)] = module.weight.detach().clone()
    return weights


def _limit(batches: Sequence[torch.Tensor], images: Optional[int]) -> list[torch.Tensor]:
    """The leading batches that hold the first ``images`` images (all of them for ``None``)."""
    if images is None:
        return list(batches)
    kept, left = [], images
    for b in batches:
        if left <= 0:
            break
        kept.append(b[:left])
        left -= kept[-1].shape[0]
    return kept


@dataclass
class Rounding:
    """Where the block stage leaves each rounded weight, for the joint stage to resume from.

    Attributes:
        float_weights: parameter name -> the weight before reconstruction.
        v: parameter name -> AdaRound's ``V`` at the end of its block's training.
    """

    float_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)


def _weight_names(block_name: str, block: nn.Module, swaps: Sequence[_Swap]) -> dict[str, _AdaRoundWeight]:
    """Parameter name of the weight -> its AdaRound stand-in, for the block's weight swaps."""
    names = {m: sub for sub, m in block.named_modules()}
    return {
        ".".join(p for p in (block_name, names[s.parent], "weight") if p): s.stand_in
        for s in swaps
        if isinstance(s.stand_in, _AdaRoundWeight)
    }


def reconstruct_(
    model: nn.Module,
    blocks: Sequence[str],
    data: Sequence[torch.Tensor],
    settings: ReconSettings,
    loss: str = "mse",
    rounding: Optional[Rounding] = None,
) -> dict[str, tuple[float, float]]:
    """Reconstruct a calibrated, quantizing model block by block, in place (BRECQ / QDrop).

    Args:
        model: a model whose quantizers are calibrated and in ``QUANTIZE`` mode (left so).
        blocks: names of the blocks in forward order (``Family.blocks``); each is called
            once per forward, its input tensor first (other arguments must not depend on
            the batch).
        data: calibration input batches on the model's device.
        settings: steps, batch size, images, learning rates, regularizer weight, QDrop
            probability and seed.
        loss: ``"mse"`` (BRECQ's squared error) or ``"fisher"`` (weighted by
            :func:`_fisher_weights`, FIMA-Q's ``fisher_brecq``).
        rounding: filled, when given, with each rounded weight's float value and its ``V``
            at the end of the block stage (what :func:`reconstruct_joint_` resumes from).

    Returns:
        Block name -> the mean squared error of its quantized output against the float
        target, on the cached calibration images, before and after reconstruction.
    """
    if loss not in BLOCK_LOSSES:
        raise ValueError(f"loss={loss!r} must be one of {', '.join(BLOCK_LOSSES)}")
    batches = _limit(data, settings.images)
    device = batches[0].device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    drop = _Drop(float(settings.drop_prob), generator)
    float_weights = _float_weights(model, blocks)
    if rounding is not None:
        rounding.float_weights.update(float_weights)
    errors = {}
    bar = tqdm(total=len(blocks) * settings.iters, desc="Reconstruction", disable=None, leave=False)
    with torch.inference_mode(False), bar:
        for name in blocks:
            block = model.get_submodule(name)
            block_data = _capture(model, name, batches, float_weights)
            if loss == "fisher":
                block_data.fisher = _fisher_weights(model, name, batches, float_weights)
            before = _block_mse(block, block_data, settings.batch_size)
            swaps = _swap_in(block, drop, settings.act_lr > 0)
            try:
                with torch.enable_grad():
                    _train(block, block_data, swaps, settings, drop, bar)
            finally:
                _restore(swaps)
            _commit(swaps)
            if rounding is not None:
                rounding.v.update({k: r.v.detach().clone() for k, r in _weight_names(name, block, swaps).items()})
            errors[name] = (before, _block_mse(block, block_data, settings.batch_size))
            log.info("reconstructed %s: output MSE %.4g -> %.4g", name, *errors[name])
    return errors


def _kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(target) || softmax(logits))`` summed over classes, averaged over images."""
    log_p = F.log_softmax(target, dim=-1)
    return (log_p.exp() * (log_p - F.log_softmax(logits, dim=-1))).sum(-1).mean()


@torch.no_grad()
def _model_kl(model: nn.Module, images: torch.Tensor, target: torch.Tensor, batch_size: int) -> float:
    """:func:`_kl` of the model's logits against ``target`` over all ``images``."""
    total = 0.0
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        total += float(_kl(model(chunk), target[start : start + batch_size])) * len(chunk)
    return total / len(images)


def _resume(block_name: str, block: nn.Module, swaps: Sequence[_Swap], rounding: Rounding) -> None:
    """Give each AdaRound stand-in of ``block`` the float weight and the ``V`` the block stage left."""
    for weight_name, stand_in in _weight_names(block_name, block, swaps).items():
        if weight_name not in rounding.v:
            raise CalibrationError(f"{weight_name} was not rounded by the block stage; reconstruct_joint cannot resume it")
        with torch.no_grad():
            stand_in.down.copy_((rounding.float_weights[weight_name] / stand_in.step).floor())
            stand_in.v.copy_(rounding.v[weight_name])


def reconstruct_joint_(
    model: nn.Module, blocks: Sequence[str], data: Sequence[torch.Tensor], settings: ReconSettings, rounding: Rounding
) -> tuple[float, float]:
    """Tune every block's rounding and step sizes together on the float model's output, in place.

    Each block's quantizers are replaced by their stand-ins at once, the AdaRound variables
    resumed from ``rounding`` (the block stage's ``V`` on the float weights), the activation
    step sizes from the quantizers' (learned) scales. ``settings.joint_iters`` Adam steps on
    random batches of ``settings.batch_size`` calibration images minimize
    ``KL(softmax(float logits) || softmax(quantized logits))`` plus AdaRound's regularizer, on
    the block stage's schedule stretched to ``joint_iters`` steps; QDrop leaves each element
    of every activation quant point's input float with probability ``drop_prob``. Then
    ``h >= 0.5`` rounds up and the weights and steps are written into the model, as after a block.

    Args:
        model: a model reconstructed block by block (quantizers in ``QUANTIZE`` mode, left so).
        blocks: the names of the blocks, as given to :func:`reconstruct_`.
        data: calibration input batches on the model's device.
        settings: ``joint_iters``, batch size, images, learning rates, regularizer weight,
            QDrop probability and seed.
        rounding: what :func:`reconstruct_` left (its ``rounding`` argument).

    Returns:
        The KL divergence of the quantized model's logits from the float model's on the
        calibration images, before and after.
    """
    images = torch.cat(_limit(data, settings.images))
    joint = replace(settings, iters=settings.joint_iters)
    with _float_model(model, rounding.float_weights) as run, torch.no_grad():
        target = torch.cat([run(images[i : i + joint.batch_size]) for i in range(0, len(images), joint.batch_size)])
    before = _model_kl(model, images, target, joint.batch_size)
    generator = torch.Generator(device=images.device).manual_seed(joint.seed)
    drop = _Drop(float(joint.drop_prob), generator)
    swaps: list[_Swap] = []
    with torch.inference_mode(False):
        try:
            for name in blocks:
                block = model.get_submodule(name)
                block_swaps = _swap_in(block, drop, joint.act_lr > 0)
                swaps.extend(block_swaps)
                _resume(name, block, block_swaps, rounding)
            with torch.enable_grad(), tqdm(total=joint.iters, desc="Joint reconstruction", disable=None, leave=False) as bar:
                _train_joint(model, images, target, swaps, joint, drop, bar)
        finally:
            _restore(swaps)
        _commit(swaps)
    after = _model_kl(model, images, target, joint.batch_size)
    log.info("joint reconstruction: KL to the float logits %.4g -> %.4g", before, after)
    return before, after


def _train_joint(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor, swaps: Sequence[_Swap], joint: ReconSettings, drop: _Drop, bar: tqdm
) -> None:
    """``joint.iters`` steps of :func:`_kl` plus the rounding regularizer on random batches."""
    rounding = [s.stand_in for s in swaps if isinstance(s.stand_in, _AdaRoundWeight)]
    steps = [s.stand_in.step for s in swaps if isinstance(s.stand_in, _LearnedStep) and s.stand_in.step.requires_grad]
    optimizers = _Optimizers([r.v for r in rounding], steps, joint)
    batch = min(joint.batch_size, len(images))
    for i in range(joint.iters):
        idx = torch.randperm(len(images), generator=drop.generator, device=images.device)[:batch]
        loss = _kl(model(images[idx]), target[idx])
        beta = _beta(i, joint)
        if beta is not None and rounding and joint.round_weight > 0:
            loss = loss + joint.round_weight * sum(r.regularizer(beta) for r in rounding)
        optimizers.step(loss)
        bar.update()


_ROUNDING = "recon_rounding"
"""``ctx.results`` key of the :class:`Rounding` the block stage leaves for ``reconstruct_joint``."""


def _block_stage(model: nn.Module, batches: Sequence[torch.Tensor], ctx: CalibrationContext, loss: str) -> None:
    """:func:`reconstruct_` with ``loss``; keeps the rounding when ``reconstruct_joint`` follows."""
    rounding = None
    if ctx.config.recipe is not None and "reconstruct_joint" in RECIPES[ctx.config.recipe]:
        rounding = ctx.results[_ROUNDING] = Rounding()
    blocks = ctx.family.fact("blocks", model)
    ctx.results["reconstruction"] = reconstruct_(model, blocks, batches, ctx.config.recon, loss=loss, rounding=rounding)


@register_step("reconstruct", needs={"blocks": "blocks"})
def reconstruct(model: nn.Module, batches: Sequence[torch.Tensor], ctx: CalibrationContext) -> None:
    """The recipe step: :func:`reconstruct_` through the family's blocks with the config's
    ``recon`` settings; each block's output error before and after is left in
    ``ctx.results["reconstruction"]``."""
    _block_stage(model, batches, ctx, "mse")


@register_step("reconstruct_fisher", needs={"blocks": "blocks"})
def reconstruct_fisher(model: nn.Module, batches: Sequence[torch.Tensor], ctx: CalibrationContext) -> None:
    """``reconstruct`` with the Fisher-weighted block loss (``loss="fisher"``)."""
    _block_stage(model, batches, ctx, "fisher")


@register_step("reconstruct_joint", needs={"blocks": "blocks"})
def reconstruct_joint(model: nn.Module, batches: Sequence[torch.Tensor], ctx: CalibrationContext) -> None:
    """The joint stage (:func:`reconstruct_joint_`) after a block stage of the same recipe;
    the KL before and after is left in ``ctx.results["joint_reconstruction"]``.

    Raises:
        CalibrationError: no block stage ran before it in this calibration.
    """
    rounding = ctx.results.pop(_ROUNDING, None)
    if rounding is None:
        raise CalibrationError("reconstruct_joint needs reconstruct or reconstruct_fisher before it in the recipe")
    blocks = ctx.family.fact("blocks", model)
    ctx.results["joint_reconstruction"] = reconstruct_joint_(model, blocks, batches, ctx.config.recon, rounding)
