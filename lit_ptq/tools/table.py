"""A grid of post-training quantization runs on one model and dataset, summarized in one table.

Every cell is a normal evaluation through the product path, exactly what
``python main.py validate --config CONFIG --model.method M ...`` runs: a :class:`PTQModule`,
a :class:`CalibrationCallback` and ``Trainer.validate`` on one :class:`ImageNetDataModule`
(built once for the whole grid), run and recorded by the run service
(:class:`lit_ptq.run.Evaluation`). The grid crosses the activation observers (MinMax, EMA,
Percentile, OMSE), FQ-ViT's power-of-two factors (PTF) on and off, the ``seed`` and ``full``
placements and the bit widths 8/8/8, 6/6/6, 4/4/4 and 8/8/4 with log-int-softmax (LIS), plus
the float baseline. PTF and LIS come from Lin et al., "FQ-ViT: Post-Training Quantization for
Fully Quantized Vision Transformer", IJCAI 2022.

PTF acts on LayerNorm inputs, which only the ``full`` placement quantizes: under ``seed`` a
PTF run would repeat the run without it, so it is not run and one row stands for both.

Usage::

    python -m lit_ptq.tools.table --config configs/demo.yaml \\
        --out results/demo_table.json --markdown results/demo_table.md

The JSON file is a list with one record per run, the fields of ``main.py validate
--results_path``; the markdown file holds the table (rows: method, PTF, placement; columns:
bit widths; cells: top-1 in percent). Both are written atomically; the JSON file is rewritten
after every run, so an interrupted grid keeps the runs it finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from pytorch_lightning import Trainer, seed_everything

from lit_ptq.callbacks import CalibrationCallback
from lit_ptq.data import ImageNetDataModule
from lit_ptq.errors import ConfigError, UserError
from lit_ptq.io import check_writable, write_text
from lit_ptq.module import PTQModule
from lit_ptq.quant import METHODS, PLACEMENTS, parse_bits
from lit_ptq.run import Evaluation, linked_data_args, quiet_lightning

__all__ = ["BITS", "Cell", "GridSetup", "grid", "load_setup", "main", "markdown_table", "run_cell", "run_grid"]

log = logging.getLogger(__name__)

MODULE = "lit_ptq.tools.table"
# The bit-width columns: (bits "weights/activations/attention", log-int-softmax).
BITS: tuple[tuple[str, bool], ...] = (("8/8/8", False), ("6/6/6", False), ("4/4/4", False), ("8/8/4", True))
# The grid's default rows: the seed's observers and FQ-ViT's placements (the low-bit
# placement and its recipes are measured by ``benchmarks/bench_recipes.py``).
GRID_METHODS: tuple[str, ...] = ("minmax", "ema", "percentile", "omse")
GRID_PLACEMENTS: tuple[str, ...] = ("seed", "full")
# Model options a grid cell sets; the config's values for them are ignored.
_GRID_KEYS = ("method", "placement", "bits", "ptf", "lis", "recipe", "softmax", "recon")


@dataclass(frozen=True)
class Cell:
    """One run of the grid; ``method=None`` is the float baseline (``recipe``: a low-bit preset)."""

    method: Optional[str] = None
    placement: str = "seed"
    bits: str = "8/8/8"
    ptf: bool = False
    lis: bool = False
    recipe: Optional[str] = None
    options: tuple[tuple[str, Any], ...] = ()
    """Further ``PTQModule`` keywords as ``(name, value)`` pairs, e.g. ``(("gelu", "adalog"),)``."""

    @property
    def variant(self) -> str:
        """The further keywords as ``name=value`` words (``gelu=adalog``), or ``""``."""
        return " ".join(f"{k}={v}" for k, v in self.options)

    @property
    def column(self) -> str:
        """The table column: the bit widths, with `` LIS`` under log-int-softmax."""
        return f"{self.bits} LIS" if self.lis else self.bits

    @property
    def label(self) -> str:
        """A short name for logs, e.g. ``omse+ptf full 8/8/4 LIS``."""
        if self.method is None:
            return "fp32"
        recipe = f" {self.recipe}" if self.recipe else ""
        variant = f" {self.variant}" if self.options else ""
        return f"{self.method}{'+ptf' if self.ptf else ''} {self.placement}{recipe}{variant} {self.column}"


def grid(
    methods: Sequence[str] = GRID_METHODS,
    placements: Sequence[str] = GRID_PLACEMENTS,
    bits: Sequence[tuple[str, bool]] = BITS,
    ptf: Sequence[bool] = (False, True),
) -> list[Cell]:
    """The runs of a grid: the float baseline first, then every method x PTF x placement x bits.

    Under the ``seed`` placement each setting runs once, without PTF, whatever ``ptf`` asks:
    ``seed`` does not quantize LayerNorm inputs, the only thing PTF changes, so a PTF run
    would repeat it.

    Raises:
        ConfigError: an unknown method or placement, or malformed bits.
    """
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"method {method!r} is not one of: {', '.join(METHODS)}")
    for placement in placements:
        if placement not in PLACEMENTS:
            raise ConfigError(f"placement {placement!r} is not one of: {', '.join(PLACEMENTS)}")
    for b, _ in bits:
        parse_bits(b)
    cells = [Cell()]
    for method in methods:
        for placement in placements:
            for with_ptf in dict.fromkeys(ptf) if placement == "full" else (False,):
                cells.extend(Cell(method, placement, b, with_ptf, lis) for b, lis in bits)
    return cells


@dataclass
class GridSetup:
    """What every cell shares, read from a LightningCLI config file.

    Attributes:
        model: ``PTQModule`` arguments other than the grid's (model name, checkpoint, ...).
        datamodule: the data, built once.
        seed: ``seed_everything`` value, set before each run as ``main.py`` does.
        accelerator: the Trainer accelerator.
    """

    model: dict[str, Any]
    datamodule: ImageNetDataModule
    seed: int
    accelerator: str


def load_setup(config: str) -> GridSetup:
    """Read the model, data, seed and accelerator of a ``main.py`` YAML config.

    The data section gets the model's name, input size and class count, as the CLI links them
    (:func:`lit_ptq.run.linked_data_args`).
    The config's quantization options and trainer logger are not used; the grid runs on one
    device.

    Raises:
        ConfigError: the file is missing or lacks ``model`` / ``data`` sections.
    """
    path = Path(config)
    if not path.is_file():
        raise ConfigError(f"--config {config} does not exist; give a main.py YAML config such as configs/demo.yaml")
    cfg = yaml.safe_load(path.read_text()) or {}
    if not isinstance(cfg.get("model"), dict) or not isinstance(cfg.get("data"), dict):
        raise ConfigError(f"--config {config} needs 'model' and 'data' sections, as configs/demo.yaml has")
    model = {k: v for k, v in cfg["model"].items() if k not in _GRID_KEYS}
    model.setdefault("model_name", "itpn_base")
    model.setdefault("num_classes", 1000)
    try:
        datamodule = ImageNetDataModule(**{**cfg["data"], **linked_data_args(model)})
    except TypeError as err:
        raise ConfigError(f"--config {config}: the data section does not fit ImageNetDataModule ({err})") from None
    trainer = cfg.get("trainer") or {}
    if trainer.get("devices", 1) not in (1, "1", [0]):
        log.warning("trainer.devices=%s in %s: the grid runs on one device", trainer["devices"], config)
    seed = int(cfg.get("seed_everything") or 0)
    return GridSetup(model, datamodule, seed, trainer.get("accelerator", "auto"))


def run_cell(setup: GridSetup, cell: Cell) -> dict[str, Any]:
    """Calibrate and evaluate one cell; return the record ``main.py --results_path`` would write."""
    seed_everything(setup.seed, verbose=False)
    module = PTQModule(
        **setup.model, method=cell.method, placement=cell.placement, bits=cell.bits, ptf=cell.ptf, lis=cell.lis,
        recipe=cell.recipe, **dict(cell.options),
    )
    calibration = CalibrationCallback()
    trainer = Trainer(
        accelerator=setup.accelerator,
        devices=1,
        logger=False,
        callbacks=[calibration],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    evaluation = Evaluation(module, setup.datamodule, trainer, seed=setup.seed, announce=False)
    return evaluation.run(lambda: calibration.result)


def run_grid(
    setup: GridSetup, cells: Sequence[Cell], on_record: Optional[Callable[[list[dict[str, Any]]], None]] = None
) -> list[dict[str, Any]]:
    """Run the cells in order; ``on_record`` gets the records so far after each run."""
    records: list[dict[str, Any]] = []
    for i, cell in enumerate(cells, 1):
        record = run_cell(setup, cell)
        records.append(record)
        log.info("[%d/%d] %s: acc1 %.2f (%.0f s)", i, len(cells), cell.label, record["acc1"], record["seconds"])
        if on_record is not None:
            on_record(records)
    return records


def _column(record: dict[str, Any]) -> str:
    return f"{record['bits']} LIS" if record.get("lis") else record["bits"]


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """The grid as markdown: the float top-1, then rows method x PTF x placement, columns bit widths.

    Cells hold top-1 in percent (two decimals); a run missing from ``records`` shows as ``–``.
    """
    quantized = [r for r in records if r["method"] != "fp32"]
    columns = list(dict.fromkeys(_column(r) for r in quantized))
    rows: dict[tuple[str, bool, str], dict[str, float]] = {}
    for r in quantized:
        rows.setdefault((r["method"], bool(r.get("ptf")), r["placement"]), {})[_column(r)] = r["acc1"]
    lines = []
    for r in records:
        if r["method"] == "fp32":
            lines += [f"Float (fp32) top-1: **{r['acc1']:.2f}** on {r['num_images']:,} images.", ""]
    lines += [
        "| method | PTF | placement | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for (method, ptf, placement), accs in rows.items():
        ptf_cell = ("yes" if ptf else "no") if placement == "full" else "n/a"
        values = " | ".join(f"{accs[c]:.2f}" if c in accs else "–" for c in columns)
        lines.append(f"| {method} | {ptf_cell} | {placement} | {values} |")
    if any(r["placement"] == "seed" for r in quantized):
        lines += [
            "",
            "Cells: top-1 (%). PTF n/a: the seed placement does not quantize LayerNorm inputs, the only",
            "thing PTF changes, so one run stands for PTF on and off.",
        ]
    else:
        lines += ["", "Cells: top-1 (%)."]
    return "\n".join(lines) + "\n"


def _write_json(path: str, records: list[dict[str, Any]]) -> None:
    write_text(path, json.dumps(records, indent=2, allow_nan=True))


def _bits_setting(text: str) -> tuple[str, bool]:
    """``8/8/8`` -> ("8/8/8", False); ``8/8/4+lis`` -> ("8/8/4", True)."""
    bits, _, flag = text.partition("+")
    if flag not in ("", "lis"):
        raise argparse.ArgumentTypeError(f"{text!r}: write bits as W/A/S, optionally with +lis (e.g. 8/8/4+lis)")
    try:
        parse_bits(bits)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return bits, flag == "lis"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with a one-line message on a user error)."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a main.py YAML config (model, data, seed)")
    parser.add_argument("--out", help="write the records here as JSON (a list, one per run)")
    parser.add_argument("--markdown", help="write the markdown table here")
    parser.add_argument("--methods", nargs="+", default=list(GRID_METHODS), choices=METHODS, help="activation observers")
    parser.add_argument("--placements", nargs="+", default=list(GRID_PLACEMENTS), choices=PLACEMENTS)
    parser.add_argument("--bits", nargs="+", type=_bits_setting, default=list(BITS),
                        help="bit-width columns: W/A/S, +lis for log-int-softmax (default: 8/8/8 6/6/6 4/4/4 "
                             "8/8/4+lis)")  # fmt: skip
    parser.add_argument("--ptf", nargs="+", choices=("off", "on"), default=["off", "on"], help="PTF settings to run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    quiet_lightning()
    try:
        for path, option in ((args.out, "--out"), (args.markdown, "--markdown")):
            if path:
                check_writable(path, option)
        cells = grid(args.methods, args.placements, args.bits, [p == "on" for p in args.ptf])
        setup = load_setup(args.config)
        start = time.perf_counter()
        records = run_grid(setup, cells, on_record=(lambda rs: _write_json(args.out, rs)) if args.out else None)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = markdown_table(records)
    if args.markdown:
        write_text(args.markdown, table)
    print(table)
    print(f"{len(records)} runs in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
