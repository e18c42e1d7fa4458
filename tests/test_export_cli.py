"""Specification of ``main.py export`` and ``main.py validate --model.onnx`` (the onnxruntime backend).

The runs use ``itpn_tiny`` on the small tree of real Fashion-MNIST images of conftest.py
(59 validation images), calibrated on 2 batches of 16 images as in tests/test_cli.py.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import main as main_script  # noqa: E402
from lit_ptq.callbacks import CalibrationCallback  # noqa: E402
from lit_ptq.data import ImageNetDataModule  # noqa: E402
from lit_ptq.errors import ConfigError  # noqa: E402
from lit_ptq.export import METADATA_KEY, create_session, read_onnx_file  # noqa: E402
from lit_ptq.module import PTQModule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CALIB_BATCH_SIZE = 16
CALIB_BATCHES = 2
CALIB_IMAGES = CALIB_BATCH_SIZE * CALIB_BATCHES
NO_LOGGER = ("--trainer.logger", "false")


@pytest.fixture(scope="module")
def export_config(tmp_path_factory, fmnist_root, tiny_checkpoint, make_tiny_config) -> Path:
    """A config shaped like configs/demo.yaml (minmax, seed placement, 8/8/8), for itpn_tiny on the small tree."""
    config = make_tiny_config(fmnist_root, tiny_checkpoint, CALIB_BATCH_SIZE, CALIB_BATCHES)
    path = tmp_path_factory.mktemp("export_config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _main(args: list[str]) -> tuple[int, str]:
    """``main.main(args)`` in this process: its exit code and stdout."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main_script.main(args)
    return code, stdout.getvalue()


def _metadata(path: Path) -> dict[str, Any]:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props[METADATA_KEY])


