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
"""

from __future__ import annotations

import itertools
from typing import Any

__all__ = ["MOVABLE_OPS", "sink_dequantize"]

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
