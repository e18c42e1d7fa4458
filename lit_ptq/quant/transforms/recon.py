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
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch.func import functional_call
from tqdm import tqdm

from ..calibration import CalibrationContext
from ..config import ReconSettings
from ..primitives import EPS
from ..quantizer import NonUniformQuantizer, QuantMode, QuantPoint, TensorQuantizer, WeightQuantizer
from ..steps import register_step
from ..walk import set_quant_mode
from .capture import capture_inputs, capture_outputs

__all__ = ["reconstruct", "reconstruct_", "ZETA", "GAMMA", "BETA", "WARMUP"]

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1
"""Stretch of AdaRound's rectified sigmoid ``h(V) = clamp(sigmoid(V) (ZETA - GAMMA) + GAMMA, 0, 1)``."""
BETA = (20.0, 2.0)
"""AdaRound's regularizer exponent: its value when the warm-up ends, and the value its linear
decay reaches at step ``iters`` (the last step run, ``iters - 1``, is one decrement above it,
as in BRECQ's schedule)."""
WARMUP = 0.2
"""Fraction of the steps before the rounding regularizer starts and ``beta`` decays."""


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
    """

    quantized_input: torch.Tensor
    float_input: torch.Tensor
    target: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

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
        loss = _rec_loss(block(x, *data.args, **data.kwargs), data.target[idx])
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


def reconstruct_(
    model: nn.Module, blocks: Sequence[str], data: Sequence[torch.Tensor], settings: ReconSettings
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

    Returns:
        Block name -> the mean squared error of its quantized output against the float
        target, on the cached calibration images, before and after reconstruction.
    """
    batches = _limit(data, settings.images)
    device = batches[0].device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    drop = _Drop(float(settings.drop_prob), generator)
    float_weights = _float_weights(model, blocks)
    errors = {}
    bar = tqdm(total=len(blocks) * settings.iters, desc="Reconstruction", disable=None, leave=False)
    with torch.inference_mode(False), bar:
        for name in blocks:
            block = model.get_submodule(name)
            block_data = _capture(model, name, batches, float_weights)
            before = _block_mse(block, block_data, settings.batch_size)
            swaps = _swap_in(block, drop, settings.act_lr > 0)
            try:
                with torch.enable_grad():
                    _train(block, block_data, swaps, settings, drop, bar)
            finally:
                _restore(swaps)
            _commit(swaps)
            errors[name] = (before, _block_mse(block, block_data, settings.batch_size))
            log.info("reconstructed %s: output MSE %.4g -> %.4g", name, *errors[name])
    return errors


@register_step("reconstruct", needs={"blocks": "blocks"})
def reconstruct(model: nn.Module, batches: Sequence[torch.Tensor], ctx: CalibrationContext) -> None:
    """The recipe step: :func:`reconstruct_` through the family's blocks with the config's
    ``recon`` settings; each block's output error before and after is left in
    ``ctx.results["reconstruction"]``."""
    ctx.results["reconstruction"] = reconstruct_(model, ctx.family.fact("blocks", model), batches, ctx.config.recon)
