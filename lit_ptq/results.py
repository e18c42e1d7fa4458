"""One run's results: the record written to ``--results_path`` and the per-quantizer report table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from .quant import QuantizerStats

if TYPE_CHECKING:
    from .callbacks import CalibrationCallback
    from .module import PTQModule

__all__ = ["results_record", "report_markdown", "run_label"]


def run_label(summary: Mapping[str, Any]) -> str:
    """``itpn_tiny minmax seed 8/8/8`` (`` onnxruntime`` appended for an ONNX file): how a run's
    printed line starts.

    Args:
        summary: a results record, or :meth:`~lit_ptq.module.PTQModule.run_summary` with ``backend``.
    """
    backend = " onnxruntime" if summary.get("backend") == "onnxruntime" else ""
    return f"{summary['model']} {summary['method']} {summary['placement'] or ''} {summary['bits']}{backend}"


def report_markdown(report: list[QuantizerStats]) -> str:
    """The per-quantizer report as a markdown table."""
    lines = [
        "| quantizer | role | bits | min | max | scale | clipped % | SQNR dB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report:
        lines.append(
            f"| {r.name} | {r.role} | {r.bits} | {r.min_val:.4g} | {r.max_val:.4g} | {r.scale:.4g} | "
            f"{100 * r.clipped:.3f} | {r.sqnr_db:.2f} |"
        )
    return "\n".join(lines)


def results_record(
    module: "PTQModule",
    metrics: dict[str, float],
    calib: "CalibrationCallback",
    extra: dict[str, Any],
    split: Literal["val", "test"] = "val",
) -> dict[str, Any]:
    """One run's result, as written to ``--results_path`` (acc1 / acc5 in percent).

    ``metrics`` are the trainer's callback metrics of the evaluated ``split`` (``val/acc1``
    or ``test/acc1``, ...); the record names the split (``split``: ``val`` for validate,
    ``test`` for test). ``backend`` says what computed the logits (``pytorch`` or
    ``onnxruntime``; see :attr:`PTQModule.backend`); an ONNX run's summary also names the
    file (``onnx``).
    """
    summary = module.run_summary()
    return dict(
        **summary,
        backend=getattr(module, "backend", "pytorch"),
        calib_images=calib.calib_images,
        calibration_seconds=round(calib.seconds, 3),
        acc1=round(100.0 * metrics[f"{split}/acc1"], 4),  # torchmetrics computes in float32: keep its digits
        acc5=round(100.0 * metrics[f"{split}/acc5"], 4),
        loss=metrics[f"{split}/loss"],
        num_images=int(round(metrics[f"{split}/num_images"])),
        split=split,
        **extra,
    )
