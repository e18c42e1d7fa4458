"""QDQ ONNX export (``lit_ptq.export.onnx``): graph structure and onnxruntime agreement.

Skipped where onnx / onnxruntime are not installed (requirements.txt pins them).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from lit_ptq.export import OnnxExportError, export_onnx, ort_session_options  # noqa: E402
from lit_ptq.export.graph import MOVABLE_OPS  # noqa: E402
from lit_ptq.models import create_model  # noqa: E402
from lit_ptq.quant import QuantConfig, calibrate, quantize_, set_quant_mode  # noqa: E402
from lit_ptq.quant.quantizer import NotCalibratedError, QuantPoint  # noqa: E402

INT8, UINT8 = onnx.TensorProto.INT8, onnx.TensorProto.UINT8


def _model(config: QuantConfig | None, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model("itpn_tiny", num_classes=10).eval()
    if config is not None:
        quantize_(model, config)
        calibrate(model, [torch.randn(4, 3, 32, 32) for _ in range(2)])
    return model


def _run(path: Path, x: torch.Tensor, optimize: bool = True):
    options = ort_session_options(intra_op_num_threads=1)
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(5, 3, 32, 32)  # 5: not the example batch of 2, so the batch is dynamic


@pytest.fixture(scope="module", params=["seed", "full", "matmul"])
def qdq(request, tmp_path_factory, images):
    model = _model(QuantConfig(method="minmax", placement=request.param, bits="8/8/8"))
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    export_onnx(model, path, images[:2])
    with torch.no_grad():
        expected = model(images)
    return model, path, expected


def _source(producers: dict, name: str):
    """The node that computed ``name``, looking through data movement (``MOVABLE_OPS``)."""
    node = producers[name]
    while node.op_type in MOVABLE_OPS:
        node = producers[node.input[0]]
    return node


def test_qdq_graph_has_pairs_and_int8_weights(qdq):
    model, path, _ = qdq
    graph = onnx.load(str(path)).graph
    ops = Counter(n.op_type for n in graph.node)
    weights = [i for i in graph.initializer if i.data_type == INT8 and len(i.dims) >= 2]
    n_weights = sum(1 for name, _ in model.named_modules() if name.endswith("weight_quantizer"))
    assert len(weights) == n_weights
    assert ops["QuantizeLinear"] > 0
    producers = {out: n for n in graph.node for out in n.output}
    activation_dqs = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in producers]
    # every activation DQ reads a Q, directly or through data movement (sink_dequantize)
    assert {_source(producers, n.input[0]).op_type for n in activation_dqs} == {"QuantizeLinear"}
    assert {_source(producers, n.input[0]).name for n in activation_dqs} == {
        n.name for n in graph.node if n.op_type == "QuantizeLinear"
    }  # and every Q is dequantized somewhere
    names = {w.name for w in weights}
    weight_dqs = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in names]
    assert len(weight_dqs) == n_weights
    # linear weights are stored (in, out), per output channel on axis 1; the patch embedding's on axis 0
    dims = {w.name: len(w.dims) for w in weights}
    assert all({a.name: a.i for a in n.attribute}.get("axis") == (1 if dims[n.input[0]] == 2 else 0) for n in weight_dqs)
    floats = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    owners = [name.rsplit(".", 1)[0] for name, _ in model.named_modules() if name.endswith("weight_quantizer")]
    assert not floats & {f"{owner}.weight" for owner in owners}  # only the int8 codes are stored
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def _optimized_ops(path: Path, tmp_path: Path) -> Counter:
    """The operators of the graph onnxruntime runs after its optimizations."""
    options = ort_session_options(intra_op_num_threads=1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def test_linears_export_as_gemm_that_onnxruntime_runs_as_qgemm(tmp_path, images):
    """Linears with a bias and a quantized weight are Gemm (bias inside), GELU one operator;
    under ``matmul`` every such linear becomes onnxruntime's integer QGemm."""
    model = _model(QuantConfig(method="minmax", placement="matmul", bits="8/8/8"))
    path = tmp_path / "matmul.onnx"
    export_onnx(model, path, images[:2])
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with_bias = sum(1 for m in linears if m.bias is not None)
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["Gemm"] == with_bias and ops["Gelu"] > 0 and ops["Erf"] == 0
    optimized = _optimized_ops(path, tmp_path)
    assert optimized["QGemm"] == with_bias and optimized["Gemm"] == 0


def test_qdq_activation_types_follow_the_spec(qdq):
    graph = onnx.load(str(qdq[1])).graph
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant"}
    zp_types = set()
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 2:
            zp = inits.get(node.input[2]) or consts.get(node.input[2])
            zp_types.add(zp.data_type)
    assert zp_types == {UINT8}  # activations are unsigned asymmetric in the default config


def test_qdq_matches_fake_quant(qdq, images):
    """Logits within 3e-2 of the fake-quantized ones (random weights: logits up to ~0.9).

    Without graph optimizations onnxruntime runs the Q/DQ pairs as written, so the weights
    are exact and the differences come from activations moved by one level: where
    QuantizeLinear's ``round(x / s) + zp`` and the seed's ``round(x / s + zp)`` disagree
    (about 1e-5 of the elements), and where float kernels that sum in another order put a
    value on the other side of a rounding boundary. One level of a point is a step of
    ~1e-2 here; measured worst cases over three seeds and the three placements are 8e-3
    (as written) and 1e-2 (integer kernels, which requantize with their own arithmetic).
    Most logits agree far closer, which the mean checks.
    """
    _, path, expected = qdq
    for optimize in (False, True):
        diff = (_run(path, images, optimize=optimize) - expected).abs()
        assert diff.max() < 3e-2
        assert diff.mean() < 5e-3


