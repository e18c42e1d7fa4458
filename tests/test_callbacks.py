"""Specification of lit_ptq/callbacks.py: CalibrationCallback on a small tree of real images."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.callbacks import TQDMProgressBar

from lit_ptq.callbacks import CalibrationCallback
from lit_ptq.quant.state import STATE_FORMAT, weights_fingerprint
from lit_ptq.data import ImageNetDataModule
from lit_ptq.errors import CheckpointError, ConfigError
from lit_ptq.models import create_model
from lit_ptq.module import PTQModule
from lit_ptq.quant import QuantMode, WeightQuantizer, calibrate, float_points, quantizers

CALIB_BATCH_SIZE = 16
CALIB_BATCHES = 2
VAL_BATCH_SIZE = 10
RECIPE = dict(method="minmax", placement="matmul", bits="4/4/4", recipe="repq")
"""A low-bit recipe: its calibration changes the weights (LayerNorms folded into the Linears)."""
RECIPE_CALIB_BATCH_SIZE = 4


class Probe(Callback):
    """Records what the model looks like at each point of the validation run."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.inference_mode_at_start: bool | None = None
        self.modes_at_first_batch: set[QuantMode] = set()
        self.ready_at_first_batch: bool | None = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self.inference_mode_at_start = torch.is_inference_mode_enabled()
        self.events.append("validation_start")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            qs = [q for _, q in quantizers(pl_module.model)]
            self.modes_at_first_batch = {q.mode for q in qs}
            self.ready_at_first_batch = all(q.ready and bool(q.calibrated) for q in qs)
        self.events.append("batch")


def _datamodule(root: Path, calib_batch_size: int = CALIB_BATCH_SIZE, seed: int = 0) -> ImageNetDataModule:
    return ImageNetDataModule(
        root=str(root),
        model_name="itpn_tiny",
        num_classes=10,
        batch_size=VAL_BATCH_SIZE,
        num_workers=0,
        calib_batch_size=calib_batch_size,
        calib_batches=CALIB_BATCHES,
        seed=seed,
    )


def _module(checkpoint: Path, method: str | None = "minmax", **kwargs) -> PTQModule:
    return PTQModule(model_name="itpn_tiny", num_classes=10, checkpoint=str(checkpoint), method=method, **kwargs)


