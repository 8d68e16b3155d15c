"""Packager steps: small plug-ins in the style of Olive passes.

Each step is a class with a ``name``, a dataclass ``Config`` and ``run(model, out_dir, config) -> Path`` that reads
one ONNX file and writes ``out_dir/model.onnx`` (plus ``model.onnx.data`` for models over 2 GB). Steps never modify
their input. Every step is listed in :data:`STEPS`; a plan is a list of ``(step name, config dict)`` and
:func:`make_plan` refuses unknown steps and unknown config keys. After ``run`` a step's ``notes`` say what it did.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import io
import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from edgefleet.sdk.errors import ConfigError, InputError, PackagingError

__all__ = [
    "STEPS",
    "CheckModel",
    "ConvertFloat16",
    "FixShapes",
    "FuseTransformer",
    "KeepFloat",
    "OptimizeGraph",
    "PlannedStep",
    "QuantizeDynamic",
    "QuantizeStatic",
    "Step",
    "UpgradeOpset",
    "make_plan",
    "run_plan",
]

log = logging.getLogger("edgefleet.packager")

MODEL_FILE = "model.onnx"
_TWO_GB = 2_000_000_000
# Oldest default-domain opset accepted: the ONNX version converter has no adapters below 7.
MIN_OPSET = 7


def _save(model: Any, out_dir: Path) -> Path:
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / MODEL_FILE
    big = model.ByteSize() > _TWO_GB
    onnx.save_model(model, str(out), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=MODEL_FILE + ".data" if big else None)
    return out


@contextlib.contextmanager
def _quiet_tool() -> Iterator[None]:
    """Keep a third-party tool's chatter out of stdout (``--json`` prints the report there) and its root-logger
    advice ("consider pre-processing...") out of the user's terminal; both go to our debug log instead."""
    buf = io.StringIO()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        root.setLevel(level)
        if buf.getvalue():
            log.debug("tool output: %s", buf.getvalue()[-2000:])


