"""Specification of ``main.py predict`` and ``main.py test``, and of ``fit`` not being offered.

The runs use ``itpn_tiny`` on the small tree of real Fashion-MNIST images of conftest.py
(120 train, 59 val images), calibrated on 2 batches of 16 images as in tests/test_cli.py.
``test/`` is a copy of ``val/``; the predict folders are copies of val images, flat and nested.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

import main as main_script

REPO = Path(__file__).resolve().parents[1]
CALIB_BATCH_SIZE = 16
CALIB_BATCHES = 2
QUIET = ("--trainer.logger", "false")


@pytest.fixture(scope="module")
def pt_root(tmp_path_factory, fmnist_root) -> Path:
    """``fmnist_root`` plus a ``test/`` split (a copy of ``val/``)."""
    root = tmp_path_factory.mktemp("pt_root")
    for split in ("train", "val"):
        shutil.copytree(fmnist_root / split, root / split)
    shutil.copytree(fmnist_root / "val", root / "test")
    return root


@pytest.fixture(scope="module")
def pt_config(tmp_path_factory, pt_root, tiny_checkpoint, make_tiny_config) -> Path:
    """A config shaped like configs/demo.yaml (minmax, seed placement, 8/8/8) for itpn_tiny on ``pt_root``."""
    config = make_tiny_config(pt_root, tiny_checkpoint, CALIB_BATCH_SIZE, CALIB_BATCHES)
    path = tmp_path_factory.mktemp("pt_config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def nested_folder(tmp_path_factory, pt_root) -> dict[str, Any]:
    """A predict folder: 4 images at the top, 5 two folders down, plus a text file and a hidden image (ignored)."""
    folder = tmp_path_factory.mktemp("nested")
    val = sorted((pt_root / "val").rglob("*.png"))
    (folder / "x" / "y").mkdir(parents=True)
    sources = {}
    for i, src in enumerate(val[:9]):
        dst = folder / (f"top_{i}.png" if i < 4 else f"x/y/deep_{i}.png")
        shutil.copyfile(src, dst)
        sources[str(dst)] = str(src)
    (folder / "notes.txt").write_text("not an image")
    shutil.copyfile(val[0], folder / ".hidden.png")
    return dict(folder=folder, images=sorted(sources), sources=sources)


def _main(args: list[str]) -> tuple[int, str]:
    """``main.main(args)`` in this process: its exit code and stdout."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main_script.main(args)
    return code, stdout.getvalue()


def _predict(config: Path, folder: Path, output: Path, *extra: str) -> str:
    code, stdout = _main(["predict", "--config", str(config), "--data.predict_root", str(folder),
                          "--output", str(output), *extra])  # fmt: skip
    assert code == 0
    return stdout


def _read(path: Path) -> list[dict[str, Any]]:
    """The rows of a predictions file as ``{"path", "classes", "probs"}``, CSV or JSON Lines."""
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    k = sum(1 for key in rows[0] if key.startswith("class_"))
    return [
        dict(path=r["path"], classes=[r[f"class_{i}"] for i in range(1, k + 1)],
             probs=[float(r[f"prob_{i}"]) for i in range(1, k + 1)])
        for r in rows
    ]  # fmt: skip


def _top1_hits(rows: list[dict[str, Any]]) -> int:
    """Rows whose first class is the image's class folder."""
    return sum(Path(r["path"]).parent.name == r["classes"][0] for r in rows)


@pytest.fixture(scope="module")
def validate_run(pt_config, tmp_path_factory) -> dict[str, Any]:
    """``main.py validate`` of the config, saving its quantizer state."""
    out = tmp_path_factory.mktemp("validate")
    code, _ = _main(["validate", "--config", str(pt_config), "--results_path", str(out / "results.json"),
                     "--calibration.save_state", str(out / "state.qstate"), *QUIET])  # fmt: skip
    assert code == 0
    return dict(record=json.loads((out / "results.json").read_text()), state=out / "state.qstate")


