"""Open Inference Protocol (KServe v2) tensors and model descriptions, as Triton and OpenVINO Model Server speak them.

Requests: inputs as JSON ``data`` (flat or nested) or, with the binary tensor extension, as raw little-endian bytes
after the JSON header (``parameters.binary_data_size`` per input; BYTES elements as a 4-byte little-endian length
then the bytes). Outputs as JSON or binary (``parameters.binary_data`` per output, or ``binary_data_output`` for all —
tritonclient's default), and top-k classification (``parameters.classification``). Model metadata in KServe's form,
and a Triton-style model configuration derived from the bundle manifest. Every client mistake is an
:class:`~edgefleet.agent.httpd.HttpError` 400 that says what was wrong and what was expected.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .httpd import HttpError

if TYPE_CHECKING:
    from edgefleet.sdk.bundle import Manifest, TensorSpec
    from edgefleet.sdk.runtime import Model

__all__ = ["KSERVE_DATATYPES", "InferRequest", "OutputSpec", "decode_request", "encode_response", "model_config",
           "model_metadata"]

KSERVE_DATATYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64", "int8": "INT8",
    "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16", "float32": "FP32", "float64": "FP64",
    "bfloat16": "BF16", "string": "BYTES",
}
_NUMPY = {v: np.dtype(k) for k, v in KSERVE_DATATYPES.items() if k not in ("bfloat16", "string")}
_TRITON_TYPES = {v: f"TYPE_{'STRING' if v == 'BYTES' else v}" for v in KSERVE_DATATYPES.values()}
_MAX_DIMS = 16
_MAX_CLASSES = 1 << 16


@dataclass(frozen=True)
class OutputSpec:
    """One requested output: its name, binary or JSON, and top-k classification (0: the tensor itself)."""

    name: str
    binary: bool
    classes: int = 0


@dataclass
class InferRequest:
    """A decoded inference request."""

    inputs: dict[str, np.ndarray]
    outputs: list[OutputSpec]
    id: str | None
    timeout_us: int | None


def _bad(msg: str) -> HttpError:
    return HttpError(400, msg)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _dims(shape: tuple[Any, ...]) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def _decode_bytes_elements(raw: memoryview, count: int, name: str) -> np.ndarray:
    """BYTES in the binary extension: per element a uint32 little-endian length, then that many bytes."""
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise _bad(f"input {name!r}: BYTES data ends after {i} of {count} elements")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise _bad(f"input {name!r}: BYTES element {i} claims {n} bytes, {len(raw) - pos} are left")
        out[i] = _text(bytes(raw[pos:pos + n]), name)
        pos += n
    if pos != len(raw):
        raise _bad(f"input {name!r}: {len(raw) - pos} bytes after the {count} BYTES elements")
    return out


def _text(b: bytes, name: str) -> str:
    # ONNX string tensors are UTF-8 text: bytes that are not are refused here, not inside ONNX Runtime.
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(f"input {name!r}: BYTES element is not UTF-8 ({exc.reason} at byte {exc.start}); ONNX string "
                   "tensors hold text") from None


def _json_strings(data: Any, count: int, name: str) -> np.ndarray:
    flat: list[Any] = []

    def walk(v: Any, depth: int) -> None:
        if depth > _MAX_DIMS:
            raise _bad(f"input {name!r}: data nested deeper than {_MAX_DIMS}")
        if isinstance(v, list):
            for x in v:
                walk(x, depth + 1)
        elif isinstance(v, str):
            flat.append(v)
        else:
            raise _bad(f"input {name!r}: BYTES data must be strings, got {type(v).__name__}")
        if len(flat) > count:
            raise _bad(f"input {name!r}: more than the {count} values the shape needs")

    walk(data, 0)
    if len(flat) != count:
        raise _bad(f"input {name!r}: {len(flat)} values given for {count} needed by the shape")
    arr = np.empty(count, dtype=object)
    arr[:] = flat
    return arr


def _bool_param(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    v = params.get(key, default)
    if not isinstance(v, bool):
        raise _bad(f"{where}: parameters.{key} must be true or false, got {v!r}")
    return v


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    p = obj.get("parameters")
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise _bad(f"{where}: parameters must be an object, got {type(p).__name__}")
    if "shared_memory_region" in p:
        raise _bad(f"{where}: shared memory is not supported by this agent (no system or CUDA shared-memory "
                   "extension): send the tensor in the request body")
    return p


def decode_request(model: Model, body: bytes | bytearray, header_length: int | None) -> InferRequest:
    """Parse and check an infer request body against the model's manifest (tensors are not copied)."""
    head: bytes | bytearray = body
    binary = memoryview(b"")
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise _bad(f"Inference-Header-Content-Length {header_length} is outside the {len(body)}-byte body")
        head, binary = bytes(memoryview(body)[:header_length]), memoryview(body)[header_length:]
    try:
        req = json.loads(head)
    except (ValueError, UnicodeError, RecursionError) as exc:  # RecursionError: "[[[[..." nested past the stack
        raise _bad(f"request body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(req, dict):
        raise _bad("request body must be a JSON object")
    params = _params(req, "request")
    default_binary = _bool_param(params, "binary_data_output", False, "request")
    timeout = params.get("timeout")
    if timeout is not None and not (_int(timeout) and timeout >= 0):
        raise _bad(f"request: parameters.timeout must be a non-negative integer of microseconds, got {timeout!r}")
    seq = params.get("sequence_id")
    if seq not in (None, 0, ""):
        raise _bad(f"model {model.name!r} is not a sequence model (no sequence batcher): sequence_id is not accepted")
    rid = req.get("id")
    if rid is not None and not isinstance(rid, str):
        raise _bad(f"request: id must be a string, got {type(rid).__name__}")
    inputs = _decode_inputs(model, req, binary)
    outputs = _requested_outputs(model, req, default_binary)
    return InferRequest(inputs, outputs, rid, timeout or None)


def _decode_inputs(model: Model, req: dict[str, Any], binary: memoryview) -> dict[str, np.ndarray]:
    specs = {t.name: t for t in model.manifest.inputs}
    items = req.get("inputs")
    if not isinstance(items, list) or not items:
        raise _bad("request needs a non-empty 'inputs' list")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _bad(f"inputs[{i}] must be an object")
        name = item.get("name")
        if not isinstance(name, str) or name not in specs:
            raise _bad(f"inputs[{i}]: unknown input {name!r}; model {model.name} takes {sorted(specs)}")
        if name in out:
            raise _bad(f"input {name!r} given twice")
        spec = specs[name]
        expected = KSERVE_DATATYPES[spec.dtype]
        datatype = item.get("datatype")
        if datatype != expected:
            raise _bad(f"input {name!r}: datatype {datatype!r} given, model expects {expected}")
        if expected == "BF16":
            raise _bad(f"input {name!r}: BF16 tensors are not supported by this API (ONNX Runtime's Python "
                       "binding has no bfloat16 arrays)")
        shape = item.get("shape")
        if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
                or not all(_int(d) and d >= 0 for d in shape)):
            raise _bad(f"input {name!r}: shape must be a list of at most {_MAX_DIMS} non-negative integers, "
                       f"got {shape!r}")
        count = math.prod(shape)
        params = _params(item, f"input {name!r}")
        size = params.get("binary_data_size")
        if size is not None:
            if not _int(size) or size < 0 or offset + size > len(binary):
                raise _bad(f"input {name!r}: binary_data_size {size!r} exceeds the {len(binary) - offset} binary "
                           "bytes left in the body")
            raw = binary[offset:offset + size]
            offset += size
            if expected == "BYTES":
                arr = _decode_bytes_elements(raw, count, name)
            else:
                dtype = _NUMPY[expected]
                if size != count * dtype.itemsize:
                    raise _bad(f"input {name!r}: {size} binary bytes for shape {shape} of {expected} "
                               f"(needs {count * dtype.itemsize})")
                arr = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
        else:
            if "data" not in item:
                raise _bad(f"input {name!r}: needs 'data' or parameters.binary_data_size")
            if expected == "BYTES":
                arr = _json_strings(item["data"], count, name)
            else:
                try:
                    arr = np.asarray(item["data"], dtype=_NUMPY[expected])
                except (ValueError, TypeError, OverflowError) as exc:
                    raise _bad(f"input {name!r}: data is not a list of {expected} values: {str(exc)[:200]}") from None
                if arr.size != count:
                    raise _bad(f"input {name!r}: {arr.size} values given for shape {shape} ({count} needed)")
        out[name] = arr.reshape(shape)
    if offset != len(binary):
        raise _bad(f"{len(binary) - offset} binary bytes after the inputs are not claimed by any input")
    missing = sorted(set(specs) - set(out))
    if missing:
        raise _bad(f"missing input(s) {missing}; model {model.name} takes {sorted(specs)}")
    return out


