"""ONNX export of a calibrated lit_ptq model in QDQ form.

Each uniform activation quant point becomes a ``QuantizeLinear`` / ``DequantizeLinear`` pair
with its calibrated scale and zero point (uint8 for an unsigned spec, int8 for a signed
one; per axis for a per-channel point such as FQ-ViT's PTF LayerNorm inputs), and each
weight quantizer an int8 (uint8 for an asymmetric spec) initializer of the integer codes,
per output channel, followed by ``DequantizeLinear`` (a linear's codes are stored
transposed, ``(in, out)`` with ``axis=1``; a convolution's as its weight, ``axis=0``). This is the "QDQ"
(quantize-dequantize) representation of the ONNX quantization format, which onnxruntime
fuses into integer kernels:

- ONNX operators: https://onnx.ai/onnx/operators/onnx__QuantizeLinear.html and
  https://onnx.ai/onnx/operators/onnx__DequantizeLinear.html
- onnxruntime quantization, "Quantized model format: QDQ":
  https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html

The graph is captured with torch's ``torch.export``-based exporter (``dynamo=True``; the
TorchScript exporter fails on the iTPN position-bias resize): in :func:`qdq_export_mode`
every quant point's ``forward`` calls the ``quantized_decomposed`` operators
(``torch.ao.quantization.fx._decomposed``), which the exporter's ``torch_lib`` (onnxscript)
translates to ``QuantizeLinear`` / ``DequantizeLinear``; per-channel activation points use
the translation of this module, one per-axis ``QuantizeLinear`` without torch_lib's
trailing ``Clip``. Grids narrower than 8 bits are clamped (``Clip``) before
``QuantizeLinear``, which gives the same codes as the seed's clamp after rounding.

Arithmetic differences from the PyTorch fake quantization (``Arithmetic.SEED``):

- ``QuantizeLinear`` computes ``saturate(round(x / s) + zp)``; the seed rounds
  ``x / s + zp``. The two differ only where ``x / s`` lies at (or, after adding ``zp`` in
  float32, rounds onto) a half-integer and ``zp`` is odd: one level, on a tiny fraction of
  the elements. Under ``Arithmetic.FUSED`` torch multiplies by ``1 / s`` instead of
  dividing, a difference of the same kind.
- The weights are exact: the integer codes are computed with the seed's division and
  ``DequantizeLinear`` multiplies them by the same float32 scale.
- onnxruntime's fused integer kernels (``QLinearMatMul``, ``MatMulIntegerToFloat``, ...)
  accumulate in int32 and requantize with their own float arithmetic, so its outputs are
  close to, not equal to, the fake-quantized ones.
- Linears with a bias export as ``Gemm`` over the flattened tokens (see
  :func:`_linear_forward`), which onnxruntime runs as ``QGemm`` (bias inside) when the input
  is quantized too; their float rounding differs from torch's ``MatMul`` + ``Add`` order.
  Where the output is not quantized, the bias is a float ``Add`` after a bias-free ``Gemm``
  (:func:`~lit_ptq.export.graph.split_bias`); where it is, onnxruntime rounds the bias onto
  the grid of the integer product (``s_x * s_w``) inside ``QGemm``.
- A weight DequantizeLinear feeding a ``MatMul`` whose other input is float (a bias-free
  linear the placement leaves unquantized at its input) becomes ``MatMulNBits``, which by
  default (``session.qdq_matmulnbits_accuracy_level=4``) quantizes that float input to int8
  on the fly, an approximation the PyTorch model does not make; :func:`ort_session_options`
  turns it off.

FQ-ViT's PTF LayerNorm inputs are per-channel scales and zero points and export as per-axis
pairs. Points ONNX's uniform Q/DQ cannot express: the non-uniform codes
(:class:`~lit_ptq.quant.quantizer.NonUniformQuantizer`: RepQ-ViT's log2 / log-sqrt2, AdaLog's
adaptive-base logarithm, PTQ4ViT's twin-uniform) and FQ-ViT's log-int-softmax
(:class:`~lit_ptq.quant.quantizer.LogSoftmaxQuantizer`). By
default they raise :class:`OnnxExportError` naming the point; with ``log_points="float_ops"``
they are traced as standard float operators (``Log``, ``Pow``, ``Floor``, ...), whose
results in onnxruntime may differ from torch's near the code boundaries.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Literal, Optional, Union

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn as nn

from ..errors import UserError
from ..quant.layers import QuantLinear, maybe_quant
from ..quant.walk import owner_weight, quant_points
from ..quant.quantizer import (
    LogSoftmaxQuantizer,
    NonUniformQuantizer,
    NotCalibratedError,
    QuantMode,
    QuantPoint,
    TensorQuantizer,
    WeightQuantizer,
)
from .graph import raise_quantize, sink_dequantize, split_bias

__all__ = ["export_onnx", "qdq_export_mode", "ort_session_options", "OnnxExportError", "OPSET"]

OPSET = 20
"""ONNX opset of the exported graph: 20 has a ``Gelu`` operator (onnxruntime fuses it with the
preceding bias as ``BiasGelu``; opset 18 spells it as five elementwise operators)."""

LogPoints = Literal["raise", "float_ops"]

_QD = torch.ops.quantized_decomposed
_PROTOBUF_LIMIT = 2**31  # bytes: one ONNX file holds one protobuf message
_CODES_BUFFER = "_onnx_int_codes"
CODES_SUFFIX = f".weight_quantizer.{_CODES_BUFFER}"
"""How the initializer of a weight's integer codes is named, after its owner (``blocks.0.mlp.fc1``)."""


