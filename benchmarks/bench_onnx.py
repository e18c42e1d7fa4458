"""ONNX export: parity with the fake-quantized model, onnxruntime's own quantizer, and speed.

Three measurements, each printed as a table (nothing is asserted)::

    python benchmarks/bench_onnx.py parity --config configs/demo.yaml --recipe-configs configs/demo_w6a6.yaml configs/demo_w4a4.yaml configs/demo_w4a4_recon.yaml --json results/demo_onnx.json --markdown results/demo_onnx.md
    python benchmarks/bench_onnx.py static --config configs/demo.yaml --json results/demo_ort_static.json --markdown results/demo_ort_static.md
    python benchmarks/bench_onnx.py speed --models itpn_base deit_base_patch16_224 --weights default normal --json benchmarks/results_cpu_onnx.json

``parity``: for each observer and placement at 8/8/8, FQ-ViT's PTF and PTF + LIS (MinMax,
``full``) and each ``--recipe-configs`` config, the
product path three times: ``Trainer.validate`` of the fake-quantized :class:`PTQModule`
(calibration saved to a state file), ``PTQTrainer.export`` of the same config from that
state (what ``main.py export --calibration.load_state`` runs), and ``Trainer.validate`` of
``PTQModule(onnx=FILE)`` (what ``main.py validate --model.onnx FILE`` runs). Both validations
record every image's logits; the table gives both top-1, their difference, the share of
images whose top-1 label agrees and the largest absolute logit difference.

``static``: onnxruntime's own post-training quantizer (``onnxruntime.quantization.quantize_static``:
QDQ, int8 per-channel weights, uint8 activations) on the float export of the same config,
calibrated on the same images as ``validate`` (the data module's calibration batches) with
its MinMax, Percentile and Entropy methods, each evaluated through ``PTQModule(onnx=FILE)``.

``speed``: for each ``--weights`` draw (``default``: the constructor's initialization;
``normal``: every parameter N(0, 0.05), LayerNorm weights N(1, 0.05); or a checkpoint file),
side by side in one process: PyTorch float, onnxruntime float, our QDQ file for each
placement (MinMax 8/8/8 calibrated on random images) and ``quantize_static``'s file of the
float graph (MinMax, the same images), at each batch size; every timing is one forward,
interleaved round-robin, and the table gives the median, the speed-up over onnxruntime float,
the file size and how many of the file's quantized linears (input and weight quantized)
onnxruntime runs as integer kernels (:func:`lit_ptq.export.runtime.linear_kernels`). torch and onnxruntime use
``--threads`` threads; the sessions are made as ``validate --model.onnx`` makes them
(:func:`lit_ptq.export.runtime.create_session`: no spinning threads under
``OMP_WAIT_POLICY=PASSIVE``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pytorch_lightning import Callback, Trainer, seed_everything  # noqa: E402

from lit_ptq.callbacks import CalibrationCallback  # noqa: E402
from lit_ptq.export import export_onnx  # noqa: E402
from lit_ptq.export.runtime import create_session, linear_kernels  # noqa: E402
from lit_ptq.io import write_text  # noqa: E402
from lit_ptq.module import PTQModule  # noqa: E402
from lit_ptq.run import Evaluation, quiet_lightning  # noqa: E402
from lit_ptq.tools.table import GRID_METHODS, GRID_PLACEMENTS, GridSetup, load_setup  # noqa: E402
from lit_ptq.trainer import PTQTrainer  # noqa: E402

log = logging.getLogger("bench_onnx")

STATIC_METHODS = ("MinMax", "Percentile", "Entropy")
"""onnxruntime's calibration methods (``onnxruntime.quantization.CalibrationMethod``) compared."""


class LogitsRecorder(Callback):
    """Keeps the logits of every validation image, in loader order (recomputed after each step)."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def on_validation_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        with torch.no_grad():
            self.batches.append(pl_module.predict_logits(batch[0]).cpu())

    @property
    def logits(self) -> torch.Tensor:
        """All logits, ``(images, classes)``."""
        return torch.cat(self.batches)


def _trainer(setup: GridSetup, callbacks: list[Callback], cls: type = Trainer) -> Trainer:
    return cls(
        accelerator=setup.accelerator, devices=1, logger=False, callbacks=callbacks, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )


def validate(setup: GridSetup, module: PTQModule, calibration: Optional[CalibrationCallback] = None) -> tuple[dict[str, Any], torch.Tensor]:
    """``Trainer.validate`` of ``module`` as ``main.py validate`` runs it: the record and every image's logits."""
    seed_everything(setup.seed, verbose=False)
    calibration = calibration or CalibrationCallback()
    recorder = LogitsRecorder()
    trainer = _trainer(setup, [calibration, recorder])
    evaluation = Evaluation(module, setup.datamodule, trainer, seed=setup.seed, announce=False)
    return evaluation.run(lambda: calibration.result), recorder.logits