def test_float_export_matches_torch(tmp_path, images):
    model = _model(None)
    export_onnx(model, tmp_path / "float.onnx", images[:2])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "float.onnx")).graph.node)
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 0
    with torch.no_grad():
        expected = model(images)
    torch.testing.assert_close(_run(tmp_path / "float.onnx", images), expected, atol=1e-4, rtol=0)


def test_export_restores_the_model(qdq, images):
    model, _, expected = qdq
    for _, m in model.named_modules():
        if isinstance(m, QuantPoint):
            assert "forward" not in m.__dict__ and "_onnx_int_codes" not in m._buffers
    with torch.no_grad():
        assert torch.equal(model(images), expected)


def test_log_int_softmax_raises_naming_the_point(tmp_path, images):
    model = _model(QuantConfig(placement="seed", lis=True))
    with pytest.raises(OnnxExportError, match=r"blocks\.\d+\.attn\.softmax_output"):
        export_onnx(model, tmp_path / "lis.onnx", images[:2])


@pytest.mark.parametrize("bits", ["8/8/8", pytest.param("8/6/8", marks=pytest.mark.slow)])
def test_ptf_norm_inputs_are_per_axis_pairs(tmp_path, images, bits):
    """FQ-ViT's PTF LayerNorm inputs (per channel, power-of-two factors on one base scale)
    are per-channel scales and zero points: one per-axis QuantizeLinear each, followed by
    its DequantizeLinear (directly, or through data movement). A 6-bit grid is clamped before QuantizeLinear."""
    model = _model(QuantConfig(placement="full", ptf=True, bits=bits))
    export_onnx(model, tmp_path / "ptf.onnx", images[:2])
    graph = onnx.load(str(tmp_path / "ptf.onnx")).graph
    producers = {out: n for n in graph.node for out in n.output}
    assert {_source(producers, n.input[0]).op_type for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in producers} == {
        "QuantizeLinear"
    }
    inits = {i.name: i for i in graph.initializer}
    per_axis = [
        n for n in graph.node
        if n.op_type == "QuantizeLinear" and n.input[1] in inits and list(inits[n.input[1]].dims) not in ([], [1])
    ]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm) and getattr(m, "input_quantizer", None)]
    assert len(per_axis) == len(norms) > 0
    with torch.no_grad():
        expected = model(images)
    assert (_run(tmp_path / "ptf.onnx", images, optimize=False) - expected).abs().max() < 6e-2


def test_log_points_as_float_ops(tmp_path, images):
    """With ``log_points="float_ops"`` the log-int-softmax is traced as float operators."""
    model = _model(QuantConfig(placement="seed", lis=True))
    export_onnx(model, tmp_path / "lis.onnx", images[:2], log_points="float_ops")
    with torch.no_grad():
        expected = model(images)
    assert (_run(tmp_path / "lis.onnx", images, optimize=False) - expected).abs().max() < 1e-1


def test_uncalibrated_model_is_refused(tmp_path, images):
    torch.manual_seed(0)
    model = quantize_(create_model("itpn_tiny", num_classes=10).eval(), QuantConfig(placement="seed"))
    set_quant_mode(model, "calibrate")
    with pytest.raises(OnnxExportError, match="calibrate mode"):
        export_onnx(model, tmp_path / "m.onnx", images[:2])
    set_quant_mode(model, "quantize")
    with pytest.raises(NotCalibratedError):
        export_onnx(model, tmp_path / "m.onnx", images[:2])
    assert not (tmp_path / "m.onnx").exists()
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_repq_recipe_uint8_weights_and_log_softmax(tmp_path, images):
    """RepQ-ViT 4/4/4: asymmetric per-channel weights are uint8 codes with per-channel zero
    points; its log-sqrt2 softmax is refused by default, named, and traced with ``float_ops``.
    Measured difference as written: 0 (4-bit steps make rounding ties rare); bound: 1e-1."""
    model = _model(QuantConfig(placement="matmul", recipe="repq", bits="4/4/4"))
    with pytest.raises(OnnxExportError, match=r"blocks\.\d+\.attn\.softmax_output is a logarithmic"):
        export_onnx(model, tmp_path / "repq.onnx", images[:2])
    export_onnx(model, tmp_path / "repq.onnx", images[:2], log_points="float_ops")
    graph = onnx.load(str(tmp_path / "repq.onnx")).graph
    assert {i.data_type for i in graph.initializer if i.name.endswith("_onnx_int_codes")} == {UINT8}
    with torch.no_grad():
        expected = model(images)
    assert (_run(tmp_path / "repq.onnx", images, optimize=False) - expected).abs().max() < 1e-1


def test_per_tensor_weight_override(tmp_path, images):
    """A per-tensor weight spec is stored per channel with its one scale repeated (exact)."""
    config = QuantConfig(placement="seed", overrides={"*.weight_quantizer": {"granularity": "per_tensor"}})
    model = _model(config)
    export_onnx(model, tmp_path / "pt.onnx", images[:2])
    with torch.no_grad():
        expected = model(images)
    assert (_run(tmp_path / "pt.onnx", images, optimize=False) - expected).abs().max() < 3e-2
