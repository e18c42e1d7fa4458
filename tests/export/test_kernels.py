"""Every quantized linear of a QDQ export runs as one of onnxruntime's integer kernels, whatever the weights.

onnxruntime forms ``QGemm`` only from a ``Gemm`` whose every input is dequantized: a float
bias kept it a float ``Gemm`` unless the output was quantized too (its
``WeightBiasQuantization`` then rewrites the bias), and the exporter drops an all-zero bias,
so the kernels used to depend on the weights (docs/onnx.md, "Integer kernels whatever the
weights"). Each
family is exported at each placement with several weight draws: the constructors' default
initialization (zero biases), every parameter drawn N(0, 0.05) with LayerNorm weights near 1,
and the trained demo checkpoint (``itpn_tiny``); the linears are counted in the graph that
onnxruntime itself optimizes (:func:`lit_ptq.export.runtime.linear_kernels`).

Five cells run by default, every family, placement and weight draw among them; the rest of
the grid is marked ``slow`` (each export traces the model with ``torch.export``, seconds each).

Skipped where onnx / onnxruntime are not installed (requirements.txt pins them).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from benchmarks.bench_onnx import normal_weights_  # noqa: E402
from lit_ptq.export import export_onnx  # noqa: E402
from lit_ptq.export.runtime import linear_kernels  # noqa: E402
from lit_ptq.models import create_model  # noqa: E402
from lit_ptq.quant import PLACEMENTS, QuantConfig, calibrate, quantize_  # noqa: E402
from lit_ptq.quant.layers import QuantLinear  # noqa: E402
from lit_ptq.quant.quantizer import QuantMode  # noqa: E402

DEMO_CHECKPOINT = Path(__file__).resolve().parents[2] / "demo_data" / "itpn_tiny_fashion_mnist.pt"

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "itpn": ("itpn_tiny", dict(depth=1, embed_dim=32, num_heads=2)),
    "timm_vit": ("deit_tiny_patch16_224", dict(img_size=32, depth=1, embed_dim=16, num_heads=2)),
    "timm_swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=2, embed_dim=8, depths=(1, 1), num_heads=(1, 1))),
}
"""Each family's smallest model (the iTPN draw ``checkpoint`` uses ``itpn_tiny`` as trained)."""

DRAWS = {"itpn": ("default", "normal", "checkpoint"), "timm_vit": ("default", "normal"), "timm_swin": ("default", "normal")}

FAST = {
    ("itpn", "full", "normal"), ("itpn", "matmul", "checkpoint"), ("timm_vit", "seed", "default"),
    ("timm_vit", "matmul", "normal"), ("timm_swin", "full", "normal"),
}
"""The cells run without ``-m slow``: every family, placement and weight draw at least once."""


def _model(family: str, draw: str) -> torch.nn.Module:
    name, small = FAMILIES[family]
    torch.manual_seed(0)
    if draw == "checkpoint":
        if not DEMO_CHECKPOINT.exists():
            pytest.skip(f"{DEMO_CHECKPOINT} is not in this checkout")
        return create_model(name, num_classes=10, checkpoint=str(DEMO_CHECKPOINT))
    model = create_model(name, num_classes=10, **small)
    return normal_weights_(model) if draw == "normal" else model


def _cells() -> list[Any]:
    cells = []
    for family, draws in DRAWS.items():
        for placement in PLACEMENTS:
            for draw in draws:
                marks = () if (family, placement, draw) in FAST else (pytest.mark.slow,)
                cells.append(pytest.param(family, placement, draw, marks=marks, id=f"{family}-{placement}-{draw}"))
    return cells


def _quantizing(point: Any) -> bool:
    return point is not None and point.mode is QuantMode.QUANTIZE


@pytest.mark.parametrize("family,placement,draw", _cells())
def test_every_quantized_linear_is_an_integer_kernel(tmp_path, family, placement, draw):
    model = _model(family, draw).eval()
    quantize_(model, QuantConfig(method="minmax", placement=placement, bits="8/8/8"))
    side = model.eval_cfg.input_size[-1]
    images = torch.randn(8, 3, side, side, generator=torch.Generator().manual_seed(1))
    calibrate(model, [images])
    path = tmp_path / "model.onnx"
    export_onnx(model, path, images[:2])

    kernels = {k.name: k for k in linear_kernels(str(path), str(tmp_path / "optimized.onnx"))}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and _quantizing(m.weight_quantizer)}
    assert set(kernels) == set(linears)
    candidates = {n for n, k in kernels.items() if k.input_quantized}  # input dequantized in the file
    if placement == "seed":
        assert candidates and candidates != set(linears)  # qkv and fc1 read float LayerNorm outputs
    else:
        assert candidates == set(linears)  # full and matmul quantize every linear's input
    stayed_float = {n: k.op_type for n, k in kernels.items() if n in candidates and not k.integer}
    assert not stayed_float, f"{len(stayed_float)}/{len(candidates)} quantized linears are float: {stayed_float}"
    with_bias = {n for n in candidates if linears[n].bias is not None}
    assert {n for n in candidates if kernels[n].op_type == "QGemm"} == with_bias  # the bias inside the kernel
