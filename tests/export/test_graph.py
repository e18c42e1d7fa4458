"""lit_ptq.export.graph.sink_dequantize: DequantizeLinear moved below data movement, same values."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from lit_ptq.export import export_onnx, ort_session_options  # noqa: E402
from lit_ptq.export.graph import sink_dequantize  # noqa: E402
from lit_ptq.models import create_model  # noqa: E402
from lit_ptq.quant import QuantConfig, calibrate, quantize_  # noqa: E402


def _attention_like(per_axis: bool = False) -> onnx.ModelProto:
    """x -> Q -> DQ -> Reshape (2, 3, 4) -> Gather 0 / Gather 1 (-> Transpose) -> MatMul; DQ also an output."""
    scale = np.array([0.05, 0.1, 0.2, 0.4], np.float32) if per_axis else np.array(0.05, np.float32)
    zp = np.zeros(scale.shape, np.uint8) + 3
    inits = [
        numpy_helper.from_array(scale, "s"),
        numpy_helper.from_array(zp, "zp"),
        numpy_helper.from_array(np.array([2, 3, 4], np.int64), "shape"),
        numpy_helper.from_array(np.array(0, np.int64), "i0"),
        numpy_helper.from_array(np.array(1, np.int64), "i1"),
    ]
    axis = [helper.make_attribute("axis", 1)]
    q = helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q")
    dq = helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq")
    q.attribute.extend(axis)
    dq.attribute.extend(axis)
    nodes = [
        q,
        dq,
        helper.make_node("Reshape", ["xd", "shape"], ["r"], name="reshape"),
        helper.make_node("Gather", ["r", "i0"], ["a"], axis=0, name="gather_a"),
        helper.make_node("Gather", ["r", "i1"], ["b"], axis=0, name="gather_b"),
        helper.make_node("Transpose", ["b"], ["bt"], perm=[1, 0], name="transpose"),
        helper.make_node("MatMul", ["a", "bt"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3]),
         helper.make_tensor_value_info("xd", TensorProto.FLOAT, [6, 4])],
        inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_dequantize_moves_through_reshape_gather_and_transpose_with_the_same_values() -> None:
    model = _attention_like()
    x = np.random.RandomState(0).randn(6, 4).astype(np.float32)
    before = _run(model, x)
    assert sink_dequantize(model) == 4  # Reshape, both Gathers, the Transpose
    onnx.checker.check_model(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    assert [producers[i].op_type for i in producers["y"].input] == ["DequantizeLinear", "DequantizeLinear"]
    assert producers["xd"].op_type == "DequantizeLinear" and producers["xd"].input[0] == "xq"  # a graph output stays
    for a, b in zip(before, _run(model, x)):
        np.testing.assert_array_equal(a, b)


def test_per_axis_dequantize_stays() -> None:
    model = _attention_like(per_axis=True)
    assert sink_dequantize(model) == 0


def test_full_placement_attention_runs_as_integer_matmuls(tmp_path) -> None:
    """Under FQ-ViT's ``full`` placement the attention operands come from the quantized qkv
    output through reshape / permute / select: after the rewrite onnxruntime makes both
    attention products integer kernels (no float MatMul is left)."""
    torch.manual_seed(0)
    model = create_model("itpn_tiny", num_classes=10).eval()
    quantize_(model, QuantConfig(method="minmax", placement="full", bits="8/8/8"))
    calibrate(model, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    export_onnx(model, tmp_path / "full.onnx", torch.randn(2, 3, 32, 32))
    options = ort_session_options(intra_op_num_threads=1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "full.onnx"), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert ops["MatMul"] == ops["FusedMatMul"] == 0
    assert ops["QLinearMatMul"] + ops["MatMulIntegerToFloat"] > 0
