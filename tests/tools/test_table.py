"""Specification of lit_ptq/tools/table.py: the grid, the table layout, and runs equal to main.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lit_ptq.cli import cli_main
from lit_ptq.errors import ConfigError
from lit_ptq.tools.table import BITS, Cell, grid, main, markdown_table

METRICS = ("acc1", "acc5", "loss", "num_images", "calib_images")


def test_full_grid_runs_each_distinct_setting_once() -> None:
    cells = grid()
    assert cells[0] == Cell()  # the float baseline first
    quantized = cells[1:]
    # 4 methods x (seed, full without PTF, full with PTF) x 4 bit settings
    assert len(quantized) == 4 * 3 * len(BITS) == 48
    assert len(set(quantized)) == len(quantized)
    assert not [c for c in quantized if c.ptf and c.placement == "seed"]
    assert {(c.bits, c.lis) for c in quantized} == set(BITS)
    assert {c.column for c in quantized} == {"8/8/8", "6/6/6", "4/4/4", "8/8/4 LIS"}
    only_ptf = grid(methods=["ema"], bits=[("8/8/8", False)], ptf=[True])
    assert only_ptf[1:] == [Cell("ema", "seed", "8/8/8", ptf=False), Cell("ema", "full", "8/8/8", ptf=True)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(methods=["kl"]), "method 'kl' is not one of"),
        (dict(placements=["everywhere"]), "placement 'everywhere' is not one of"),
        (dict(bits=[("8/8", False)]), "must be three integers"),
    ],
)
def test_grid_rejects_unknown_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        grid(**kwargs)


def _record(method: str, placement: str | None, bits: str, acc1: float, ptf: bool = False, lis: bool = False) -> dict:
    record = dict(method=method, placement=placement, bits=bits, acc1=acc1, num_images=10000)
    if method != "fp32":
        record.update(ptf=ptf, lis=lis)
    return record


def test_markdown_layout() -> None:
    records = [
        _record("fp32", None, "32/32/32", 90.0),
        _record("minmax", "seed", "8/8/8", 89.9),
        _record("minmax", "seed", "8/8/4", 88.25, lis=True),
        _record("minmax", "full", "8/8/8", 89.5),
        _record("minmax", "full", "8/8/8", 89.75, ptf=True),
        _record("minmax", "full", "8/8/4", 80.0, ptf=True, lis=True),
    ]
    lines = markdown_table(records).splitlines()
    assert lines[0] == "Float (fp32) top-1: **90.00** on 10,000 images."
    assert lines[2:7] == [
        "| method | PTF | placement | 8/8/8 | 8/8/4 LIS |",
        "|---|---|---|---|---|",
        "| minmax | n/a | seed | 89.90 | 88.25 |",
        "| minmax | no | full | 89.50 | – |",
        "| minmax | yes | full | 89.75 | 80.00 |",
    ]
    assert "one run stands for PTF on and off" in markdown_table(records)


@pytest.fixture
def config(fmnist_root: Path, tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A main.py config on the small Fashion-MNIST tree: 59 val images, 2 x 20 calibration images."""
    cfg = dict(
        seed_everything=0,
        model=dict(model_name="itpn_tiny", num_classes=10, checkpoint=str(tiny_checkpoint), method="minmax"),
        data=dict(root=str(fmnist_root), batch_size=25, num_workers=0, calib_batch_size=20, calib_batches=2),
        trainer=dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False),
    )
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_small_grid_writes_json_and_markdown_equal_to_main(config: Path, tmp_path: Path, num_val_images: int) -> None:
    out, md = tmp_path / "table.json", tmp_path / "table.md"
    argv = ["--config", str(config), "--methods", "minmax", "--placements", "full", "--bits", "4/4/4+lis",
            "--ptf", "on"]  # fmt: skip
    assert main([*argv, "--out", str(out), "--markdown", str(md)]) == 0

    records = json.loads(out.read_text())
    assert [(r["method"], r["placement"], r["bits"], r.get("ptf"), r.get("lis")) for r in records] == [
        ("fp32", None, "32/32/32", None, None),
        ("minmax", "full", "4/4/4", True, True),
    ]
    assert all(r["num_images"] == num_val_images for r in records)
    assert [r["calib_images"] for r in records] == [0, 40]
    assert md.read_text().splitlines()[2:5] == [
        "| method | PTF | placement | 4/4/4 LIS |",
        "|---|---|---|---|",
        f"| minmax | yes | full | {records[1]['acc1']:.2f} |",
    ]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"

    # The same cell through main.py gives the same record.
    path = tmp_path / "main.json"
    cli_main(["validate", "--config", str(config), "--model.placement", "full", "--model.ptf", "true",
              "--model.bits", "4/4/4", "--model.lis", "true", "--results_path", str(path)])  # fmt: skip
    expected = json.loads(path.read_text())
    assert set(records[1]) == set(expected)
    assert {k: records[1][k] for k in METRICS} == {k: expected[k] for k in METRICS}


def test_bad_config_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err


def test_a_cells_options_reach_the_module(monkeypatch) -> None:
    from lit_ptq.tools import table

    seen = {}

    class Stop(Exception):
        pass

    def module(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(table, "PTQModule", module)
    setup = table.GridSetup(model=dict(model_name="itpn_tiny"), datamodule=None, seed=0, accelerator="cpu")
    cell = Cell("mse", "matmul", "4/4/4", recipe="repq_gptq", options=(("gelu", "adalog"), ("softmax", "twin_uniform")))
    with pytest.raises(Stop):
        table.run_cell(setup, cell)
    assert seen == dict(model_name="itpn_tiny", method="mse", placement="matmul", bits="4/4/4", ptf=False, lis=False,
                        recipe="repq_gptq", gelu="adalog", softmax="twin_uniform")  # fmt: skip
    assert cell.label == "mse matmul repq_gptq gelu=adalog softmax=twin_uniform 4/4/4"
