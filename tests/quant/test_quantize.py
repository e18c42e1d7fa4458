"""quantize_ / calibrate / quant_report on itpn_tiny: where each placement puts its quant points
(written out by hand from docs/quantization.md), the calibration loop, and the report.

itpn_tiny (mlp_depth=1, depth=6) has ``blocks.0`` MLP-only, ``blocks.1`` PatchMerge,
``blocks.2`` MLP-only, ``blocks.3`` PatchMerge, ``blocks.4`` to ``blocks.9`` attention blocks.
"""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch

from lit_ptq.errors import ConfigError
from lit_ptq.quant import (
    CalibrationError,
    LogSoftmaxQuantizer,
    QuantConfig,
    QuantMode,
    TensorQuantizer,
    WeightQuantizer,
    calibrate,
    is_quantized,
    quant_report,
    quantize_,
    quantizers,
    set_quant_mode,
)
from lit_ptq.quant.config import QuantSpec
from lit_ptq.quant.observers import OmseObserver, PtfObserver, build_observer
from lit_ptq.quant.report import _Accumulator, _stats

MLP_ONLY = [0, 2]
MERGES = [1, 3]
ATTENTION = [4, 5, 6, 7, 8, 9]
MLP_BLOCKS = MLP_ONLY + ATTENTION


def _seed_points() -> set[str]:
    names = set()
    for i in ATTENTION:
        names |= {f"blocks.{i}.attn.{p}" for p in ("qkv_output", "logits", "softmax_output", "context", "proj_output")}
        names |= {f"blocks.{i}.attn.qkv.weight_quantizer", f"blocks.{i}.attn.proj.weight_quantizer"}
    for i in MLP_BLOCKS:
        names |= {f"blocks.{i}.mlp.act_output", f"blocks.{i}.mlp.fc2_output"}
        names |= {f"blocks.{i}.mlp.fc1.weight_quantizer", f"blocks.{i}.mlp.fc2.weight_quantizer"}
    for i in MERGES:
        names |= {f"blocks.{i}.reduction_output", f"blocks.{i}.reduction.weight_quantizer"}
    return names


def _full_only_points() -> set[str]:
    names = {
        "head.weight_quantizer",
        "head.input_quantizer",
        "patch_embed.proj.weight_quantizer",
        "patch_embed.proj.input_quantizer",
        "patch_embed.norm.input_quantizer",
        "fc_norm.input_quantizer",
    }
    for i in ATTENTION:
        names |= {f"blocks.{i}.attn.qkv.input_quantizer", f"blocks.{i}.norm1.input_quantizer"}
    for i in MLP_BLOCKS:
        names |= {f"blocks.{i}.mlp.fc1.input_quantizer", f"blocks.{i}.norm2.input_quantizer"}
    for i in MERGES:
        names |= {f"blocks.{i}.reduction.input_quantizer", f"blocks.{i}.norm.input_quantizer"}
    return names


SEED_POINTS = _seed_points()
FULL_POINTS = SEED_POINTS | _full_only_points()


def _points(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (TensorQuantizer, LogSoftmaxQuantizer))}


# --- placement ------------------------------------------------------------------------------


def test_expected_name_lists_have_the_sizes_worked_out_by_hand() -> None:
    # seed: 6 attention blocks x 7 + 8 MLPs x 4 + 2 merges x 2 = 78
    # full: + 6 (head, patch embed, fc_norm) + 6 x 2 + 8 x 2 + 2 x 2 = 116
    assert (len(SEED_POINTS), len(FULL_POINTS)) == (78, 116)


@pytest.mark.parametrize(("placement", "expected"), [("seed", SEED_POINTS), ("full", FULL_POINTS)])
def test_placement_creates_exactly_these_quant_points(placement, expected, tiny_model) -> None:
    model = quantize_(tiny_model, QuantConfig(placement=placement))
    assert set(_points(model)) == expected
    assert all(q.qualname == name for name, q in _points(model).items())
    assert all(q.mode is QuantMode.FLOAT for q in _points(model).values())
    assert model.quant_config == QuantConfig(placement=placement)


