"""Matplotlib figures for TensorBoard: the sensitivity chart and the activation histograms.

matplotlib is imported when a figure is made, with the non-interactive Agg backend, so runs that
draw nothing never load it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .sensitivity import ActivationHistogram, PointSensitivity

__all__ = ["histogram_figure", "sensitivity_figure"]

ROLE_COLORS = {"act": "#1f77b4", "attn": "#ff7f0e", "weight": "#2ca02c", "norm": "#9467bd"}
"""Bar colour of each quant-point role."""


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sensitivity_figure(points: Sequence[PointSensitivity], top: int, images: int) -> Any:
    """Horizontal bars of the ``top`` worst points, worst at the top, one row per quant point.

    Three panels share the rows: the KL divergence of the output with the point alone
    quantized, the images whose top-1 class changes, and the point's own SQNR.

    Args:
        points: the sensitivity ranking, worst first.
        top: how many points to draw.
        images: the images measured on (for the title).

    Returns:
        A matplotlib ``Figure`` (``SummaryWriter.add_figure`` closes it).
    """
    plt = _pyplot()
    shown = list(points[:top])
    labels = [f"{p.name} ({p.bits}b)" for p in shown]
    colors = [ROLE_COLORS.get(p.role, "#7f7f7f") for p in shown]
    rows = range(len(shown))
    fig, axes = plt.subplots(1, 3, sharey=True, figsize=(9, 1.6 + 0.3 * len(shown)), gridspec_kw={"width_ratios": [3, 2, 2]})
    panels = (
        ([p.kl for p in shown], "KL(float || quantized) (nats)", "{:.3g}"),
        ([p.top1_drop for p in shown], "top-1 changed (%)", "{:.1f}"),
        ([p.sqnr_db if math.isfinite(p.sqnr_db) else 0.0 for p in shown], "own SQNR (dB)", "{:.1f}"),
    )
    for ax, (values, title, fmt) in zip(axes, panels):
        bars = ax.barh(rows, values, color=colors)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=2, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.margins(x=0.18)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(list(rows), labels, fontsize=8)
    axes[0].invert_yaxis()
    roles = sorted({p.role for p in shown})
    handles = [plt.Rectangle((0, 0), 1, 1, color=ROLE_COLORS.get(r, "#7f7f7f")) for r in roles]
    axes[-1].legend(handles, roles, fontsize=7, loc="lower right")
    fig.suptitle(
        f"Sensitivity: each quant point alone quantized (the others float) on {images} calibration images\n"
        f"the worst {len(shown)} of {len(points)} quant points by KL, worst at the top",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def histogram_figure(histograms: Sequence[ActivationHistogram]) -> Any:
    """One panel per histogram: the values a point sees (log counts) and its grid's range.

    Args:
        histograms: from :func:`lit_ptq.sensitivity.activation_histograms`.

    Returns:
        A matplotlib ``Figure``.
    """
    plt = _pyplot()
    cols = min(3, max(1, len(histograms)))
    rows = max(1, math.ceil(len(histograms) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat[len(histograms) :]:
        ax.axis("off")
    for ax, h in zip(axes.flat, histograms):
        ax.stairs(h.counts, h.edges, fill=True, color=ROLE_COLORS.get(h.role, "#7f7f7f"))
        ax.set_yscale("log")
        if h.grid is not None:
            for x in h.grid:
                ax.axvline(x, color="#d62728", linestyle="--", linewidth=1)
        ax.set_title(f"{h.name}\n{h.role}, {h.bits} bits, clipped {100 * h.clipped:.2f} %", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("Values each point sees in the float model; red dashes: its grid's lowest and highest level", fontsize=9)
    fig.tight_layout()
    return fig