@pytest.fixture(scope="module")
def val_predictions(pt_config, pt_root, tmp_path_factory) -> dict[str, Any]:
    """``main.py predict`` on ``val/`` itself, as CSV."""
    out = tmp_path_factory.mktemp("predict_val") / "preds.csv"
    stdout = _predict(pt_config, pt_root / "val", out)
    return dict(path=out, rows=_read(out), stdout=stdout)


class TestPredict:
    def test_csv_has_one_row_per_image_in_sorted_order(self, val_predictions, pt_root, num_val_images):
        rows = val_predictions["rows"]
        paths = sorted(str(p) for p in (pt_root / "val").rglob("*.png"))
        assert [r["path"] for r in rows] == paths and len(rows) == num_val_images
        header = val_predictions["path"].read_text().splitlines()[0]
        assert header == "path," + ",".join(f"class_{i},prob_{i}" for i in range(1, 6))
        classes = sorted(p.name for p in (pt_root / "train").iterdir())
        for r in rows:
            assert len(r["classes"]) == 5 == len(set(r["classes"])) and set(r["classes"]) <= set(classes)
            assert r["probs"] == sorted(r["probs"], reverse=True) and 0 < sum(r["probs"]) <= 1 + 1e-5
        line = val_predictions["stdout"].strip().splitlines()[-1]
        assert line.startswith("itpn_tiny minmax seed 8/8/8: top-5 classes of 59 images written to ")

    def test_top1_equals_validate_on_the_same_images(self, val_predictions, validate_run, num_val_images):
        record = validate_run["record"]
        assert record["num_images"] == num_val_images
        assert _top1_hits(val_predictions["rows"]) == round(record["acc1"] * num_val_images / 100)

    def test_jsonl_of_a_nested_folder(self, pt_config, nested_folder, val_predictions, tmp_path):
        out = tmp_path / "nested.jsonl"
        _predict(pt_config, nested_folder["folder"], out)
        rows = _read(out)
        assert [r["path"] for r in rows] == nested_folder["images"]  # no notes.txt, no .hidden.png
        assert set(rows[0]) == {"path", "classes", "probs"}
        by_path = {r["path"]: r for r in val_predictions["rows"]}
        for row in rows:  # an image's prediction depends neither on its folder nor on the other images
            source = by_path[nested_folder["sources"][row["path"]]]
            assert (row["classes"], row["probs"]) == (source["classes"], source["probs"])
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]

    def test_float_model_with_class_names_from_a_file(self, pt_config, nested_folder, tmp_path):
        """No calibration and no train/: the classes are named by --data.class_names."""
        names = [f"class {i}" for i in range(10)]
        (tmp_path / "names.txt").write_text("\n".join(names) + "\n\n")
        root = tmp_path / "no_train"
        root.mkdir()
        out = tmp_path / "fp32.csv"
        stdout = _predict(pt_config, nested_folder["folder"], out, "--model.method", "null", "--data.root", str(root),
                          "--data.class_names", str(tmp_path / "names.txt"))  # fmt: skip
        rows = _read(out)
        assert len(rows) == len(nested_folder["images"]) and all(set(r["classes"]) <= set(names) for r in rows)
        assert "itpn_tiny fp32  32/32/32: top-5 classes of 9 images" in stdout

    def test_load_state_gives_the_same_file(self, pt_config, pt_root, val_predictions, validate_run, tmp_path):
        out = tmp_path / "loaded.csv"
        _predict(pt_config, pt_root / "val", out, "--calibration.load_state", str(validate_run["state"]))
        assert out.read_text() == val_predictions["path"].read_text()


