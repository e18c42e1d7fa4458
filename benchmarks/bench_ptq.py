"""Cost of fake quantization: quantized evaluation and calibration against the float model.

Everything is measured side by side in one process, through the public API
(``create_model``, ``QuantConfig``, ``quantize_``, ``calibrate``), on a model with random
weights and random inputs (timings do not depend on the values)::

    python benchmarks/bench_ptq.py                       # itpn_base, every method, both placements
    python benchmarks/bench_ptq.py --model itpn_tiny --repeats 2 --json /tmp/bench.json
    python benchmarks/bench_ptq.py --methods minmax --placement seed --compile   # + torch.compile

For each placement and method it reports

- ``eval``: one forward of a calibrated quantized model on a batch of ``--batch-size``
  images, against the same forward of the float model;
- ``calib``: ``calibrate(model, batches)`` over ``--batches`` batches of
  ``--calib-batch-size`` images (observers, OMSE / percentile searches and the weight
  ranges included), against the same float forwards of the float model;
- ``mem``: the peak memory of that calibration against the peak of one float forward at
  the calibration batch size (see :func:`peak_bytes`);
- with ``--compile``, ``compiled``: the same forward of the calibrated model through
  ``torch.compile`` (:func:`lit_ptq.quant.compile_quantized`) against the eager float forward,
  the seconds of its first call (the compilation), and whether its logits equal the eager
  quantized logits (else their largest absolute difference).

Float and quantized repetitions are interleaved, so that load from other processes
affects both alike; each ratio is the median time of one over the median of the other
(the JSON also holds every repetition). The script prints tables; it asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

# OpenMP's wait policy is left as the environment sets it (unset: OpenMP's default, threads
# spin a while before they sleep), which is what a script that imports lit_ptq gets; the
# printed header says which. On a machine shared with other busy processes, set
# OMP_WAIT_POLICY=PASSIVE (as main.py does): spinning threads then take the cores from the
# threads they wait for. The profiler's own log stays quiet unless asked for.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
# Run as ``python benchmarks/bench_ptq.py`` from a checkout: the project root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from lit_ptq.models import create_model  # noqa: E402
from lit_ptq.quant import METHODS, PLACEMENTS, Arithmetic, QuantConfig, calibrate, compile_quantized, quantize_  # noqa: E402

TARGETS = {"eval_seed": 1.15, "eval_full": 1.30, "calib": 1.5, "mem": 1.5}

log = logging.getLogger("bench_ptq")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="itpn_base", help="registered model name (random weights)")
    p.add_argument("--batch-size", type=int, default=8, help="evaluation batch size")
    p.add_argument("--calib-batch-size", type=int, default=4, help="calibration batch size")
    p.add_argument("--batches", type=int, default=10, help="calibration batches")
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--placement", nargs="+", default=list(PLACEMENTS), choices=PLACEMENTS)
    p.add_argument("--arithmetic", nargs="+", default=["seed"], choices=[a.value for a in Arithmetic])
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (after one warm-up)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--skip", nargs="*", default=[], choices=["eval", "calib", "mem"], help="measurements to leave out")
    p.add_argument("--compile", action="store_true", help="also time evaluation through torch.compile (and the compilation)")
    p.add_argument("--json", default=None, help="write the results here (after every row)")
    p.add_argument("--verbose", action="store_true", help="log every repetition")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of one call of ``fn``, in seconds (device work included)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def interleaved(
    a: Callable[[], Any], b: Callable[[], Any], repeats: int, device: torch.device, label: str = ""
) -> tuple[list[float], list[float]]:
    """One warm-up of each, then ``repeats`` alternating timings ``a, b, a, b, ...``."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a, device))
        tb.append(timed(b, device))
        log.info("%s float %.3f s, quantized %.3f s (load %.1f)", label, ta[-1], tb[-1], os.getloadavg()[0])
    return ta, tb


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of tensor memory allocated by ``fn`` above what was live when it started.

    On CUDA: ``torch.cuda.max_memory_allocated`` after a reset. On CPU: torch's profiler
    with ``profile_memory=True`` records every allocation and free of torch's CPU allocator
    (with its size and time); the peak of their running sum is the peak of live tensor
    memory. This counts exactly the tensors torch allocates (the model's activations, the
    observers' temporaries) and nothing else: not the Python heap, not allocator slack.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _ratio(q: list[float], f: list[float]) -> float:
    return _median(q) / _median(f)


def _paired(q: list[float], f: list[float]) -> float:
    """Median of the ratios of adjacent repetitions (less sensitive to load that drifts)."""
    return _median([a / b for a, b in zip(q, f)])


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        torch=torch.__version__,
        args=vars(args),
        targets=TARGETS,
        load_start=os.getloadavg(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"),
        rows=[],
    )
    torch.set_num_threads(args.threads)
    result.update(threads=torch.get_num_threads(), machine=_machine(torch.device(args.device)))
    device = torch.device(args.device)
    torch.manual_seed(0)
    float_model = create_model(args.model).eval().to(device)
    _, h, w = float_model.eval_cfg.input_size
    x_eval = torch.randn(args.batch_size, 3, h, w, device=device)
    calib = [torch.randn(args.calib_batch_size, 3, h, w, device=device) for _ in range(args.batches)]

    @torch.no_grad()
    def float_eval() -> None:
        float_model(x_eval)

    @torch.no_grad()
    def float_calib() -> None:
        for x in calib:
            float_model(x)

    @torch.no_grad()
    def float_forward() -> None:
        float_model(calib[0])

    rows = result["rows"]
    float_peak = None if "mem" in args.skip else peak_bytes(float_forward, device)
    for arithmetic in args.arithmetic:
        for placement in args.placement:
            for method in args.methods:
                config = QuantConfig(method=method, placement=placement, arithmetic=arithmetic)
                model: nn.Module = quantize_(copy.deepcopy(float_model), config)
                row: dict[str, Any] = dict(config.describe())
                if "calib" not in args.skip:
                    tf, tq = interleaved(float_calib, lambda: calibrate(model, calib), args.repeats, device, f"{placement}/{method} calib")
                    row.update(calib_float_s=tf, calib_quant_s=tq, calib_ratio=_ratio(tq, tf), calib_paired=_paired(tq, tf))
                else:
                    calibrate(model, calib)
                if "mem" not in args.skip:
                    peak = peak_bytes(lambda: calibrate(model, calib), device)
                    row.update(mem_float_bytes=float_peak, mem_calib_bytes=peak, mem_ratio=peak / float_peak)
                if "eval" not in args.skip:

                    @torch.no_grad()
                    def quant_eval() -> None:
                        model(x_eval)

                    tf, tq = interleaved(float_eval, quant_eval, args.repeats, device, f"{placement}/{method} eval")
                    row.update(eval_float_s=tf, eval_quant_s=tq, eval_ratio=_ratio(tq, tf), eval_paired=_paired(tq, tf))
                    if args.compile:
                        row.update(compiled_row(model, float_eval, x_eval, args.repeats, device, f"{placement}/{method}"))
                row["load"] = os.getloadavg()
                rows.append(row)
                print(_row_line(row), flush=True)
                _write(args.json, result)
                del model
                gc.collect()
    result["load_end"] = os.getloadavg()
    return result


def compiled_row(
    model: nn.Module, float_eval: Callable[[], Any], x: torch.Tensor, repeats: int, device: torch.device, label: str
) -> dict[str, Any]:
    """Compile ``model`` (after calibration), time its compiled forward against ``float_eval``.

    Dynamo's caches are emptied first, so each row compiles its own model (Inductor's on-disk
    cache of kernels and graphs is left alone: a graph met before compiles faster).
    """
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x)
        start = time.perf_counter()
        compiled = compile_quantized(model)
        logits = compiled(x)
        _sync(device)
        compile_s = time.perf_counter() - start

    @torch.no_grad()
    def compiled_eval() -> None:
        compiled(x)

    tf, tc = interleaved(float_eval, compiled_eval, repeats, device, f"{label} compiled")
    return dict(
        compile_s=compile_s, eval_compiled_float_s=tf, eval_compiled_s=tc, compiled_ratio=_ratio(tc, tf),
        compiled_paired=_paired(tc, tf), compiled_equal=torch.equal(logits, eager),
        compiled_max_abs=float((logits - eager).abs().max()),
    )


