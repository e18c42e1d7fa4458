"""Specification of configs/: a model file and a method file compose into one run.

``configs/models/<model>.yaml`` holds the model, its checkpoint placeholder, the data and the
evaluation settings; ``configs/methods/<setting>.yaml`` the quantization settings and their
calibration set. ``python main.py validate --config MODEL --config METHOD`` combines them with
LightningCLI's repeated ``--config``. Every model x method pair is parsed here (jsonargparse only,
no model is built) and compared with what the two YAML files say, read with ``yaml`` alone; the
table below pins what each setting's name promises. The demo configs stand alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import main as main_script
from lit_ptq.cli import LitPTQCLI
from lit_ptq.models import list_models

REPO = Path(__file__).resolve().parents[1]
MODELS = sorted((REPO / "configs" / "models").glob("*.yaml"))
METHODS = sorted((REPO / "configs" / "methods").glob("*.yaml"))
DEMOS = sorted((REPO / "configs").glob("demo*.yaml"))

SETTINGS: dict[str, tuple[Any, ...]] = {
    # setting: method, placement, bits, ptf, lis, recipe, calibration images
    "fp32": (None, "full", "8/8/8", False, False, None, 1000),
    "minmax": ("minmax", "seed", "8/8/8", False, False, None, 1000),
    "ema": ("ema", "seed", "8/8/8", False, False, None, 1000),
    "percentile": ("percentile", "seed", "8/8/8", False, False, None, 1000),
    "omse": ("omse", "seed", "8/8/8", False, False, None, 1000),
    "full_minmax": ("minmax", "full", "8/8/8", False, False, None, 1000),
    "full_ema": ("ema", "full", "8/8/8", False, False, None, 1000),
    "full_percentile": ("percentile", "full", "8/8/8", False, False, None, 1000),
    "full_omse": ("omse", "full", "8/8/8", False, False, None, 1000),
    "full_ptf_minmax": ("minmax", "full", "8/8/8", True, False, None, 1000),
    "full_ptf_lis_minmax": ("minmax", "full", "8/8/4", True, True, None, 1000),
    "w6a6_repq": ("mse", "matmul", "6/6/6", False, False, "repq", 32),  # RepQ-ViT's 32 images
    "w4a4_repq_gptq": ("mse", "matmul", "4/4/4", False, False, "repq_gptq", 32),
    "w4a4_repq_gptq_oclip": ("mse", "matmul", "4/4/4", False, False, "repq_gptq_oclip", 32),  # its ablation partner
    "w4a4_recon": ("mse", "matmul", "4/4/4", False, False, "recon", 1024),  # BRECQ / QDrop's 1,024
    "w3a3_repq_gptq": ("mse", "matmul", "3/3/3", False, False, "repq_gptq", 32),
    "w3a3_recon": ("mse", "matmul", "3/3/3", False, False, "recon", 1024),
}
"""What each setting's name promises: FQ-ViT's and PTQ-for-iTPN's 10 batches of 100 images, the low-bit recipes'."""

MODEL_NAMES = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
    "itpn_base": "itpn_base",
    "itpn_large": "itpn_large",
}
"""The ImageNet-1k models with configs: file stem -> ``model_name``."""


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model.method": "omse", ...}``: every leaf of a nested mapping under its dotted key."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _load(path: Path) -> dict[str, Any]:
    return _leaves(yaml.safe_load(path.read_text()))


class _Built(Exception):
    """Carries the CLI's parser out of ``LitPTQCLI.__init__`` before anything is parsed."""

    def __init__(self, parser: Any) -> None:
        super().__init__("parser built")
        self.parser = parser


class _ParserOnly(LitPTQCLI):
    def parse_arguments(self, parser: Any, args: Any) -> None:
        raise _Built(parser)


@pytest.fixture(scope="module")
def parse():
    """``(*configs) -> dict``: the ``validate`` config of ``--config`` files, as the CLI's parser resolves it."""
    with pytest.raises(_Built) as built:
        _ParserOnly(args=[])
    parser = built.value.parser

    def run(*configs: Path) -> dict[str, Any]:
        args = ["validate"]
        for config in configs:
            args += ["--config", str(config)]
        resolved = parser.parse_args(args)["validate"].as_dict()
        resolved.pop("config")  # the files' paths
        return _leaves(resolved)

    return run


def test_the_files_are_the_models_and_settings_listed():
    assert {p.stem for p in MODELS} == set(MODEL_NAMES)
    assert {p.stem for p in METHODS} == set(SETTINGS)
    demos = ["demo.yaml", "demo_fp32.yaml", "demo_w3a3.yaml", "demo_w3a3_recon.yaml", "demo_w4a4.yaml",
             "demo_w4a4_recon.yaml", "demo_w6a6.yaml"]  # fmt: skip
    assert [p.name for p in DEMOS] == demos
    assert sorted(p.name for p in (REPO / "configs").iterdir()) == sorted(["methods", "models", *demos])


