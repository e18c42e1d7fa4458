"""Specification of lit_ptq/backends.py: the export and inference registries, and a new backend of
each kind as one class plus its registration, run through the product path (PTQModule, the run
service, ``PTQTrainer.export`` and ``main.py export --format``)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
import torch
import torch.nn as nn
import yaml
from pytorch_lightning import LightningDataModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

import lit_ptq.export  # noqa: F401  (registers the onnx and onnxruntime backends)
import main as main_script
from lit_ptq.backends import (
    EXPORT_BACKENDS,
    INFERENCE_BACKENDS,
    ExportBackend,
    InferenceBackend,
    PyTorchBackend,
    export_backend,
    register_export_backend,
    register_inference_backend,
)
from lit_ptq.callbacks import CalibrationCallback
from lit_ptq.errors import ConfigError
from lit_ptq.module import PTQModule
from lit_ptq.run import Evaluation, summary_line
from lit_ptq.trainer import PTQTrainer

# --------------------------------------------------------------------------- two toy backends, one class each


@register_inference_backend("torch_pickle")
class TorchPickleBackend(InferenceBackend):
    """Runs a whole module saved with ``torch.save`` (a toy inference backend)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.net: nn.Module = torch.load(path, weights_only=False).eval()

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.to(images.device)(images)

    def summary(self, config_summary: dict[str, Any]) -> dict[str, Any]:
        return dict(config_summary, pickle=self.path)


@register_export_backend("torch_state")
class TorchStateExport(ExportBackend):
    """Writes ``torch.save`` of the model's state dict and the run's metadata (a toy export backend)."""

    suffix = ".pt"

    def export(self, model: nn.Module, path: str, example_input: torch.Tensor, metadata: dict[str, Any]) -> dict[str, Any]:
        full = dict(metadata, input_size=list(example_input.shape[1:]))
        torch.save(dict(state=model.state_dict(), metadata=full), path)
        return full

    def describe(self, metadata: dict[str, Any]) -> str:
        return "torch state dict"


# --------------------------------------------------------------------------- registries


def test_the_registries_hold_the_package_backends_and_the_toys() -> None:
    assert EXPORT_BACKENDS["onnx"] is lit_ptq.export.OnnxExport and EXPORT_BACKENDS["torch_state"] is TorchStateExport
    assert INFERENCE_BACKENDS["pytorch"] is PyTorchBackend
    assert INFERENCE_BACKENDS["onnxruntime"] is lit_ptq.export.OnnxRuntimeBackend
    assert TorchPickleBackend.name == "torch_pickle" and TorchStateExport.name == "torch_state"


def test_the_registries_are_read_only() -> None:
    with pytest.raises(TypeError):
        EXPORT_BACKENDS["x"] = TorchStateExport  # type: ignore[index]
    with pytest.raises(TypeError):
        INFERENCE_BACKENDS["x"] = TorchPickleBackend  # type: ignore[index]


def test_a_name_is_registered_once_and_only_for_its_kind() -> None:
    with pytest.raises(ValueError, match="'onnx' is already registered"):
        register_export_backend("onnx")(TorchStateExport)
    with pytest.raises(TypeError, match="is not an InferenceBackend"):
        register_inference_backend("wrong_kind")(TorchStateExport)
    assert "wrong_kind" not in INFERENCE_BACKENDS


def test_an_unknown_export_format_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^--format=tensorrt is not an export backend; registered: .*onnx"):
        export_backend("tensorrt")


# --------------------------------------------------------------------------- a toy inference backend


class _Data(LightningDataModule):
    """The least a run needs of a data module: calibration and validation batches of random images."""

    batch_size = 8

    def __init__(self, n: int = 21) -> None:
        super().__init__()
        self.skipped_files: list[str] = []
        g = torch.Generator().manual_seed(3)
        self.images, self.targets = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)

    def calib_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images[:16]), batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images, self.targets), batch_size=self.batch_size)


def _trainer(*callbacks: Any, cls: type = Trainer) -> Trainer:
    return cls(accelerator="cpu", devices=1, logger=False, callbacks=list(callbacks), enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False)  # fmt: skip


def _validate(module: PTQModule) -> dict[str, Any]:
    """The run service's record of ``module`` on :class:`_Data` (as the grid tool runs a cell)."""
    calibration = CalibrationCallback()
    evaluation = Evaluation(module, _Data(), _trainer(calibration), announce=False)
    return evaluation.run(lambda: calibration.result)


def test_a_registered_inference_backend_runs_through_the_module_and_the_run_service(tmp_path, tiny_checkpoint) -> None:
    torch.manual_seed(0)
    reference = PTQModule(model_name="itpn_tiny", num_classes=10, checkpoint=str(tiny_checkpoint))
    path = tmp_path / "net.pt"
    torch.save(reference.model, path)
    module = PTQModule(model_name="itpn_tiny", num_classes=10, checkpoint=str(tiny_checkpoint), backend=TorchPickleBackend(str(path)))
    assert module.model is None and not module.quantized and module.backend == "torch_pickle"
    record, expected = _validate(module), _validate(reference)
    assert record["backend"] == "torch_pickle" and record["pickle"] == str(path) and record["calib_images"] == 0
    for key in ("acc1", "acc5", "loss", "num_images"):
        assert record[key] == expected[key], key  # the same float model: the same logits
    assert summary_line(record, 1.0).startswith("itpn_tiny fp32  32/32/32 torch_pickle: acc1")


