"""Matplotlib figures for TensorBoard: per-layer SQNR, the sensitivity ranking, activation histograms.

Every figure is one narrow column (:data:`WIDTH` pixels wide, as tall as its rows need), with
layer names on its axis, axis titles and fonts large enough to read where TensorBoard's IMAGES
tab scales an image to its card; legends sit below the axes, where they cover no bar or label.
matplotlib is imported when a figure is made, with the non-interactive Agg backend, so runs
that draw nothing never load it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any, Optional

from .quant import QuantizerStats
from .sensitivity import ActivationHistogram, PointSensitivity

__all__ = ["DPI", "HISTOGRAM_HEIGHT", "ROW", "WIDTH", "histogram_figure", "sensitivity_figure", "sqnr_figure", "top1_figure"]

WIDTH = 350
"""Width of every figure in pixels: the IMAGES tab shows an image 350 pixels wide at its default
settings (scaling a wider one down), any height."""

DPI = 100
"""Pixels per inch of the figures (a font of ``n`` points is ``1.4 n`` pixels high)."""

FONT = 8
"""Font size (points) of tick labels, bar labels and axis titles."""

ROW = 0.2
"""Height (inches) of one bar row."""

HISTOGRAM_HEIGHT = 270
"""Height of a histogram figure in pixels: with :data:`WIDTH`, about the shape of the TIME
SERIES tab's image cards, which fit an image to their height as well as their width."""

ROLE_COLORS = {"act": "#1f77b4", "attn": "#ff7f0e", "weight": "#2ca02c", "norm": "#9467bd"}
"""Bar colour of each quant-point role."""

OVERRIDDEN_COLOR = "#d62728"
"""Bar colour of a point whose setting ``model.overrides`` changes."""


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar_figure(
    labels: Sequence[str],
    values: Sequence[float],
    colors: Sequence[str],
    texts: Sequence[str],
    title: str,
    xlabel: str,
    legend: Sequence[tuple[str, str]] = (),
    hatched: Optional[Collection[int]] = None,
) -> Any:
    """One horizontal bar per row, top to bottom in the given order, with its value at its end.

    Args:
        labels: the row names (the y axis).
        values: the bar lengths; a NaN draws no bar.
        colors: one bar colour per row.
        texts: the text written at each bar's end.
        title: the figure's title (may hold a newline).
        xlabel: the x axis title.
        legend: ``(colour, text)`` entries, drawn below the axes.
        hatched: rows drawn hatched (the points ``model.overrides`` sets).
    """
    plt = _pyplot()
    title_lines = title.count("\n") + 1
    legend_rows = math.ceil(len(legend) / 2)
    height = ROW * len(labels) + 0.25 * title_lines + 0.3 * legend_rows + 0.9
    fig, ax = plt.subplots(figsize=(WIDTH / DPI, height), dpi=DPI, layout="constrained")
    rows = list(range(len(labels)))
    drawn = [0.0 if math.isnan(v) else v for v in values]
    bars = ax.barh(rows, drawn, color=colors, height=0.75)
    for i in hatched or ():
        bars[i].set_hatch("///")
        bars[i].set_edgecolor("white")
    ax.bar_label(bars, labels=list(texts), padding=2, fontsize=FONT - 1)
    ax.set_yticks(rows, labels, fontsize=FONT)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first row at the top
    ax.tick_params(axis="x", labelsize=FONT - 1)
    ax.margins(x=0.22)
    ax.set_xlim(left=min(0.0, *drawn) if drawn else 0.0)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(xlabel, fontsize=FONT, loc="right")
    fig.suptitle(title, fontsize=FONT + 1)
    if legend:
        handles = [plt.Rectangle((0, 0), 1, 1, color=color) for color, _ in legend]
        fig.legend(handles, [text for _, text in legend], loc="outside lower center", ncols=2, fontsize=FONT - 1, frameon=False)
    return fig


def _role_legend(roles: Collection[str]) -> list[tuple[str, str]]:
    return [(ROLE_COLORS.get(r, "#7f7f7f"), r) for r in sorted(roles)]


def _labels(names: Sequence[str], bits: Sequence[int]) -> tuple[list[str], str]:
    """The row labels and the words for their bit width: the names and ``at 4 bits`` when every
    row has one width, else each name with its width (``blocks.0.attn.logits (8b)``) and ``""``."""
    if len(set(bits)) == 1:
        return list(names), f" at {bits[0]} bits"
    return [f"{n} ({b}b)" for n, b in zip(names, bits)], ""


def _sqnr_text(sqnr_db: float) -> str:
    """An SQNR as a bar's label: ``12.3``, ``lossless`` (no error) or ``no signal`` (all zeros)."""
    if math.isfinite(sqnr_db):
        return f"{sqnr_db:.1f}"
    return "lossless" if sqnr_db > 0 else "no signal"


