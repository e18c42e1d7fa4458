"""What a run writes to TensorBoard: its name, typed hparams, the quantizer report and sensitivity.

A run logs to ``<save_dir>/<model>/<settings>/version_<n>`` (:func:`run_name`), so TensorBoard's
run list says what each run is. Its hparams are written by hand with TensorBoard's hparams
plugin protos, not through ``TensorBoardLogger.log_hyperparams``: every run logs the same
columns (:data:`HPARAM_COLUMNS`) with their real types (booleans as booleans, float runs
included), and the same experiment config, which marks the five columns a user compares first
(:data:`VISIBLE`) so the HPARAMS tab shows them by default (it shows five hparam columns,
those flagged ``differs`` first, by name).

Per-layer results are images (:mod:`lit_ptq.figures`) with the layer names on their axis, not
step-indexed scalars, which TensorBoard would smooth and clip and could not name; nothing is
logged that would make an empty or constant card (one-step histograms, Lightning's ``epoch``).
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import yaml
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2, summary_v2

from .io import write_text
from .quant import QuantizerStats
from .results import report_markdown
from .sensitivity import SensitivityResult, overrides_yaml, sensitivity_markdown

__all__ = [
    "HPARAM_COLUMNS",
    "METRICS",
    "VISIBLE",
    "HParamColumn",
    "log_hparams",
    "log_report",
    "log_run",
    "histogram_tag",
    "log_sensitivity",
    "name_logger",
    "overridden_points",
    "run_hparams",
    "run_name",
]

HParamValue = Union[str, bool, int, float]


@dataclass(frozen=True)
class HParamColumn:
    """One hparam every run logs.

    Attributes:
        name: the key (a column of the HPARAMS tab, a key of ``hparams.yaml``).
        kind: ``str``, ``bool`` or ``int`` (a number in TensorBoard).
        visible: shown by default in the HPARAMS tab.
        description: what it is (the column's tooltip).
    """

    name: str
    kind: type
    visible: bool
    description: str


HPARAM_COLUMNS: tuple[HParamColumn, ...] = (
    HParamColumn("method", str, True, "activation observer; fp32 for the float model"),
    HParamColumn("placement", str, True, "which tensors are quantized (seed, full, matmul); none in float"),
    HParamColumn("bits", str, True, "weights/activations/attention bit widths; 32/32/32 in float"),
    HParamColumn("ptf", bool, True, "FQ-ViT's power-of-two factors for LayerNorm inputs"),
    HParamColumn("overrides", str, True, "model.overrides (per-layer settings): how many entries set what, or none"),
    HParamColumn("lis", bool, False, "FQ-ViT's log-int-softmax"),
    HParamColumn("model", str, False, "registered model name"),
    HParamColumn("recipe", str, False, "low-bit recipe (repq, repq_gptq, recon, ...) or none"),
    HParamColumn("softmax", str, False, "softmax-output quantizer (uniform, log2, log_sqrt2); none in float"),
    HParamColumn("arithmetic", str, False, "seed or fused fake quantization; none in float"),
    HParamColumn("calib_images", int, False, "images calibration saw (0 in float or with a loaded state)"),
    HParamColumn("backend", str, False, "what computed the logits: pytorch or onnxruntime"),
    HParamColumn("checkpoint", str, False, "float weights file; none when not set"),
)
"""The hparams of every run, in the order of ``hparams.yaml``."""

VISIBLE = tuple(c.name for c in HPARAM_COLUMNS if c.visible)
"""The columns the HPARAMS tab shows by default (it shows at most five)."""

METRICS: tuple[tuple[str, str], ...] = (
    ("hp/acc1", "top-1 %"),
    ("hp/acc5", "top-5 %"),
    ("hp/loss", "loss"),
    ("hp/skipped_files", "skipped files"),
)
"""The HPARAMS tab's metric columns: ``(tag, display name)``, each a scalar of the run."""

_TYPES = {str: api_pb2.DATA_TYPE_STRING, bool: api_pb2.DATA_TYPE_BOOL, int: api_pb2.DATA_TYPE_FLOAT64}


def run_hparams(summary: Mapping[str, Any]) -> dict[str, HParamValue]:
    """The typed hparams of a run (:data:`HPARAM_COLUMNS`) from its summary or results record.

    ``summary`` is :meth:`lit_ptq.module.PTQModule.run_summary` or the results record (which
    adds ``calib_images`` and ``backend``); what a float run lacks takes its float meaning
    (``none``, ``False``, 0).
    """
    quantized = summary.get("method") not in (None, "fp32")
    none = "none"
    values: dict[str, HParamValue] = dict(
        method=str(summary.get("method") or "fp32"),
        placement=str(summary.get("placement") or none),
        bits=str(summary.get("bits") or "32/32/32"),
        ptf=bool(summary.get("ptf", False)),
        lis=bool(summary.get("lis", False)),
        model=str(summary.get("model") or none),
        recipe=str(summary.get("recipe") or none),
        softmax=str(summary.get("softmax") or ("uniform" if quantized else none)),
        arithmetic=str(summary.get("arithmetic") or none) if quantized else none,
        overrides=_overrides_summary(summary.get("overrides") or {}),
        calib_images=int(summary.get("calib_images") or 0),
        backend=str(summary.get("backend") or "pytorch"),
        checkpoint=str(summary.get("checkpoint") or none),
    )
    return {c.name: values[c.name] for c in HPARAM_COLUMNS}


def _overrides_summary(overrides: Mapping[str, Any]) -> str:
    """``model.overrides`` in a few words: ``8 x {bits: 8}``, ``1 x null, 2 x {bits: 6}``, ``none``."""
    counts: dict[str, int] = {}
    for setting in overrides.values():
        label = "null" if setting is None else "{" + ", ".join(f"{k}: {v}" for k, v in setting.items()) + "}"
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{n} x {label}" for label, n in counts.items()) or "none"


def run_name(summary: Mapping[str, Any]) -> str:
    """``<model>/<settings>``, e.g. ``itpn_tiny/omse-seed-w4a4a4`` or ``itpn_tiny/fp32``.

    ``summary`` is what :func:`run_hparams` takes. The settings are the method, placement and
    bit widths (``w<W>a<A>a<Attn>``), then what is set of ``ptf``, ``lis``, the recipe, a
    softmax quantizer other than the default, ``fused`` arithmetic, ``mixed<n>`` for ``n``
    entries of ``overrides`` and ``onnx`` for an ONNX file.
    """
    hparams = run_hparams(summary)
    if hparams["method"] == "fp32":
        settings = "fp32"
    else:
        w, a, s = str(hparams["bits"]).split("/")
        parts = [str(hparams["method"]), str(hparams["placement"]), f"w{w}a{a}a{s}"]
        parts += [flag for flag in ("ptf", "lis") if hparams[flag]]
        recipe = hparams["recipe"]
        if recipe != "none":
            parts.append(str(recipe))
        if hparams["softmax"] != ("uniform" if recipe == "none" else "log_sqrt2"):
            parts.append(str(hparams["softmax"]))
        if hparams["arithmetic"] == "fused":
            parts.append("fused")
        if summary.get("overrides"):
            parts.append(f"mixed{len(summary['overrides'])}")
        settings = "-".join(parts)
    if hparams["backend"] == "onnxruntime":
        settings += "-onnx"
    return f"{hparams['model']}/{settings}"


def name_logger(logger: Optional[Logger], summary: Mapping[str, Any]) -> None:
    """Make a TensorBoard logger write to ``<save_dir>/<run_name>/version_<n>``, without
    Lightning's ``epoch`` scalar.

    Lightning adds ``epoch`` to every ``self.log`` it hands a logger; a PTQ run has one epoch,
    numbered 0, so the scalar would be a constant card of its own. Call this before anything is
    logged: a logger whose log folder is already open keeps it.
    """
    if isinstance(logger, TensorBoardLogger) and logger._experiment is None:
        logger._name = run_name(summary)
        log_metrics = logger.log_metrics

        def without_epoch(metrics: Mapping[str, float], step: Optional[int] = None) -> None:
            kept = {k: v for k, v in metrics.items() if k != "epoch"}
            if kept:
                log_metrics(kept, step)

        logger.log_metrics = without_epoch  # type: ignore[method-assign]


def _hparams_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary:
    """A summary holding one hparams plugin message, as TensorBoard's own writers make it."""
    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)
    return summary