def test_the_pytorch_backend_is_the_default(tiny_checkpoint) -> None:
    module = PTQModule(model_name="itpn_tiny", num_classes=10, checkpoint=str(tiny_checkpoint), method="minmax")
    assert isinstance(module.inference_backend, PyTorchBackend) and module.inference_backend.model is module.model
    assert module.backend == "pytorch" and module.quantized


def test_onnx_and_a_backend_together_are_refused(tmp_path) -> None:
    backend = PyTorchBackend(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="model.onnx=x.onnx and model.backend are both set"):
        PTQModule(model_name="itpn_tiny", num_classes=10, onnx="x.onnx", backend=backend)


# --------------------------------------------------------------------------- a toy export backend


def test_a_registered_export_backend_writes_through_the_trainer(tmp_path, tiny_checkpoint) -> None:
    torch.manual_seed(0)
    module = PTQModule(model_name="itpn_tiny", num_classes=10, checkpoint=str(tiny_checkpoint), method="minmax")
    out = tmp_path / "model.pt"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        written = _trainer(cls=PTQTrainer).export(module, str(out), datamodule=_Data(), format="torch_state")
    saved = torch.load(out, weights_only=False)
    assert saved["metadata"]["calib_images"] == 16 and saved["metadata"]["input_size"] == [3, 32, 32]
    assert written["path"] == str(out) and written["bytes"] == out.stat().st_size
    state = module.model.state_dict()
    assert saved["state"].keys() == state.keys()
    assert all(torch.equal(saved["state"][k], v) for k, v in state.items())
    assert f"wrote {out} " in stdout.getvalue()
    assert stdout.getvalue().strip().endswith("itpn_tiny minmax seed 8/8/8, torch state dict, calibrated on 16 images")


def test_the_output_must_have_the_backends_suffix(tmp_path, tiny_checkpoint) -> None:
    module = PTQModule(model_name="itpn_tiny", num_classes=10, checkpoint=str(tiny_checkpoint))
    with pytest.raises(ConfigError, match=r"--output=.*model.onnx must end in .pt"):
        _trainer(cls=PTQTrainer).export(module, str(tmp_path / "model.onnx"), format="torch_state")
    assert list(tmp_path.iterdir()) == []


def test_main_export_format_chooses_the_backend(tmp_path, fmnist_root, tiny_checkpoint, make_tiny_config) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(make_tiny_config(fmnist_root, tiny_checkpoint, 16, 2)))
    out = tmp_path / "model.pt"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main_script.main(["export", "--config", str(config), "--output", str(out), "--format", "torch_state"])
    assert code == 0
    assert stdout.getvalue().strip().endswith("itpn_tiny minmax seed 8/8/8, torch state dict, calibrated on 32 images")
    assert torch.load(out, weights_only=False)["metadata"]["summary"]["model"] == "itpn_tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "tiny.yaml"]


def test_main_export_refuses_an_unknown_format_before_any_compute(tmp_path, fmnist_root, tiny_checkpoint, make_tiny_config, capsys) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(make_tiny_config(fmnist_root, tiny_checkpoint, 16, 2)))
    code = main_script.main(["export", "--config", str(config), "--output", str(tmp_path / "m.onnx"), "--format", "trt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --format=trt is not an export backend; registered:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]



def test_the_pytorch_backend_compiles_at_the_first_batch_and_again_after_a_reset() -> None:
    model = nn.Linear(3, 2)
    compiled: list[nn.Module] = []

    def compiler(m: nn.Module) -> Any:
        compiled.append(m)
        return lambda x: m(x) + 1

    backend = PyTorchBackend(model, compiler=compiler)
    x = torch.ones(1, 3)
    assert backend.compiled and not compiled  # nothing compiled before a batch (calibration runs first)
    assert torch.equal(backend.logits(x), model(x) + 1) and torch.equal(backend.logits(x), model(x) + 1)
    assert compiled == [model]
    backend.reset()
    backend.logits(x)
    assert compiled == [model, model]
    assert not PyTorchBackend(model).compiled


def test_compile_with_another_backend_is_refused() -> None:
    class Zeros(InferenceBackend):
        def logits(self, images: torch.Tensor) -> torch.Tensor:
            return images.new_zeros(images.shape[0], 10)

    with pytest.raises(ConfigError, match="model.compile=true compiles the PyTorch model, but model.backend evaluates another backend"):
        PTQModule(model_name="itpn_tiny", num_classes=10, compile=True, backend=Zeros())
