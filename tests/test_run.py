"""Specification of lit_ptq/run.py, the run service: the option checks and calibration-batch policy
(:func:`plan_run`), the typed calibration result, the record and the summary line."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from pytorch_lightning import Trainer
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from lit_ptq.callbacks import CalibrationCallback
from lit_ptq.data import ImageNetDataModule
from lit_ptq.errors import ConfigError
from lit_ptq.module import PTQModule
from lit_ptq.quant import quantizers
from lit_ptq.run import (
    DATA_LINKS,
    NOT_CALIBRATED,
    CalibrationResult,
    Evaluation,
    RunPlan,
    calibrate_module,
    linked_data_args,
    plan_run,
    progress_bar,
    results_record,
    summary_line,
)
from lit_ptq.sensitivity import SensitivitySettings

DATA = dict(root="/data", calib_batches=4, calib_batch_size=8)


def _plan(subcommand: str = "validate", sensitivity: bool = False, **model_and_calibration: Any) -> RunPlan:
    calibration = {k: model_and_calibration.pop(k) for k in ("save_state", "load_state") if k in model_and_calibration}
    return plan_run(subcommand, model_and_calibration, DATA, calibration, SensitivitySettings(enabled=sensitivity))


class TestPlan:
    @pytest.mark.parametrize(
        "kwargs, calib_batches",
        [
            (dict(), 0),  # float: nothing to calibrate
            (dict(method="minmax"), 4),
            (dict(method="minmax", load_state="{state}"), 0),  # loaded: no calibration image
            (dict(method="minmax", load_state="{state}", sensitivity=True), 4),  # measured on them
            (dict(method="minmax", onnx="m.onnx"), 0),  # the file holds its quantization
        ],
    )
    def test_calibration_batches(self, tmp_path, kwargs, calib_batches):
        state = tmp_path / "s.qstate"
        state.write_bytes(b"")
        kwargs = {k: v.format(state=state) if isinstance(v, str) else v for k, v in kwargs.items()}
        assert _plan(**kwargs) == RunPlan(calib_batches, logger=True)

    def test_predict_keeps_no_logger(self, tmp_path):
        (tmp_path / "images").mkdir()
        (tmp_path / "images" / "a.png").write_bytes(b"")
        data = dict(DATA, predict_root=str(tmp_path / "images"))
        plan = plan_run("predict", dict(method="minmax"), data, {}, SensitivitySettings(), output=str(tmp_path / "p.csv"))
        assert plan == RunPlan(4, logger=False)

    @pytest.mark.parametrize(
        "subcommand, kwargs, message",
        [
            ("validate", dict(method="minmax", onnx="m.onnx", save_state="s.qstate"), "calibration.save_state is set but model.onnx=m.onnx"),
            ("validate", dict(method="minmax", load_state="/no/such.qstate"), "calibration.load_state=/no/such.qstate does not exist"),
            ("export", dict(onnx="m.onnx"), "model.onnx=m.onnx is for validate"),
            ("test", dict(method="minmax", sensitivity=True), "sensitivity.enabled=true is for validate, not test"),
            ("validate", dict(method="minmax", compile=True, onnx="m.onnx"), "model.compile=true compiles the PyTorch model, but model.onnx=m.onnx"),
            ("export", dict(method="minmax", compile=True), r"model.compile=true is for evaluation \(validate, test, predict\)"),
        ],
    )
    def test_errors_are_one_sentence(self, subcommand, kwargs, message):
        with pytest.raises(ConfigError, match=message):
            _plan(subcommand, **kwargs)

    def test_no_calibration_batches_for_a_quantized_model(self):
        with pytest.raises(ConfigError, match="data.calib_batches=0 but model.method is set"):
            plan_run("validate", dict(method="minmax"), dict(DATA, calib_batches=0), {}, SensitivitySettings())

    def test_export_output_is_checked_by_its_backend(self, tmp_path):
        with pytest.raises(ConfigError, match=r"--output=.*model.pt must end in .onnx"):
            plan_run("export", {}, DATA, {}, SensitivitySettings(), output=str(tmp_path / "model.pt"))


def test_data_links() -> None:
    assert [m for m, _ in DATA_LINKS] == ["model_name", "img_size", "num_classes"]
    assert linked_data_args(dict(model_name="itpn_tiny", num_classes=10, method="omse")) == dict(
        model_name="itpn_tiny", img_size=None, num_classes=10
    )


class _Calib:
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def calib_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images), batch_size=6)


class TestCalibration:
    def test_a_float_module_is_not_calibrated(self):
        module = PTQModule(model_name="itpn_tiny", num_classes=10)
        assert calibrate_module(module, _Calib(torch.zeros(2, 3, 32, 32))) is None

    def test_the_result_is_typed_and_the_callback_exposes_it(self, tmp_path):
        images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        module = PTQModule(model_name="itpn_tiny", num_classes=10, method="minmax")
        callback = CalibrationCallback(save_state=str(tmp_path / "s.qstate"))
        assert callback.result is None and callback.calib_images == 0 and callback.report == []
        assert callback.prepare(module, _Calib(images))
        result = callback.result
        assert isinstance(result, CalibrationResult)
        assert result.calib_images == 12 and result.seconds > 0 and result.saved_to == str(tmp_path / "s.qstate")
        assert result.loaded_from is None and {r.name for r in result.report} == {n for n, _ in quantizers(module.model)}
        assert (callback.calib_images, callback.seconds, callback.report) == (12, result.seconds, result.report)
        loaded = calibrate_module(module, load_state=str(tmp_path / "s.qstate"))
        assert loaded is not None and loaded.loaded_from == str(tmp_path / "s.qstate")
        assert (loaded.calib_images, loaded.report, loaded.saved_to) == (0, [], None)


def test_record_and_summary_line() -> None:
    module = PTQModule(model_name="itpn_tiny", num_classes=10, method="minmax")
    metrics = {"test/acc1": 50.0, "test/acc5": 87.5, "test/loss": 1.25, "test/num_images": 8.0}  # percent, as logged
    calib = CalibrationResult(seconds=1.23456, calib_images=16)
    record = results_record(module, metrics, calib, dict(seed=0), "test")
    assert record["calib_images"] == 16 and record["calibration_seconds"] == 1.235 and record["backend"] == "pytorch"
    assert (record["acc1"], record["acc5"], record["num_images"], record["split"], record["seed"]) == (50.0, 87.5, 8, "test", 0)
    assert results_record(module, metrics, None, {}, "test")["calib_images"] == NOT_CALIBRATED.calib_images == 0
    assert summary_line(record, 2.04) == "itpn_tiny minmax seed 8/8/8: test acc1 50.00 acc5 87.50 loss 1.2500 on 8 images (2.0 s)"


# --------------------------------------------------------------------------- fewer images than ranks


FEW_CLASSES = ("0_t-shirt_top", "1_trouser")  # the model's classes 0 and 1, so the folders' indices are its own


@pytest.fixture(scope="module")
def few_images_root(tmp_path_factory, fmnist_root) -> Path:
    """train/: 2 classes of 12 Fashion-MNIST images; val/ and test/ hold 1 image; ``three/`` a root whose val/
    and test/ hold 3 (2 + 1: unequal shares over 2 ranks)."""
    base = tmp_path_factory.mktemp("few")
    for name, counts in (("one", (1, 0)), ("three", (2, 1))):
        for cls, count in zip(FEW_CLASSES, counts):
            (base / name / "train").mkdir(parents=True, exist_ok=True)
            (base / name / "train" / cls).symlink_to(fmnist_root / "train" / cls)
            for split in ("val", "test"):
                if count:
                    (base / name / split / cls).mkdir(parents=True)
                    for f in sorted((fmnist_root / "val" / cls).glob("*.png"))[-count:]:  # the last images of the class
                        shutil.copyfile(f, base / name / split / cls / f.name)
    for cls in FEW_CLASSES[1:]:  # one/ evaluates class 0 alone: train/ must hold the same classes
        (base / "one" / "train" / cls).unlink()
    return base


def _evaluate(root: Path, checkpoint: Path, split: str, **trainer_kwargs: Any) -> dict[str, Any]:
    """The run service's record of a minmax 8/8/8 ``itpn_tiny`` run (batches of 10, 2 x 4 calibration images)."""
    module = PTQModule(model_name="itpn_tiny", checkpoint=str(checkpoint), num_classes=10, method="minmax")
    data = ImageNetDataModule(str(root), model_name="itpn_tiny", batch_size=10, num_workers=0, calib_batch_size=4, calib_batches=2)
    calibration = CalibrationCallback()
    options = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = Trainer(**{**options, **trainer_kwargs}, callbacks=[calibration])
    return Evaluation(module, data, trainer, split=split, announce=False).run(lambda: calibration.result)


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("images", [1, 3])
def test_fewer_images_than_ranks_count_every_image_once(few_images_root, tiny_checkpoint, monkeypatch, split, images):
    """2 ranks and 1 image: rank 1 has none of its own, yet both finish (it runs one empty step, so
    it joins the calibration broadcast and the metrics' sync) and the record is the one-process
    run's; 3 images (2 + 1) likewise."""
    monkeypatch.delenv("MASTER_PORT", raising=False)  # Lightning picks a free one and leaves it set
    root = few_images_root / ("one" if images == 1 else "three")
    one = _evaluate(root, tiny_checkpoint, split)
    # forked ranks (gloo), with a short collective timeout: a rank left waiting fails the test instead of hanging it
    strategy = DDPStrategy(start_method="fork", process_group_backend="gloo", timeout=timedelta(seconds=60))
    two = _evaluate(root, tiny_checkpoint, split, devices=2, strategy=strategy)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["num_images"] == two["num_images"] == images and one["split"] == two["split"] == split
    for key in ("acc1", "acc5", "loss"):  # (calib_images stays in the forked ranks: the parent calibrated nothing)
        assert two[key] == one[key], key


