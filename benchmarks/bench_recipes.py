"""Accuracy and calibration time of the low-bit recipes on the embedded demo, and their cost
per block on a large model.

Two measurements, each printed as a table (nothing is asserted)::

    python benchmarks/bench_recipes.py demo --config configs/demo.yaml --json results/demo_lowbit.json --markdown results/demo_lowbit.md
    python benchmarks/bench_recipes.py blocks --model itpn_base --images 8

``demo``: every recipe (and the ``matmul`` placement without one, MinMax and MSE), then each
further piece on its own (the AdaLog and twin-uniform softmax and post-GELU quantizers, the
output-error weight ranges: an ablation), at W6A6, W4A4 and W3A3 (``--bits``), each a full
``Trainer.validate`` run through the product path (``PTQModule``, ``CalibrationCallback``),
with the top-1 and the calibration time the callback measured. ``--append`` adds runs to an
existing ``--json`` file (a table measured in parts).

``blocks``: on a model with random trained-like weights and random images, the time of each
recipe step: the RepQ-ViT reparameterization, weight and activation calibration (whole
model), then per block the ridge + GPTQ correction and block reconstruction with
``--recon-iters`` steps (reported per step; a run's cost at another step count follows,
plus the capture of each block's inputs and targets, which the per-step figure includes
spread over the timed steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lit_ptq.io import write_text  # noqa: E402
from lit_ptq.run import quiet_lightning  # noqa: E402
from lit_ptq.tools.table import Cell, load_setup, run_cell  # noqa: E402

log = logging.getLogger("bench_recipes")

DEMO_ROWS: tuple[tuple[str, Optional[str], tuple[tuple[str, Any], ...]], ...] = (
    ("minmax", None, ()),
    ("mse", None, ()),
    ("mse", "repq", ()),
    ("mse", "repq_gptq", ()),
    ("mse", "recon", ()),
    ("mse", "repq_gptq", (("softmax", "adalog"),)),
    ("mse", "repq_gptq", (("softmax", "twin_uniform"),)),
    ("mse", "repq_gptq", (("gelu", "adalog"),)),
    ("mse", "repq_gptq", (("gelu", "twin_uniform"),)),
    ("mse", "repq_oclip", ()),
    ("mse", "repq_gptq_oclip", ()),
)
"""The demo table's rows: the placement alone, each recipe, then each further piece on its own
(an ablation: the post-softmax and post-GELU quantizers, the output-error weight ranges)."""

DEMO_BITS = ("6/6/6", "4/4/4", "3/3/3")
"""The demo table's columns."""


def demo_cells(recipes: Sequence[str], bits: Sequence[str] = DEMO_BITS, variants: bool = True) -> list[Cell]:
    """The float baseline, then each row whose recipe (``none``: without) is in ``recipes``, at each width.

    ``variants=False`` keeps the rows without further keywords only.
    """
    rows = [r for r in DEMO_ROWS if (r[1] or "none") in recipes and (variants or not r[2])]
    return [Cell()] + [Cell(method, "matmul", b, recipe=recipe, options=options) for b in bits for method, recipe, options in rows]


def demo_markdown(records: list[dict[str, Any]]) -> str:
    """Rows: method, recipe and further keywords (``variant``); columns: each width's top-1 and
    calibration seconds."""
    float_runs = [r for r in records if r["method"] == "fp32"]
    runs = [r for r in records if r["method"] != "fp32"]
    columns = list(dict.fromkeys(r["bits"] for r in runs))
    rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in runs:
        rows.setdefault((r["method"], r.get("recipe") or "none", r.get("variant") or ""), {})[r["bits"]] = r
    lines = [f"Float (fp32) top-1: **{r['acc1']:.2f}** on {r['num_images']:,} images." for r in float_runs]
    lines += ["", "| method | recipe | with | " + " | ".join(f"{c} top-1 | {c} calib (s)" for c in columns) + " |"]
    lines.append("|---|---|---|" + "---|---|" * len(columns))
    for (method, recipe, variant), cells in rows.items():
        values = " | ".join(
            f"{cells[c]['acc1']:.2f} | {cells[c]['calibration_seconds']:.0f}" if c in cells else "– | –" for c in columns
        )
        lines.append(f"| {method} | {recipe} | {variant or '–'} | {values} |")
    return "\n".join(lines) + "\n"