def sqnr_figure(report: Sequence[QuantizerStats], role: str, overridden: Collection[str] = ()) -> Any:
    """The own SQNR of each quant point of one role, in module order, names on the axis.

    Args:
        report: the quantizer report (every role; those of ``role`` are drawn).
        role: ``act``, ``attn``, ``weight`` or ``norm``.
        overridden: names of the points ``model.overrides`` sets: drawn red and hatched.

    Returns:
        A matplotlib ``Figure`` (``SummaryWriter.add_figure`` closes it).
    """
    points = [r for r in report if r.role == role]
    marked = [i for i, r in enumerate(points) if r.name in overridden]
    values = [r.sqnr_db if math.isfinite(r.sqnr_db) else math.nan for r in points]
    colors = [OVERRIDDEN_COLOR if i in marked else ROLE_COLORS.get(role, "#7f7f7f") for i in range(len(points))]
    legend = [(ROLE_COLORS.get(role, "#7f7f7f"), f"{role}, the run's bits"), (OVERRIDDEN_COLOR, "set by model.overrides")]
    labels, width = _labels([r.name for r in points], [r.bits for r in points])
    return _bar_figure(
        labels, values, colors, [_sqnr_text(r.sqnr_db) for r in points],
        f"Own SQNR of each {role} quant point{width},\nin model order, on the last calibration batch\n(each point's input from the float model)",
        "own SQNR (dB), higher is better",
        legend if marked else (), marked,
    )  # fmt: skip


def _ranking(points: Sequence[PointSensitivity], top: int) -> tuple[list[PointSensitivity], list[str], str, list[str]]:
    """The ``top`` first points, their labels, the words for their width (:func:`_labels`), their colours."""
    shown = list(points[:top])
    labels, width = _labels([p.name for p in shown], [p.bits for p in shown])
    return shown, labels, width, [ROLE_COLORS.get(p.role, "#7f7f7f") for p in shown]


def sensitivity_figure(points: Sequence[PointSensitivity], top: int, images: int) -> Any:
    """The ``top`` worst points by KL, worst at the top, names on the axis.

    Args:
        points: the sensitivity ranking, worst first.
        top: how many points to draw.
        images: the images measured on (for the title).

    Returns:
        A matplotlib ``Figure``.
    """
    shown, labels, width, colors = _ranking(points, top)
    return _bar_figure(
        labels, [p.kl for p in shown], colors, [f"{p.kl:.2g}" for p in shown],
        f"The {len(shown)} of {len(points)} quant points that cost most,\n"
        f"each quantized alone{width} (the others float),\non {images} images",
        "KL(float || quantized) of the output (nats)",
        _role_legend({p.role for p in shown}),
    )  # fmt: skip


def top1_figure(points: Sequence[PointSensitivity], top: int, images: int) -> Any:
    """The images whose top-1 class changes, for the rows of :func:`sensitivity_figure`.

    Args:
        points: the sensitivity ranking, worst first.
        top: how many points to draw.
        images: the images measured on.

    Returns:
        A matplotlib ``Figure``.
    """
    shown, labels, width, colors = _ranking(points, top)
    return _bar_figure(
        labels, [p.top1_drop for p in shown], colors, [f"{p.top1_drop:.1f}" for p in shown],
        f"Top-1 class changed: the {len(shown)} worst points by KL,\n"
        f"each quantized alone{width} (the others float),\non {images} images",
        "images whose top-1 class changes (%)",
        _role_legend({p.role for p in shown}),
    )  # fmt: skip


def histogram_figure(h: ActivationHistogram, report_clipped: Optional[float] = None) -> Any:
    """The values one point sees in the float model (log counts), with its grid's range.

    Args:
        h: from :func:`lit_ptq.sensitivity.activation_histograms`.
        report_clipped: the point's clipped share in the quantizer report (the text tables'),
            measured on the last calibration batch; None when the run has no report.

    Returns:
        A matplotlib ``Figure``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(WIDTH / DPI, HISTOGRAM_HEIGHT / DPI), dpi=DPI, layout="constrained")
    ax.stairs(h.counts, h.edges, fill=True, color=ROLE_COLORS.get(h.role, "#7f7f7f"))
    ax.set_yscale("log")
    if h.grid is not None:
        for x in h.grid:
            ax.axvline(x, color="#d62728", linestyle="--", linewidth=1.2)
    fig.suptitle(f"{h.name}\n{h.role}, {h.bits} bits; red dashes: its lowest and highest level", fontsize=FONT)
    ax.set_xlabel("value the point sees in the float model", fontsize=FONT)
    ax.set_ylabel("values per bin (log scale)", fontsize=FONT)
    ax.tick_params(labelsize=FONT - 1)
    caption = f"clipped here: {100 * h.clipped:.2f} % (the first batch of the sensitivity images)"
    if report_clipped is not None and not math.isnan(report_clipped):
        caption += f"\nin the text tables: {100 * report_clipped:.2f} % (the last calibration batch)"
    fig.supxlabel(caption, fontsize=FONT - 1)
    return fig