def export(setup: GridSetup, model_args: dict[str, Any], path: str, state: Optional[str], log_points: str) -> None:
    """``main.py export`` of ``model_args`` to ``path``, the quantizers loaded from ``state``."""
    seed_everything(setup.seed, verbose=False)
    calibration = CalibrationCallback(load_state=state)
    trainer = _trainer(setup, [calibration], PTQTrainer)
    trainer.export(PTQModule(**model_args), path, datamodule=setup.datamodule, log_points=log_points)


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Share of images (percent) with the same top-1 label, and the largest absolute logit difference."""
    agree = (reference.argmax(1) == other.argmax(1)).float().mean().item()
    return dict(agreement=round(100.0 * agree, 2), max_logit_diff=float((reference - other).abs().max()))


# --------------------------------------------------------------------------- parity


FQVIT_CELLS: tuple[dict[str, Any], ...] = (
    dict(method="minmax", placement="full", bits="8/8/8", ptf=True),
    dict(method="minmax", placement="full", bits="8/8/4", ptf=True, lis=True),
)
"""FQ-ViT's power-of-two factors (per-axis Q/DQ) and log-int-softmax (float operators)."""


def parity_cells(methods: Sequence[str], placements: Sequence[str]) -> list[dict[str, Any]]:
    """The quantization settings compared: each observer at each placement, 8/8/8."""
    return [dict(method=m, placement=p, bits="8/8/8") for p in placements for m in methods]


def _recipe_cell(config: str) -> dict[str, Any]:
    import yaml

    with open(config) as f:
        model = yaml.safe_load(f)["model"]
    keys = ("method", "placement", "bits", "recipe", "softmax", "recon")
    return {k: model[k] for k in keys if k in model}


def run_parity(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Validate, export and validate the export of every cell; print and write the table."""
    setup = load_setup(args.config)
    cells = parity_cells(args.methods, args.placements) + (list(FQVIT_CELLS) if args.fqvit else [])
    cells += [_recipe_cell(c) for c in args.recipe_configs]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, cell in enumerate(cells, 1):
            model_args = {**setup.model, **cell}
            state, path = os.path.join(tmp, f"state{i}.pt"), os.path.join(tmp, f"model{i}.onnx")
            torch_record, torch_logits = validate(setup, PTQModule(**model_args), CalibrationCallback(save_state=state))
            log_points = "float_ops" if cell.get("recipe") or cell.get("lis") else args.log_points
            export(setup, model_args, path, state, log_points)
            ort_record, ort_logits = validate(setup, PTQModule(**{**setup.model, "onnx": path}))
            row = dict(
                **{k: torch_record.get(k) for k in ("model", "method", "placement", "bits", "ptf", "lis", "recipe", "softmax")},
                log_points=log_points,
                calib_images=torch_record["calib_images"],
                num_images=torch_record["num_images"],
                acc1_pytorch=torch_record["acc1"],
                acc1_onnxruntime=ort_record["acc1"],
                delta=round(ort_record["acc1"] - torch_record["acc1"], 4),
                onnx_mb=round(os.path.getsize(path) / 1e6, 2),
                **compare(torch_logits, ort_logits),
            )
            rows.append(row)
            print(f"[{i}/{len(cells)}] {_label(row)}: PyTorch {row['acc1_pytorch']:.2f}, onnxruntime "
                  f"{row['acc1_onnxruntime']:.2f}, agreement {row['agreement']:.2f} %, max |logit diff| "
                  f"{row['max_logit_diff']:.3g}", flush=True)
            _write(args.json, json.dumps(rows, indent=2))
    table = parity_markdown(rows)
    print(table)
    _write(args.markdown, table)
    return rows


def _placement(row: dict[str, Any]) -> str:
    """``full + ptf + lis``, ``matmul + repq_gptq``: the placement and what acts on it."""
    extras = [k for k in ("ptf", "lis") if row.get(k)] + ([row["recipe"]] if row.get("recipe") else [])
    return " + ".join([row["placement"], *extras])


def _label(row: dict[str, Any]) -> str:
    return f"{row['method']} {_placement(row)} {row['bits']}"


def parity_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One row per setting: both top-1, their difference, label agreement, largest logit difference."""
    lines = [
        "| observer | placement | bits | top-1 PyTorch | top-1 onnxruntime | Δ | top-1 agreement % | max abs logit diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_placement(r)} | {r['bits']} | {r['acc1_pytorch']:.2f} | {r['acc1_onnxruntime']:.2f} | "
            f"{r['delta']:+.2f} | {r['agreement']:.2f} | {r['max_logit_diff']:.3g} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- static


class _Reader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over batches of images."""

    def __init__(self, input_name: str, batches: Callable[[], Iterator[torch.Tensor]]) -> None:
        self.input_name = input_name
        self._make = batches
        self._it: Optional[Iterator[torch.Tensor]] = None

    def get_next(self) -> Optional[dict[str, np.ndarray]]:
        if self._it is None:
            self._it = self._make()
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch.numpy()}

    def rewind(self) -> None:
        self._it = None


def quantize_static_file(float_path: str, out_path: str, batches: Callable[[], Iterator[torch.Tensor]], method: str) -> None:
    """onnxruntime's ``quantize_static`` of a float export: QDQ, int8 per-channel weights, uint8 activations.

    The float file is first prepared with onnxruntime's ``quant_pre_process`` (shape
    inference and graph optimization), as its documentation recommends.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = type("Reader", (_Reader, CalibrationDataReader), {})("input", batches)
    prepared = out_path.replace(".onnx", ".pre.onnx")
    quant_pre_process(float_path, prepared)
    quantize_static(
        prepared, out_path, reader, quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method),
    )
    os.remove(prepared)


