"""Per-layer sensitivity: which quant points cost accuracy, and which to keep at higher precision.

Each quant point is quantized alone (every other point float) on a fixed set of calibration
images, and its cost is read on the model's output against the float model's: the KL divergence
``KL(float || quantized)`` of the softmax outputs (mean over the images, in nats) and the top-1
agreement (the share of images whose top-1 class stays the float model's). Points are ranked
worst first by KL, which separates points that the agreement of a few hundred images ties.

The ranking gives a mixed-precision config: every point at the run's bit widths except the
``keep`` most sensitive ones, which get ``keep_bits`` (a ``model.overrides`` mapping, see
:attr:`lit_ptq.quant.QuantConfig.overrides`). :class:`SensitivityCallback` runs all of this
after validation (``python main.py validate ... --sensitivity.enabled true``).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import yaml
from pytorch_lightning import Callback, LightningModule, Trainer

from .callbacks import CalibrationCallback
from .errors import ConfigError
from .io import check_writable, write_text
from .quant import QuantConfig, QuantizerStats, QuantMode, QuantPoint, float_points, quant_points
from .quant.walk import as_input

__all__ = [
    "ActivationHistogram",
    "PointSensitivity",
    "SensitivityCallback",
    "SensitivityResult",
    "activation_histograms",
    "keep_count",
    "measure_sensitivity",
    "mixed_precision_overrides",
    "output_divergence",
    "overrides_yaml",
    "sensitivity_markdown",
]

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 120
"""Bins of an activation histogram (over the values seen and the grid's range together)."""


@dataclass
class PointSensitivity:
    """What quantizing one point alone does to the model's output.

    Attributes:
        name: the quant point's name (``blocks.3.mlp.act_output``), as ``overrides`` patterns match it.
        role: ``weight``, ``act``, ``attn`` or ``norm``.
        bits: its bit width.
        kl: mean ``KL(float || quantized)`` of the softmax outputs, in nats.
        agreement: images (percent) whose top-1 class is the float model's.
        sqnr_db: the point's own SQNR on the last calibration batch (from the quantizer report;
            NaN when unknown).
        clipped: the share of its values the grid saturates there (NaN when unknown).
    """

    name: str
    role: str
    bits: int
    kl: float
    agreement: float
    sqnr_db: float = math.nan
    clipped: float = math.nan

    @property
    def top1_drop(self) -> float:
        """``100 - agreement``: images (percent) whose top-1 class changes."""
        return 100.0 - self.agreement

    def as_dict(self) -> dict[str, Any]:
        """The fields and ``top1_drop`` as a plain dict (for JSON)."""
        return dict(asdict(self), top1_drop=self.top1_drop)


@dataclass
class ActivationHistogram:
    """The values one quant point sees in the float model, with the range of its grid.

    Attributes:
        name: the quant point.
        role: its role.
        bits: its bit width.
        edges: ``len(counts) + 1`` bin edges, spanning the values and the grid's range.
        counts: values per bin.
        grid: the lowest and highest level of its grid (:meth:`QuantPoint.grid_range`), or None.
        clipped: the share of the values the grid saturates.
        numel, total, total_squares, min_val, max_val: count, sum, sum of squares and extremes
            of the values (TensorBoard's histogram summary).
    """

    name: str
    role: str
    bits: int
    edges: list[float]
    counts: list[float]
    grid: Optional[tuple[float, float]]
    clipped: float
    numel: int
    total: float
    total_squares: float
    min_val: float
    max_val: float


@dataclass
class SensitivityResult:
    """One run's sensitivity measurement and the mixed-precision config it gives.

    Attributes:
        images: images measured on.
        seconds: wall time of the measurement (histograms included).
        points: every quant point, worst first.
        histograms: the activation histograms of the worst points.
        keep_bits: the bit width the kept points get.
        kept: the points raised to ``keep_bits``, worst first.
        overrides: the whole ``model.overrides`` mapping of the mixed-precision config (the
            run's own overrides first).
        output: where that config was written, or None.
    """

    images: int
    seconds: float
    points: list[PointSensitivity]
    histograms: list[ActivationHistogram] = field(default_factory=list)
    keep_bits: int = 8
    kept: list[str] = field(default_factory=list)
    overrides: dict[str, Optional[dict[str, Any]]] = field(default_factory=dict)
    output: Optional[str] = None

    def record(self) -> dict[str, Any]:
        """The ``sensitivity`` field of the results JSON."""
        return dict(
            images=self.images,
            seconds=round(self.seconds, 3),
            ranking="kl",
            points=[p.as_dict() for p in self.points],
            mixed_precision=dict(keep_bits=self.keep_bits, kept=self.kept, overrides=self.overrides, output=self.output),
        )


def output_divergence(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Top-1 agreement (percent) and mean ``KL(reference || logits)`` (nats) of two logit batches.

    Args:
        reference: ``(N, classes)`` logits of the float model.
        logits: ``(N, classes)`` logits of the same images through the quantized model.

    Returns:
        ``(agreement, kl)``: 100 and 0 for identical logits.
    """
    if reference.shape != logits.shape or reference.dim() != 2 or reference.shape[0] == 0:
        shapes = f"{tuple(reference.shape)} and {tuple(logits.shape)}"
        raise ValueError(f"need two (N, classes) logit batches of one shape, got {shapes}")
    ref, out = reference.detach().double(), logits.detach().double()
    agreement = 100.0 * float((ref.argmax(1) == out.argmax(1)).double().mean())
    log_p, log_q = ref.log_softmax(1), out.log_softmax(1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(1).mean())
    return agreement, max(kl, 0.0)


def _logits(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model's float32 logits of ``images``, forwarded ``batch_size`` at a time."""
    device = next(model.parameters()).device
    return torch.cat([model(images[i : i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module, images: torch.Tensor, batch_size: int, report: Sequence[QuantizerStats] = ()
) -> list[PointSensitivity]:
    """Quantize each point of a calibrated model alone and measure the cost on its output.

    The float logits are computed once; then, point by point, only that point quantizes (the
    others pass their input through) and the images are forwarded again. The modes of every
    point and the model's training flag are restored afterwards.

    Args:
        model: a calibrated model (``calibrate`` or a loaded state).
        images: the fixed images, ``(N, C, H, W)``.
        batch_size: images per forward.
        report: the quantizer report of the run (:func:`lit_ptq.quant.quant_report`), whose SQNR
            and clipping are copied into the result.

    Returns:
        One :class:`PointSensitivity` per quant point, worst first (largest KL; ties in module order).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    own = {r.name: r for r in report}
    was_training = model.training
    model.eval()
    result = []
    try:
        with float_points(model) as points:
            reference = _logits(model, images, batch_size)
            for name, point in points:
                point.mode = QuantMode.QUANTIZE
                try:
                    agreement, kl = output_divergence(reference, _logits(model, images, batch_size))
                finally:
                    point.mode = QuantMode.FLOAT
                stats = own.get(name)
                result.append(
                    PointSensitivity(
                        name, point.role, point.bits, kl, agreement,
                        stats.sqnr_db if stats else math.nan, stats.clipped if stats else math.nan,
                    )
                )  # fmt: skip
    finally:
        model.train(was_training)
    return sorted(result, key=lambda p: -p.kl)


def _histogram(point: QuantPoint, args: tuple, out: torch.Tensor, bins: int) -> ActivationHistogram:
    """The histogram of what ``point`` sees in one float-mode call."""
    x, _, clipped = point.error_terms(args, out)
    x = x.detach().double().flatten()
    grid = point.grid_range()
    lo, hi = float(x.min()), float(x.max())
    if grid is not None:
        lo, hi = min(lo, grid[0]), max(hi, grid[1])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(x, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return ActivationHistogram(
        point.qualname, point.role, point.bits, edges.tolist(), counts.cpu().tolist(), grid,
        float(clipped.double().mean()), x.numel(), float(x.sum()), float(x.pow(2).sum()),
        float(x.min()), float(x.max()),
    )  # fmt: skip


@torch.no_grad()
def activation_histograms(
    model: nn.Module, images: torch.Tensor, names: Iterable[str], bins: int = HISTOGRAM_BINS
) -> list[ActivationHistogram]:
    """Histograms of the values the points ``names`` see when the float model runs on ``images``.

    Each point's histogram spans the values and its grid's range, so the clipping range can be
    drawn on it. The modes of every point are restored afterwards.

    Args:
        model: a calibrated model.
        images: one batch of images (every value of every named point is counted).
        names: quant point names, in the order the histograms are returned.
        bins: bins per histogram.
    """
    points = dict(quant_points(model))
    wanted = [n for n in names if n in points]
    found: dict[str, ActivationHistogram] = {}
    hooks = []
    for name in wanted:

        def hook(mod: QuantPoint, args: tuple, out: torch.Tensor, name: str = name) -> None:
            if name not in found:  # a point called twice in a forward keeps its first call
                found[name] = _histogram(mod, args, out, bins)

        hooks.append(points[name].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with float_points(model):
            model(images.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [found[n] for n in wanted if n in found]


def keep_count(keep: Union[int, float], candidates: int) -> int:
    """How many points to keep at higher precision.

    Args:
        keep: a count (an ``int`` >= 0) or a share of the candidates (a ``float`` in (0, 1],
            rounded up).
        candidates: how many points could be kept.
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ConfigError(f"sensitivity.keep={keep!r} must be a count (an integer >= 0) or a share in (0, 1]")
    if isinstance(keep, int):
        if keep < 0:
            raise ConfigError(f"sensitivity.keep={keep} must be a count >= 0 or a share in (0, 1]")
        return min(keep, candidates)
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"sensitivity.keep={keep} must be a share in (0, 1] (or an integer count)")
    return min(math.ceil(keep * candidates - 1e-9), candidates)


def _check_keep_bits(keep_bits: int) -> None:
    """Raise ``ConfigError`` unless ``keep_bits`` is an integer in 2..16."""
    if isinstance(keep_bits, bool) or not isinstance(keep_bits, int) or not 2 <= keep_bits <= 16:
        raise ConfigError(f"sensitivity.keep_bits={keep_bits!r} is outside the supported range 2..16")


def _literal_pattern(name: str) -> str:
    """An ``fnmatch`` pattern that matches exactly ``name``."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def mixed_precision_overrides(
    points: Sequence[PointSensitivity], config: QuantConfig, keep: Union[int, float], keep_bits: int
) -> tuple[dict[str, Optional[dict[str, Any]]], list[str]]:
    """The ``model.overrides`` mapping that keeps the most sensitive points at ``keep_bits``.

    Candidates are the points below ``keep_bits``; the ``keep_count(keep, candidates)`` worst of
    them (in the order of ``points``, worst first) get ``{bits: keep_bits}``. The config's own
    overrides come first, so the mapping replaces ``model.overrides`` without losing them.

    Args:
        points: the sensitivity ranking, worst first.
        config: the run's quantization config.
        keep: a count or a share of the candidates (see :func:`keep_count`).
        keep_bits: the bit width of the kept points, 2..16.

    Returns:
        ``(overrides, kept)``: the mapping and the names of the kept points, worst first.
    """
    _check_keep_bits(keep_bits)
    candidates = [p for p in points if p.bits < keep_bits]
    kept = [p.name for p in candidates[: keep_count(keep, len(candidates))]]
    overrides = {pattern: o.describe() for pattern, o in config.overrides}
    for name in kept:
        pattern = _literal_pattern(name)
        # moved to the end, so that no earlier wildcard of the run's own overrides wins over it
        overrides[pattern] = {**(overrides.pop(pattern, None) or {}), "bits": keep_bits}
    return overrides, kept


def overrides_yaml(overrides: Mapping[str, Optional[Mapping[str, Any]]], comment: Sequence[str] = ()) -> str:
    """``model: {overrides: ...}`` as YAML, for ``--config``, after ``comment`` lines (``# ...``)."""
    head = "".join(f"# {line}\n" for line in comment)
    mapping = {k: (dict(v) if v is not None else None) for k, v in overrides.items()}
    body = yaml.safe_dump({"model": {"overrides": mapping}}, sort_keys=False, default_flow_style=None)
    return head + body


def sensitivity_markdown(points: Sequence[PointSensitivity], top: int) -> str:
    """The ``top`` worst points as a markdown table, worst first."""
    lines = [
        "| rank | quant point | role | bits | KL (nats) | top-1 agreement % | top-1 changed % | own SQNR dB | clipped % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(points[:top], 1):
        lines.append(
            f"| {i} | {p.name} | {p.role} | {p.bits} | {p.kl:.3g} | {p.agreement:.2f} | {p.top1_drop:.2f} | "
            f"{p.sqnr_db:.2f} | {100 * p.clipped:.2f} |"
        )
    return "\n".join(lines)


class SensitivityCallback(Callback):
    """After validation, measure every quant point's sensitivity and write a mixed-precision config.

    On global rank 0 only (the others finish as usual): the first ``images`` calibration images
    (``datamodule.calib_dataloader()``, the same images on every run of a config) go through the
    float model once and once per quant point with that point alone quantizing
    (:func:`measure_sensitivity`); then the activation histograms of the ``histograms`` worst
    points (:func:`activation_histograms`, on the first ``batch_size`` images) and the
    mixed-precision overrides (:func:`mixed_precision_overrides`), written to ``output`` when set.
    The CLI logs :attr:`result` to TensorBoard and the results JSON.

    Args:
        enabled: measure (off by default: it costs one forward of ``images`` per quant point).
        images: calibration images to measure on (at most the run's calibration images).
        batch_size: images per forward; None: the calibration batch size.
        keep: how many points the mixed-precision config keeps at ``keep_bits``: a count (an
            integer) or a share of the points below ``keep_bits`` (a float in (0, 1], rounded up;
            default 0.1, a tenth of them).
        keep_bits: the bit width of the kept points.
        output: write the mixed-precision config (``model: {overrides: ...}``, for ``--config``)
            to this YAML file.
        top: rows of the worst-points table and bars of the chart.
        histograms: how many of the worst points get an activation histogram.

    Attributes:
        result: the measurement of the last run (None before, and on ranks other than 0).
    """

    def __init__(
        self,
        enabled: bool = False,
        images: int = 256,
        batch_size: Optional[int] = None,
        keep: Union[int, float] = 0.1,
        keep_bits: int = 8,
        output: Optional[str] = None,
        top: int = 20,
        histograms: int = 6,
    ) -> None:
        super().__init__()
        self.enabled, self.images, self.batch_size = enabled, images, batch_size
        self.keep, self.keep_bits, self.output = keep, keep_bits, output
        self.top, self.histograms = top, histograms
        self.result: Optional[SensitivityResult] = None

    def check_options(self, quantized: bool, onnx: Optional[str], calib_images: int, subcommand: Optional[str]) -> None:
        """Fail before any compute on options that cannot work.

        Args:
            quantized: whether the config quantizes (``model.method`` set).
            onnx: ``model.onnx``, when set.
            calib_images: calibration images the data module will read.
            subcommand: the CLI subcommand.
        """
        if not self.enabled:
            if self.output is not None:
                raise ConfigError(
                    f"sensitivity.output={self.output} is written by a sensitivity run; add --sensitivity.enabled true"
                )
            return
        if subcommand not in (None, "validate"):
            raise ConfigError(f"sensitivity.enabled=true is for validate, not {subcommand}; remove it")
        if not quantized:
            raise ConfigError("sensitivity.enabled=true measures quant points but model.method is null (float); set model.method")
        if onnx:
            raise ConfigError(
                f"sensitivity.enabled=true measures the PyTorch model's quant points, not model.onnx={onnx}; remove one"
            )
        for name in ("images", "top"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"sensitivity.{name}={value!r} must be a positive integer")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"sensitivity.batch_size={self.batch_size!r} must be a positive integer or null")
        if isinstance(self.histograms, bool) or not isinstance(self.histograms, int) or self.histograms < 0:
            raise ConfigError(f"sensitivity.histograms={self.histograms!r} must be an integer >= 0")
        if importlib.util.find_spec("matplotlib") is None:
            raise ConfigError(
                "sensitivity.enabled=true needs matplotlib for its chart, which is not installed; pip install -r requirements.txt"
            )
        keep_count(self.keep, 0)  # raises on a keep of the wrong type or range
        _check_keep_bits(self.keep_bits)
        if calib_images < 1:
            raise ConfigError(
                "sensitivity.enabled=true measures on calibration images but data.calib_batches=0; set data.calib_batches >= 1"
            )
        if self.output is not None:
            check_writable(self.output, "sensitivity.output")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Measure on global rank 0 in a one-process run; under DDP the caller runs :meth:`run`.

        Under DDP the other ranks would wait in their next collective (the CLI's sum of
        skipped files) while rank 0 measures, up to the process group's timeout; the CLI calls
        :meth:`run` after its last collective instead.
        """
        self.result = None
        if trainer.world_size == 1:
            self.run(trainer, pl_module)

    def run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Measure ``pl_module`` on global rank 0 and keep the result in :attr:`result` (no-op elsewhere)."""
        if not self.enabled or not getattr(pl_module, "quantized", False) or not trainer.is_global_zero:
            return
        calibration = next((cb for cb in trainer.callbacks if isinstance(cb, CalibrationCallback)), None)
        report = calibration.report if calibration is not None else []
        self.result = self.measure(pl_module, trainer.datamodule, report)

    def measure(self, pl_module: LightningModule, datamodule: Any, report: Sequence[QuantizerStats] = ()) -> SensitivityResult:
        """Measure ``pl_module``'s calibrated model on ``datamodule``'s calibration images,
        write ``output`` when set, and return the result."""
        start = time.perf_counter()
        images = self._images(datamodule)
        batch_size = self.batch_size or int(getattr(datamodule, "calib_batch_size", 0) or len(images))
        model = pl_module.model
        points = measure_sensitivity(model, images, batch_size, report)
        worst = [p.name for p in points[: self.histograms]]
        histograms = activation_histograms(model, images[:batch_size], worst) if worst else []
        config: QuantConfig = model.quant_config
        overrides, kept = mixed_precision_overrides(points, config, self.keep, self.keep_bits)
        result = SensitivityResult(len(images), 0.0, points, histograms, self.keep_bits, kept, overrides, self.output)
        if self.output is not None:
            self._write(result, config, pl_module)
        result.seconds = time.perf_counter() - start
        log.info("sensitivity of %d quant points on %d images took %.1f s", len(points), len(images), result.seconds)
        return result

    def _images(self, datamodule: Any) -> torch.Tensor:
        """The first ``images`` calibration images, as one tensor."""
        if not hasattr(datamodule, "calib_dataloader"):
            raise ValueError("sensitivity needs a datamodule with calib_dataloader() (an ImageNetDataModule)")
        taken: list[torch.Tensor] = []
        count = 0
        for batch in datamodule.calib_dataloader():
            x = as_input(batch)[: self.images - count]
            taken.append(x)
            count += x.shape[0]
            if count >= self.images:
                break
        if not count:
            raise ConfigError("sensitivity.enabled=true found no calibration images; set data.calib_batches >= 1")
        return torch.cat(taken)

    def _write(self, result: SensitivityResult, config: QuantConfig, pl_module: LightningModule) -> None:
        """Write the mixed-precision config to ``output`` (atomically)."""
        hp = pl_module.hparams
        comment = [
            f"Mixed precision for {hp.model_name} {config.method} {config.placement} {config.bits}, "
            "written by --sensitivity.output:",
            f"the {len(result.kept)} most sensitive of its {len(result.points)} quant points "
            "(KL of the output with each point alone",
            f"quantized, on {result.images} calibration images) at {result.keep_bits} bits, the others as the run's config says.",
            "Pass it after the run's own options: python main.py validate --config RUN.yaml ... --config THIS.yaml",
        ]
        assert self.output is not None
        write_text(self.output, overrides_yaml(result.overrides, comment))
        log.info("mixed-precision overrides written to %s", self.output)
