"""Exported ONNX files at run time: their ``lit_ptq`` metadata, checks, onnxruntime sessions,
and the ``onnxruntime`` inference backend (:class:`OnnxRuntimeBackend`).

An ONNX file written by ``main.py export`` carries, in its ``metadata_props``, the key
:data:`METADATA_KEY` whose value is a JSON object describing the run that produced it::

    {"summary": {...PTQModule.run_summary()...}, "calib_images": 1000, "load_state": null,
     "log_points": "raise", "format": "qdq", "input_size": [3, 32, 32], "opset": 20}

``main.py validate --model.onnx FILE`` reads it back (:func:`read_onnx_file`) to report what
the file is and to check that it fits the config before any image is loaded.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from ..backends import InferenceBackend, register_inference_backend
from ..errors import ConfigError
from ..models import model_entry
from ..quant.walk import quant_points
from ..quant.quantizer import LogSoftmaxQuantizer, NonUniformQuantizer, TensorQuantizer
from .graph import MOVABLE_OPS
from .onnx import CODES_SUFFIX, _integer_dtype, log_point_error, ort_session_options

__all__ = [
    "METADATA_KEY",
    "OnnxFileInfo",
    "read_onnx_file",
    "embed_metadata",
    "check_exportable",
    "create_session",
    "INTEGER_KERNELS",
    "LinearKernel",
    "linear_kernels",
    "OnnxRuntimeBackend",
]

log = logging.getLogger(__name__)

METADATA_KEY = "lit_ptq"
"""The ``metadata_props`` key under which an exported file describes its run (a JSON object)."""

Dim = Union[int, str, None]


@dataclass(frozen=True)
class OnnxFileInfo:
    """What :func:`read_onnx_file` found in an ONNX file.

    Attributes:
        path: the file.
        input_name: the graph's (only) image input.
        input_shape: its dimensions: an int where fixed, the symbolic name (``"batch"``) or
            None where dynamic.
        output_name: the graph's first output (the logits).
        output_shape: its dimensions, like ``input_shape``.
        metadata: the decoded :data:`METADATA_KEY` entry, None when the file has none.
    """

    path: str
    input_name: str
    input_shape: tuple[Dim, ...]
    output_name: str
    output_shape: tuple[Dim, ...]
    metadata: Optional[dict[str, Any]] = field(default=None)

    @property
    def image_size(self) -> Optional[tuple[int, ...]]:
        """``(channels, height, width)`` the file expects, None where any of them is dynamic."""
        dims = self.input_shape[1:]
        return tuple(dims) if all(isinstance(d, int) for d in dims) else None  # type: ignore[return-value]


def _dims(value_info: Any) -> tuple[Dim, ...]:
    shape = value_info.type.tensor_type.shape
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim)


def read_onnx_file(path: str, option: str = "model.onnx") -> OnnxFileInfo:
    """Check that ``path`` is an ONNX image classifier and read its input, output and metadata.

    The graph is parsed (``onnx.load`` without external data); no onnxruntime session is made.

    Args:
        path: the ``.onnx`` file.
        option: how the path is named in error messages.

    Raises:
        ConfigError: the file does not exist, is not an ONNX model (a text file, a ``.pt``
            checkpoint, ...), or has no single 4-D image input and 2-D logits output.
    """
    import onnx
    from google.protobuf.message import DecodeError

    if not os.path.exists(path):
        raise ConfigError(f"{option}={path} does not exist; write one with main.py export --output {path}")
    if not os.path.isfile(path):
        raise ConfigError(f"{option}={path} is not a file; give the path of an .onnx file")
    not_onnx = f"{option}={path} is not an ONNX model; give a file written by main.py export"
    try:
        proto = onnx.load(path, load_external_data=False)
    except DecodeError:
        raise ConfigError(f"{not_onnx} (its bytes are not an ONNX protobuf)") from None
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"{not_onnx} ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    except OSError as err:
        raise ConfigError(f"{option}={path} cannot be read ({err.strerror})") from None
    graph = proto.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if proto.ir_version <= 0 or not graph.node or not inputs or not graph.output:
        raise ConfigError(not_onnx)
    if len(inputs) != 1 or len(_dims(inputs[0])) != 4 or len(_dims(graph.output[0])) != 2:
        shapes = ", ".join(f"{i.name}{list(_dims(i))}" for i in inputs)
        raise ConfigError(
            f"{option}={path} is not an image classifier with one (batch, channels, height, width) input "
            f"and (batch, classes) logits (inputs: {shapes}); give a file written by main.py export"
        )
    metadata = None
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                metadata = json.loads(prop.value)
            except ValueError:
                log.warning("%s: its %r metadata is not JSON; reporting the run from the config", path, METADATA_KEY)
            if not isinstance(metadata, dict):
                metadata = None
    return OnnxFileInfo(
        path=path,
        input_name=inputs[0].name,
        input_shape=_dims(inputs[0]),
        output_name=graph.output[0].name,
        output_shape=_dims(graph.output[0]),
        metadata=metadata,
    )


def embed_metadata(path: str, metadata: dict[str, Any]) -> None:
    """Store ``metadata`` (JSON) under :data:`METADATA_KEY` in the ONNX file ``path``, rewriting it in place.

    Write to a temporary path (:func:`lit_ptq.io.atomic_path`) when the file must never be
    seen half-written.
    """
    import onnx

    proto = onnx.load(path)
    props = {p.key: p.value for p in proto.metadata_props}
    props[METADATA_KEY] = json.dumps(metadata)
    onnx.helper.set_model_props(proto, props)  # replaces the list
    onnx.save(proto, path)


def check_exportable(model: nn.Module, log_points: str = "raise") -> None:
    """Refuse, before calibration, a quantized model that :func:`~lit_ptq.export.export_onnx` would refuse after it.

    Non-uniform quantizers (log2, log-sqrt2, AdaLog, twin-uniform) and log-int-softmax with
    ``log_points="raise"``, and quantizers
    wider than 8 bits, cannot be written as QDQ; finding out after minutes of calibration
    would waste them.

    Raises:
        OnnxExportError: naming the first such quant point.
    """
    for name, point in quant_points(model):
        if log_points == "raise" and isinstance(point, (NonUniformQuantizer, LogSoftmaxQuantizer)):
            raise log_point_error(name, point, "--log_points float_ops")
        if isinstance(point, TensorQuantizer):
            _integer_dtype(point)


def _spinning_allowed() -> bool:
    """onnxruntime's threads spin while waiting, as OpenMP's do, unless ``OMP_WAIT_POLICY=PASSIVE``."""
    return os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"


def create_session(path: str, device: torch.device, option: str = "model.onnx") -> Any:
    """An onnxruntime ``InferenceSession`` of ``path`` that computes as the exported model does.

    Session options from :func:`~lit_ptq.export.ort_session_options`, with as many intra-op
    threads as torch uses (``torch.get_num_threads()``: Lightning's DDP on CPU divides the
    cores among the ranks) and, under ``OMP_WAIT_POLICY=PASSIVE`` (``main.py``'s default),
    no spinning threads.

    Args:
        path: the ONNX file.
        device: where the module runs: ``cuda`` runs on onnxruntime's
            ``CUDAExecutionProvider`` on the same GPU, anything else on the CPU.
        option: how the path is named in error messages.

    Raises:
        ConfigError: ``device`` is a GPU but this onnxruntime has no ``CUDAExecutionProvider``
            (a CPU-only ``onnxruntime`` package), or onnxruntime cannot load the file.
    """
    import onnxruntime

    options = ort_session_options(intra_op_num_threads=torch.get_num_threads())
    if not _spinning_allowed():
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise ConfigError(
                f"{option}={path} should run on {device} but this onnxruntime has no CUDAExecutionProvider "
                f"(it has {', '.join(onnxruntime.get_available_providers())}); install onnxruntime-gpu "
                "or evaluate on the CPU with --trainer.accelerator cpu"
            )
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        return onnxruntime.InferenceSession(path, options, providers=providers)
    except Exception as err:  # onnxruntime's own exception types (Fail, InvalidGraph, ...) are not exported
        raise ConfigError(f"onnxruntime cannot load {option}={path}: {' '.join(str(err).split())[:300]}") from None


INTEGER_KERNELS = frozenset(
    ("QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "DynamicQuantizeMatMul", "QAttention")
)
"""onnxruntime operators that multiply integer codes (int32 accumulation), as opposed to a float
``Gemm`` / ``MatMul`` of dequantized values or the weight-only ``MatMulNBits``."""


@dataclass(frozen=True)
class LinearKernel:
    """How onnxruntime runs one linear of an exported file.

    Attributes:
        name: the linear's module name (``blocks.0.mlp.fc1``), or the name of its codes in a
            file that another tool wrote.
        input_quantized: whether its input reaches it dequantized (an integer-kernel candidate);
            False for a weight-only linear (the ``seed`` placement's ``qkv`` and ``fc1``).
        op_type: the operator of onnxruntime's optimized graph that reads its weight codes
            (``QGemm``, ``MatMulIntegerToFloat``, ...), or that reads their dequantization
            (``Gemm``, ``MatMul``: the float product).
    """

    name: str
    input_quantized: bool
    op_type: str

    @property
    def integer(self) -> bool:
        """Whether the linear runs as an integer kernel (:data:`INTEGER_KERNELS`)."""
        return self.op_type in INTEGER_KERNELS


def linear_kernels(path: str, optimized_path: str) -> list[LinearKernel]:
    """The operator onnxruntime runs each quantized linear of the exported file ``path`` with.

    The file's linears are its 2-d int8 / uint8 initializers (weight codes: ours are named
    ``<linear>`` :data:`~lit_ptq.export.onnx.CODES_SUFFIX`, ``quantize_static``'s after the
    float weight) whose ``DequantizeLinear`` reaches a ``Gemm`` or ``MatMul``, directly or
    through data movement; the linear's input is quantized when that
    product's other operand comes from a ``DequantizeLinear`` too. Each is looked up in the
    graph onnxruntime optimizes for the CPU with the options of :func:`create_session` (all
    optimizations; ``SessionOptions.optimized_model_filepath``): the operator that reads the
    codes, or the one that reads their dequantization.

    Args:
        path: a QDQ ONNX file (:func:`~lit_ptq.export.export_onnx`, or ``quantize_static``).
        optimized_path: where onnxruntime writes its optimized graph.

    Returns:
        One :class:`LinearKernel` per quantized linear, in initializer order.
    """
    import onnx
    import onnxruntime

    def links(graph: Any) -> tuple[dict[str, Any], dict[str, list[Any]]]:
        producers = {out: node for node in graph.node for out in node.output}
        consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        return producers, consumers

    def product_of(value: str, consumers: dict[str, list[Any]]) -> Optional[tuple[Any, str]]:
        """The first ``Gemm`` / ``MatMul`` reading ``value`` through data movement, and the name it reads."""
        for node in consumers.get(value, []):
            if node.op_type in ("Gemm", "MatMul", "MatMulNBits") and value in node.input[1:2]:
                return node, value
            if node.op_type in MOVABLE_OPS and node.input[0] == value:
                found = product_of(node.output[0], consumers)
                if found is not None:
                    return found
        return None

    graph = onnx.load(path).graph
    producers, consumers = links(graph)
    linears: dict[str, bool] = {}
    for init in graph.initializer:
        if init.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) or len(init.dims) != 2:
            continue
        for dq in consumers.get(init.name, []):
            found = product_of(dq.output[0], consumers)
            if dq.op_type == "DequantizeLinear" and found is not None:
                source = producers.get(found[0].input[0])
                while source is not None and source.op_type in MOVABLE_OPS:
                    source = producers.get(source.input[0])
                linears[init.name] = source is not None and source.op_type == "DequantizeLinear"
    options = ort_session_options(intra_op_num_threads=1)
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = optimized_path
    onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    _, optimized = links(onnx.load(optimized_path, load_external_data=False).graph)
    kernels = []
    for codes, input_quantized in linears.items():
        # an integer kernel reads the codes; MatMulNBits reads a repacked copy named after them
        readers = [n for name, nodes in optimized.items() if name.startswith(codes) for n in nodes]
        op_type = "missing"
        if readers:
            reader = readers[0]
            found = product_of(reader.output[0], optimized) if reader.op_type == "DequantizeLinear" else None
            op_type = found[0].op_type if found is not None else reader.op_type
        kernels.append(LinearKernel(codes.removesuffix(CODES_SUFFIX), input_quantized, op_type))
    return kernels


_RECORD_KEYS = frozenset(
    ("backend", "onnx", "onnx_calib_images", "calib_images", "calibration_seconds", "acc1", "acc5", "loss", "num_images")
)
"""Keys a results record sets itself, dropped from a file's recorded summary."""


@register_inference_backend("onnxruntime")
class OnnxRuntimeBackend(InferenceBackend):
    """An ONNX file written by ``main.py export``, run by onnxruntime (``main.py validate --model.onnx FILE``).

    The file is read and checked when the backend is made (:func:`read_onnx_file`); its
    session is made at the first batch, on the images' device (:func:`create_session`), and
    again when they move.

    Args:
        path: the ``.onnx`` file.
        option: how the path is named in error messages.

    Raises:
        ConfigError: the file is missing or not an ONNX image classifier.
    """

    def __init__(self, path: str, option: str = "model.onnx") -> None:
        self.option = option
        self.info = read_onnx_file(path, option=option)
        self._session: Optional[tuple[torch.device, Any]] = None

    def check(self, model_name: str, img_size: Optional[int], num_classes: int) -> None:
        """Refuse a file made for another input size, class count or model.

        Raises:
            ConfigError: the file's input size, class count or recorded model differ from
                ``model_name`` / ``img_size`` / ``num_classes``.
        """
        info, path, option = self.info, self.info.path, self.option
        try:
            _, eval_cfg = model_entry(model_name)
        except ValueError as err:
            raise ConfigError(f"model.model_name: {err}") from None
        side = img_size or eval_cfg.input_size[-1]
        expected = (eval_cfg.input_size[0], side, side)
        fmt = "x".join
        if info.image_size is not None and info.image_size != expected:
            raise ConfigError(
                f"{option}={path} takes {fmt(map(str, info.image_size))} images but the config gives "
                f"{fmt(map(str, expected))} (model.model_name={model_name}, model.img_size={img_size}); "
                f"set model.img_size={info.image_size[-1]} or export the file again"
            )
        classes = info.output_shape[-1]
        if isinstance(classes, int) and classes != num_classes:
            raise ConfigError(
                f"{option}={path} outputs {classes} classes but model.num_classes={num_classes}; "
                f"set model.num_classes={classes} or use a file exported for this dataset"
            )
        recorded = ((info.metadata or {}).get("summary") or {}).get("model")
        if recorded is not None and recorded != model_name:
            raise ConfigError(
                f"{option}={path} was exported from {recorded} but model.model_name={model_name}; "
                f"set model.model_name={recorded} (the images are prepared for the named model)"
            )

    def session(self, device: torch.device) -> Any:
        """The onnxruntime session of the file on ``device``, made on first use."""
        if self._session is None or self._session[0] != device:
            self._session = (device, create_session(self.info.path, device, option=self.option))
        return self._session[1]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """onnxruntime's logits of ``images`` (given as float32), on the images' device."""
        info = self.info
        batch = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session(images.device).run([info.output_name], {info.input_name: batch})
        return torch.from_numpy(logits).to(images.device)

    def summary(self, config_summary: dict[str, Any]) -> dict[str, Any]:
        """The summary the file's metadata recorded at export (else ``config_summary``), plus
        ``onnx`` (the path) and ``onnx_calib_images`` (None when unknown)."""
        meta = self.info.metadata or {}
        summary = config_summary
        if isinstance(meta.get("summary"), dict):
            summary = {k: v for k, v in meta["summary"].items() if k not in _RECORD_KEYS}
        return dict(summary, onnx=self.info.path, onnx_calib_images=meta.get("calib_images"))