def run_static(args: argparse.Namespace) -> list[dict[str, Any]]:
    """quantize_static of the config's float model with each calibration method, evaluated on its data."""
    setup = load_setup(args.config)
    dm = setup.datamodule
    dm.setup("validate")
    rows: list[dict[str, Any]] = []
    float_args = {**setup.model, "method": None}

    def calib_images() -> Iterator[torch.Tensor]:
        return (batch[0] for batch in dm.calib_dataloader())

    calib = sum(batch.shape[0] for batch in calib_images())
    with tempfile.TemporaryDirectory() as tmp:
        float_path = os.path.join(tmp, "float.onnx")
        export(setup, float_args, float_path, None, "raise")
        float_record, float_logits = validate(setup, PTQModule(**{**setup.model, "onnx": float_path}))
        for method in args.methods:
            path = os.path.join(tmp, f"static_{method}.onnx")
            start = time.perf_counter()
            quantize_static_file(float_path, path, calib_images, method)
            seconds = time.perf_counter() - start
            record, logits = validate(setup, PTQModule(**{**setup.model, "onnx": path}))
            rows.append(dict(
                model=float_record["model"], quantizer="onnxruntime quantize_static", calibrate_method=method,
                calib_images=calib, calibration_seconds=round(seconds, 2), acc1=record["acc1"], acc5=record["acc5"],
                float_acc1=float_record["acc1"], num_images=record["num_images"], onnx_mb=round(os.path.getsize(path) / 1e6, 2),
                **compare(float_logits, logits),
            ))
            print(f"quantize_static {method}: top-1 {record['acc1']:.2f} (float {float_record['acc1']:.2f}), "
                  f"calibration {seconds:.1f} s on {calib} images", flush=True)
            _write(args.json, json.dumps(rows, indent=2))
    table = static_markdown(rows)
    print(table)
    _write(args.markdown, table)
    return rows


def static_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One row per calibration method of ``quantize_static``."""
    lines = [
        "| quantize_static calibration | calib images | top-1 | float top-1 | top-1 agreement with float % |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['calibrate_method']} | {r['calib_images']} | {r['acc1']:.2f} | {r['float_acc1']:.2f} | {r['agreement']:.2f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- speed


def _time_round_robin(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """One warm-up of each, then ``repeats`` rounds timing each once, in turn."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def model_input_size(model_name: str) -> int:
    """The input side of a registered model."""
    from lit_ptq.models import model_entry

    return int(model_entry(model_name)[1].input_size[-1])


WEIGHT_DRAWS = ("default", "normal")
"""The ``--weights`` draws that need no file; any other value is a checkpoint path."""


def weights_arg(value: str) -> str:
    """``--weights``: ``default``, ``normal`` or an existing checkpoint file."""
    if value not in WEIGHT_DRAWS and not os.path.isfile(value):
        raise argparse.ArgumentTypeError(f"{value!r} is neither {' nor '.join(WEIGHT_DRAWS)} nor a checkpoint file")
    return value


