"""How a run's results read: the label its printed lines start with and the per-quantizer report table.

The record itself (``--results_path``) and the summary line are the run service's
(:func:`lit_ptq.run.results_record`, :func:`lit_ptq.run.summary_line`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .quant import QuantizerStats

__all__ = ["report_markdown", "run_label"]


def run_label(summary: Mapping[str, Any]) -> str:
    """``itpn_tiny minmax seed 8/8/8`` (the backend appended when it is not PyTorch: `` onnxruntime``
    for an ONNX file): how a run's printed line starts.

    Args:
        summary: a results record, or :meth:`~lit_ptq.module.PTQModule.run_summary` with ``backend``.
    """
    backend = f" {summary['backend']}" if summary.get("backend") not in (None, "pytorch") else ""
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
