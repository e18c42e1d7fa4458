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
from lit_ptq.export.graph import raise_quantize, sink_dequantize, split_bias  # noqa: E402
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


def _linear_like(quantize_output: bool) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x (2, 3, 4) -> Q -> DQ -> Reshape (6, 4) -> Gemm(W^T codes (4, 5) per-axis, float bias) -> Reshape (2, 3, 5)
    [-> Q -> DQ], as ``torch.export`` writes a 3-d linear; returns the model and its constants."""
    rng = np.random.RandomState(0)
    c = dict(
        sx=np.array(0.05, np.float32), zx=np.array(7, np.uint8), w=rng.randint(-127, 128, (4, 5)).astype(np.int8),
        sw=np.array([0.01, 0.02, 0.03, 0.015, 0.005], np.float32), zw=np.zeros(5, np.int8),
        b=rng.randn(5).astype(np.float32), sy=np.array(0.07, np.float32), zy=np.array(120, np.uint8),
    )
    inits = [numpy_helper.from_array(v, k) for k, v in c.items()]
    inits += [numpy_helper.from_array(np.array([6, 4], np.int64), "flat"), numpy_helper.from_array(np.array([2, 3, 5], np.int64), "shape")]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dqx"),
        helper.make_node("Reshape", ["xd", "flat"], ["x2"], name="flatten"),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=1, name="dqw"),
        helper.make_node("Gemm", ["x2", "wd", "b"], ["g"], name="gemm"),
        helper.make_node("Reshape", ["g", "shape"], ["r" if quantize_output else "y"], name="unflatten"),
    ]
    if quantize_output:
        nodes += [
            helper.make_node("QuantizeLinear", ["r", "sy", "zy"], ["yq"], name="qy"),
            helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["y"], name="dqy"),
        ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), c


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> Counter:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def _reference(c: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The linear in float64 on the dequantized input and weight (round half to even, as ONNX)."""
    xd = (np.clip(np.round(x / c["sx"]) + c["zx"].astype(np.int64), 0, 255) - c["zx"].astype(np.int64)) * np.float64(c["sx"])
    wd = c["w"].astype(np.float64) * c["sw"].astype(np.float64)
    return xd.reshape(6, 4) @ wd + c["b"]


def test_a_quantize_after_a_reshaped_gemm_moves_up_to_it(tmp_path) -> None:
    model, c = _linear_like(quantize_output=True)
    x = np.random.RandomState(1).randn(2, 3, 4).astype(np.float32)
    before = _run(model, x)
    assert raise_quantize(model) == 1
    onnx.checker.check_model(model)
    order = [n.name for n in model.graph.node]
    assert order[order.index("gemm"):] == ["gemm", "qy", "unflatten", "dqy"]  # the reshape moves codes
    assert split_bias(model) == 0  # the Gemm's output is quantized: onnxruntime quantizes the bias itself
    for a, b in zip(before, _run(model, x)):
        np.testing.assert_array_equal(a, b)
    expected = (np.clip(np.round(_reference(c, x) / c["sy"]) + 120, 0, 255) - 120) * np.float64(c["sy"])
    np.testing.assert_allclose(before[0].reshape(6, 5), expected, atol=1e-6)
    ops = _optimized_ops(model, tmp_path)
    assert ops["QGemm"] == 1 and ops["Add"] == 0 and ops["Gemm"] == 0


def test_a_float_bias_of_an_unquantized_output_moves_into_an_add(tmp_path) -> None:
    model, c = _linear_like(quantize_output=False)
    x = np.random.RandomState(2).randn(2, 3, 4).astype(np.float32)
    assert raise_quantize(model) == 0
    assert split_bias(model) == 1
    onnx.checker.check_model(model)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    add = next(n for n in model.graph.node if n.op_type == "Add")
    assert len(gemm.input) == 2 and list(add.input) == [gemm.output[0], "b"]
    np.testing.assert_allclose(_run(model, x)[0].reshape(6, 5), _reference(c, x), rtol=1e-5, atol=1e-5)
    ops = _optimized_ops(model, tmp_path)
    assert ops["QGemm"] == 1 and ops["Gemm"] == 0


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