def _experiment_summary() -> summary_pb2.Summary:
    """The experiment config: every column with its type, :data:`VISIBLE` flagged ``differs``."""
    infos = []
    for column in HPARAM_COLUMNS:
        info = api_pb2.HParamInfo(
            name=column.name, description=column.description, type=_TYPES[column.kind], differs=column.visible
        )
        if column.kind is bool:
            info.domain_discrete.extend([False, True])
        infos.append(info)
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=name) for tag, name in METRICS]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)
    return _hparams_summary(metadata.EXPERIMENT_TAG, plugin_data_pb2.HParamsPluginData(experiment=experiment))


def _session_end_summary() -> summary_pb2.Summary:
    """The run's session end (status success)."""
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    return _hparams_summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end))


def log_hparams(logger: TensorBoardLogger, hparams: Mapping[str, HParamValue], metrics: Mapping[str, float]) -> None:
    """Write the experiment config, the run's session (typed hparams), its metrics as scalars
    at step 0, and ``hparams.yaml`` (the same hparams; atomically, replacing Lightning's)."""
    writer = logger.experiment
    file_writer = writer._get_file_writer()
    file_writer.add_summary(_experiment_summary(), 0)
    file_writer.add_summary(summary_v2.hparams_pb(dict(hparams), trial_id=_trial_id(logger)), 0)
    for tag, value in metrics.items():
        writer.add_scalar(tag, value, 0)
    file_writer.add_summary(_session_end_summary(), 0)
    os.makedirs(logger.log_dir, exist_ok=True)
    path = os.path.join(logger.log_dir, TensorBoardLogger.NAME_HPARAMS_FILE)
    write_text(path, yaml.safe_dump(dict(hparams), sort_keys=False))