def run_demo(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the demo grid and print / write its table."""
    setup = load_setup(args.config)
    cells = demo_cells(args.recipes, args.bits, args.variants)
    records = []
    if args.append and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            records = json.load(f)
        cells = cells[1:] if any(r["method"] == "fp32" for r in records) else cells
    for i, cell in enumerate(cells, 1):
        record = {**run_cell(setup, cell), "variant": cell.variant}
        records.append(record)
        print(f"[{i}/{len(cells)}] {cell.label}: top-1 {record['acc1']:.2f}, calibration {record.get('calibration_seconds', 0):.1f} s", flush=True)
        _write(args.json, json.dumps(records, indent=2))
    table = demo_markdown(records)
    print(table)
    _write(args.markdown, table)
    return records


def _timed(fn: Any, *args: Any, **kwargs: Any) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def run_blocks(args: argparse.Namespace) -> dict[str, Any]:
    """Time each recipe step on ``args.model`` (random weights and images), per block."""
    from lit_ptq.models import create_model
    from lit_ptq.quant import STEPS, CalibrationContext, QuantConfig, family_of, quantize_, set_quant_mode
    from lit_ptq.quant.config import ReconSettings
    from lit_ptq.quant.transforms import correct_weights_, reconstruct_

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = create_model(args.model).eval().to(device)
    size = model.patch_embed.img_size[0] if hasattr(model, "patch_embed") else 224
    batches = [torch.randn(args.batch_size, 3, size, size, device=device) for _ in range(args.images // args.batch_size)]
    quantize_(model, QuantConfig("mse", "matmul", args.bits, recipe="repq_gptq"))
    family = family_of(model)
    ctx = CalibrationContext(model.quant_config, family, device)
    result: dict[str, Any] = dict(model=args.model, images=args.images, bits=args.bits, device=str(device))
    with torch.no_grad():
        result["float_forward_s"] = _timed(lambda: [model(x) for x in batches])
        result["reparameterize_s"] = _timed(STEPS["reparameterize"].fn, model, batches, ctx)
        set_quant_mode(model, "float")
        result["weights_s"] = _timed(STEPS["calibrate_weights"].fn, model, batches, ctx)
        result["activations_s"] = _timed(STEPS["calibrate_activations_sequential"].fn, model, batches, ctx)
        blocks = family.blocks(model)[: args.blocks] if args.blocks else family.blocks(model)
        calibrated = copy.deepcopy(model)
        per_block: dict[str, float] = {}
        correct_weights_(model, blocks, batches, on_block=per_block.__setitem__)
    settings = ReconSettings(iters=args.recon_iters, batch_size=args.batch_size)
    recon_per_step = {name: _timed(reconstruct_, calibrated, [name], batches, settings) / settings.iters for name in blocks}
    result["gptq_s_per_block"] = per_block
    result["recon_s_per_step"] = recon_per_step
    print(f"{args.model}, {args.images} random images of {size}x{size}, {args.bits}, {device}:")
    print(f"  float forward over the images      {result['float_forward_s']:8.2f} s")
    print(f"  reparameterization (whole model)   {result['reparameterize_s']:8.2f} s")
    print(f"  weight ranges (mse, all layers)    {result['weights_s']:8.2f} s")
    print(f"  activation calibration (in order)  {result['activations_s']:8.2f} s")
    print(f"\n| block | ridge + GPTQ (s) | reconstruction (s per step of {args.batch_size} images) |\n|---|---|---|")
    for name in blocks:
        gptq = f"{per_block[name]:.2f}" if name in per_block else "–"
        print(f"| {name} | {gptq} | {recon_per_step[name]:.3f} |")
    return result


def _write(path: Optional[str], text: str) -> None:
    if path:
        write_text(path, text)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="top-1 and calibration time of each recipe on a main.py config")
    demo.add_argument("--config", default="configs/demo.yaml", help="a main.py YAML config (model, data, seed)")
    demo.add_argument("--recipes", nargs="+", default=list(dict.fromkeys(r[1] or "none" for r in DEMO_ROWS)),
                      help="the rows of these recipes (none: without a recipe)")
    demo.add_argument("--bits", nargs="+", default=list(DEMO_BITS), help="the columns")
    demo.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                      help="also the rows with further keywords (softmax, gelu)")
    demo.add_argument("--append", action="store_true", help="add the runs to those of an existing --json file")
    demo.add_argument("--json", default=None)
    demo.add_argument("--markdown", default=None)
    blocks = sub.add_parser("blocks", help="time of each recipe step per block, random weights and images")
    blocks.add_argument("--model", default="itpn_base")
    blocks.add_argument("--images", type=int, default=32, help="calibration images (RepQ-ViT uses 32)")
    blocks.add_argument("--batch-size", type=int, default=8)
    blocks.add_argument("--bits", default="4/4/4")
    blocks.add_argument("--blocks", type=int, default=0, help="time only the first N blocks (0: all)")
    blocks.add_argument("--recon-iters", type=int, default=5, help="reconstruction steps timed per block")
    blocks.add_argument("--device", default="cpu")
    blocks.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    quiet_lightning()
    args = parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    if args.command == "demo":
        run_demo(args)
    else:
        _write(args.json, json.dumps(run_blocks(args), indent=2))


if __name__ == "__main__":
    main()