def _load(path: Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise InputError(f"{path}: not a readable ONNX model: {exc}") from exc


class Step(abc.ABC):
    """Base of every step: subclasses set ``name`` and ``Config`` and implement ``run``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object

    def __init__(self) -> None:
        self.notes: dict[str, Any] = {}

    @abc.abstractmethod
    def run(self, model: Path, out_dir: Path, config: Any) -> Path:
        """Read ``model``, write ``out_dir/model.onnx`` and return its path."""


# -- check ------------------------------------------------------------------------------------------------------------

def check_external_data(path: Path) -> list[str]:
    """Every external-data file the model refers to, checked to stay inside the model's folder; returns their names."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path}: not an ONNX model (or truncated/corrupt): {exc}") from exc
    root = path.parent.resolve()
    found = []
    for tensor in _all_tensors(proto.graph):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        target = (root / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(root):
            raise InputError(f"{path}: tensor {tensor.name!r} keeps its data at {location!r}, outside the model folder "
                             f"{root}; refusing to read it")
        if not target.is_file():
            raise InputError(f"{path}: tensor {tensor.name!r} refers to missing external data file {location!r}")
        found.append(location)
    return sorted(set(found))


def _all_tensors(graph: Any) -> Iterator[Any]:
    """Initializers and tensor attributes of a graph and all its subgraphs (If/Loop/Scan bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for g in attr.graphs:
                yield from _all_tensors(g)


@dataclass(frozen=True)
class CheckConfig:
    """``max_opset``: newest default-domain opset accepted (None: what the installed onnx knows)."""

    max_opset: int | None = None


class CheckModel(Step):
    """Load and check: onnx.checker, shape inference, opset/IR version, external data kept inside the model folder;
    unnamed nodes get stable names so later steps (and node exclusion) can refer to them."""

    name = "check"
    Config = CheckConfig

    def run(self, model: Path, out_dir: Path, config: CheckConfig) -> Path:
        import onnx
        from onnx import shape_inference

        if not model.is_file():
            raise InputError(f"model {model} does not exist")
        ext = check_external_data(model)
        head = onnx.load(str(model), load_external_data=False)
        opset = next((o.version for o in head.opset_import if o.domain in ("", "ai.onnx")), None)
        newest = config.max_opset or onnx.defs.onnx_opset_version()
        if opset is None:
            raise InputError(f"{model}: no default-domain opset import")
        # Before the checker: an opset from the future would otherwise surface as a confusing checker message.
        if not MIN_OPSET <= opset <= newest:
            raise InputError(f"{model}: opset {opset} is not supported "
                             f"(this packager takes opset {MIN_OPSET}..{newest})")
        try:
            onnx.checker.check_model(str(model), full_check=False)
        except onnx.checker.ValidationError as exc:
            raise InputError(f"{model}: invalid ONNX model: {str(exc).splitlines()[0]}") from exc
        proto = _load(model)
        try:
            proto = shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
        except Exception as exc:  # noqa: BLE001 - inference is best effort; the checker already passed
            log.warning("shape inference failed on %s: %s", model, exc)
        unnamed = 0
        used = {n.name for n in proto.graph.node if n.name}
        for i, node in enumerate(proto.graph.node):
            if not node.name:
                candidate = f"{node.op_type}_{i}"
                while candidate in used:
                    candidate += "_"
                node.name = candidate
                used.add(candidate)
                unnamed += 1
        self.notes = {"opset": opset, "ir_version": proto.ir_version, "nodes": len(proto.graph.node),
                      "external_data": ext, "named_nodes": unnamed}
        return _save(proto, out_dir)


@dataclass(frozen=True)
class FixShapesConfig:
    """``shapes``: input name -> the full shape to fix (every dim >= 1; static dims must keep their value)."""

    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


class FixShapes(Step):
    """Fix the named inputs' dynamic dims (``--input-shape``), then re-run shape inference so the fixed sizes reach
    every tensor: some EPs compile only static shapes (measured: OpenVINO refuses MiniLM's and silero-vad's dynamic
    graphs). A symbolic dim's name shared with other inputs or outputs takes the same value there (as
    ``onnxruntime.tools.make_dynamic_shape_fixed`` does for a dim_param)."""

    name = "fix_shapes"
    Config = FixShapesConfig

    def run(self, model: Path, out_dir: Path, config: FixShapesConfig) -> Path:
        from onnx import shape_inference

        proto = _load(model)
        graph = proto.graph
        init = {i.name for i in graph.initializer}
        inputs = {vi.name: vi for vi in graph.input if vi.name not in init}
        unknown = sorted(set(config.shapes) - set(inputs))
        if unknown:
            raise InputError(f"--input-shape names {unknown}, not inputs of the model (its inputs: "
                             f"{', '.join(inputs)})")
        params: dict[str, int] = {}
        for name, shape in config.shapes.items():
            dims = inputs[name].type.tensor_type.shape.dim
            declared = _dims_text(dims)
            if len(dims) != len(shape):
                raise InputError(f"--input-shape {name}={'x'.join(map(str, shape))}: the model's input has rank "
                                 f"{len(dims)} ({declared}), not {len(shape)}")
            for axis, (d, v) in enumerate(zip(dims, shape, strict=True)):
                if v < 1:
                    raise InputError(f"--input-shape {name}: dim {axis} must be >= 1, got {v}")
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != v:
                    raise InputError(f"--input-shape {name}: dim {axis} is {d.dim_value} in the model "
                                     f"({declared}), not {v}")
                if d.HasField("dim_param") and d.dim_param:
                    if params.setdefault(d.dim_param, v) != v:
                        raise InputError(f"--input-shape: dim {d.dim_param!r} is shared by several inputs; it gets "
                                         f"{params[d.dim_param]} and {v}")
                d.Clear()
                d.dim_value = v
        shared: list[str] = []
        for vi in [*graph.input, *graph.output]:
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param") and d.dim_param in params:
                    shared.append(vi.name)
                    value = params[d.dim_param]
                    d.Clear()
                    d.dim_value = value
        # intermediate shapes were inferred with the symbolic dims: infer them again from the fixed inputs
        del graph.value_info[:]
        try:
            proto = shape_inference.infer_shapes(proto, check_type=False, strict_mode=True, data_prop=True)
        except Exception as exc:
            raise InputError(f"--input-shape {_shapes_text(config.shapes)}: shape inference fails with these shapes: "
                             f"{_first_line(exc)}") from exc
        fixed = {vi.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                           for d in vi.type.tensor_type.shape.dim] for vi in graph.input if vi.name in inputs}
        self.notes = {"fixed": {k: list(v) for k, v in config.shapes.items()}, "inputs": fixed,
                      "same_dim_name_also_fixed_in": sorted(set(shared) - set(config.shapes))}
        out = _save(proto, out_dir)
        # ONNX Runtime infers further than onnx (inside If/Loop bodies): a graph that branches on another input can
        # be consistent for one shape only in some branches (measured: silero-vad's 8 kHz branch at a 16 kHz chunk)
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # folding If exposes the branches
        try:
            ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InputError(f"--input-shape {_shapes_text(config.shapes)}: ONNX Runtime refuses the model with "
                             f"these shapes: {_first_line(exc)}") from exc
        return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _dims_text(dims: Any) -> str:
    return "x".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims)


def _shapes_text(shapes: Mapping[str, Sequence[int]]) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())


@dataclass(frozen=True)
class UpgradeConfig:
    """``opset``: the default-domain opset to reach (no-op when the model is already there)."""

    opset: int = 13


class UpgradeOpset(Step):
    """Raise the default-domain opset with the ONNX version converter (per-channel QDQ needs opset >= 13)."""

    name = "upgrade_opset"
    Config = UpgradeConfig

    def run(self, model: Path, out_dir: Path, config: UpgradeConfig) -> Path:
        from onnx import version_converter

        proto = _load(model)
        current = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        if current >= config.opset:
            self.notes = {"opset": current, "converted": False}
            return _save(proto, out_dir)
        try:
            converted = version_converter.convert_version(proto, config.opset)
        except Exception as exc:
            raise PackagingError(f"cannot upgrade opset {current} -> {config.opset}: {exc}") from exc
        self.notes = {"opset": config.opset, "from_opset": current, "converted": True}
        return _save(converted, out_dir)


# -- transformer fusion ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FuseConfig:
    """Model type for onnxruntime.transformers.optimizer (bert, gpt2, vit, ...); 0 heads/hidden = detect."""

    model_type: str = "bert"
    num_heads: int = 0
    hidden_size: int = 0


class FuseTransformer(Step):
    """Fuse transformer subgraphs into ORT contrib ops (Attention, SkipLayerNormalization, Gelu/BiasGelu, ...).

    Runs only the Python fusions (``opt_level=0``): ORT's own graph optimizations are a separate step whose level
    depends on the target.
    """

    name = "fuse_transformer"
    Config = FuseConfig

    def run(self, model: Path, out_dir: Path, config: FuseConfig) -> Path:
        from onnxruntime.transformers import optimizer

        try:
            with _quiet_tool():
                opt = optimizer.optimize_model(str(model), model_type=config.model_type, num_heads=config.num_heads,
                                               hidden_size=config.hidden_size, opt_level=0)
        except Exception as exc:
            raise PackagingError(f"transformer fusion ({config.model_type}) failed: {exc}") from exc
        stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        self.notes = {"model_type": config.model_type, "fused": stats}
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / MODEL_FILE
        opt.save_model_to_file(str(out), use_external_data_format=opt.model.ByteSize() > _TWO_GB)
        return out


# -- ORT graph optimization -------------------------------------------------------------------------------------------

_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}


@dataclass(frozen=True)
class OptimizeConfig:
    """``level``: basic | extended | layout | all (the last two are tied to the CPU EP of the build host's ISA)."""

    level: str = "basic"

    def __post_init__(self) -> None:
        if self.level not in _LEVELS:
            raise ConfigError(f"optimize.level must be one of {list(_LEVELS)}, got {self.level!r}")


class OptimizeGraph(Step):
    """Offline ORT graph optimization, saved into the bundle so devices do not redo it at every load."""

    name = "optimize"
    Config = OptimizeConfig

    def run(self, model: Path, out_dir: Path, config: OptimizeConfig) -> Path:
        import onnxruntime as ort

        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / MODEL_FILE
        so = ort.SessionOptions()
        level = _LEVELS[config.level]
        # "layout" is new in recent ORT; older ones call the same thing "all"
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level,
                                              ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        so.optimized_model_filepath = str(out)
        so.log_severity_level = 3  # the "hardware specific" warning at layout levels is expected: offline_level rules
        if model.stat().st_size > _TWO_GB:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", MODEL_FILE + ".data")
        before = _op_counts(model)
        try:
            ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise PackagingError(f"ONNX Runtime could not optimize the model at level {config.level}: "
                                 f"{str(exc).splitlines()[0]}") from exc
        after = _op_counts(out)
        self.notes = {"level": config.level, "nodes_before": sum(before.values()), "nodes_after": sum(after.values())}
        return out


def _op_counts(path: Path) -> Counter[str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return Counter(n.op_type for n in m.graph.node)


# -- quantization -----------------------------------------------------------------------------------------------------

_QTYPES = ("int8", "uint8")
_METHODS = ("minmax", "entropy", "percentile")


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


@dataclass(frozen=True)
class DynamicConfig:
    """Dynamic INT8: weights quantized offline, activations at run time (MatMul-heavy models on the CPU EP)."""

    weight_type: str = "int8"
    per_channel: bool = False
    reduce_range: bool = False
    op_types: tuple[str, ...] = ("MatMul", "Attention", "Gather")
    nodes_to_exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.weight_type not in _QTYPES:
            raise ConfigError(f"quantize_dynamic.weight_type must be one of {_QTYPES}, got {self.weight_type!r}")


class QuantizeDynamic(Step):
    """``onnxruntime.quantization.quantize_dynamic`` on the configured op types (never Conv: ConvInteger is slow)."""

    name = "quantize_dynamic"
    Config = DynamicConfig

    def run(self, model: Path, out_dir: Path, config: DynamicConfig) -> Path:
        from onnxruntime.quantization import quantize_dynamic

        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / MODEL_FILE
        try:
            with _quiet_tool():
                quantize_dynamic(model, out, weight_type=_qtype(config.weight_type), per_channel=config.per_channel,
                                 reduce_range=config.reduce_range, op_types_to_quantize=list(config.op_types),
                                 nodes_to_exclude=list(config.nodes_to_exclude))
        except Exception as exc:
            raise PackagingError(f"dynamic quantization failed: {exc}") from exc
        self.notes = {"weight_type": config.weight_type, "per_channel": config.per_channel,
                      "excluded": list(config.nodes_to_exclude)}
        return out


class StreamingReader:
    """CalibrationDataReader over the calibration files, one sample at a time (never the whole set in memory)."""

    def __init__(self, path: Path, model: Path) -> None:
        from .data import SampleSource
        from .planning import io_specs

        inputs, _ = io_specs(model)
        self._source = SampleSource(path, inputs, "calibration data")
        self._i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._i >= len(self._source):
            return None
        self._i += 1
        return self._source[self._i - 1]

    def rewind(self) -> None:
        self._i = 0

    def __len__(self) -> int:
        return len(self._source)


@dataclass(frozen=True)
class StaticConfig:
    """Static INT8 with calibration; types, range and method come from the target profile's ``[quantization]``."""

    calibration: str = ""
    format: str = "qdq"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    method: str = "minmax"
    symmetric_activations: bool = False
    op_types: tuple[str, ...] = ()
    nodes_to_exclude: tuple[str, ...] = ()
    max_intermediate_outputs: int = 0
    calibration_cache: str = ""
    keep_removable_activations: bool = False

    def __post_init__(self) -> None:
        if not self.calibration:
            raise ConfigError("quantize_static needs calibration data (static INT8 without calibration is refused)")
        if self.format not in ("qdq", "qoperator"):
            raise ConfigError(f"quantize_static.format must be qdq or qoperator, got {self.format!r}")
        for k in ("activation_type", "weight_type"):
            if getattr(self, k) not in _QTYPES:
                raise ConfigError(f"quantize_static.{k} must be one of {_QTYPES}, got {getattr(self, k)!r}")
        if self.method not in _METHODS:
            raise ConfigError(f"quantize_static.method must be one of {_METHODS}, got {self.method!r}")


class QuantizeStatic(Step):
    """``onnxruntime.quantization.quantize_static``: QDQ (or QOperator) INT8 with MinMax/Entropy/Percentile ranges."""

    name = "quantize_static"
    Config = StaticConfig

    def run(self, model: Path, out_dir: Path, config: StaticConfig) -> Path:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[config.method]
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / MODEL_FILE
        extra: dict[str, Any] = {"WeightSymmetric": True, "ActivationSymmetric": config.symmetric_activations}
        if config.method == "percentile":
            extra["CalibPercentile"] = 99.999
        if config.keep_removable_activations:
            # Relu/Clip stay in the graph with their own Q/DQ (ORT and OpenVINO fuse them again at load): a tensor
            # later kept in float (keep_float) then still passes through its activation
            extra["QDQKeepRemovableActivations"] = True
        if config.max_intermediate_outputs:
            # MinMax keeps every sample's intermediate tensors until it computes ranges: merge them every N samples
            # instead (same ranges, bounded memory)
            extra["CalibMaxIntermediateOutputs"] = config.max_intermediate_outputs
        kw: dict[str, Any] = {}
        if config.calibration_cache and "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            # ranges depend on the model, the op types and the method only: later candidates (other activation
            # types, nodes kept in float) reuse them instead of calibrating again
            kw["calibration_cache_path"] = config.calibration_cache
        reused = bool(config.calibration_cache) and Path(config.calibration_cache).is_file()
        try:
            with _quiet_tool():
                quantize_static(
                    model, out, StreamingReader(Path(config.calibration), model),
                    quant_format=QuantFormat.QDQ if config.format == "qdq" else QuantFormat.QOperator,
                    activation_type=_qtype(config.activation_type), weight_type=_qtype(config.weight_type),
                    per_channel=config.per_channel, reduce_range=config.reduce_range, calibrate_method=method,
                    op_types_to_quantize=list(config.op_types) or None,
                    nodes_to_exclude=list(config.nodes_to_exclude), extra_options=extra, **kw,
                )
        except Exception as exc:
            raise PackagingError(f"static quantization failed: {exc}") from exc
        self.notes = {"format": config.format, "activation_type": config.activation_type,
                      "weight_type": config.weight_type, "per_channel": config.per_channel,
                      "reduce_range": config.reduce_range, "method": config.method,
                      "excluded": list(config.nodes_to_exclude), "calibration_reused": reused,
                      "keep_removable_activations": config.keep_removable_activations,
                      "max_intermediate_outputs": config.max_intermediate_outputs or None}
        return out


@dataclass(frozen=True)
class KeepFloatConfig:
    """Activation tensors of a QDQ model to keep in float (their Q/DQ pairs removed), found by measurement."""

    tensors: tuple[str, ...] = ()


class KeepFloat(Step):
    """Mixed precision on a QDQ model: the Q/DQ pairs of the named activation tensors are removed, so the nodes
    around them run in float while every other tensor keeps its calibrated INT8 scale (no re-calibration: what the
    accuracy-aware search measured is what ships). A tensor the model does not quantize is an error."""

    name = "keep_float"
    Config = KeepFloatConfig

    def run(self, model: Path, out_dir: Path, config: KeepFloatConfig) -> Path:
        import onnx

        from .sensitivity import keep_float

        out = out_dir / MODEL_FILE
        found = keep_float(model, config.tensors, out)
        missing = sorted(set(config.tensors) - set(found))
        if missing:
            raise PackagingError(f"keep_float: {len(missing)} tensor(s) are not quantized in {model}: "
                                 f"{', '.join(missing[:5])}")
        g = onnx.load(str(model), load_external_data=False).graph
        producer = {o: n.name for n in g.node for o in n.output}
        self.notes = {"float_tensors": list(config.tensors),
                      "float_nodes": list(dict.fromkeys(producer[t] for t in config.tensors if t in producer))}
        return out


# -- FP16 -------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Float16Config:
    """Weights and compute in FP16; ``keep_io_types`` keeps FP32 inputs/outputs so callers see no change."""

    keep_io_types: bool = True
    op_block_list: tuple[str, ...] = ()


class ConvertFloat16(Step):
    """FP16 conversion for CUDA and CoreML (never for TensorRT: there FP16 is a builder flag on FP32 weights).

    Uses ORT's maintained copy of the onnxconverter-common converter: onnxconverter-common 1.16 produced a YOLOv8
    model that ORT refused to load (a Cast whose declared output type was left stale), ORT's copy loads and runs.
    """

    name = "fp16"
    Config = Float16Config

    def run(self, model: Path, out_dir: Path, config: Float16Config) -> Path:
        from onnxruntime.transformers import float16

        proto = _load(model)
        kw: dict[str, Any] = {"keep_io_types": config.keep_io_types}
        if config.op_block_list:
            kw["op_block_list"] = list(config.op_block_list)
        try:
            converted = float16.convert_float_to_float16(proto, **kw)
        except Exception as exc:
            raise PackagingError(f"FP16 conversion failed: {exc}") from exc
        self.notes = {"keep_io_types": config.keep_io_types}
        return _save(converted, out_dir)


# -- the table --------------------------------------------------------------------------------------------------------

STEPS: dict[str, type[Step]] = {
    s.name: s for s in (CheckModel, FixShapes, UpgradeOpset, FuseTransformer, OptimizeGraph, QuantizeDynamic,
                        QuantizeStatic, KeepFloat, ConvertFloat16)
}


@dataclass(frozen=True)
class PlannedStep:
    """One step of a plan with its validated config."""

    step: type[Step]
    config: Any

    @property
    def name(self) -> str:
        """The step's name."""
        return self.step.name

    def describe(self) -> dict[str, Any]:
        """JSON form (config values that differ from the defaults)."""
        default = self.step.Config.__dataclass_fields__  # type: ignore[attr-defined]
        cfg = {f.name: getattr(self.config, f.name) for f in fields(self.config)}
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in default}
        cfg.pop("calibration", None)  # a temp path: meaningless in a report
        cfg.pop("calibration_cache", None)
        return {"step": self.name, "config": cfg}


def make_plan(items: Sequence[tuple[str, Mapping[str, Any]]]) -> list[PlannedStep]:
    """Validate a plan: known step names, known config keys, valid values."""
    plan = []
    for name, cfg in items:
        step = STEPS.get(name)
        if step is None:
            raise ConfigError(f"unknown packager step {name!r}; known: {', '.join(STEPS)}")
        known = {f.name for f in fields(step.Config)}  # type: ignore[arg-type]
        unknown = set(cfg) - known
        if unknown:
            raise ConfigError(f"step {name}: unknown config key(s) {sorted(unknown)}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
        plan.append(PlannedStep(step, step.Config(**values)))
    return plan


@dataclass
class StepRecord:
    """What one executed step did: name, config, notes, output size, seconds."""

    name: str
    config: dict[str, Any]
    notes: dict[str, Any] = field(default_factory=dict)
    size: int = 0
    seconds: float = 0.0
    path: Path | None = None  # where the step wrote its model (not reported: a temp path)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"step": self.name, "config": self.config, "notes": self.notes, "size": self.size,
                "seconds": round(self.seconds, 3)}


def model_size(path: Path) -> int:
    """Bytes of a model file plus its external data files in the same folder."""
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))


def run_plan(model: Path, work_dir: Path, plan: Sequence[PlannedStep]) -> tuple[Path, list[StepRecord]]:
    """Run the steps in order, each into its own sub-folder of ``work_dir``; returns the last model and records."""
    import time

    records = []
    current = model
    for i, ps in enumerate(plan):
        step = ps.step()
        t0 = time.perf_counter()
        current = step.run(current, work_dir / f"{i:02d}-{ps.name}", ps.config)
        rec = StepRecord(ps.name, ps.describe()["config"], step.notes, model_size(current), time.perf_counter() - t0,
                         current)
        records.append(rec)
    return current, records
