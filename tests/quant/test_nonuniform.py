"""AdaLog's and PTQ4ViT's twin-uniform codes: the arithmetic and the searches against plain
loops, the config fields ``softmax`` / ``gelu``, state files, and the ONNX export's refusal."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lit_ptq.errors import ConfigError
from lit_ptq.quant import (
    FAMILIES,
    AdaLogObserver,
    AdaLogQuantizer,
    QuantConfig,
    TensorQuantizer,
    TwinUniformObserver,
    TwinUniformQuantizer,
    load_quant_state,
    quant_points,
    quant_state,
    quantize_,
    save_quant_state,
)
from lit_ptq.quant.primitives import fake_quant_adalog, fake_quant_twin


def _gelu_like(n: int, seed: int = 0) -> torch.Tensor:
    """Asymmetric, post-GELU-shaped values (minimum about -0.17, a long positive tail)."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.gelu(torch.randn(n, generator=g) * 1.5 + 0.2)


def _softmax_like(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n // 16, 16, generator=g) * 2.5).softmax(dim=-1).reshape(-1)


def _adalog_reference(x: torch.Tensor, scale: float, shift: float, q: int, bits: int, r: int = 37) -> torch.Tensor:
    """AdaLog's code element by element in float64: the table, the shift, the underflow."""
    steps = 2 ** (bits + 1) - 2
    out = []
    for v in x.tolist():
        y = min(max((v + shift) / scale, 1e-15), 1.0)
        code = round(-math.log2(y) * r / q)
        if code >= 2**bits:
            out.append(-shift)
            continue
        e = code * q
        value = 2.0 ** -(e // r) * round(2 ** (-(e % r) / r) * steps) / steps
        out.append(value * scale - shift)
    return torch.tensor(out)


@pytest.mark.parametrize("bits", [3, 4, 6])
@pytest.mark.parametrize("q", [10, 18, 37, 61])
def test_adalog_fake_quant_matches_elementwise_reference(bits: int, q: int) -> None:
    x = torch.cat((_gelu_like(500), torch.tensor([-0.17, 0.0, 2.5, 1e-9])))
    scale, shift = 1.3, 0.17
    got = fake_quant_adalog(x, torch.tensor(scale), torch.tensor(shift), torch.tensor(float(q)), bits)
    torch.testing.assert_close(got, _adalog_reference(x, scale, shift, q, bits).float(), atol=2e-6, rtol=1e-5)


def _twin_reference(x: torch.Tensor, d1: float, d2: float, boundary: float, lo1: int, hi1: int, hi2: int) -> torch.Tensor:
    out = []
    for v in x.tolist():
        if v < boundary:
            out.append(min(max(round(v / d1), lo1), hi1) * d1)
        else:
            out.append(min(max(round(v / d2), 0), hi2) * d2)
    return torch.tensor(out)


@pytest.mark.parametrize(
    "d1, d2, boundary, lo1, hi1",
    [(0.17 / 8, 0.17 / 8 * 4, 0.0, -8, 0), (1 / 7 / 32, 1 / 7, 8 / 7 / 32, 0, 7)],
    ids=["gelu", "softmax"],
)
def test_twin_fake_quant_matches_elementwise_reference(d1, d2, boundary, lo1, hi1) -> None:
    x = torch.cat((_gelu_like(400), _softmax_like(400)))
    got = fake_quant_twin(x, torch.tensor(d1), torch.tensor(d2), torch.tensor(boundary), lo1, hi1, 7)
    torch.testing.assert_close(got, _twin_reference(x, d1, d2, boundary, lo1, hi1, 7).float(), atol=1e-7, rtol=0)


def _observe(cls, x: torch.Tensor, bits: int = 4):
    obs = cls(0, 2**bits - 1, False, False, -1)
    obs.update(x, last=True)
    return obs


def _sse(fq: torch.Tensor, x: torch.Tensor) -> float:
    return float((fq - x).double().pow(2).sum())


@pytest.mark.parametrize("make", [_gelu_like, _softmax_like], ids=["gelu", "softmax"])
def test_adalog_search_matches_brute_force(make) -> None:
    """The alternating search, replayed with plain loops over the candidates (one fake
    quantization each); the chosen code's error is the loops' least error."""
    x = make(4096)
    obs = _observe(AdaLogObserver, x)
    shift = max(0.0, -float(x.min()))
    positives = sorted(v for v in x.tolist() if v > 0)
    lo = positives[math.ceil(len(positives) * 0.9) - 1] + shift
    hi = float(x.max()) + shift
    scales = [lo + (hi - lo) * i / 31 for i in range(32)]
    torch.testing.assert_close(obs.candidate_scales(x, torch.tensor(shift)), torch.tensor(scales), atol=1e-6, rtol=1e-6)

    def err(scale: float, q: int) -> float:
        return _sse(fake_quant_adalog(x, torch.tensor(scale), torch.tensor(shift), torch.tensor(float(q)), 4), x)

    scale, q = scales[-1], 37
    for _ in range(3):
        new_q = min(range(10, 138), key=lambda c: err(scale, c))
        new_scale = min(scales, key=lambda s: err(s, new_q))
        if (new_q, new_scale) == (q, scale):
            break
        scale, q = new_scale, new_q
    found_scale, found_shift, found_q = obs.found
    assert float(found_shift) == pytest.approx(shift, abs=1e-7)
    assert err(float(found_scale), int(found_q)) == pytest.approx(err(scale, q), rel=1e-5)


@pytest.mark.parametrize("make", [_gelu_like, _softmax_like], ids=["gelu", "softmax"])
def test_twin_search_matches_brute_force(make) -> None:
    x = make(4096)
    obs = _observe(TwinUniformObserver, x)
    lo, hi = float(x.min()), float(x.max())
    if lo < 0:
        d1 = -lo / 8
        candidates = [(d1, d1 * 2.0**m, 0.0, -8, 0) for m in range(-5, 25)]
    else:
        d2 = hi / 7
        candidates = [(d2 / 2.0**m, d2, 8 * d2 / 2.0**m, 0, 7) for m in range(20)]
    errors = [_sse(_twin_reference(x, *c, 7).float(), x) for c in candidates]
    best = candidates[errors.index(min(errors))]
    found = obs.found
    got = (found["low_scale"], found["scale"], found["boundary"], found["low_qmin"], found["low_qmax"])
    assert [float(v) for v in got] == pytest.approx(list(best), rel=1e-6, abs=1e-9)


def test_config_fields_and_one_line_errors() -> None:
    config = QuantConfig(placement="matmul", recipe="repq", softmax="adalog", gelu="twin_uniform")
    assert config.describe()["softmax"] == "adalog" and config.describe()["gelu"] == "twin_uniform"
    assert QuantConfig().gelu == "uniform" and "gelu" not in QuantConfig().describe()
    with pytest.raises(ConfigError, match=r"^gelu='log2' is not one of: uniform, adalog, twin_uniform$"):
        QuantConfig(gelu="log2")
    with pytest.raises(ConfigError, match=r"^softmax='nope' is not one of: uniform, adalog, log2, log_sqrt2, twin_uniform$"):
        QuantConfig(softmax="nope")
    with pytest.raises(ConfigError, match="lis=True both quantize the softmax output"):
        QuantConfig(placement="seed", lis=True, softmax="twin_uniform")


def test_family_without_gelu_linears_is_refused(make_tiny, monkeypatch) -> None:
    monkeypatch.delitem(FAMILIES["itpn"].facts, "gelu_linears")
    with pytest.raises(ConfigError, match="gelu='adalog' needs the itpn plugin to list its gelu_linears"):
        quantize_(make_tiny(), QuantConfig(placement="matmul", gelu="adalog"))
    quantize_(make_tiny(), QuantConfig(placement="matmul"))  # the default needs no fact


@pytest.mark.parametrize("placement, point", [("matmul", "mlp.fc2.input_quantizer"), ("seed", "mlp.act_output")])
def test_points_get_their_quantizers(make_tiny, placement: str, point: str) -> None:
    model = quantize_(make_tiny(), QuantConfig(placement=placement, bits="8/4/4", softmax="twin_uniform", gelu="adalog"))
    points = dict(quant_points(model))
    gelu = [p for n, p in points.items() if n.endswith(point)]
    assert gelu and all(type(p) is AdaLogQuantizer and p.spec.bits == 4 for p in gelu)
    soft = [p for n, p in points.items() if n.endswith("softmax_output")]
    assert soft and all(type(p) is TwinUniformQuantizer for p in soft)
    default = dict(quant_points(quantize_(make_tiny(), QuantConfig(placement=placement))))
    assert all(type(default[n]) is TensorQuantizer for n in default if n.endswith(point))


@pytest.fixture
def small_sample(monkeypatch) -> None:
    """AdaLog's search on 4096 values instead of 65536 (the tests' tensors are random)."""
    monkeypatch.setattr(AdaLogObserver, "sample", 4096)


@pytest.mark.parametrize("softmax, gelu", [("adalog", "twin_uniform"), ("twin_uniform", "adalog")])
def test_state_round_trip(make_quantized, make_tiny, eval_images, tmp_path: Path, small_sample, softmax: str, gelu: str) -> None:
    fields = dict(method="minmax", placement="matmul", bits="4/4/4", softmax=softmax, gelu=gelu)
    model = make_quantized(**fields)
    save_quant_state(model, str(tmp_path / "s.pt"), {"model": "itpn_tiny"})
    fresh = quantize_(make_tiny(), QuantConfig(**fields))
    load_quant_state(fresh, str(tmp_path / "s.pt"), {"model": "itpn_tiny"})
    saved, loaded = quant_state(model), quant_state(fresh)
    assert any(k.endswith(".base") or k.endswith(".low_scale") for k in saved)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(model(eval_images), fresh(eval_images))


_KINDS = {
    "adalog": r"a logarithmic quantizer with an adaptive base \(AdaLog\)",
    "twin_uniform": r"a twin-uniform quantizer \(PTQ4ViT\)",
}


@pytest.mark.parametrize("gelu", sorted(_KINDS))
def test_export_refuses_in_one_line(make_quantized, eval_images, tmp_path: Path, small_sample, gelu: str) -> None:
    """Before calibration (``check_exportable``) and at export, one line naming the point and the option."""
    from lit_ptq.export import OnnxExportError, check_exportable, export_onnx

    model = make_quantized(method="minmax", placement="matmul", bits="8/8/8", gelu=gelu).eval()
    message = rf"^quant point blocks\.\d+\.mlp\.fc2\.input_quantizer is {_KINDS[gelu]}, which ONNX [^\n]*float operators$"
    with pytest.raises(OnnxExportError, match=message):
        check_exportable(model)
    with pytest.raises(OnnxExportError, match=message):
        export_onnx(model, tmp_path / "m.onnx", eval_images[:2])
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("softmax, gelu", [("adalog", "twin_uniform"), ("twin_uniform", "adalog")])
def test_export_as_float_ops(make_quantized, eval_images, tmp_path: Path, small_sample, softmax: str, gelu: str) -> None:
    """With ``log_points="float_ops"`` both codes are traced as float operators; onnxruntime
    computes the same logits to 1e-1 (about a minute per export on a loaded 2-core CPU)."""
    ort = pytest.importorskip("onnxruntime")
    from lit_ptq.export import export_onnx

    model = make_quantized(method="minmax", placement="matmul", bits="8/8/8", softmax=softmax, gelu=gelu).eval()
    export_onnx(model, tmp_path / "m.onnx", eval_images[:2], log_points="float_ops")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": eval_images.numpy()})[0])
    with torch.no_grad():
        assert (got - model(eval_images)).abs().max() < 1e-1