def _requested_outputs(model: Model, req: dict[str, Any], default_binary: bool) -> list[OutputSpec]:
    names = [t.name for t in model.manifest.outputs]
    wanted = req.get("outputs")
    if wanted is None:
        return [OutputSpec(n, default_binary) for n in names]
    if not isinstance(wanted, list):
        raise _bad("'outputs' must be a list")
    out: list[OutputSpec] = []
    for i, o in enumerate(wanted):
        if not isinstance(o, dict) or o.get("name") not in names:
            got = o.get("name") if isinstance(o, dict) else o
            raise _bad(f"outputs[{i}]: unknown output {got!r}; model {model.name} has {names}")
        if any(x.name == o["name"] for x in out):
            raise _bad(f"output {o['name']!r} requested twice")
        p = _params(o, f"output {o['name']!r}")
        classes = p.get("classification", 0)
        if not (_int(classes) and 0 <= classes <= _MAX_CLASSES):
            raise _bad(f"output {o['name']!r}: parameters.classification must be an integer in 0..{_MAX_CLASSES}, "
                       f"got {classes!r}")
        out.append(OutputSpec(o["name"], _bool_param(p, "binary_data", default_binary, f"output {o['name']!r}"),
                              classes))
    return out


def _classify(arr: np.ndarray, k: int, name: str) -> np.ndarray:
    """Triton's classification extension: the top ``k`` of the last axis as "value:index" strings."""
    if arr.ndim == 0 or arr.dtype.kind not in "iufb":
        raise _bad(f"output {name!r}: classification needs a numeric tensor of rank >= 1, got {arr.dtype} "
                   f"{list(arr.shape)}")
    k = min(k, arr.shape[-1])
    idx = np.argsort(-arr.astype(np.float64), axis=-1, kind="stable")[..., :k]
    vals = np.take_along_axis(arr, idx, axis=-1)
    out = np.empty(idx.shape, dtype=object)
    for pos in np.ndindex(idx.shape):
        out[pos] = f"{float(vals[pos]):f}:{int(idx[pos])}"
    return out