class TestPredictErrors:
    """User errors end in one line on stderr, exit code 2, and leave no predictions file."""

    @staticmethod
    def _error(args: list[str], capsys) -> str:
        code = main_script.main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, err
        assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
        return err[0]

    @pytest.mark.parametrize(
        "case, message",
        [
            ("missing_folder", "data.predict_root={folder} does not exist or is not a folder"),
            ("no_images", "data.predict_root={folder} holds no images"),
            ("no_predict_root", "predict needs data.predict_root"),
            ("no_output", "predict needs --output"),
            ("extension", "--output={out} must end in .csv or .jsonl"),
            ("output_folder", "--output={out}: the folder {tmp}/missing does not exist"),
            ("class_names", "data.class_names={tmp}/names.txt lists 3 class names but data.num_classes=10"),
            ("no_train", "{tmp}/train is missing, and predictions name their classes after its class folders"),
        ],
    )
    def test_bad_options(self, pt_config, nested_folder, tmp_path, capsys, case, message):
        folder, out = nested_folder["folder"], tmp_path / "preds.csv"
        extra: list[str] = []
        if case == "missing_folder":
            folder = tmp_path / "nowhere"
        elif case == "no_images":
            folder = tmp_path / "empty"
            (folder / "sub").mkdir(parents=True)
            (folder / "sub" / "readme.txt").write_text("no images here")
        elif case == "extension":
            out = tmp_path / "preds.txt"
        elif case == "output_folder":
            out = tmp_path / "missing" / "preds.csv"
        elif case == "class_names":
            (tmp_path / "names.txt").write_text("a\nb\nc\n")
            extra = ["--data.class_names", str(tmp_path / "names.txt")]
        elif case == "no_train":
            extra = ["--model.method", "null", "--data.root", str(tmp_path)]
        args = ["predict", "--config", str(pt_config), *extra]
        if case != "no_predict_root":
            args += ["--data.predict_root", str(folder)]
        if case != "no_output":
            args += ["--output", str(out)]
        err = self._error(args, capsys)
        assert message.format(folder=folder, out=out, tmp=tmp_path) in err
        assert not out.exists()

    def test_unreadable_image_is_named_or_skipped(self, pt_config, nested_folder, tmp_path, capsys):
        folder = tmp_path / "folder"
        shutil.copytree(nested_folder["folder"], folder)
        victim = folder / "x" / "y" / sorted(os.listdir(folder / "x" / "y"))[0]
        victim.write_bytes(victim.read_bytes()[:60])
        out = tmp_path / "preds.jsonl"
        args = ["predict", "--config", str(pt_config), "--data.predict_root", str(folder), "--output", str(out)]
        err = self._error(args, capsys)
        assert str(victim) in err and "data.skip_unreadable=true" in err
        assert not out.exists()
        code, stdout = _main([*args, "--data.skip_unreadable", "true"])
        assert code == 0 and "skipped 1 unreadable image" in stdout
        rows = _read(out)
        assert len(rows) == len(nested_folder["images"]) - 1 and str(victim) not in {r["path"] for r in rows}


@pytest.mark.skipif(not all(map(__import__("importlib").util.find_spec, ("onnx", "onnxruntime", "onnxscript"))),
                    reason="needs onnx, onnxruntime and onnxscript")  # fmt: skip
def test_predict_with_an_exported_onnx_file(pt_config, pt_root, val_predictions, tmp_path):
    """``main.py export`` then ``predict --model.onnx``: one row per image, top-1 as PyTorch's on all but 2."""
    path = tmp_path / "model.onnx"
    code, _ = _main(["export", "--config", str(pt_config), "--output", str(path)])
    assert code == 0
    out = tmp_path / "ort.jsonl"
    stdout = _predict(pt_config, pt_root / "val", out, "--model.onnx", str(path))
    assert "itpn_tiny minmax seed 8/8/8 onnxruntime: top-5 classes of 59 images" in stdout
    rows, reference = _read(out), val_predictions["rows"]
    assert [r["path"] for r in rows] == [r["path"] for r in reference]
    differ = sum(a["classes"][0] != b["classes"][0] for a, b in zip(rows, reference))
    assert differ <= 2, differ