class OnnxExportError(UserError, ValueError):
    """The model has a quant point or a state that the QDQ export cannot represent."""


def _integer_dtype(point: TensorQuantizer) -> torch.dtype:
    """int8 for a signed spec, uint8 for an unsigned one; wider grids have no 8-bit type."""
    spec = point.spec
    if spec.bits > 8:
        raise OnnxExportError(
            f"quant point {point.qualname or point.role} has {spec.bits} bits; QDQ export supports 8 bits or fewer"
        )
    return torch.int8 if spec.signed else torch.uint8


def _grid_bounds(point: TensorQuantizer, scale: torch.Tensor, zero_point: torch.Tensor) -> Optional[tuple]:
    """For a grid narrower than its 8-bit type, the float values of ``qmin`` and ``qmax``.

    ``round(((q - zp) * s) / s) == q - zp`` for the small integers of a grid, so clamping
    ``x`` to these values before ``QuantizeLinear`` gives the codes of a clamp after rounding.
    ``None`` for a full 8-bit grid, where ``QuantizeLinear`` saturates by itself.
    """
    spec = point.spec
    full = (-128, 127) if spec.signed else (0, 255)
    if (spec.qmin, spec.qmax) == full:
        return None
    lo, hi = (spec.qmin - zero_point) * scale, (spec.qmax - zero_point) * scale
    if lo.numel() == 1:
        return float(lo), float(hi)
    return lo, hi


