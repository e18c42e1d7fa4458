"""Rewrites of an exported QDQ graph that let onnxruntime pick integer kernels.

onnxruntime fuses a ``MatMul`` into an integer kernel (``QLinearMatMul``,
``MatMulIntegerToFloat``) only when each input comes straight from a ``DequantizeLinear``.
In a transformer the attention operands reach their matmul through data movement: the
quantized ``qkv`` output is reshaped, permuted and split into ``q``, ``k`` and ``v`` (and
``k`` transposed). onnxruntime moves a ``DequantizeLinear`` past ``Reshape`` and
``Transpose`` by itself, but not past the ``Gather`` that selects ``q`` / ``k`` / ``v``, so
those matmuls stay float.

:func:`sink_dequantize` moves every per-tensor ``DequantizeLinear`` below the pure data
movement operators that read it (the operator then moves the integer codes, and a copy of
the ``DequantizeLinear`` follows each of its outputs). Data movement commutes exactly with
an elementwise dequantization, so the graph computes the same values.

onnxruntime forms ``QGemm`` only from a ``Gemm`` whose every input comes from a
``DequantizeLinear``, the bias an int32 one (``GemmNodeGroupSelector`` in onnxruntime's
``qdq_transformer/selectors_actions/qdq_selectors.cc``); its own ``WeightBiasQuantization``
quantizes a float bias only where the ``Gemm``'s output is quantized. :func:`quantize_bias`
writes every such bias as int32 codes, the QDQ bias of onnxruntime's quantization format.
"""

from __future__ import annotations

import itertools
from typing import Any

__all__ = ["MOVABLE_OPS", "sink_dequantize", "quantize_bias"]

MOVABLE_OPS = frozenset(("Reshape", "Transpose", "Gather", "Squeeze", "Unsqueeze", "Slice", "Flatten", "Split"))
"""Operators that only move or select elements of their first input (any element type)."""


def _per_tensor(node: Any, initializers: dict[str, Any]) -> bool:
    """Whether a ``DequantizeLinear`` has one scale (a scalar initializer): it commutes with any movement."""
    scale = initializers.get(node.input[1])
    return scale is not None and len(scale.dims) == 0


def _consumers(graph: Any) -> dict[str, list[Any]]:
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def sink_dequantize(model: Any) -> int:
    """Move per-tensor ``DequantizeLinear`` nodes below the data movement that reads them, in place.

    Repeated until nothing moves, so a dequantization travels down a whole chain (``Reshape
    -> Transpose -> Gather -> Transpose``) to the operator that computes with it. A
    ``DequantizeLinear`` stays (beside its moved copies) where its output is also a graph
    output or is read by anything else, a movement operator's shape / index inputs included.

    Args:
        model: an ``onnx.ModelProto`` (its main graph is rewritten).

    Returns:
        How many movement operators now read integer codes.
    """
    import onnx

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    names = itertools.count()
    moved = 0
    changed = True
    while changed:
        changed = False
        consumers = _consumers(graph)
        for dq in list(graph.node):
            if dq.op_type != "DequantizeLinear" or not _per_tensor(dq, initializers):
                continue
            value = dq.output[0]
            readers = consumers.get(value, [])
            movable = [n for n in readers if n.op_type in MOVABLE_OPS and n.input[0] == value and value not in n.input[1:]]
            for node in movable:
                node.input[0] = dq.input[0]
                position = list(graph.node).index(node) + 1
                for k, out in enumerate(node.output):
                    codes = f"{out}__codes{next(names)}"
                    node.output[k] = codes
                    copy = onnx.helper.make_node(
                        "DequantizeLinear", [codes, *dq.input[1:]], [out], name=f"{dq.name}__sunk{next(names)}"
                    )
                    copy.attribute.extend(dq.attribute)
                    graph.node.insert(position, copy)
                    position += 1
                moved += 1
                changed = True
            if movable and len(movable) == len(readers) and value not in outputs:
                graph.node.remove(dq)
            if changed:
                break  # the node list changed: rebuild the consumers
    return moved


def _attribute(node: Any, name: str, default: float) -> float:
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def quantize_bias(model: Any) -> int:
    """Write the float bias of each ``Gemm`` over dequantized integer inputs as int32 codes, in place.

    A ``Gemm`` (``alpha = beta = 1``) qualifies when its input ``A`` comes, through data
    movement, from a per-tensor ``DequantizeLinear`` and its weight ``B`` straight from a
    ``DequantizeLinear`` of a constant, per tensor or per output channel. Its bias ``b``
    becomes ``DequantizeLinear(round(b / (s_a * s_b)), s_a * s_b)`` (int32 codes, zero point 0,
    per channel on axis 0), which moves each bias by at most half of ``s_a * s_b``, one step
    of the integer product's int32 accumulator. A bias whose codes would not fit int32 (a
    scale near 0) stays float.

    Args:
        model: an ``onnx.ModelProto`` (its main graph is rewritten).

    Returns:
        How many biases are now int32 codes.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    replaced: list[str] = []
    for gemm in list(graph.node):
        if gemm.op_type != "Gemm" or len(gemm.input) < 3 or gemm.input[2] not in initializers:
            continue
        if _attribute(gemm, "alpha", 1.0) != 1.0 or _attribute(gemm, "beta", 1.0) != 1.0:
            continue
        a = producers.get(gemm.input[0])
        while a is not None and a.op_type in MOVABLE_OPS:
            a = producers.get(a.input[0])
        b = producers.get(gemm.input[1])
        if a is None or a.op_type != "DequantizeLinear" or not _per_tensor(a, initializers):
            continue
        if b is None or b.op_type != "DequantizeLinear" or b.input[0] not in initializers or b.input[1] not in initializers:
            continue
        bias = numpy_helper.to_array(initializers[gemm.input[2]])
        b_scale = numpy_helper.to_array(initializers[b.input[1]])
        out_axis = 0 if _attribute(gemm, "transB", 0) else 1
        if bias.dtype != np.float32 or bias.ndim != 1 or (b_scale.ndim == 1 and _attribute(b, "axis", 1) % 2 != out_axis):
            continue
        scale = (numpy_helper.to_array(initializers[a.input[1]]) * b_scale).astype(np.float32) * np.ones_like(bias)
        with np.errstate(divide="ignore", invalid="ignore"):
            codes = np.round(bias.astype(np.float64) / scale.astype(np.float64))
        if not np.isfinite(codes).all() or np.abs(codes).max(initial=0) >= 2**31 - 1:
            continue
        name = gemm.input[2]
        graph.initializer.extend(
            [
                numpy_helper.from_array(codes.astype(np.int32), f"{name}__int32"),
                numpy_helper.from_array(scale, f"{name}__int32_scale"),
            ]
        )
        dq = onnx.helper.make_node(
            "DequantizeLinear", [f"{name}__int32", f"{name}__int32_scale"], [f"{name}__dequantized"], name=f"{gemm.name}__bias", axis=0
        )
        graph.node.insert(list(graph.node).index(gemm), dq)
        gemm.input[2] = dq.output[0]
        replaced.append(name)
    read = {name for node in graph.node for name in node.input}
    for name in replaced:
        if name not in read:
            graph.initializer.remove(initializers[name])
    return len(replaced)