def _trial_id(logger: TensorBoardLogger) -> str:
    """The run's name with its version: one row per run in the HPARAMS tab."""
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return f"{logger.name}/{version}"


def overridden_points(report: Sequence[QuantizerStats], overrides: Mapping[str, Any]) -> set[str]:
    """The names of the report's points that a ``model.overrides`` pattern matches (``fnmatch``,
    as :meth:`lit_ptq.quant.QuantConfig.spec_for` matches them)."""
    return {r.name for r in report if any(fnmatch.fnmatchcase(r.name, pattern) for pattern in overrides)}


def log_report(writer: Any, report: Sequence[QuantizerStats], overrides: Optional[Mapping[str, Any]] = None) -> None:
    """The per-quantizer table (text ``quantizers/report``) and one ``sqnr_by_layer/<role>``
    figure per role: each point's own SQNR, names on the axis, those ``overrides`` sets marked."""
    from .figures import sqnr_figure

    writer.add_text("quantizers/report", report_markdown(list(report)))
    marked = overridden_points(report, overrides or {})
    for role in sorted({r.role for r in report}):
        writer.add_figure(f"sqnr_by_layer/{role}", sqnr_figure(report, role, marked), 0)


def _mixed_precision_markdown(result: SensitivityResult) -> str:
    """The mixed-precision config of a sensitivity run, as markdown with the YAML to pass back."""
    kept = len(result.kept)
    where = f"written to `{result.output}`" if result.output else "write it with `--sensitivity.output FILE.yaml`"
    text = (
        f"The {kept} most sensitive quant points below {result.keep_bits} bits kept at {result.keep_bits} bits "
        f"(`sensitivity.keep`); {where} and pass it back after the run's options with `--config FILE.yaml`.\n\n"
    )
    return text + "```yaml\n" + overrides_yaml(result.overrides) + "```"


def histogram_tag(rank: int, name: str, count: int) -> str:
    """``activations/<rank>_<point>``, the rank zero-padded to ``count``'s digits so that
    TensorBoard, which sorts a group's tags by name, shows them worst first."""
    return f"activations/{rank:0{len(str(count))}d}_{name}"


def log_sensitivity(writer: Any, result: SensitivityResult, top: int, report: Sequence[QuantizerStats] = ()) -> None:
    """The sensitivity charts (images ``sensitivity/chart``: KL, ``sensitivity/top1_changed``),
    the worst-points table and the mixed-precision config (text), and one histogram figure per
    point (images :func:`histogram_tag`), captioned with the report's clipped share as well."""
    from .figures import histogram_figure, sensitivity_figure, top1_figure

    writer.add_figure("sensitivity/chart", sensitivity_figure(result.points, top, result.images), 0)
    writer.add_figure("sensitivity/top1_changed", top1_figure(result.points, top, result.images), 0)
    writer.add_text("sensitivity/worst", sensitivity_markdown(result.points, top))
    writer.add_text("sensitivity/mixed_precision", _mixed_precision_markdown(result))
    clipped = {r.name: r.clipped for r in report}
    for rank, h in enumerate(result.histograms, 1):
        figure = histogram_figure(h, clipped.get(h.name))
        writer.add_figure(histogram_tag(rank, h.name, len(result.histograms)), figure, 0)


def log_run(
    logger: Optional[Logger],
    record: Mapping[str, Any],
    report: Sequence[QuantizerStats],
    sensitivity: Optional[SensitivityResult] = None,
    top: int = 20,
) -> None:
    """Everything a finished run logs to a TensorBoard logger (nothing for other loggers).

    Args:
        logger: the trainer's logger.
        record: the results record (:func:`lit_ptq.run.results_record`).
        report: the per-quantizer report (empty for a float or ONNX run).
        sensitivity: the run's sensitivity measurement, if any.
        top: rows of the worst-points table and bars of the chart.
    """
    if not isinstance(logger, TensorBoardLogger):
        return
    metrics = {tag: float(record[tag.split("/", 1)[1]]) for tag, _ in METRICS}
    log_hparams(logger, run_hparams(record), metrics)
    writer = logger.experiment
    if report:
        log_report(writer, report, record.get("overrides") or {})
    if sensitivity is not None:
        log_sensitivity(writer, sensitivity, top, report)
    writer.flush()
