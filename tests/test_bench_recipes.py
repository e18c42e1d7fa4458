"""benchmarks/bench_recipes.py: the demo table's layout and the per-block timing run (no timing is asserted)."""

from __future__ import annotations

import json

from benchmarks import bench_recipes


def record(method: str, bits: str, recipe: str | None, acc1: float, seconds: float, variant: str = "") -> dict:
    return dict(method=method, bits=bits, recipe=recipe, acc1=acc1, calibration_seconds=seconds, num_images=10000, variant=variant)


def test_demo_markdown_has_a_row_per_recipe_and_two_figures_per_width() -> None:
    records = [
        record("fp32", "32/32/32", None, 90.07, 0.0),
        record("mse", "6/6/6", "repq", 90.13, 4.6),
        record("mse", "4/4/4", "repq", 89.05, 4.1),
        record("minmax", "4/4/4", None, 87.41, 0.6),
        record("mse", "3/3/3", "repq", 80.5, 3.9, variant="gelu=adalog"),
    ]
    table = bench_recipes.demo_markdown(records)
    assert "Float (fp32) top-1: **90.07** on 10,000 images." in table
    assert ("| method | recipe | with | 6/6/6 top-1 | 6/6/6 calib (s) | 4/4/4 top-1 | 4/4/4 calib (s) "
            "| 3/3/3 top-1 | 3/3/3 calib (s) |") in table
    assert "| mse | repq | – | 90.13 | 5 | 89.05 | 4 | – | – |" in table
    assert "| minmax | none | – | – | – | 87.41 | 1 | – | – |" in table
    assert "| mse | repq | gelu=adalog | – | – | – | – | 80.50 | 4 |" in table


def test_demo_cells_are_the_float_run_then_each_row_at_each_width() -> None:
    cells = bench_recipes.demo_cells(["none", "repq_gptq"], ["4/4/4", "3/3/3"])
    assert cells[0].method is None
    labels = [c.label for c in cells[1:]]
    assert labels[:6] == [
        "minmax matmul 4/4/4", "mse matmul 4/4/4", "mse matmul repq_gptq 4/4/4",
        "mse matmul repq_gptq softmax=adalog 4/4/4", "mse matmul repq_gptq softmax=twin_uniform 4/4/4",
        "mse matmul repq_gptq gelu=adalog 4/4/4",
    ]  # fmt: skip
    assert len(labels) == 2 * 7 and labels[7] == "minmax matmul 3/3/3"
    plain = bench_recipes.demo_cells(["repq_gptq"], ["4/4/4"], variants=False)
    assert [c.label for c in plain[1:]] == ["mse matmul repq_gptq 4/4/4"]


def test_blocks_times_every_step_of_every_block(tmp_path, capsys) -> None:
    out = tmp_path / "blocks.json"
    bench_recipes.main(["blocks", "--model", "itpn_tiny", "--images", "4", "--batch-size", "2", "--blocks", "3",
                        "--recon-iters", "1", "--json", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert list(result["gptq_s_per_block"]) == list(result["recon_s_per_step"]) == ["patch_embed", "blocks.0", "blocks.1"]
    assert all(v >= 0 for v in result["recon_s_per_step"].values())
    assert "| blocks.1 |" in capsys.readouterr().out