def _bytes_elements(arr: np.ndarray) -> bytes:
    parts = []
    for v in arr.ravel():
        b = v if isinstance(v, bytes) else str(v).encode("utf-8")
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def encode_response(model: Model, results: dict[str, np.ndarray], req: InferRequest) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (else None)."""
    resp: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": []}
    if req.id is not None:
        resp["id"] = req.id
    blobs: list[bytes] = []
    for spec in req.outputs:
        arr = results[spec.name]
        if spec.classes:
            arr = _classify(arr, spec.classes, spec.name)
        is_bytes = arr.dtype.kind in "OUS"
        entry: dict[str, Any] = {"name": spec.name, "shape": list(arr.shape),
                                 "datatype": "BYTES" if is_bytes else KSERVE_DATATYPES.get(str(arr.dtype), "BYTES")}
        if spec.binary:
            raw = _bytes_elements(arr) if is_bytes else np.ascontiguousarray(
                arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif is_bytes:
            entry["data"] = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.ravel()]
        else:
            entry["data"] = arr.ravel().tolist()
        resp["outputs"].append(entry)
    head = json.dumps(resp, separators=(",", ":")).encode("utf-8")
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def _tensor_meta(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "datatype": KSERVE_DATATYPES[t.dtype], "shape": _dims(t.shape)}


def model_metadata(model: Model) -> dict[str, Any]:
    """KServe model metadata (dynamic dims are -1), with the bundle's target, digest and serving providers."""
    m = model.manifest
    return {
        "name": m.name, "versions": [m.version], "platform": "onnxruntime_onnx",
        "inputs": [_tensor_meta(t) for t in m.inputs],
        "outputs": [_tensor_meta(t) for t in m.outputs],
        "parameters": {"target": m.target, "digest": model.digest, "providers": list(model.placement.serving)},
    }


