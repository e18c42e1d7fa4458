"""How a run's results read: the label its printed lines start with and the per-quantizer report table.

The record itself (``--results_path``) and the summary line are the run service's
(:func:`lit_ptq.run.results_record`, :func:`lit_ptq.run.summary_line`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from .quant import QuantizerStats, quant_points

__all__ = ["overrides_summary", "report_markdown", "run_label"]


def run_label(summary: Mapping[str, Any]) -> str:
    """``itpn_tiny minmax seed 8/8/8`` (the backend appended when it is not PyTorch: `` onnxruntime``
    for an ONNX file): how a run's printed line starts.

    Args:
        summary: a results record, or :meth:`~lit_ptq.module.PTQModule.run_summary` with ``backend``.
    """
    backend = f" {summary['backend']}" if summary.get("backend") not in (None, "pytorch") else ""
    return f"{summary['model']} {summary['method']} {summary['placement'] or ''} {summary['bits']}{backend}"


def overrides_summary(model: nn.Module) -> str:
    """What ``model.overrides`` changed, grouped: ``mixed: 8 points at 8 bits`` ('' without overrides).

    Each quant point's setting after the overrides (:meth:`lit_ptq.quant.QuantConfig.spec_for`)
    is compared with its role's: the points an override changes are counted by what they got
    (``at 8 bits``, ``observer mse``, ``per_tensor``, together when several fields change),
    largest group first. A point an override leaves float is not in the model, so a ``null``
    override is named by its pattern (``'head.*' float``).

    Args:
        model: a model quantized with ``quantize_`` (it has ``quant_config``).
    """
    config = getattr(model, "quant_config", None)
    if config is None or not config.overrides:
        return ""
    changed: Counter[str] = Counter()
    for name, point in quant_points(model):
        role = point.role
        base, spec = getattr(config, role), config.spec_for(role, name)
        if spec is None or spec == base:
            continue
        what = []
        if spec.bits != base.bits:
            what.append(f"at {spec.bits} bits")
        if spec.observer != base.observer:
            what.append(f"observer {spec.observer}")
        if spec.granularity != base.granularity:
            what.append(getattr(spec.granularity, "value", str(spec.granularity)))
        changed[", ".join(what) or "changed"] += 1
    parts = [f"{n} point{'' if n == 1 else 's'} {what}" for what, n in changed.most_common()]
    parts += [f"{pattern!r} float" for pattern, override in config.overrides if not override.enabled]
    return "mixed: " + ", ".join(parts) if parts else "mixed: no point changed"


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