def test_seed_placement_leaves_head_patch_embedding_and_norms_float(tiny_model) -> None:
    model = quantize_(tiny_model, QuantConfig(placement="seed"))
    assert model.head.weight_quantizer is None and model.head.input_quantizer is None
    assert model.patch_embed.proj.weight_quantizer is None and model.patch_embed.proj.input_quantizer is None
    norms = [m for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 6 + 8 + 2 + 2  # norm1 x 6, norm2 x 8, merge norms, patch_embed.norm and fc_norm
    assert all(m.input_quantizer is None for m in norms)
    for i in ATTENTION:
        assert model.blocks[i].attn.qkv.input_quantizer is None  # LayerNorm outputs stay float


@pytest.mark.parametrize("placement", ["seed", "full"])
def test_quant_point_kinds_and_roles(placement, tiny_model) -> None:
    model = quantize_(tiny_model, QuantConfig(placement=placement, bits="6/7/5"))
    for name, q in _points(model).items():
        if name.endswith("weight_quantizer"):
            assert isinstance(q, WeightQuantizer) and (q.role, q.spec.bits, q.spec.signed) == ("weight", 6, True)
        elif name.endswith("softmax_output"):
            assert type(q) is TensorQuantizer and (q.role, q.spec.bits) == ("attn", 5)
        elif ".norm" in name or name.startswith("fc_norm"):
            assert type(q) is TensorQuantizer and (q.role, q.spec.bits) == ("norm", 7)
        elif name == "patch_embed.proj.input_quantizer":  # the image: the activation spec outside ``matmul``
            assert type(q) is TensorQuantizer and (q.role, q.spec.bits, q.spec.signed) == ("image", 7, False)
        else:
            assert type(q) is TensorQuantizer and (q.role, q.spec.bits, q.spec.signed) == ("act", 7, False)


def test_weight_quantizers_have_one_scale_per_output_channel(tiny_model) -> None:
    model = quantize_(tiny_model, QuantConfig(placement="full"))
    assert model.blocks[4].attn.qkv.weight_quantizer.scale.shape == (3 * 128,)
    assert model.patch_embed.proj.weight_quantizer.scale.shape == (32,)
    assert model.head.weight_quantizer.scale.shape == (10,)
    assert model.blocks[4].attn.logits.scale.shape == (1,)


def test_ptf_gives_layernorm_inputs_one_scale_per_channel(tiny_model) -> None:
    model = quantize_(tiny_model, QuantConfig(placement="full", ptf=True))
    assert model.blocks[4].norm1.input_quantizer.scale.shape == (128,)
    assert model.blocks[1].norm.input_quantizer.scale.shape == (4 * 32,)
    assert model.patch_embed.norm.input_quantizer.scale.shape == (32,)
    assert isinstance(model.fc_norm.input_quantizer.observer, PtfObserver)


@pytest.mark.parametrize("placement", ["seed", "full"])
def test_lis_replaces_the_softmax_quantizer_with_a_stateless_log_quantizer(placement, tiny_model) -> None:
    model = quantize_(tiny_model, QuantConfig(placement=placement, bits="8/8/4", lis=True))
    expected = SEED_POINTS if placement == "seed" else FULL_POINTS
    assert set(_points(model)) == expected
    state = model.state_dict()
    for i in ATTENTION:
        lis = model.blocks[i].attn.softmax_output
        assert type(lis) is LogSoftmaxQuantizer and lis.bits == 4
        assert not hasattr(lis, "scale") and list(lis.buffers()) == []
        assert not any(k.startswith(f"blocks.{i}.attn.softmax_output.") for k in state)
    names = {n for n, _ in quantizers(model)}
    assert names == expected - {f"blocks.{i}.attn.softmax_output" for i in ATTENTION}


def test_quantize_twice_raises(tiny_model) -> None:
    quantize_(tiny_model, QuantConfig())
    assert is_quantized(tiny_model)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(tiny_model, QuantConfig(placement="full"))


# --- overrides: every pattern must match a placed point --------------------------------------


def test_a_pattern_matching_no_point_is_refused_with_the_closest_names(tiny_model) -> None:
    message = (
        r"^overrides: the pattern 'blokcs\.\*\.qkv\*' matches no quant point of this model \(placement 'seed'\); "
        r"the closest point names are 'blocks\.\*\.attn\.qkv_output', "
    )
    with pytest.raises(ConfigError, match=message):
        quantize_(tiny_model, QuantConfig(overrides={"blokcs.*.qkv*": {"bits": 8}}))


def test_a_pattern_matching_only_points_the_placement_leaves_float_is_refused(make_tiny) -> None:
    assert "head.weight_quantizer" in _full_only_points()  # placed by full, not by seed
    quantize_(make_tiny(), QuantConfig(placement="full", overrides={"head.*": None}))
    with pytest.raises(ConfigError, match=r"^overrides: the pattern 'head\.\*' matches no quant point .*\(placement 'seed'\)"):
        quantize_(make_tiny(), QuantConfig(placement="seed", overrides={"head.*": None}))


def test_matching_patterns_are_logged_with_their_counts(tiny_model, caplog) -> None:
    overrides = {"blocks.*.mlp.*": {"bits": 6}, "blocks.4.attn.*": None, "blocks.4.attn.context": {}}
    with caplog.at_level(logging.INFO, logger="lit_ptq.quant.quantize"):
        quantize_(tiny_model, QuantConfig(overrides=overrides))
    mlp = {n for n in _seed_points() if ".mlp." in n}
    assert len(mlp) == 4 * len(MLP_BLOCKS)  # fc1, fc2 weights, GELU and fc2 outputs
    assert caplog.messages == [
        f"override 'blocks.*.mlp.*': {len(mlp)} quant points -> bits 6",
        "override 'blocks.4.attn.*': 7 quant points -> float",  # counted though they end float
        "override 'blocks.4.attn.context': 1 quant point -> the role's setting",
    ]
    names = {n for n, _ in quantizers(tiny_model)} | {n for n, p in tiny_model.named_modules() if isinstance(p, LogSoftmaxQuantizer)}
    assert names == _seed_points() - {f"blocks.4.attn.{p}" for p in ("qkv_output", "logits", "softmax_output", "proj_output", "qkv.weight_quantizer", "proj.weight_quantizer")}


# --- calibrate ------------------------------------------------------------------------------


def test_calibrate_with_no_batches_raises_and_leaves_float(tiny_model) -> None:
    model = quantize_(tiny_model, QuantConfig())
    with pytest.raises(CalibrationError, match="calibration needs at least one batch, got none"):
        calibrate(model, [])
    assert all(q.mode is QuantMode.FLOAT for q in _points(model).values())


def test_calibrate_a_float_model_raises(tiny_model, calib_batches) -> None:
    with pytest.raises(ValueError, match=r"calibrate\(\) needs a model prepared with quantize_"):
        calibrate(tiny_model, calib_batches)


def test_calibrate_rejects_batches_without_a_tensor(tiny_model) -> None:
    model = quantize_(tiny_model, QuantConfig())
    with pytest.raises(TypeError, match="calibration batches must be tensors or .* got dict"):
        calibrate(model, [{"image": torch.zeros(1, 3, 32, 32)}])


def test_calibrate_returns_the_batch_count_and_leaves_the_model_quantizing(make_quantized, eval_images) -> None:
    model = make_quantized(calibrated=False, placement="full")
    model.train()
    batches = (eval_images[i : i + 1] for i in range(3))  # any iterable, a generator too
    assert calibrate(model, batches) == 3
    assert model.training  # the train / eval state is given back
    assert all(q.mode is QuantMode.QUANTIZE for q in _points(model).values())
    assert all(bool(q.calibrated) for _, q in quantizers(model))


def test_calibrate_accepts_image_label_tuples(make_quantized, calib_batches) -> None:
    plain = make_quantized(calibrated=False, method="ema")
    tupled = make_quantized(calibrated=False, method="ema")
    calibrate(plain, calib_batches)
    assert calibrate(tupled, [(x, torch.zeros(len(x), dtype=torch.long)) for x in calib_batches]) == 2
    assert calibrate(tupled, [[x, "labels"] for x in calib_batches]) == 2
    plain_state, tupled_state = plain.state_dict(), tupled.state_dict()
    assert all(torch.equal(plain_state[k], tupled_state[k]) for k in plain_state)


def test_weights_are_calibrated_on_the_float_weights(make_quantized) -> None:
    model = make_quantized(placement="full")
    for name, q in quantizers(model):
        if isinstance(q, WeightQuantizer):
            weight = model.get_submodule(name.rsplit(".", 1)[0]).weight
            flat = weight.detach().reshape(weight.shape[0], -1)
            assert torch.equal(q.min_val, flat.amin(1)) and torch.equal(q.max_val, flat.amax(1))


@pytest.mark.parametrize("placement", ["seed", "full"])
def test_omse_searches_once_per_quantizer_on_the_last_batch(placement, make_quantized, monkeypatch) -> None:
    model = make_quantized(calibrated=False, placement=placement, method="omse")
    searched: list[tuple[OmseObserver, torch.Tensor]] = []
    original = OmseObserver.search

    def spy(self: OmseObserver, x: torch.Tensor):
        searched.append((self, x.clone()))
        return original(self, x)

    monkeypatch.setattr(OmseObserver, "search", spy)
    batches = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    calibrate(model, batches)
    omse = [q.observer for _, q in quantizers(model) if isinstance(q.observer, OmseObserver)]
    # seed: 6 x 5 attention + 8 x 2 MLP + 2 merge outputs; full adds 18 Linear / Conv inputs and 18 LayerNorm inputs
    assert len(omse) == {"seed": 48, "full": 84}[placement]
    assert len(searched) == len(omse)
    assert {id(obs) for obs, _ in searched} == {id(obs) for obs in omse}
    if placement == "full":  # the first quant point sees the image itself: the last batch
        first = model.patch_embed.proj.input_quantizer.observer
        assert any(obs is first and torch.equal(x, batches[-1]) for obs, x in searched)


def test_ptf_searches_once_per_layernorm_on_the_last_batch(make_quantized, monkeypatch) -> None:
    model = make_quantized(calibrated=False, placement="full", ptf=True)
    calls: list[PtfObserver] = []
    original = PtfObserver.search

    def spy(self: PtfObserver, x: torch.Tensor):
        calls.append(self)
        return original(self, x)

    monkeypatch.setattr(PtfObserver, "search", spy)
    calibrate(model, [torch.randn(1, 3, 32, 32) for _ in range(3)])
    ptf = [q.observer for _, q in quantizers(model) if isinstance(q.observer, PtfObserver)]
    assert len(ptf) == 6 + 8 + 2 + 2
    assert sorted(map(id, calls)) == sorted(map(id, ptf))


def test_calibrate_twice_starts_over(make_quantized, calib_batches) -> None:
    once = make_quantized(method="minmax")
    twice = make_quantized(calibrated=False, method="minmax")
    calibrate(twice, [calib_batches[0] * 10])
    calibrate(twice, calib_batches)
    once_state, twice_state = once.state_dict(), twice.state_dict()
    assert all(torch.equal(once_state[k], twice_state[k]) for k in once_state)


# --- every combination, end to end ----------------------------------------------------------

COMBINATIONS = list(
    itertools.product(["minmax", "ema", "percentile", "omse"], ["seed", "full"], [False, True], [False, True])
)


def _expected_observer(name: str, method: str, ptf: bool) -> str:
    """The observer a tensor quantizer of this name gets: MinMax for weights, PTF for LayerNorm
    inputs under PTF, else the configured method."""
    if name.endswith("weight_quantizer"):
        return "minmax"
    if ".norm" in name or name.startswith("fc_norm"):
        return "ptf" if ptf else method
    return method


@pytest.mark.parametrize(("method", "placement", "ptf", "lis"), COMBINATIONS)
def test_every_combination_runs_end_to_end(method, placement, ptf, lis, make_tiny, eval_images) -> None:
    """Each configuration has its placement's quant points with the configured observers, calibrates
    them on the float model's tensors, and keeps its logits within 15% (in norm) of the float ones."""
    model = quantize_(make_tiny(), QuantConfig(method=method, placement=placement, ptf=ptf, lis=lis))
    points = _points(model)
    assert set(points) == (SEED_POINTS if placement == "seed" else FULL_POINTS)
    for name, q in points.items():
        if lis and name.endswith("softmax_output"):
            assert type(q) is LogSoftmaxQuantizer
            continue
        assert q.observer.name == _expected_observer(name, method, ptf), name
        per_channel = name.endswith("weight_quantizer") or (ptf and q.role == "norm")
        assert (q.scale.numel() > 1) == per_channel, name

    batches = [eval_images[:2], eval_images[2:]]
    float_model, gelu = make_tiny(), []
    float_model.blocks[0].mlp.act.register_forward_hook(lambda module, args, out: gelu.append(out))
    with torch.no_grad():
        reference = float_model(eval_images)
        gelu.clear()
        for x in batches:
            float_model(x)
    assert calibrate(model, batches) == 2
    assert all(q.mode is QuantMode.QUANTIZE for q in points.values())
    assert all(bool(q.calibrated) for _, q in quantizers(model))
    # a value: the first GELU's quant point holds what a `method` observer makes of the float GELU outputs
    observer = build_observer(method, 0, 255, signed=False, per_channel=False, channel_axis=-1)
    observer.update(gelu[0])
    observer.update(gelu[1], last=True)
    point = model.blocks[0].mlp.act_output
    for buffer, value in zip((point.scale, point.zero_point, point.min_val, point.max_val), observer.compute()):
        assert torch.equal(buffer, value.reshape(1))
    with torch.no_grad():
        logits = model(eval_images)
    assert logits.shape == (4, 10)
    # measured: at most 0.112 of the float logits' norm (full placement with PTF and LIS)
    assert (logits - reference).norm() < 0.15 * reference.norm()


@pytest.mark.parametrize("placement", ["seed", "full"])
def test_logits_are_quantized_before_the_position_bias(placement, make_quantized, calib_batches) -> None:
    """The logits quant point sees ``(q @ k^T) * scale`` without the relative position bias: its
    MinMax range is that of ``(q @ k^T) * scale`` over the calibration batches (q, k from ``qkv``)."""
    model = make_quantized(calibrated=False, placement=placement, method="minmax")
    qkv: dict[int, list[torch.Tensor]] = {i: [] for i in ATTENTION}
    for i in ATTENTION:
        model.blocks[i].attn.qkv.register_forward_hook(lambda module, args, out, i=i: qkv[i].append(out.clone()))
    calibrate(model, calib_batches)
    grid, tokens = 4, 16  # a 32x32 input in patches of 8
    rpe_index = model.rpe_index(grid)
    for i in ATTENTION:
        attn = model.blocks[i].attn
        logits = []
        for out in qkv[i]:
            B, N, C3 = out.shape
            heads = attn.num_heads
            q, k, _ = out.reshape(B, N, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4)
            logits.append((q @ k.transpose(-2, -1)) * attn.scale)
        logits = torch.cat(logits)
        assert torch.equal(attn.logits.min_val, logits.min().reshape(1)), i
        assert torch.equal(attn.logits.max_val, logits.max().reshape(1)), i
        biased = logits + attn.position_bias(rpe_index, tokens)  # what the point would see after the bias
        assert not torch.equal(torch.stack([biased.min(), biased.max()]), torch.stack([logits.min(), logits.max()]))


# --- report ---------------------------------------------------------------------------------


@pytest.fixture
def reported(make_quantized, calib_batches):
    model = make_quantized(placement="full", method="minmax", lis=True)
    modes = {n: q.mode for n, q in _points(model).items()}
    return model, quant_report(model, calib_batches[-1]), modes


def test_report_has_one_entry_per_quant_point_in_module_order(reported) -> None:
    model, report, _ = reported
    assert [s.name for s in report] == list(_points(model))
    assert {s.name for s in report} == FULL_POINTS


def test_report_entries(reported) -> None:
    model, report, _ = reported
    points = _points(model)
    for s in report:
        q = points[s.name]
        assert s.role == q.role and 0.0 <= s.clipped <= 1.0 and s.numel > 0
        assert list(s.as_dict()) == [
            "name", "role", "bits", "min_val", "max_val", "scale", "clipped", "sqnr_db", "numel"
        ]
        if isinstance(q, LogSoftmaxQuantizer):
            assert (s.bits, s.min_val, s.max_val) == (8, 0.0, 1.0) and math.isnan(s.scale)
            continue
        assert s.bits == 8 and s.min_val <= s.max_val and s.scale > 0
        assert (s.min_val, s.max_val) == (float(q.min_val.min()), float(q.max_val.max()))
        assert s.scale == float(q.scale.mean())
        assert math.isfinite(s.sqnr_db)
        if s.role == "weight":
            assert s.sqnr_db > 20.0
            assert s.numel == model.get_submodule(s.name.rsplit(".", 1)[0]).weight.numel()


def test_minmax_report_on_the_calibration_batch_saturates_at_most_the_extremes(reported) -> None:
    model, report, _ = reported
    # The range is the batch's own: values that round to an end level are not saturated. Only an
    # extreme sitting on the half step past the grid (the int8 weight knife edge, or float noise
    # at an activation's max) may count, so at most one value per channel for weights and the
    # min and max for activations.
    for s in report:
        if s.role == "weight":
            assert s.clipped * s.numel <= model.get_submodule(s.name.rsplit(".", 1)[0]).weight.shape[0]
        elif s.role != "attn":
            assert s.clipped * s.numel <= 2


def test_a_point_that_saw_no_values_reports_nothing_clipped_and_no_error() -> None:
    stats = _stats("p", TensorQuantizer(QuantSpec(8), "act"), _Accumulator())
    assert (stats.clipped, stats.sqnr_db, stats.numel) == (0.0, math.inf, 0)


def test_report_restores_the_quant_modes(reported, eval_images) -> None:
    model, _, modes = reported
    assert {n: q.mode for n, q in _points(model).items()} == modes
    set_quant_mode(model, "float")
    quant_report(model, (eval_images, torch.zeros(4)))
    assert all(q.mode is QuantMode.FLOAT for q in _points(model).values())