class TestProgressBar:
    def test_a_bar_in_the_validation_bars_style_on_global_rank_zero(self, capsys):
        trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_model_summary=False)
        bar = progress_bar(trainer, 78, "Sensitivity")
        assert bar is not None and (bar.total, bar.desc) == (78, "Sensitivity")
        assert bar.bar_format == trainer.progress_bar_callback.BAR_FORMAT and bar.leave
        bar.update(78)
        bar.close()
        assert "Sensitivity: 100%|██████████| 78/78" in capsys.readouterr().out

    def test_no_bar_without_the_trainers_bar(self):
        assert progress_bar(None, 3, "Sensitivity") is None
        quiet = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
        assert progress_bar(quiet, 3, "Sensitivity") is None


def test_summary_line_says_what_the_overrides_changed() -> None:
    record = dict(model="itpn_tiny", method="omse", placement="seed", bits="4/4/4", split="val",
                  acc1=89.81, acc5=99.6, loss=0.35, num_images=10000)  # fmt: skip
    assert summary_line(record, 20.0, "mixed: 8 points at 8 bits") == (
        "itpn_tiny omse seed 4/4/4 mixed: 8 points at 8 bits: acc1 89.81 acc5 99.60 loss 0.3500 on 10000 images (20.0 s)"
    )
    assert summary_line(record, 20.0).startswith("itpn_tiny omse seed 4/4/4: acc1 89.81")