def _write(path: str | None, result: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs"


def _fmt(row: dict[str, Any], key: str, scale: float = 1.0, spec: str = ".2f") -> str:
    return format(row[key] * scale, spec) if key in row else "-"


def _row_line(row: dict[str, Any]) -> str:
    med = lambda k: _median(row[k]) if k in row else None  # noqa: E731
    cells = [row["placement"], row["method"], row["arithmetic"]]
    for kind in ("eval", "calib"):
        if f"{kind}_ratio" in row:
            cells += [f"{med(f'{kind}_float_s'):.3f}", f"{med(f'{kind}_quant_s'):.3f}", f"{row[f'{kind}_ratio']:.2f}"]
        else:
            cells += ["-", "-", "-"]
    if "mem_ratio" in row:
        cells += [f"{row['mem_float_bytes'] / 2**20:.0f}", f"{row['mem_calib_bytes'] / 2**20:.0f}", f"{row['mem_ratio']:.2f}"]
    else:
        cells += ["-", "-", "-"]
    if "compiled_ratio" in row:
        equal = "yes" if row["compiled_equal"] else f"no ({row['compiled_max_abs']:.2g})"
        cells += [f"{med('eval_compiled_s'):.3f}", f"{row['compiled_ratio']:.2f}", f"{row['compile_s']:.0f}", equal]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| placement | method | arithmetic | eval float s | eval quant s | eval ratio "
    "| calib float s | calib s | calib ratio | float peak MiB | calib peak MiB | mem ratio |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)
COMPILED_HEADER = (" eval compiled s | compiled ratio | compile s | logits = eager |", "---|---|---|---|")
"""The columns ``--compile`` adds: the compiled forward, its ratio to the eager float forward
(timed in their own interleaved pairs), the compilation, and whether the logits are eager's."""


def header(compiled: bool) -> str:
    """The table's header, with the compiled columns when ``compiled``."""
    if not compiled:
        return HEADER
    top, rule = HEADER.split("\n")
    return f"{top}{COMPILED_HEADER[0]}\n{rule}{COMPILED_HEADER[1]}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    print(
        f"{args.model}, eval batch {args.batch_size}, calibration {args.batches} x {args.calib_batch_size}, "
        f"{args.repeats} repeats, device {args.device}, {args.threads} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    print(header(args.compile), flush=True)
    result = run(args)
    load = ", ".join(f"{a:.1f}" for a in result["load_start"]) + " -> " + ", ".join(f"{a:.1f}" for a in result["load_end"])
    print(f"\n{result['machine']}, torch {result['torch']}, {result['date']}, load average {load}\n")
    print(header(args.compile))
    for row in result["rows"]:
        print(_row_line(row))
    _write(args.json, result)


if __name__ == "__main__":
    main()