@pytest.mark.parametrize("model", MODELS, ids=[p.stem for p in MODELS])
def test_a_model_file_holds_the_model_data_and_evaluation(model):
    leaves = _load(model)
    name = MODEL_NAMES[model.stem]
    assert name in list_models()
    assert leaves == {
        "seed_everything": 0,
        "model.model_name": name,
        "model.checkpoint": f"/path/to/{name}.pth",
        "model.num_classes": 1000,
        "data.root": "/path/to/imagenet",
        "data.batch_size": 100,
        "data.num_workers": 8,
        "data.pin_memory": True,
        "data.seed": 0,
        "trainer.accelerator": "auto",
        "trainer.devices": 1,
        "trainer.precision": "32-true",
    }


@pytest.mark.parametrize("method", METHODS, ids=[p.stem for p in METHODS])
def test_a_method_file_holds_the_quantization_its_name_says(method):
    leaves = _load(method)
    name, placement, bits, ptf, lis, recipe, images = SETTINGS[method.stem]
    expected = {
        "model.method": name, "model.placement": placement, "model.bits": bits, "model.ptf": ptf, "model.lis": lis,
        "model.arithmetic": "seed",
    }  # fmt: skip
    if recipe is not None:
        expected["model.recipe"] = recipe
    calibration = {key: leaves.pop(key) for key in ("data.calib_batch_size", "data.calib_batches")}
    assert leaves == expected
    assert calibration["data.calib_batch_size"] * calibration["data.calib_batches"] == images
    if images != 1000:
        assert calibration["data.calib_batch_size"] == 32


def test_model_and_method_files_set_disjoint_keys():
    """So the order of the two ``--config`` files does not matter."""
    model_keys = set().union(*(_load(p) for p in MODELS))
    method_keys = set().union(*(_load(p) for p in METHODS))
    assert model_keys and method_keys and not model_keys & method_keys


@pytest.mark.parametrize("model", MODELS, ids=[p.stem for p in MODELS])
@pytest.mark.parametrize("method", METHODS, ids=[p.stem for p in METHODS])
def test_every_pair_resolves_to_what_its_two_files_say(parse, model, method):
    resolved = parse(model, method)
    written = {**_load(model), **_load(method)}
    assert {key: resolved[key] for key in written} == written
    assert resolved["data.model_name"] == resolved["model.model_name"]  # linked by the CLI
    assert resolved["trainer.logger.class_path"] == "pytorch_lightning.loggers.TensorBoardLogger"
    assert resolved["trainer.logger.init_args.save_dir"] == "tb_logs"
    assert resolved["trainer.logger.init_args.default_hp_metric"] is False
    assert resolved["model.overrides"] is None and resolved["model.onnx"] is None


def test_the_order_of_the_two_files_does_not_matter(parse):
    model, method = REPO / "configs/models/swin_small.yaml", REPO / "configs/methods/w4a4_recon.yaml"
    assert parse(model, method) == parse(method, model)


def test_print_config_of_a_pair_through_main(capsys):
    """The README's command, end to end through ``main.main`` (stops after printing)."""
    args = [
        "validate",
        "--config", "configs/models/itpn_base.yaml",
        "--config", "configs/methods/omse.yaml",
        "--data.root", "/data/imagenet",
        "--print_config",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main_script.main(args)
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    model, data = printed["model"], printed["data"]
    assert (model["model_name"], model["method"], model["placement"]) == ("itpn_base", "omse", "seed")
    assert model["bits"] == "8/8/8" and model["recipe"] is None
    assert (data["root"], data["calib_batches"], data["calib_batch_size"]) == ("/data/imagenet", 10, 100)
    assert model["checkpoint"] == "/path/to/itpn_base.pth" and printed["seed_everything"] == 0


@pytest.mark.parametrize("demo", DEMOS, ids=[p.stem for p in DEMOS])
def test_a_demo_config_stands_alone(parse, demo):
    resolved = parse(demo)
    written = _load(demo)
    assert {key: resolved[key] for key in written} == written
    assert resolved["model.model_name"] == "itpn_tiny"


DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("document", DOCUMENTS, ids=[p.name for p in DOCUMENTS])
def test_every_config_a_document_names_exists(document):
    named = set(re.findall(r"configs/[\w/]+\.yaml", document.read_text()))
    assert all((REPO / path).is_file() for path in named), sorted(p for p in named if not (REPO / p).is_file())


def test_the_readme_lists_every_model_and_setting():
    readme = (REPO / "README.md").read_text()
    for path in MODELS + METHODS:
        assert f"`{path.stem}`" in readme, path.stem