def _run(
    module: PTQModule, root: Path, *callbacks: Callback, datamodule: ImageNetDataModule | None = None, **trainer_kwargs: Any
) -> dict[str, float]:
    """``Trainer.validate`` on ``root`` (one CPU process unless ``trainer_kwargs`` say otherwise;
    ``datamodule`` defaults to ``_datamodule(root)``)."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer = Trainer(**{**options, **trainer_kwargs}, callbacks=list(callbacks))
    (metrics,) = trainer.validate(module, datamodule=datamodule or _datamodule(root), verbose=False)
    return metrics


def _buffers(module: PTQModule) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": b.clone() for n, q in quantizers(module.model) for k, b in q.named_buffers()}


def _params(module: PTQModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters()}


def _float_inputs(module: PTQModule, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each activation quantizer receives when the float model (every point passing
    through) runs on ``images``."""
    seen: dict[str, torch.Tensor] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(point: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen[name] = args[0].detach().float().clone()

        return hook

    hooks = [
        q.register_forward_hook(record(name)) for name, q in quantizers(module.model) if not isinstance(q, WeightQuantizer)
    ]
    try:
        with torch.no_grad(), float_points(module.model):
            module.model(images)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _metrics_only(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("val/")}


class RankOneCalibratesOtherImages(Callback):
    """Test-only, for a two-process run: rank 1 calibrates on another shuffle of ``train/`` (data
    seed 1), so that its quantizer buffers differ from rank 0's until the broadcast; after
    validation each rank saves its buffers to ``folder/rank{r}.pt`` and its model's parameters
    to ``folder/params{r}.pt``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def setup(self, trainer, pl_module, stage) -> None:
        if trainer.global_rank == 1:
            trainer.datamodule.seed = 1

    def on_validation_end(self, trainer, pl_module) -> None:
        torch.save(_buffers(pl_module), self.folder / f"rank{trainer.global_rank}.pt")
        torch.save(_params(pl_module), self.folder / f"params{trainer.global_rank}.pt")


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory, fmnist_root, tiny_checkpoint):
    """A minmax run (inference mode, as Trainer's default) that saved its quantizer state.

    Returns:
        ``(path, metrics, buffers, callback, probe, module)``.
    """
    path = tmp_path_factory.mktemp("state") / "itpn_tiny_minmax.qstate"
    calib, probe = CalibrationCallback(save_state=str(path)), Probe()
    module = _module(tiny_checkpoint)
    assert all(q.mode is QuantMode.FLOAT and not q.ready for _, q in quantizers(module.model))
    metrics = _run(module, fmnist_root, probe, calib)
    return path, metrics, _buffers(module), calib, probe, module


def _check_calibrated_run(module, metrics, calib, probe, num_val_images):
    assert probe.events[0] == "validation_start"
    assert probe.events.count("batch") == -(-num_val_images // VAL_BATCH_SIZE)
    assert probe.modes_at_first_batch == {QuantMode.QUANTIZE}
    assert probe.ready_at_first_batch
    assert all(q.mode is QuantMode.QUANTIZE for _, q in quantizers(module.model))
    assert metrics["val/num_images"] == num_val_images
    assert calib.calib_images == CALIB_BATCHES * CALIB_BATCH_SIZE
    assert calib.seconds > 0
    assert metrics["calibration/seconds"] == round(calib.seconds, 2)  # logged rounded to 2 decimals


class TestCalibration:
    def test_calibrates_before_validation_and_leaves_the_model_quantizing(self, saved_state, num_val_images):
        _, metrics, _, calib, probe, module = saved_state
        assert probe.inference_mode_at_start is True  # Trainer's default: calibration runs in inference mode
        _check_calibrated_run(module, metrics, calib, probe, num_val_images)

    def test_outside_inference_mode_gives_the_same_result(
        self, saved_state, fmnist_root, tiny_checkpoint, num_val_images
    ):
        _, reference, buffers, *_ = saved_state
        module = _module(tiny_checkpoint)
        calib, probe = CalibrationCallback(), Probe()
        metrics = _run(module, fmnist_root, probe, calib, inference_mode=False)
        assert probe.inference_mode_at_start is False
        _check_calibrated_run(module, metrics, calib, probe, num_val_images)
        assert _metrics_only(metrics) == _metrics_only(reference)
        assert all(torch.equal(b, buffers[k]) for k, b in _buffers(module).items())

    def test_report_covers_every_quant_point(self, saved_state):
        _, _, buffers, calib, *_ = saved_state
        names = [r.name for r in calib.report]
        quantizer_names = {k.rsplit(".", 1)[0] for k in buffers}
        assert names and quantizer_names <= set(names)
        assert {r.role for r in calib.report} >= {"weight", "act", "attn"}
        assert all(r.bits == 8 for r in calib.report)
        assert [r.name for r in calib.report if r.numel == 0] == []  # every point saw data
        assert all(r.sqnr_db > 0 for r in calib.report if r.role == "weight")

    def test_report_is_measured_on_the_last_calibration_batch(self, saved_state, fmnist_root):
        """Each activation point's numbers are those of its float input ``x`` on the last calibration
        batch: SQNR ``10 log10(sum x^2 / sum (x - fq(x))^2)`` with ``fq(x) = (clamp(round(x / s + zp),
        qmin, qmax) - zp) * s``, and the share of ``x`` more than half a step outside the grid."""
        *_, calib, _, module = saved_state
        last = [batch[0] for batch in _datamodule(fmnist_root).calib_dataloader()][-1]
        seen = _float_inputs(module, last)
        points = dict(quantizers(module.model))
        reported = {r.name: r for r in calib.report if r.name in seen}
        assert set(reported) == set(seen) and len(seen) == 48
        for name, x in seen.items():
            q, r = points[name], reported[name]
            s, zp, qmin, qmax = q.scale, q.zero_point, q.spec.qmin, q.spec.qmax
            fq = (torch.round(x / s + zp).clamp(qmin, qmax) - zp) * s
            signal = x.double().pow(2).sum().item()
            noise = (x.double() - fq.double()).pow(2).sum().item()
            outside = (x < (qmin - zp - 0.5) * s) | (x > (qmax - zp + 0.5) * s)
            assert r.numel == x.numel(), name
            assert r.sqnr_db == pytest.approx(10 * math.log10(signal / noise), rel=1e-9), name
            assert r.clipped == outside.sum().item() / x.numel(), name

    def test_float_model_is_not_calibrated(self, fmnist_root, tiny_checkpoint, num_val_images):
        calib = CalibrationCallback()
        metrics = _run(_module(tiny_checkpoint, method=None), fmnist_root, calib)
        assert calib.calib_images == 0 and calib.report == []
        assert "calibration/seconds" not in metrics
        assert metrics["val/num_images"] == num_val_images

    def test_progress_bar_shows_calibration(self, saved_state, fmnist_root, tiny_checkpoint, capsys):
        """With the TQDM bar on, calibration shows as its own bar and the result does not change."""
        module = _module(tiny_checkpoint)
        calib = CalibrationCallback()
        bar = TQDMProgressBar(refresh_rate=1)
        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[bar, calib],
        )
        (metrics,) = trainer.validate(module, datamodule=_datamodule(fmnist_root), verbose=False)
        captured = capsys.readouterr()
        bar_line = f"Calibration: 100%|██████████| {CALIB_BATCHES}/{CALIB_BATCHES}"
        assert bar_line in captured.out + captured.err
        assert calib.calib_images == CALIB_BATCHES * CALIB_BATCH_SIZE
        assert _metrics_only(metrics) == _metrics_only(saved_state[1])


class TestTwoProcesses:
    def test_every_rank_ends_with_rank_zeros_state(
        self, saved_state, fmnist_root, tiny_checkpoint, tmp_path, monkeypatch
    ):
        """Rank 1 calibrates on other images than rank 0; after the broadcast both ranks hold rank 0's
        buffers (those of the one-process run) and the metrics are the one-process run's."""
        monkeypatch.delenv("MASTER_PORT", raising=False)  # Lightning picks a free one and leaves it set
        _, reference, buffers, *_ = saved_state
        alone = _module(tiny_checkpoint)
        other_images = _datamodule(fmnist_root)
        other_images.seed = 1
        calibrate(alone.model, other_images.calib_dataloader())
        assert not all(torch.equal(b, buffers[k]) for k, b in _buffers(alone).items())  # rank 1's own state

        module = _module(tiny_checkpoint)
        ranks = RankOneCalibratesOtherImages(tmp_path)
        # forked ranks (gloo): nothing to pickle or re-import, so the run takes about a second
        metrics = _run(module, fmnist_root, ranks, CalibrationCallback(), strategy="ddp_fork", devices=2)
        assert _metrics_only(metrics) == _metrics_only(reference)
        for rank in (0, 1):
            state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
            assert set(state) == set(buffers)
            assert all(torch.equal(state[k], v) for k, v in buffers.items()), rank

    def test_a_recipes_weights_and_buffers_are_rank_zeros_on_every_rank(
        self, fmnist_root, tiny_checkpoint, tmp_path, monkeypatch
    ):
        """A recipe changes the weights as well as the quantizer buffers: rank 1 calibrates other
        images, yet after the broadcast both ranks hold exactly the parameters and buffers of a
        one-process run on rank 0's images, and report its metrics."""
        monkeypatch.delenv("MASTER_PORT", raising=False)
        alone = _module(tiny_checkpoint, **RECIPE)
        reference = _run(alone, fmnist_root, CalibrationCallback(), datamodule=_datamodule(fmnist_root, RECIPE_CALIB_BATCH_SIZE))
        params, buffers = _params(alone), _buffers(alone)
        rank_one_alone = _module(tiny_checkpoint, **RECIPE)
        CalibrationCallback().prepare(rank_one_alone, _datamodule(fmnist_root, RECIPE_CALIB_BATCH_SIZE, seed=1))
        folded = [k for k in params if k.endswith("fc1.weight")]  # a LayerNorm folded in: data dependent
        assert folded and not any(torch.equal(_params(rank_one_alone)[k], params[k]) for k in folded)

        module = _module(tiny_checkpoint, **RECIPE)
        ranks = RankOneCalibratesOtherImages(tmp_path)
        metrics = _run(
            module, fmnist_root, ranks, CalibrationCallback(),
            datamodule=_datamodule(fmnist_root, RECIPE_CALIB_BATCH_SIZE), strategy="ddp_fork", devices=2,
        )  # fmt: skip
        assert _metrics_only(metrics) == _metrics_only(reference)
        for rank in (0, 1):
            for saved, expected in (("params", params), ("rank", buffers)):
                state = torch.load(tmp_path / f"{saved}{rank}.pt", weights_only=True)
                assert set(state) == set(expected), (rank, saved)
                assert [k for k, v in expected.items() if not torch.equal(state[k], v)] == [], (rank, saved)


class TestStateFile:
    def test_save_writes_a_tagged_state(self, saved_state, tiny_checkpoint):
        path, _, buffers, *_ = saved_state
        payload = torch.load(path, map_location="cpu", weights_only=True)
        assert payload["format"] == STATE_FORMAT
        meta = payload["meta"]
        assert (meta["model"], meta["method"], meta["placement"]) == ("itpn_tiny", "minmax", "seed")
        assert meta["bits"] == "8/8/8"
        reference = create_model("itpn_tiny", num_classes=10, checkpoint=str(tiny_checkpoint))
        assert meta["weights_sha256"] == weights_fingerprint(reference)
        assert set(payload["state"]) == set(buffers)
        assert all(torch.equal(payload["state"][k], v) for k, v in buffers.items())

    def test_load_gives_bit_identical_metrics(self, saved_state, fmnist_root, tiny_checkpoint):
        path, reference, buffers, *_ = saved_state
        calib = CalibrationCallback(load_state=str(path))
        module = _module(tiny_checkpoint)
        metrics = _run(module, fmnist_root, calib)
        assert _metrics_only(metrics) == _metrics_only(reference)
        assert calib.calib_images == 0
        assert all(q.mode is QuantMode.QUANTIZE for _, q in quantizers(module.model))
        assert all(torch.equal(b, buffers[k]) for k, b in _buffers(module).items())

    def test_load_works_without_train_split(self, saved_state, fmnist_root, tiny_checkpoint, tmp_path):
        """Loading a state needs no calibration images: data.calib_batches=0 and no train/."""
        path, reference, *_ = saved_state
        (tmp_path / "val").symlink_to(fmnist_root / "val")
        dm = ImageNetDataModule(
            str(tmp_path),
            model_name="itpn_tiny",
            num_classes=10,
            batch_size=VAL_BATCH_SIZE,
            num_workers=0,
            calib_batches=0,
        )
        trainer = Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[CalibrationCallback(load_state=str(path))],
        )
        (metrics,) = trainer.validate(_module(tiny_checkpoint), datamodule=dm, verbose=False)
        assert _metrics_only(metrics) == _metrics_only(reference)

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            (dict(method="ema"), r"method: file 'minmax', run 'ema'"),
            (dict(bits="8/8/4"), r"bits: file '8/8/8', run '8/8/4'"),
            (dict(placement="full"), r"placement: file 'seed', run 'full'"),
            (dict(model_kwargs={"norm_eps": 1e-5}), r"model_kwargs: file \{\}, run \{'norm_eps': 1e-05\}"),
            (dict(overrides={"blocks.0.*": None}), r"overrides: file '<missing>', run \{'blocks\.0\.\*': None\}"),
        ],
    )
    def test_refuses_a_state_made_for_another_config(self, saved_state, fmnist_root, tiny_checkpoint, kwargs, match):
        path = saved_state[0]
        module = _module(tiny_checkpoint, **kwargs)
        refused = rf"calibration.load_state=.* was made for another model or config \(.*{match}"
        with pytest.raises(CheckpointError, match=refused):
            _run(module, fmnist_root, CalibrationCallback(load_state=str(path)))

    @pytest.mark.parametrize(
        "key",
        [
            "model", "num_classes", "img_size", "model_kwargs", "method", "placement", "bits",
            "ptf", "lis", "arithmetic", "weights_sha256",
        ],
    )  # fmt: skip
    def test_refuses_a_state_missing_a_meta_key(self, saved_state, fmnist_root, tiny_checkpoint, tmp_path, key):
        """A state whose meta lacks a key (forged here by deleting it) is refused and the key named;
        a state that does not name the weights it was calibrated for is not loaded either."""
        payload = torch.load(saved_state[0], map_location="cpu", weights_only=True)
        del payload["meta"][key]
        forged = tmp_path / "forged.qstate"
        torch.save(payload, forged)
        refused = rf"calibration.load_state=.* was made for another model or config \((.*; )?{key}: file "
        with pytest.raises(CheckpointError, match=refused):
            _run(_module(tiny_checkpoint), fmnist_root, CalibrationCallback(load_state=str(forged)))

    def test_refuses_a_state_made_for_other_weights(self, saved_state, fmnist_root, tmp_path):
        torch.manual_seed(123)
        other = tmp_path / "other.pt"
        torch.save({"model": create_model("itpn_tiny", num_classes=10).state_dict()}, other)
        refused = r"was made for another model or config \(weights_sha256: file '[0-9a-f]{64}'"
        with pytest.raises(CheckpointError, match=refused):
            _run(_module(other), fmnist_root, CalibrationCallback(load_state=str(saved_state[0])))

    def test_refuses_a_state_made_for_another_model(self, saved_state, fmnist_root, tiny_checkpoint, tmp_path):
        """A state of another registered model (here: its meta rewritten to itpn_base) is refused by name."""
        payload = torch.load(saved_state[0], map_location="cpu", weights_only=True)
        payload["meta"]["model"] = "itpn_base"
        forged = tmp_path / "base.qstate"
        torch.save(payload, forged)
        with pytest.raises(CheckpointError, match=r"model: file 'itpn_base', run 'itpn_tiny'"):
            _run(_module(tiny_checkpoint), fmnist_root, CalibrationCallback(load_state=str(forged)))

    @pytest.mark.parametrize("content", [b"not a state file\n", b"\x89PNG\r\n\x1a\n\x00\x00"])
    def test_refuses_a_foreign_file(self, fmnist_root, tiny_checkpoint, tmp_path, content):
        path = tmp_path / "foreign.qstate"
        path.write_bytes(content)
        refused = r"calibration.load_state=.*foreign.qstate is not a lit_ptq quantizer state"
        with pytest.raises(CheckpointError, match=refused):
            _run(_module(tiny_checkpoint), fmnist_root, CalibrationCallback(load_state=str(path)))

    def test_refuses_a_model_checkpoint(self, fmnist_root, tiny_checkpoint):
        """A float checkpoint is a torch file too, but not a quantizer state."""
        with pytest.raises(CheckpointError, match=r"is not a lit_ptq quantizer state file"):
            _run(_module(tiny_checkpoint), fmnist_root, CalibrationCallback(load_state=str(tiny_checkpoint)))

    def test_refuses_a_state_with_other_quantizers(self, saved_state, fmnist_root, tiny_checkpoint, tmp_path):
        payload = torch.load(saved_state[0], map_location="cpu", weights_only=True)
        payload["state"].pop(next(iter(payload["state"])))
        broken = tmp_path / "broken.qstate"
        torch.save(payload, broken)
        with pytest.raises(CheckpointError, match=r"does not hold this model's quantizers"):
            _run(_module(tiny_checkpoint), fmnist_root, CalibrationCallback(load_state=str(broken)))

    def test_check_paths(self, tmp_path):
        with pytest.raises(ConfigError, match=r"calibration.load_state=.*missing.qstate does not exist"):
            CalibrationCallback(load_state=str(tmp_path / "missing.qstate")).check_paths()
        with pytest.raises(ConfigError, match=r"calibration.save_state=.*: the folder .* does not exist"):
            CalibrationCallback(save_state=str(tmp_path / "no" / "such" / "x.qstate")).check_paths()
        CalibrationCallback(save_state=str(tmp_path / "ok.qstate")).check_paths()
