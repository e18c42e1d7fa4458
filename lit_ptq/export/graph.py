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
(``qdq_transformer/weight_bias_quantization.cc``) quantizes a float bias only where the
``Gemm``'s output is quantized. :func:`split_bias` moves every other such bias into an ``Add``
after a bias-free ``Gemm``: int32 codes would round it onto the grid of the product
(``s_x * s_w``), a large step at 4 bits. A ``Gemm`` whose output is quantized after a reshape
(``torch.export`` writes a 3-d linear as ``Reshape -> Gemm -> Reshape``) gets its
``QuantizeLinear`` moved up to it first (:func:`raise_quantize`), so that onnxruntime makes it
one ``QGemm`` with quantized outputs, as where the two were adjacent.
"""

from __future__ import annotations

import itertools
from typing import Any

__all__ = ["MOVABLE_OPS", "sink_dequantize", "raise_quantize", "split_bias"]

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


RESHAPING_OPS = frozenset(("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"))
"""Single-output data movement that keeps every element (a per-tensor quantization commutes with it)."""


def raise_quantize(model: Any) -> int:
    """Move each per-tensor ``QuantizeLinear`` that follows a ``Gemm`` through reshaping up to the ``Gemm``, in place.

    ``Gemm -> Reshape -> QuantizeLinear`` becomes ``Gemm -> QuantizeLinear -> Reshape``: the
    reshape moves the integer codes instead of the floats, which quantize to the same codes
    element by element (one scale and zero point). Only where each operator of the chain is
    the sole reader of the one before and no value of it is a graph output.

    Args:
        model: an ``onnx.ModelProto`` (its main graph is rewritten).

    Returns:
        How many ``QuantizeLinear`` nodes moved.
    """
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    producers = {out: node for node in graph.node for out in node.output}
    consumers = _consumers(graph)
    moved = 0
    for quantize in list(graph.node):
        if quantize.op_type != "QuantizeLinear" or not _per_tensor(quantize, initializers):
            continue
        chain = []
        node = producers.get(quantize.input[0])
        while node is not None and node.op_type in RESHAPING_OPS and len(consumers.get(node.output[0], [])) == 1:
            chain.append(node)
            node = producers.get(node.input[0])
        if not chain or node is None or node.op_type != "Gemm":
            continue
        if len(consumers.get(node.output[0], [])) != 1 or any(n.output[0] in outputs for n in [node, *chain]):
            continue
        first, last = chain[-1], chain[0]  # chain runs upwards from the QuantizeLinear
        codes = quantize.output[0]
        quantize.input[0] = node.output[0]
        quantize.output[0] = f"{codes}__raised"
        first.input[0] = quantize.output[0]
        last.output[0] = codes
        graph.node.remove(quantize)
        graph.node.insert(list(graph.node).index(node) + 1, quantize)
        moved += 1
    return moved


def _attribute(node: Any, name: str, default: float) -> float:
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def split_bias(model: Any) -> int:
    """Move the float bias of each ``Gemm`` over dequantized integer inputs into an ``Add`` after it, in place.

    A ``Gemm`` (``alpha = beta = 1``) qualifies when its input ``A`` comes, through data
    movement, from a per-tensor ``DequantizeLinear``, its weight ``B`` straight from a
    ``DequantizeLinear``, its bias ``C`` is a float initializer, and its output does not go
    straight into a ``QuantizeLinear`` alone (there onnxruntime's ``WeightBiasQuantization``
    makes the bias int32 codes itself and ``QGemm`` writes quantized outputs). Without ``C``
    onnxruntime runs the product as ``QGemm`` with float outputs; the ``Add`` then adds the
    bias as the PyTorch model does, in float32.

    Args:
        model: an ``onnx.ModelProto`` (its main graph is rewritten).

    Returns:
        How many biases were moved.
    """
    import onnx

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers = _consumers(graph)
    moved = 0
    for gemm in list(graph.node):
        if gemm.op_type != "Gemm" or len(gemm.input) < 3 or gemm.input[2] not in initializers:
            continue
        if _attribute(gemm, "alpha", 1.0) != 1.0 or _attribute(gemm, "beta", 1.0) != 1.0:
            continue
        if initializers[gemm.input[2]].data_type != onnx.TensorProto.FLOAT:
            continue
        readers = consumers.get(gemm.output[0], [])
        if len(readers) == 1 and readers[0].op_type == "QuantizeLinear":
            continue
        a = producers.get(gemm.input[0])
        while a is not None and a.op_type in MOVABLE_OPS:
            a = producers.get(a.input[0])
        b = producers.get(gemm.input[1])
        if a is None or a.op_type != "DequantizeLinear" or not _per_tensor(a, initializers):
            continue
        if b is None or b.op_type != "DequantizeLinear" or b.input[0] not in initializers:
            continue
        bias, out = gemm.input[2], gemm.output[0]
        del gemm.input[2]
        gemm.output[0] = f"{out}__unbiased"
        add = onnx.helper.make_node("Add", [gemm.output[0], bias], [out], name=f"{gemm.name}__bias")
        graph.node.insert(list(graph.node).index(gemm) + 1, add)
        moved += 1
    return moved