def _leftovers(folder: Path) -> list[str]:
    """Temporary files of an atomic write left in ``folder``."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def exported(export_config, tmp_path_factory) -> dict[str, Any]:
    """``main.py export`` of the config, saving the quantizer state it calibrated."""
    out = tmp_path_factory.mktemp("exported")
    path, state = out / "seed.onnx", out / "seed.qstate"
    code, stdout = _main(["export", "--config", str(export_config), "--output", str(path), "--calibration.save_state", str(state)])
    assert code == 0
    return dict(path=path, state=state, stdout=stdout, out=out)


@pytest.fixture(scope="module")
def pytorch_run(export_config, tmp_path_factory) -> dict[str, Any]:
    """``main.py validate`` of the same config in PyTorch, saving its quantizer state."""
    out = tmp_path_factory.mktemp("pytorch")
    args = ["validate", "--config", str(export_config), "--results_path", str(out / "results.json"),
            "--calibration.save_state", str(out / "state.qstate"), *NO_LOGGER]  # fmt: skip
    code, _ = _main(args)
    assert code == 0
    return dict(record=json.loads((out / "results.json").read_text()), state=out / "state.qstate")


@pytest.fixture(scope="module")
def ort_run(export_config, exported, tmp_path_factory) -> dict[str, Any]:
    """``main.py validate --model.onnx`` of the exported file, with TensorBoard logs."""
    out = tmp_path_factory.mktemp("ort")
    args = ["validate", "--config", str(export_config), "--model.onnx", str(exported["path"]),
            "--results_path", str(out / "results.json"), "--trainer.logger.save_dir", str(out / "tb")]  # fmt: skip
    code, stdout = _main(args)
    assert code == 0
    return dict(record=json.loads((out / "results.json").read_text()), stdout=stdout, out=out)


class TestExport:
    def test_writes_a_qdq_file_with_its_run_in_the_metadata(self, exported):
        path = exported["path"]
        graph = onnx.load(str(path)).graph
        ops = Counter(n.op_type for n in graph.node)
        assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
        int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
        assert int8  # the Linear weights as integer codes
        meta = _metadata(path)
        assert meta["summary"]["model"] == "itpn_tiny" and meta["summary"]["method"] == "minmax"
        assert (meta["summary"]["placement"], meta["summary"]["bits"]) == ("seed", "8/8/8")
        assert meta["calib_images"] == CALIB_IMAGES and meta["load_state"] is None
        assert (meta["format"], meta["log_points"], meta["input_size"]) == ("qdq", "raise", [3, 32, 32])
        size = path.stat().st_size / 1e6
        line = exported["stdout"].strip().splitlines()[-1]
        assert line == f"wrote {path} ({size:.1f} MB): itpn_tiny minmax seed 8/8/8, QDQ ONNX, calibrated on {CALIB_IMAGES} images"
        assert not _leftovers(exported["out"])

    def test_calibrates_as_validate_does(self, exported, pytorch_run):
        """The same calibration batches on the same device: export's state equals validate's, tensor for tensor."""
        ours = torch.load(exported["state"], map_location="cpu", weights_only=True)["state"]
        theirs = torch.load(pytorch_run["state"], map_location="cpu", weights_only=True)["state"]
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    def test_load_state_exports_the_same_graph(self, export_config, exported, tmp_path):
        path = tmp_path / "loaded.onnx"
        code, stdout = _main(["export", "--config", str(export_config), "--output", str(path),
                              "--calibration.load_state", str(exported["state"])])  # fmt: skip
        assert code == 0
        assert f"QDQ ONNX, quantizer state {exported['state']}" in stdout
        meta = _metadata(path)
        assert meta["calib_images"] == 0 and meta["load_state"] == str(exported["state"])
        assert onnx.load(str(path)).graph == onnx.load(str(exported["path"])).graph

    def test_float_export(self, export_config, tmp_path, fmnist_root, tiny_checkpoint):
        path = tmp_path / "fp32.onnx"
        code, stdout = _main(["export", "--config", str(export_config), "--output", str(path), "--model.method", "null"])
        assert code == 0 and stdout.strip().endswith("itpn_tiny fp32, float ONNX")
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert not ops & {"QuantizeLinear", "DequantizeLinear"}
        meta = _metadata(path)
        assert meta["format"] == "float" and meta["summary"]["method"] == "fp32" and meta["calib_images"] == 0
        images = _val_images(fmnist_root)
        ort_module = PTQModule(model_name="itpn_tiny", num_classes=10, onnx=str(path))
        torch_module = PTQModule(model_name="itpn_tiny", num_classes=10, checkpoint=str(tiny_checkpoint)).eval()
        with torch.no_grad():
            assert torch.allclose(ort_module(images), torch_module(images), atol=1e-3)

    def test_an_error_while_writing_leaves_no_file(self, export_config, exported, tmp_path, monkeypatch, capsys):
        import lit_ptq.export.qdq

        def fail(model, path, *args, **kwargs):
            Path(path).write_bytes(b"half")
            raise ConfigError("disk full")

        monkeypatch.setattr(lit_ptq.export.qdq, "export_onnx", fail)
        path = tmp_path / "half.onnx"
        code = main_script.main(["export", "--config", str(export_config), "--output", str(path),
                                 "--calibration.load_state", str(exported["state"])])  # fmt: skip
        assert code == 2 and capsys.readouterr().err.strip() == "error: disk full"
        assert list(tmp_path.iterdir()) == []


def _val_images(root: Path, n: int = 20) -> torch.Tensor:
    data = ImageNetDataModule(str(root), model_name="itpn_tiny", batch_size=n, num_workers=0, calib_batches=0)
    return next(iter(data.val_dataloader()))[0]


class TestOnnxValidate:
    def test_results_record_the_file_and_match_pytorch(self, ort_run, pytorch_run, exported, num_val_images):
        record, reference = ort_run["record"], pytorch_run["record"]
        assert record["backend"] == "onnxruntime" and reference["backend"] == "pytorch"
        assert record["onnx"] == str(exported["path"]) and record["onnx_calib_images"] == CALIB_IMAGES
        for key in ("model", "checkpoint", "num_classes", "method", "placement", "bits", "ptf", "lis", "arithmetic"):
            assert record[key] == reference[key], key
        assert record["calib_images"] == 0 and record["num_images"] == num_val_images == reference["num_images"]
        images_apart = abs(record["acc1"] - reference["acc1"]) * num_val_images / 100
        assert images_apart <= 2 + 1e-6, (record["acc1"], reference["acc1"])
        assert record["loss"] == pytest.approx(reference["loss"], rel=0.05)
        assert "itpn_tiny minmax seed 8/8/8 onnxruntime: acc1" in ort_run["stdout"]

    def test_tensorboard_hparams_name_the_backend(self, ort_run):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        from tensorboard.plugins.hparams import plugin_data_pb2

        (version,) = list((ort_run["out"] / "tb" / "itpn_tiny" / "minmax-seed-w8a8a8-onnx").iterdir())
        acc = EventAccumulator(str(version))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
        assert start.hparams["backend"].string_value == "onnxruntime"
        assert start.hparams["method"].string_value == "minmax"

    def test_onnx_module_agrees_with_the_calibrated_pytorch_model(self, exported, fmnist_root, tiny_checkpoint):
        """Per image: the same top-1 class on at least 95% of the images, logits close."""
        images = _val_images(fmnist_root)
        kwargs = dict(model_name="itpn_tiny", num_classes=10, checkpoint=str(tiny_checkpoint), method="minmax")
        torch_module = PTQModule(**kwargs).eval()
        assert CalibrationCallback(load_state=str(exported["state"])).prepare(torch_module)
        ort_module = PTQModule(**kwargs, onnx=str(exported["path"]))
        assert ort_module.model is None and not ort_module.quantized and ort_module.backend == "onnxruntime"
        with torch.no_grad():
            expected, got = torch_module(images), ort_module(images)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        same = (got.argmax(1) == expected.argmax(1)).float().mean().item()
        assert same >= 0.95
        assert (got - expected).abs().max() < 0.5

    def test_a_file_without_metadata_is_reported_from_the_config(self, exported, tmp_path):
        proto = onnx.load(str(exported["path"]))
        del proto.metadata_props[:]
        path = tmp_path / "bare.onnx"
        onnx.save(proto, str(path))
        module = PTQModule(model_name="itpn_tiny", num_classes=10, method="ema", onnx=str(path))
        summary = module.run_summary()
        assert summary["method"] == "ema" and summary["onnx"] == str(path) and summary["onnx_calib_images"] is None

    def test_a_file_of_another_model_is_refused(self, exported):
        with pytest.raises(ConfigError, match="exported from itpn_tiny but model.model_name=itpn_base"):
            PTQModule(model_name="itpn_base", img_size=32, num_classes=10, onnx=str(exported["path"]))

    def test_cuda_without_the_cuda_provider_is_refused(self, exported):
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            pytest.skip("this onnxruntime has the CUDA provider")
        with pytest.raises(ConfigError, match="no CUDAExecutionProvider"):
            create_session(str(exported["path"]), torch.device("cuda", 0))

    def test_read_onnx_file(self, exported):
        info = read_onnx_file(str(exported["path"]))
        assert (info.input_name, info.output_name) == ("input", "logits")
        assert info.image_size == (3, 32, 32) and info.output_shape[1] == 10
        assert isinstance(info.input_shape[0], str)  # the dynamic batch


def _classifier_file(path: Path, output_dims: list[Any]) -> Path:
    """A minimal ONNX file with a ``(batch, 3, 32, 32)`` input whose graph declares an output of ``output_dims``."""
    image = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 3, 32, 32])
    logits = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, output_dims)
    node = onnx.helper.make_node("Identity", ["input"], ["logits"])
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], "classifier", [image], [logits])), str(path))
    return path


class TestOutputShape:
    """A file is taken only when its output is ``(batch, model.num_classes)`` logits."""

    def test_batch_by_classes_is_accepted(self, tmp_path):
        path = _classifier_file(tmp_path / "ok.onnx", ["batch", 10])
        module = PTQModule(model_name="itpn_tiny", num_classes=10, onnx=str(path))
        info = module.inference_backend.info
        assert module.backend == "onnxruntime" and info.output_shape == ("batch", 10) and info.output_name == "logits"

    @pytest.mark.parametrize(
        "dims, message",
        [
            (["batch", 11], r"outputs 11 classes but model.num_classes=10"),
            (["batch"], r"is not an image classifier with one \(batch, channels, height, width\) input and \(batch, classes\) logits"),
            (["batch", 10, 1], r"is not an image classifier with one \(batch, channels, height, width\) input and \(batch, classes\) logits"),
            ([], r"is not an image classifier with one \(batch, channels, height, width\) input and \(batch, classes\) logits"),
        ],
    )  # fmt: skip
    def test_another_output_shape_is_refused(self, tmp_path, dims, message):
        path = _classifier_file(tmp_path / "bad.onnx", dims)
        with pytest.raises(ConfigError, match=rf"^model.onnx={path} {message}") as refused:
            PTQModule(model_name="itpn_tiny", num_classes=10, onnx=str(path))
        assert "\n" not in str(refused.value)


@pytest.fixture(scope="module")
def not_onnx(tmp_path_factory) -> Path:
    """A text file named like an ONNX file."""
    path = tmp_path_factory.mktemp("not_onnx") / "notes.onnx"
    path.write_text("this is a text file, not a model\n")
    return path


class TestErrors:
    """User errors end in one line on stderr, exit code 2, before any compute, and leave no file."""

    @staticmethod
    def _error(args: list[str], capsys) -> str:
        code = main_script.main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, err
        assert len(err) == 1 and "Traceback" not in err[0], err
        return err[0]

    @pytest.mark.parametrize(
        "output, message",
        [
            ("{tmp}/no/such/folder/model.onnx", "error: --output={tmp}/no/such/folder/model.onnx: the folder {tmp}/no/such/folder does not exist"),
            ("{tmp}/model.pt", "error: --output={tmp}/model.pt must end in .onnx"),
        ],
    )
    def test_bad_output(self, export_config, tmp_path, capsys, output, message):
        output = output.format(tmp=tmp_path)
        err = self._error(["export", "--config", str(export_config), "--output", output], capsys)
        assert err.startswith(message.format(tmp=tmp_path))
        assert list(tmp_path.iterdir()) == []

    def test_output_is_required(self, export_config, capsys):
        assert "export.output" in self._error(["export", "--config", str(export_config)], capsys)

    def test_log_int_softmax_is_refused_before_calibration_and_leaves_no_file(self, export_config, tmp_path, capsys):
        path = tmp_path / "lis.onnx"
        args = ["export", "--config", str(export_config), "--output", str(path), "--model.lis", "true",
                "--model.bits", "8/8/4", "--calibration.save_state", str(tmp_path / "lis.qstate")]  # fmt: skip
        err = self._error(args, capsys)
        assert "is a log-int-softmax (LIS)" in err and "--log_points float_ops" in err
        assert list(tmp_path.iterdir()) == []  # not even the state: refused before calibrating

    @pytest.mark.parametrize(
        "which, message",
        [
            ("missing", "error: model.onnx={path} does not exist"),
            ("text", "error: model.onnx={path} is not an ONNX model"),
            ("checkpoint", "error: model.onnx={path} is not an ONNX model"),
        ],
    )
    def test_bad_onnx_file(self, export_config, tiny_checkpoint, not_onnx, tmp_path, capsys, which, message):
        path = {"missing": tmp_path / "none.onnx", "text": not_onnx, "checkpoint": tiny_checkpoint}[which]
        args = ["validate", "--config", str(export_config), "--model.onnx", str(path),
                "--results_path", str(tmp_path / "r.json"), *NO_LOGGER]  # fmt: skip
        assert self._error(args, capsys).startswith(message.format(path=path))
        assert not (tmp_path / "r.json").exists()

    @pytest.mark.parametrize(
        "extra, message",
        [
            (["--model.img_size", "64"], "takes 3x32x32 images but the config gives 3x64x64"),
            (["--model.num_classes", "5"], "outputs 10 classes but model.num_classes=5"),
            (["--calibration.load_state", "x.qstate"], "calibration.load_state is set but model.onnx="),
        ],
    )
    def test_onnx_file_that_does_not_fit_the_config(self, export_config, exported, capsys, extra, message):
        args = ["validate", "--config", str(export_config), "--model.onnx", str(exported["path"]), *NO_LOGGER, *extra]
        assert message in self._error(args, capsys)

    def test_export_of_an_onnx_module_is_refused(self, export_config, exported, tmp_path, capsys):
        args = ["export", "--config", str(export_config), "--model.onnx", str(exported["path"]),
                "--output", str(tmp_path / "again.onnx")]  # fmt: skip
        assert "is for validate" in self._error(args, capsys)


def test_ddp_two_ranks_equal_one_process(export_config, exported, ort_run, tmp_path, main_subprocess):
    """Two CPU ranks, each with its own session: the same metrics as the one-process ONNX run."""
    out = tmp_path / "ddp"
    out.mkdir()
    args = ["validate", "--config", str(export_config), "--model.onnx", str(exported["path"]),
            "--results_path", str(out / "results.json"), "--trainer.strategy", "ddp", "--trainer.devices", "2",
            *NO_LOGGER]  # fmt: skip
    proc = main_subprocess(args, ddp=True)
    _, stderr = proc.stdout, proc.stderr
    assert proc.returncode == 0, stderr[-4000:]
    record, one = json.loads((out / "results.json").read_text()), ort_run["record"]
    assert record["world_size"] == 2 and record["backend"] == "onnxruntime"
    for key in ("acc1", "acc5", "loss", "num_images"):
        assert record[key] == one[key], key