def _activation_qdq(point: TensorQuantizer) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``x -> DequantizeLinear(QuantizeLinear(x))`` with the point's calibrated qparams.

    The qparams are read now, as Python numbers (per tensor) or constant tensors (per
    channel), so that the exported graph holds them as constants.
    """
    dtype = _integer_dtype(point)
    qmin, qmax = point.spec.qmin, point.spec.qmax
    scale_t, zp_t = point.scale.detach().clone(), point.zero_point.detach().clone()
    if scale_t.numel() == 1:
        scale, zp = float(scale_t), int(zp_t)
        bounds = _grid_bounds(point, scale_t, zp_t)

        def per_tensor(x: torch.Tensor) -> torch.Tensor:
            if bounds is not None:
                x = torch.clamp(x, *bounds)
            q = _QD.quantize_per_tensor(x, scale, zp, qmin, qmax, dtype)
            return _QD.dequantize_per_tensor(q, scale, zp, qmin, qmax, dtype)

        return per_tensor
    zp_int = zp_t.to(torch.int32)

    def per_channel(x: torch.Tensor) -> torch.Tensor:
        axis = point.channel_axis % x.dim()
        shape = [1] * x.dim()
        shape[axis] = -1
        bounds = _grid_bounds(point, scale_t.view(shape), zp_t.view(shape))
        if bounds is not None:
            x = torch.clamp(x, *bounds)
        q = _QD.quantize_per_channel(x, scale_t, zp_int, axis, qmin, qmax, dtype)
        return _QD.dequantize_per_channel(q, scale_t, zp_int, axis, qmin, qmax, dtype)

    return per_channel


def _quantize_per_channel_onnx(input, scales, zero_points, axis: int, quant_min: int, quant_max: int, dtype):
    """``quantized_decomposed.quantize_per_channel`` as one per-axis ``QuantizeLinear``.

    torch_lib's translation adds a ``Clip`` to ``[quant_min, quant_max]`` after it, which
    separates the pair that onnxruntime fuses; the grids narrower than 8 bits are clamped
    before quantizing instead (:func:`_grid_bounds`), so saturation is enough here.
    """
    from onnxscript import ir
    from onnxscript.onnx_opset import opset20 as op

    to = ir.DataType.INT8 if quant_min < 0 else ir.DataType.UINT8
    return op.QuantizeLinear(input, op.CastLike(scales, input), op.Cast(zero_points, to=to), axis=axis)


def weight_codes(point: WeightQuantizer, weight: torch.Tensor) -> torch.Tensor:
    """The integer codes of ``weight`` (output channels on axis 0), as the seed rounds them.

    Signed per-channel specs: ``clamp(round(w / s))``; otherwise ``clamp(round(w / s + zp))``,
    in the integer dtype of the point.
    """
    spec = point.spec
    shape = (-1,) + (1,) * (weight.dim() - 1)
    w = weight.detach().float()
    s = point.scale.reshape(shape)
    if spec.signed:
        codes = torch.round(w / s)
    else:
        codes = torch.round(w / s + point.zero_point.reshape(shape))
    return codes.clamp(spec.qmin, spec.qmax).to(_integer_dtype(point))


def _weight_dq(point: WeightQuantizer, weight: torch.Tensor) -> torch.Tensor:
    """``DequantizeLinear`` of the point's stored integer codes, per output channel.

    A per-tensor weight spec (an override) repeats its one scale for every channel.
    """
    spec = point.spec
    codes = getattr(point, _CODES_BUFFER)
    channels = codes.shape[0]
    scale, zp = point.scale.expand(channels), point.zero_point.to(torch.int32).expand(channels)
    return _QD.dequantize_per_channel(codes, scale, zp, 0, spec.qmin, spec.qmax, codes.dtype)


def log_point_error(name: str, point: QuantPoint, option: str) -> OnnxExportError:
    """The error for a non-uniform quantizer or log-int-softmax exported with ``log_points="raise"``.

    Args:
        name: the point's name.
        point: the point.
        option: how the user asks for float operators instead (``log_points='float_ops'``
            in Python, ``--log_points float_ops`` on the CLI).
    """
    kind = "log-int-softmax (LIS)" if isinstance(point, LogSoftmaxQuantizer) else getattr(point, "kind", "non-uniform quantizer")
    return OnnxExportError(
        f"quant point {name} is a {kind}, which ONNX QuantizeLinear/DequantizeLinear cannot express; "
        f"export with {option} to trace it as float operators"
    )


def _export_forward(point: QuantPoint, log_points: LogPoints) -> Callable[..., torch.Tensor]:
    """The ``forward`` a quant point runs under :func:`qdq_export_mode`."""
    original = type(point).forward.__get__(point)
    name = point.qualname or point.role
    if point.mode is QuantMode.CALIBRATE:
        raise OnnxExportError(f"quant point {name} is in calibrate mode; finish calibration before exporting")
    if point.mode is QuantMode.FLOAT:
        return original
    if isinstance(point, (NonUniformQuantizer, LogSoftmaxQuantizer)):
        if log_points == "raise":
            raise log_point_error(name, point, "log_points='float_ops'")
        return original
    if isinstance(point, WeightQuantizer):
        return lambda weight: _weight_dq(point, weight)
    if isinstance(point, TensorQuantizer):
        return _activation_qdq(point)
    raise OnnxExportError(f"quant point {name} of type {type(point).__name__} has no ONNX export")


def _quantizing(point: Optional[nn.Module]) -> bool:
    return isinstance(point, TensorQuantizer) and point.mode is QuantMode.QUANTIZE


def _quantized_linears(model: nn.Module) -> list[QuantLinear]:
    """The linears whose weight is quantized: each is exported by :func:`_linear_forward`."""
    return [m for m in model.modules() if isinstance(m, QuantLinear) and _quantizing(m.weight_quantizer)]


def _linear_forward(linear: QuantLinear) -> Callable[[torch.Tensor], torch.Tensor]:
    """``linear``'s forward as ``Reshape -> Gemm -> Reshape`` over the flattened tokens, the
    weight stored transposed.

    The weight's integer codes are an ``(in, out)`` initializer dequantized per output channel
    (``axis=1``), so that ``Gemm`` (``transB=0``) reads the ``DequantizeLinear`` directly, with
    no ``Transpose`` between them; torch exports ``F.linear`` of a 3-d input as ``MatMul``
    then ``Add``, while a ``Gemm`` whose output is quantized becomes a ``QGemm`` with the bias
    inside and quantized outputs. Without a bias the product is a ``MatMul``.
    Where the input is quantized, :func:`~lit_ptq.export.graph.split_bias` then moves the bias
    into an ``Add`` unless the output is quantized, so that onnxruntime forms ``QGemm``.
    """
    point = linear.weight_quantizer
    spec = point.spec

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = maybe_quant(linear.input_quantizer, x)
        codes = getattr(point, _CODES_BUFFER)
        channels = codes.shape[1]
        scale, zp = point.scale.expand(channels), point.zero_point.to(torch.int32).expand(channels)
        weight_t = _QD.dequantize_per_channel(codes, scale, zp, 1, spec.qmin, spec.qmax, codes.dtype)
        flat = x.reshape(-1, x.shape[-1])
        out = flat @ weight_t if linear.bias is None else torch.addmm(linear.bias, flat, weight_t)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return forward


@contextlib.contextmanager
def qdq_export_mode(model: nn.Module, log_points: LogPoints = "raise") -> Iterator[nn.Module]:
    """Within the block, every quantizing point of ``model`` emits Q/DQ operators.

    Weight quantizers get a temporary buffer of their weight's integer codes (an int8
    initializer in the exported graph; transposed for a linear), linears with a quantized
    weight compute as ``Gemm`` or ``MatMul`` over those codes (see :func:`_linear_forward`);
    everything is restored on exit.

    Args:
        model: a calibrated model in ``quantize`` mode, or a float / ``float``-mode model.
        log_points: ``raise`` (default) refuses non-uniform quantizers (log2, log-sqrt2,
            AdaLog, twin-uniform) and log-int-softmax; ``float_ops`` traces them as float operators.

    Yields:
        ``model``.

    Raises:
        OnnxExportError: a point is in calibrate mode, wider than 8 bits, or logarithmic
            (with ``log_points="raise"``).
        NotCalibratedError: a quantizing point has no calibrated qparams.
    """
    patched: list[nn.Module] = []
    try:
        for name, point in quant_points(model):
            forward = _export_forward(point, log_points)
            if isinstance(point, TensorQuantizer) and point.mode is QuantMode.QUANTIZE:
                if not point.ready:
                    raise NotCalibratedError(f"quant point {name} is not calibrated; calibrate before exporting")
                _integer_dtype(point)
                if isinstance(point, WeightQuantizer):
                    point.register_buffer(_CODES_BUFFER, weight_codes(point, owner_weight(model, name)), persistent=False)
            point.forward = forward  # type: ignore[method-assign]
            patched.append(point)
        for linear in _quantized_linears(model):
            point = linear.weight_quantizer
            point.register_buffer(_CODES_BUFFER, getattr(point, _CODES_BUFFER).t().contiguous(), persistent=False)
            linear.forward = _linear_forward(linear)  # type: ignore[method-assign]
            patched.append(linear)
        yield model
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
            module._buffers.pop(_CODES_BUFFER, None)


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    example_input: torch.Tensor,
    log_points: LogPoints = "raise",
) -> None:
    """Write ``model`` as an ONNX file: QDQ form when quantized, float otherwise.

    The batch dimension is dynamic; the input is named ``input`` and the output ``logits``.
    The model is exported in eval mode and its training flag restored. Per-tensor
    ``DequantizeLinear`` nodes are then moved below the data movement that reads them
    (:func:`lit_ptq.export.graph.sink_dequantize`), so that onnxruntime sees the attention
    operands' dequantization right at their matmul, and the bias of each ``Gemm`` over
    dequantized inputs whose output is not quantized moves into an ``Add``
    (:func:`lit_ptq.export.graph.split_bias`), so that onnxruntime forms ``QGemm``.

    Args:
        model: a calibrated lit_ptq model (``quantize`` mode), or a float model.
        path: the ``.onnx`` file to write.
        example_input: an input batch (its batch size must be 2 or more for the dynamic
            dimension to be traced as such).
        log_points: what to do with log quantizers and log-int-softmax (see :func:`qdq_export_mode`).

    Raises:
        OnnxExportError: see :func:`qdq_export_mode`; or the graph is over 2 GiB (the
            single-file limit: this export writes no external-data files).
    """
    was_training = model.training
    model.eval()
    batch = torch.export.Dim("batch")
    try:
        with qdq_export_mode(model, log_points), torch.no_grad():
            program = torch.onnx.export(
                model,
                (example_input,),
                dynamo=True,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                custom_translation_table={_QD.quantize_per_channel.default: _quantize_per_channel_onnx},
                verbose=False,
            )
        import onnx

        model_proto = program.model_proto
        sink_dequantize(model_proto)
        raise_quantize(model_proto)
        split_bias(model_proto)
        if model_proto.ByteSize() >= _PROTOBUF_LIMIT:
            raise OnnxExportError(
                f"the exported graph is {model_proto.ByteSize() / 2**30:.1f} GiB, over ONNX's 2 GiB single-file limit; "
                "quantize it (int8 weights are a quarter of float) or export a smaller model"
            )
        onnx.save_model(model_proto, os.fspath(path))
    finally:
        model.train(was_training)


def ort_session_options(intra_op_num_threads: int = 0, dynamic_int8_inputs: bool = False):
    """onnxruntime session options that run an exported file as the PyTorch model computes it.

    Args:
        intra_op_num_threads: onnxruntime's intra-op threads (0: its default).
        dynamic_int8_inputs: let ``MatMulNBits`` quantize its float input to int8 on the fly
            (onnxruntime's default, faster and less faithful).

    Returns:
        An ``onnxruntime.SessionOptions`` (onnxruntime is imported here, not by this module).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = intra_op_num_threads
    if not dynamic_int8_inputs:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return options