class TestTest:
    def test_writes_the_results_json_of_the_test_split(self, pt_config, validate_run, tmp_path, num_val_images):
        out = tmp_path / "results.json"
        code, stdout = _main(["test", "--config", str(pt_config), "--results_path", str(out),
                              "--trainer.logger.init_args.save_dir", str(tmp_path / "tb")])  # fmt: skip
        assert code == 0
        record, reference = json.loads(out.read_text()), validate_run["record"]
        assert record["split"] == "test" and reference["split"] == "val"
        assert record["num_images"] == num_val_images  # test/ is a copy of val/
        for key in ("acc1", "acc5", "loss", "calib_images", "method", "bits"):
            assert record[key] == reference[key], key
        assert f"itpn_tiny minmax seed 8/8/8: test acc1 {record['acc1']:.2f}" in stdout
        assert len(list((tmp_path / "tb").rglob("events.out.tfevents.*"))) >= 1

    def test_without_a_test_split_is_one_line(self, pt_config, pt_root, tmp_path, capsys):
        root = tmp_path / "root"
        root.mkdir()
        (root / "train").symlink_to(pt_root / "train")
        (root / "val").symlink_to(pt_root / "val")
        code = main_script.main(["test", "--config", str(pt_config), "--data.root", str(root), *QUIET])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
        assert err[0].startswith(f"error: data.root={root} has no test/ folder") and "validate" in err[0]


class TestSubcommands:
    def test_help_lists_what_works_and_no_fit(self, capsys):
        with pytest.raises(SystemExit) as exit_info:
            main_script.main(["--help"])
        assert exit_info.value.code in (0, None)
        out = capsys.readouterr().out
        assert "{validate,test,predict,export}" in out and "fit" not in out.split("subcommands:")[-1]

    @pytest.mark.parametrize("prefix", [[], ["--config", "x.yaml"]])
    def test_fit_is_refused_in_one_line(self, pt_config, capsys, prefix):
        code = main_script.main([*prefix, "fit", "--config", str(pt_config)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith("error: fit is not a subcommand of lit_ptq: it does not train")
        assert "main.py validate" in err[0] and "main.py export" in err[0]


@pytest.mark.parametrize("images", [pytest.param(59, marks=pytest.mark.slow), 1])
def test_ddp_two_ranks_write_every_image_once(pt_config, pt_root, val_predictions, tmp_path, images, main_subprocess):
    """Two CPU ranks: 59 images (30 + 29) give the one-process file, byte for byte; so does 1
    image, which leaves rank 1 without one of its own (it predicts image 0 again, dropped)."""
    folder = pt_root / "val"
    if images == 1:
        folder = tmp_path / "one"
        folder.mkdir()
        first = Path(val_predictions["rows"][0]["path"])
        shutil.copyfile(first, folder / first.name)
    out = tmp_path / "ddp.csv"
    args = ["predict", "--config", str(pt_config), "--data.predict_root", str(folder), "--output", str(out),
            "--trainer.strategy", "ddp", "--trainer.devices", "2"]  # fmt: skip
    proc = main_subprocess(args, ddp=True)
    stdout, stderr = proc.stdout, proc.stderr
    assert proc.returncode == 0, stderr[-4000:]
    assert "Traceback" not in stderr
    assert stdout.count("written to") == 1 and f"top-5 classes of {images} images" in stdout  # rank 0 alone writes
    expected = val_predictions["path"].read_text().splitlines()[: images + 1]
    if images == 1:
        expected[1] = expected[1].replace(str(pt_root / "val" / Path(expected[1].split(",")[0]).parent.name), str(folder))
    assert out.read_text().splitlines() == expected


@pytest.mark.parametrize("size, fill, expected", [(5, False, [[0, 2, 4], [1, 3]]), (1, False, [[0], []]), (1, True, [[0], [0]])])
def test_unpadded_sampler_fills_an_empty_rank_only_when_asked(size, fill, expected):
    from lit_ptq.data import UnpaddedDistributedSampler

    samplers = [UnpaddedDistributedSampler(range(size), num_replicas=2, rank=r, fill_empty=fill) for r in (0, 1)]
    assert [list(s) for s in samplers] == expected and [len(s) for s in samplers] == [len(e) for e in expected]