_ACCELERATORS = {
    # bundle provider -> (Triton instance kind, execution accelerator list, accelerator name)
    "TensorrtExecutionProvider": ("KIND_GPU", "gpu_execution_accelerator", "tensorrt"),
    "CUDAExecutionProvider": ("KIND_GPU", None, None),
    "OpenVINOExecutionProvider": ("KIND_CPU", "cpu_execution_accelerator", "openvino"),
}


def model_config(model: Model, instances: int) -> dict[str, Any]:
    """A Triton-style model configuration (model_config.proto as JSON) derived from the bundle manifest.

    ``max_batch_size`` is 0: shapes include the batch dimension, as the manifest and the infer API state them.
    Bundle providers map to Triton's instance kind and execution accelerators (TensorRT, OpenVINO); what Triton has no
    field for (target, precision, digest, the provider list and options, CoreML) is in ``parameters``.
    """
    m: Manifest = model.manifest
    serving = list(model.placement.serving)
    kind = "KIND_CPU"
    accelerators: dict[str, list[dict[str, Any]]] = {}
    for p in m.providers:
        if p.name not in serving:
            continue
        k, group, acc = _ACCELERATORS.get(p.name, ("KIND_CPU", None, None))
        if k == "KIND_GPU":
            kind = "KIND_GPU"
        if group and acc:
            accelerators.setdefault(group, []).append(
                {"name": acc, "parameters": {key: str(v) for key, v in sorted(p.options.items())}})
    s = m.session
    params = {
        "edgefleet.target": m.target, "edgefleet.precision": m.precision, "edgefleet.digest": model.digest,
        "edgefleet.providers": ",".join(serving), "edgefleet.min_ort_version": m.min_ort_version,
        # the names Triton's onnxruntime backend reads
        "intra_op_thread_count": str(s.intra_op_num_threads), "inter_op_thread_count": str(s.inter_op_num_threads),
        "execution_mode": "1" if s.execution_mode == "parallel" else "0",
    }
    for p in m.providers:
        for key, v in sorted(p.options.items()):
            params[f"edgefleet.provider.{p.name}.{key}"] = str(v)
    level = {"disabled": -1, "basic": 1, "extended": 2, "layout": 2, "all": 2}.get(s.graph_optimization_level, 2)
    cfg: dict[str, Any] = {
        "name": m.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": 0,
        "input": [{"name": t.name, "data_type": _TRITON_TYPES[KSERVE_DATATYPES[t.dtype]], "format": "FORMAT_NONE",
                   "dims": _dims(t.shape), "is_shape_tensor": False, "allow_ragged_batch": False,
                   "optional": False} for t in m.inputs],
        "output": [{"name": t.name, "data_type": _TRITON_TYPES[KSERVE_DATATYPES[t.dtype]], "dims": _dims(t.shape),
                    "label_filename": "", "is_shape_tensor": False} for t in m.outputs],
        "instance_group": [{"name": f"{m.name}_0", "kind": kind, "count": instances, "gpus": [],
                            "profile": [], "passive": False, "host_policy": ""}],
        "default_model_filename": m.model.rsplit("/", 1)[-1],
        "optimization": {"graph": {"level": level}, "priority": "PRIORITY_DEFAULT",
                         "input_pinned_memory": {"enable": True}, "output_pinned_memory": {"enable": True}},
        "parameters": {k: {"string_value": v} for k, v in params.items()},
        "model_warmup": [],
        "response_cache": {"enable": False},
    }
    if accelerators:
        cfg["optimization"]["execution_accelerators"] = accelerators
    return cfg