def normal_weights_(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter drawn N(0, 0.05), then each LayerNorm weight N(1, 0.05) (generator seed 0), in place.

    Weights unlike the constructors' initialization (which zeroes the biases), as a trained
    checkpoint's are.
    """
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.05, generator=generator)
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                module.weight.normal_(1.0, 0.05, generator=generator)
    return model


def _speed_files(
    model_name: str, folder: str, placements: Sequence[str], calib: list[torch.Tensor], weights: str, num_classes: int
) -> tuple[torch.nn.Module, dict[str, str]]:
    """Export the float model, our QDQ file per placement and quantize_static's; return the float model and the paths."""
    from lit_ptq.models import create_model
    from lit_ptq.quant import QuantConfig, calibrate, quantize_

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        checkpoint = None if weights in WEIGHT_DRAWS else weights
        model = create_model(model_name, num_classes=num_classes, checkpoint=checkpoint).eval()
        return normal_weights_(model) if weights == "normal" else model

    model = fresh()
    files = {"onnxruntime float": os.path.join(folder, "float.onnx")}
    export_onnx(model, files["onnxruntime float"], calib[0])
    for placement in placements:
        quant = fresh()
        quantize_(quant, QuantConfig(method="minmax", placement=placement, bits="8/8/8"))
        calibrate(quant, iter(calib))
        files[f"lit_ptq {placement}"] = path = os.path.join(folder, f"{placement}.onnx")
        export_onnx(quant, path, calib[0])
    files["quantize_static MinMax"] = path = os.path.join(folder, "static.onnx")
    quantize_static_file(files["onnxruntime float"], path, lambda: iter(calib), "MinMax")
    return model, files


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    """Time PyTorch float and each ONNX file at each batch size, per model; print and write the table."""
    import onnxruntime

    torch.set_num_threads(args.threads)
    run = dict(
        machine=_machine(), device=_device_name(args.device), threads=args.threads, torch=torch.__version__, onnxruntime=onnxruntime.__version__,
        date=time.strftime("%Y-%m-%d"), repeats=args.repeats,
    )
    result: dict[str, Any] = {**run, "rows": []}
    if args.append and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            result = json.load(f)
    first = len(result["rows"])
    for model_name in args.models:
        for weights in args.weights:
            _speed_model(args, model_name, weights, result, run)
    print(f"{run['machine']}, {run['device']}, {args.threads} threads, torch {run['torch']}, onnxruntime {run['onnxruntime']}, "
          f"median of {args.repeats} interleaved runs\n")
    print(speed_markdown(result["rows"][first:]))
    return result


def integer_linears(path: str, optimized_path: str) -> str:
    """``29/29 QGemm``: the file's quantized linears that onnxruntime runs as integer kernels, and which."""
    kernels = [k for k in linear_kernels(path, optimized_path) if k.input_quantized]
    if not kernels:
        return "–"
    ops = sorted({k.op_type for k in kernels if k.integer})
    return f"{sum(k.integer for k in kernels)}/{len(kernels)} {' '.join(ops)}".strip()


def _speed_model(args: argparse.Namespace, model_name: str, weights: str, result: dict[str, Any], run: dict[str, Any]) -> None:
    """Time one model with one weight draw: rows appended to ``result``, the JSON rewritten after each batch size.

    Each row also records ``run`` (machine, threads, versions, date), which tells rows
    appended to an older file (``--append``) from its first ones.
    """
    label = weights if weights in WEIGHT_DRAWS else os.path.basename(weights)
    with tempfile.TemporaryDirectory() as folder:
        gen = torch.Generator().manual_seed(0)
        size = model_input_size(model_name)
        calib = [torch.randn(args.calib_batch_size, 3, size, size, generator=gen) for _ in range(args.calib_batches)]
        model, files = _speed_files(model_name, folder, args.placements, calib, weights, args.num_classes)
        kernels = {name: integer_linears(path, os.path.join(folder, f"optimized{i}.onnx")) for i, (name, path) in enumerate(files.items())}
        device = torch.device(args.device)
        model = model.to(device)
        sessions = {name: create_session(path, device) for name, path in files.items()}
        sizes = {name: os.path.getsize(path) / 1e6 for name, path in files.items()}
        for batch_size in args.batch_sizes:
            x = torch.randn(batch_size, 3, size, size, generator=gen)
            feed = {"input": x.numpy()}
            x_torch = x.to(device)
            fns: dict[str, Callable[[], Any]] = {"PyTorch float": lambda: _torch_forward(model, x_torch)}
            fns.update({name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()})
            times = _time_round_robin(fns, args.repeats)
            base = statistics.median(times["onnxruntime float"])
            for name, ts in times.items():
                row = dict(
                    model=model_name, weights=label, batch_size=batch_size, runtime=name,
                    median_s=round(statistics.median(ts), 4), min_s=round(min(ts), 4),
                    speedup_vs_ort_float=round(base / statistics.median(ts), 3),
                    file_mb=round(sizes[name], 1) if name in sizes else None, integer_linears=kernels.get(name, "–"),
                    times_s=[round(t, 4) for t in ts], **run,
                )
                result["rows"].append(row)
            print(speed_markdown(result["rows"][-len(times):]), flush=True)
            _write(args.json, json.dumps(result, indent=1))


def _torch_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    return out


def speed_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One row per model, weights, batch size and runtime: median seconds, speed-up over onnxruntime
    float, file size, quantized linears run as integer kernels."""
    lines = [
        "| model | weights | batch | runtime | median s | x onnxruntime float | file MB | integer linears |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = f"{r['file_mb']:.0f}" if r["file_mb"] is not None else "–"
        lines.append(
            f"| {r['model']} | {r['weights']} | {r['batch_size']} | {r['runtime']} | {r['median_s']:.3f} | "
            f"{r['speedup_vs_ort_float']:.2f} | {size} | {r['integer_linears']} |"
        )
    return "\n".join(lines) + "\n"


def _device_name(device: str) -> str:
    """``cpu``, or the GPU's name (``cuda: NVIDIA H100 80GB HBM3``)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    return device


def _machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"


# --------------------------------------------------------------------------- CLI


def _write(path: Optional[str], text: str) -> None:
    if path:
        write_text(path, text)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    parity = sub.add_parser("parity", help="fake-quantized PyTorch vs its ONNX export in onnxruntime, on a main.py config")
    parity.add_argument("--config", default="configs/demo.yaml", help="a main.py YAML config (model, data, seed)")
    parity.add_argument("--methods", nargs="*", default=list(GRID_METHODS))
    parity.add_argument("--placements", nargs="+", default=list(GRID_PLACEMENTS))
    parity.add_argument("--fqvit", action=argparse.BooleanOptionalAction, default=True, help="also FQ-ViT's PTF and PTF + LIS (MinMax, full)")
    parity.add_argument("--recipe-configs", nargs="*", default=[], help="configs of low-bit recipes (exported with log_points=float_ops)")
    parity.add_argument("--log-points", default="raise", choices=["raise", "float_ops"])
    parity.add_argument("--json", default=None)
    parity.add_argument("--markdown", default=None)
    static = sub.add_parser("static", help="onnxruntime quantize_static of the float export, on a main.py config")
    static.add_argument("--config", default="configs/demo.yaml")
    static.add_argument("--methods", nargs="+", default=list(STATIC_METHODS), choices=STATIC_METHODS)
    static.add_argument("--json", default=None)
    static.add_argument("--markdown", default=None)
    speed = sub.add_parser("speed", help="PyTorch float, onnxruntime float, our QDQ files and quantize_static's")
    speed.add_argument("--models", nargs="+", default=["itpn_base", "deit_base_patch16_224"])
    speed.add_argument("--placements", nargs="+", default=["matmul", "full", "seed"])
    speed.add_argument("--weights", nargs="+", type=weights_arg, default=["default"],
                       help="default (the constructor's), normal (N(0, 0.05), LayerNorm weights N(1, 0.05)) or a checkpoint file")
    speed.add_argument("--num-classes", type=int, default=1000, help="the classifier's width (a checkpoint's)")
    speed.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 1])
    speed.add_argument("--calib-batches", type=int, default=2)
    speed.add_argument("--calib-batch-size", type=int, default=8)
    speed.add_argument("--repeats", type=int, default=7)
    speed.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and onnxruntime intra-op threads")
    speed.add_argument("--device", default="cpu", help="cuda: PyTorch on the GPU and onnxruntime's CUDAExecutionProvider "
                       "(onnxruntime-gpu); the integer-kernel counts stay the CPU's")
    speed.add_argument("--json", default=None)
    speed.add_argument("--append", action="store_true", help="add the rows to those of an existing --json file")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("root").setLevel(logging.ERROR)  # quantize_static's per-tensor warnings
    quiet_lightning()
    args = parse_args(argv)
    print(f"# {_machine()}, torch {torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    if args.command == "parity":
        run_parity(args)
    elif args.command == "static":
        run_static(args)
    else:
        run_speed(args)


if __name__ == "__main__":
    main()
