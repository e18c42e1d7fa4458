"""The sensitivity run: per-layer sensitivity of a calibrated run and the mixed-precision config it gives.

The measurement is the core's (:mod:`lit_ptq.quant.sensitivity`: each quant point quantized
alone, its cost on the output as KL divergence and top-1 agreement, the ranking, the
mixed-precision overrides); this module is the run around it: the options of
``python main.py validate ... --sensitivity.enabled true`` (:class:`SensitivitySettings`),
the calibration images measured on, the result recorded in the results JSON
(:class:`SensitivityResult`), and the mixed-precision YAML file. The run service
(:mod:`lit_ptq.run`) measures after validation, on global rank 0, in one process or under DDP.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import yaml

from .errors import ConfigError
from .io import check_writable, write_text
from .quant import QuantConfig, QuantizerStats
from .quant.sensitivity import (
    HISTOGRAM_BINS,
    ActivationHistogram,
    PointSensitivity,
    Progress,
    activation_histograms,
    check_keep_bits,
    keep_count,
    measure_sensitivity,
    mixed_precision_overrides,
    output_divergence,
)
from .quant.walk import as_input

__all__ = [
    "HISTOGRAM_BINS",
    "ActivationHistogram",
    "PointSensitivity",
    "SensitivityResult",
    "SensitivitySettings",
    "activation_histograms",
    "keep_count",
    "measure_sensitivity",
    "mixed_precision_overrides",
    "output_divergence",
    "overrides_yaml",
    "sensitivity_lines",
    "sensitivity_markdown",
]

log = logging.getLogger(__name__)


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


def sensitivity_lines(result: SensitivityResult, worst: int = 5) -> list[str]:
    """What a sensitivity run prints: the ``worst`` points as an aligned table (name, KL,
    top-1 changed), then the mixed-precision config's points and where it was written.

    Args:
        result: the measurement.
        worst: rows of the table.
    """
    points = result.points[:worst]
    rows = [("quant point", "KL (nats)", "top-1 changed %")]
    rows += [(p.name, f"{p.kl:.3g}", f"{p.top1_drop:.2f}") for p in points]
    name_width = max(len(r[0]) for r in rows)
    kl_width = max(len(r[1]) for r in rows)
    lines = [
        f"sensitivity of {len(result.points)} quant points on {result.images} images ({result.seconds:.1f} s); "
        f"the {len(points)} worst:"
    ]
    lines += [f"  {name:<{name_width}}  {kl:>{kl_width}}  {drop:>15}" for name, kl, drop in rows]
    kept = f"{len(result.kept)} point{'' if len(result.kept) == 1 else 's'} at {result.keep_bits} bits"
    if result.output is not None:
        lines.append(f"mixed-precision config ({kept}) written to {result.output}; pass it back with --config {result.output}")
    else:
        lines.append(f"mixed-precision config: {kept}; write it with --sensitivity.output FILE.yaml")
    return lines


class SensitivitySettings:
    """The ``sensitivity`` options of the CLI: measure every quant point's sensitivity after validation
    and write a mixed-precision config.

    :meth:`measure` runs it (the run service calls it on global rank 0 only, after the last
    collective of the run, in one process or under DDP): the first ``images`` calibration images
    (``datamodule.calib_dataloader()``, the same images on every run of a config) go through the
    float model once and once per quant point with that point alone quantizing
    (:func:`measure_sensitivity`); then the activation histograms of the ``histograms`` worst
    points (:func:`activation_histograms`, on the first ``batch_size`` images) and the
    mixed-precision overrides (:func:`mixed_precision_overrides`), written to ``output`` when set.
    The run service logs the result to TensorBoard and the results JSON.

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
        self.enabled, self.images, self.batch_size = enabled, images, batch_size
        self.keep, self.keep_bits, self.output = keep, keep_bits, output
        self.top, self.histograms = top, histograms

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
        check_keep_bits(self.keep_bits)
        if calib_images < 1:
            raise ConfigError(
                "sensitivity.enabled=true measures on calibration images but data.calib_batches=0; set data.calib_batches >= 1"
            )
        if self.output is not None:
            check_writable(self.output, "sensitivity.output")

    def measure(
        self,
        pl_module: Any,
        datamodule: Any,
        report: Sequence[QuantizerStats] = (),
        progress: Optional[Progress] = None,
    ) -> SensitivityResult:
        """Measure ``pl_module``'s calibrated model on ``datamodule``'s calibration images,
        write ``output`` when set, and return the result.

        Args:
            pl_module: a :class:`~lit_ptq.module.PTQModule` with a calibrated model, on the
                device to measure on.
            datamodule: gives ``calib_dataloader()`` and ``calib_batch_size``.
            report: the run's quantizer report, whose SQNR and clipping the result copies.
            progress: makes the progress bar over the quant points measured.
        """
        start = time.perf_counter()
        images = self._images(datamodule)
        batch_size = self.batch_size or int(getattr(datamodule, "calib_batch_size", 0) or len(images))
        model = pl_module.model
        points = measure_sensitivity(model, images, batch_size, report, progress)
        worst = [p.name for p in points[: self.histograms]]
        histograms = activation_histograms(model, images[:batch_size], worst) if worst else []
        config: QuantConfig = model.quant_config
        overrides, kept = mixed_precision_overrides(points, config, self.keep, self.keep_bits)
        result = SensitivityResult(len(images), 0.0, points, histograms, self.keep_bits, kept, overrides, self.output)
        if self.output is not None:
            self._write(result, config, pl_module)
        result.seconds = time.perf_counter() - start
        log.debug("sensitivity of %d quant points on %d images took %.1f s", len(points), len(images), result.seconds)
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

    def _write(self, result: SensitivityResult, config: QuantConfig, pl_module: Any) -> None:
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
        log.debug("mixed-precision overrides written to %s", self.output)  # the run service prints it
