"""Check every file reference in an ONNX model without importing ``onnx``: a strict, bounded protobuf walk.

ONNX Runtime 1.16/1.17 follows a tensor's ``external_data`` ``location`` wherever it points (``../../x``, an absolute
path, a symlink) and reads files outside the model's directory; newer builds refuse some such paths, but devices run
old builds, and a model can hide a tensor in many places: graph initializers, sparse initializers (values and
indices), TENSOR/TENSORS/SPARSE_TENSOR(S) attributes, subgraphs in GRAPH/GRAPHS attributes of If/Loop/Scan or any
node at any depth, model-local functions (their nodes and their attribute defaults, ``attribute_proto``), training
info graphs. So, before a session is created, this module reads the whole ``ModelProto`` against the ONNX schema
(every message and field of onnx 1.23's ``onnx-ml.proto``, table below) and collects every reference to a file:

* a TensorProto anywhere whose ``data_location`` is not DEFAULT or that carries ``external_data`` entries;
* an ``EPContext`` node (ORT's pre-compiled EP context) with ``embed_mode = 0``: ``ep_cache_context`` is a path
  relative to the model; ``onnx_model_filename`` names a file too (TensorRT weight refit).

and refuses model metadata ORT acts on (``ort_config``: session options such as profiling, which writes a file, when
``ORT_LOAD_CONFIG_FROM_MODEL=1``). Other strings (``metadata_props``, ``doc_string``, a function's ``domain``) name no
file ONNX Runtime opens.

Each must be a plain relative path naming a file the signed manifest lists next to the model (so it was hashed and
extracted as a regular file), and byte ranges must lie inside it (:func:`check_external_data`). The walk is strict
where a lenient one could be fooled: a field the schema does not know, a message field with a wrong wire type, a
singular message field given twice (protobuf would merge the two), a duplicate external-data key, an external-data
key ORT would interpret other than ``location``/``offset``/``length``/``checksum`` (``prepacked*`` names more
ranges), ORT's in-memory address tag ``*/_ORT_MEM_ADDR_/*``, an ORT-format (flatbuffers) model, nesting deeper than
protobuf's own default limit (100) — each is refused, never skipped. Raw weights are skipped by length, never
copied; the file is memory-mapped. Work is linear in the file size and recursion is bounded, so any file gives a
clean error from the tree, never a crash or a hang: ``ModelError`` (code ``model``) for bytes that are not a valid
ONNX protobuf, ``UnsafeArchiveError`` for a reference out of the bundle, ``BundleFormatError`` for a malformed
reference (no location, bad offsets, duplicate or unknown keys) or an ORT-format model.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import BundleFormatError, ModelError, UnsafeArchiveError

__all__ = ["MAX_DEPTH", "SCHEMA", "ExternalRef", "check_external_data", "external_refs", "external_refs_in"]

MAX_DEPTH = 100  # messages nested in messages: protobuf's default recursion limit, which ORT's parser keeps
_MEM_ADDR_TAG = "*/_ORT_MEM_ADDR_/*"  # ORT reads the tensor from the process address given as "offset"
_EXTERNAL_KEYS = ("location", "offset", "length", "checksum")

# The ONNX schema: message -> {field number: child message, or "" for a scalar/string/bytes field}. A name ending in
# "!" is a singular message field (given twice, protobuf merges the two: refused). Generated from onnx 1.23's
# descriptors and checked against the installed onnx by tests/sdk/test_onnx_external.py.
SCHEMA: dict[str, dict[int, str]] = {
    "ModelProto": {1: "", 2: "", 3: "", 4: "", 5: "", 6: "", 7: "GraphProto!", 8: "OperatorSetIdProto",
                   14: "StringStringEntryProto", 20: "TrainingInfoProto", 25: "FunctionProto",
                   26: "DeviceConfigurationProto"},
    "OperatorSetIdProto": {1: "", 2: ""},
    "GraphProto": {1: "NodeProto", 2: "", 5: "TensorProto", 10: "", 11: "ValueInfoProto", 12: "ValueInfoProto",
                   13: "ValueInfoProto", 14: "TensorAnnotation", 15: "SparseTensorProto",
                   16: "StringStringEntryProto"},
    "NodeProto": {1: "", 2: "", 3: "", 4: "", 5: "AttributeProto", 6: "", 7: "", 8: "",
                  9: "StringStringEntryProto", 10: "NodeDeviceConfigurationProto"},
    "AttributeProto": {1: "", 2: "", 3: "", 4: "", 5: "TensorProto!", 6: "GraphProto!", 7: "", 8: "", 9: "",
                       10: "TensorProto", 11: "GraphProto", 13: "", 14: "TypeProto!", 15: "TypeProto", 20: "",
                       21: "", 22: "SparseTensorProto!", 23: "SparseTensorProto"},
    "TensorProto": {1: "", 2: "", 3: "TensorProto.Segment!", 4: "", 5: "", 6: "", 7: "", 8: "", 9: "", 10: "",
                    11: "", 12: "", 13: "StringStringEntryProto", 14: "", 16: "StringStringEntryProto"},
    "TensorProto.Segment": {1: "", 2: ""},
    "StringStringEntryProto": {1: "", 2: ""},
    "SparseTensorProto": {1: "TensorProto!", 2: "TensorProto!", 3: ""},
    "TypeProto": {1: "TypeProto.Tensor!", 4: "TypeProto.Sequence!", 5: "TypeProto.Map!",
                  6: "", 7: "TypeProto.Opaque!", 8: "TypeProto.SparseTensor!", 9: "TypeProto.Optional!"},
    "TypeProto.Tensor": {1: "", 2: "TensorShapeProto!"},
    "TypeProto.SparseTensor": {1: "", 2: "TensorShapeProto!"},
    "TypeProto.Sequence": {1: "TypeProto!"},
    "TypeProto.Optional": {1: "TypeProto!"},
    "TypeProto.Map": {1: "", 2: "TypeProto!"},
    "TypeProto.Opaque": {1: "", 2: ""},
    "TensorShapeProto": {1: "TensorShapeProto.Dimension"},
    "TensorShapeProto.Dimension": {1: "", 2: "", 3: ""},
    "ValueInfoProto": {1: "", 2: "TypeProto!", 3: "", 4: "StringStringEntryProto"},
    "TensorAnnotation": {1: "", 2: "StringStringEntryProto"},
    "TrainingInfoProto": {1: "GraphProto!", 2: "GraphProto!", 3: "StringStringEntryProto",
                          4: "StringStringEntryProto"},
    "FunctionProto": {1: "", 4: "", 5: "", 6: "", 7: "NodeProto", 8: "", 9: "OperatorSetIdProto", 10: "",
                      11: "AttributeProto", 12: "ValueInfoProto", 13: "", 14: "StringStringEntryProto"},
    "DeviceConfigurationProto": {1: "", 2: "", 3: ""},
    "NodeDeviceConfigurationProto": {1: "", 2: "ShardingSpecProto", 3: ""},
    "ShardingSpecProto": {1: "", 2: "", 3: "IntIntListEntryProto", 4: "ShardedDimProto"},
    "IntIntListEntryProto": {1: "", 2: ""},
    "ShardedDimProto": {1: "", 2: "SimpleShardedDimProto"},
    "SimpleShardedDimProto": {1: "", 2: "", 3: ""},
}
# Parsed once into (child kind, singular) pairs.
_FIELDS: dict[str, dict[int, tuple[str, bool]]] = {
    kind: {num: (child.rstrip("!"), child.endswith("!")) for num, child in fields.items()}
    for kind, fields in SCHEMA.items()
}
# Scalar fields whose value this walk reads, with the wire type protobuf would store them under: any other wire type
# would make protobuf keep them as unknown fields while a lenient reader took them at face value. Refused instead.
_READ_SCALARS = {("TensorProto", 14): 0, ("AttributeProto", 3): 0, ("AttributeProto", 20): 0}
_READ_STRINGS = {("TensorProto", 8), ("NodeProto", 3), ("NodeProto", 4), ("AttributeProto", 1),
                 ("AttributeProto", 4), ("AttributeProto", 21), ("StringStringEntryProto", 1),
                 ("StringStringEntryProto", 2)}
# Child summaries a parent needs: a node's attributes, a tensor's external-data entries.
_KEEP_CHILDREN = {("NodeProto", 5), ("TensorProto", 13), ("ModelProto", 14)}
# ModelProto.metadata_props keys ONNX Runtime acts on: "ort_config" carries session options (enable_profiling writes
# a profile file, thread counts) that ORT applies when ORT_LOAD_CONFIG_FROM_MODEL=1 is set in the environment.
_ACTIVE_METADATA = {"ort_config"}


@dataclass(frozen=True)
class ExternalRef:
    """One reference to a file: a tensor's external data or an EPContext node's file attribute.

    ``offset``/``length`` give the byte range a tensor reads (``length`` None: to the end of the file).
    """

    tensor: str
    location: str | None
    offset: int
    length: int | None
    kind: str = "tensor"  # tensor | epcontext

    @property
    def what(self) -> str:
        """How a message names it."""
        return (f"tensor {self.tensor!r} external data" if self.kind == "tensor"
                else f"EPContext node {self.tensor!r}")


class _Walk:
    """One pass over a model's bytes; collects :class:`ExternalRef` in ``refs``."""

    def __init__(self, buf: mmap.mmap | bytes, what: str) -> None:
        self.buf = buf
        self.what = what
        self.refs: list[ExternalRef] = []

    def fail(self, why: str) -> ModelError:
        # A model this walk cannot read is refused, never passed on: ORT's parser might read it differently.
        return ModelError(f"cannot create an ONNX Runtime session for {self.what}: not a valid ONNX model ({why})")

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        buf = self.buf
        value = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise self.fail("truncated or overlong varint")
            b = buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value, pos
            shift += 7

    def text(self, span: tuple[int, int], what: str) -> str:
        try:
            return bytes(self.buf[span[0]:span[1]]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8: {exc.reason}") from exc

    def message(self, kind: str, start: int, end: int, depth: int) -> dict[int, Any]:
        """Walk one message; returns the fields this walk reads: string spans, lists of varints, and lists of the
        summaries of node attributes and external-data entries."""
        if depth > MAX_DEPTH:
            raise self.fail(f"messages nested deeper than {MAX_DEPTH}")
        fields = _FIELDS[kind]
        seen_single: set[int] = set()
        got: dict[int, Any] = {}
        pos = start
        while pos < end:
            key, pos = self.varint(pos, end)
            num, wt = key >> 3, key & 7
            spec = fields.get(num)
            if spec is None:
                raise self.fail(f"{kind} has no field {num} in the ONNX schema this edgefleet reads (onnx 1.23): "
                                "refused rather than skipped, since it could carry data ONNX Runtime reads")
            child, single = spec
            span = (0, 0)
            number = 0
            if wt == 0:
                number, pos = self.varint(pos, end)
            elif wt == 1:
                pos += 8
            elif wt == 5:
                pos += 4
            elif wt == 2:
                n, pos = self.varint(pos, end)
                span, pos = (pos, pos + n), pos + n
            else:  # 3/4: groups (no ONNX field is one), 6/7: invalid
                raise self.fail(f"{kind} field {num} has wire type {wt}")
            if pos > end:
                raise self.fail(f"{kind} field {num} runs past the end of its message")
            if child:
                if wt != 2:
                    raise self.fail(f"{kind} field {num} is a message but has wire type {wt}")
                if single:
                    if num in seen_single:
                        raise self.fail(f"{kind} field {num} given twice (protobuf would merge the two)")
                    seen_single.add(num)
                summary = self.message(child, span[0], span[1], depth + 1)
                if (kind, num) in _KEEP_CHILDREN:
                    got.setdefault(num, []).append(summary)
                continue
            want = _READ_SCALARS.get((kind, num))
            if want is not None:
                if wt != want:
                    raise self.fail(f"{kind} field {num} has wire type {wt}, expected {want}")
                got.setdefault(num, []).append(number)
            elif (kind, num) in _READ_STRINGS:
                if wt != 2:
                    raise self.fail(f"{kind} field {num} is a string but has wire type {wt}")
                got[num] = span  # decoded only where it matters (the last one wins, as in protobuf)
        if kind == "TensorProto":
            self.tensor(got)
        elif kind == "NodeProto":
            self.node(got)
        elif kind == "ModelProto":
            for entry in got.get(14, []):
                meta = self.text(entry[1], "a metadata key") if 1 in entry else ""
                if meta in _ACTIVE_METADATA:
                    raise BundleFormatError(f"{self.what}: model metadata {meta!r} would set ONNX Runtime session "
                                            "options from inside the model (ORT_LOAD_CONFIG_FROM_MODEL); a bundle "
                                            "sets them in its signed manifest")
        return got

    def tensor(self, got: dict[int, Any]) -> None:
        # Any data_location other than DEFAULT (0) counts: protobuf keeps an unknown enum value as an unknown field,
        # so the value ORT sees may be an earlier one.
        external = any(v != 0 for v in got.get(14, []))
        entries_raw = got.get(13, [])
        if not external and not entries_raw:
            return
        name = self.text(got[8], "a tensor name") if 8 in got else ""
        what = f"{self.what}: tensor {name!r} external data"
        entries: dict[str, str] = {}
        for e in entries_raw:
            key = self.text(e[1], "an external-data key") if 1 in e else ""
            value = self.text(e[2], "an external-data value") if 2 in e else ""
            if key not in _EXTERNAL_KEYS:
                raise BundleFormatError(f"{what}: key {key[:40]!r} is not one of {', '.join(_EXTERNAL_KEYS)}")
            if key in entries:
                raise BundleFormatError(f"{what}: key {key!r} given twice")
            entries[key] = value

        def number(key: str) -> int | None:
            raw = entries.get(key)
            if raw is None or raw == "":
                return None
            if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
                raise BundleFormatError(f"{what}: {key} must be a non-negative integer below 10^18, "
                                        f"got {raw[:40]!r}")
            return int(raw)

        self.refs.append(ExternalRef(name, entries.get("location"), number("offset") or 0, number("length")))

    def node(self, got: dict[int, Any]) -> None:
        op = got.get(4)
        if op is None or self.buf[op[0]:op[1]] != b"EPContext":
            return
        name = self.text(got[3], "a node name") if 3 in got else ""
        what = f"{self.what}: EPContext node {name!r}"
        attrs: dict[str, dict[int, Any]] = {}
        for a in got.get(5, []):
            aname = self.text(a[1], "an attribute name") if 1 in a else ""
            if aname in attrs:
                raise BundleFormatError(f"{what}: attribute {aname!r} given twice")
            if 21 in a:
                raise BundleFormatError(f"{what}: attribute {aname!r} refers to a function attribute; an EPContext "
                                        "node must state its attributes")
            attrs[aname] = a
        # ORT's default without the attribute: embedded (1); an attribute without a value reads as protobuf's 0.
        embed = attrs["embed_mode"].get(3, [0])[-1] if "embed_mode" in attrs else 1
        if embed not in (0, 1):
            raise BundleFormatError(f"{what}: embed_mode must be 0 or 1, got {embed}")
        for aname in ("onnx_model_filename", "ep_cache_context") if embed == 0 else ("onnx_model_filename",):
            span = attrs.get(aname, {}).get(4)
            path = self.text(span, f"attribute {aname}") if span is not None else ""
            if path == "" and aname == "onnx_model_filename":
                continue
            self.refs.append(ExternalRef(f"{name}.{aname}", path, 0, None, kind="epcontext"))


def external_refs(model_path: str | os.PathLike[str]) -> list[ExternalRef]:
    """Every file reference in the model: tensors with external data (anywhere), EPContext file attributes."""
    p = Path(model_path)
    try:
        with open(p, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise ModelError(f"cannot create an ONNX Runtime session for {p}: not a valid ONNX model (empty)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return external_refs_in(mm, str(p))
    except OSError as exc:
        raise BundleFormatError(f"{p}: cannot read the model: {exc.strerror or exc}") from exc


def external_refs_in(data: bytes | mmap.mmap, what: str = "model") -> list[ExternalRef]:
    """:func:`external_refs` of a model's bytes; ``what`` names it in errors."""
    if len(data) == 0:
        raise ModelError(f"cannot create an ONNX Runtime session for {what}: not a valid ONNX model (empty)")
    if data[4:8] == b"ORTM":
        raise BundleFormatError(f"{what}: an ORT-format (flatbuffers) model, not an ONNX protobuf; bundles carry "
                                "ONNX models")
    walk = _Walk(data, what)
    walk.message("ModelProto", 0, len(data), 0)
    return walk.refs


def check_external_data(root: str | os.PathLike[str], model: str, files: Mapping[str, object]) -> list[ExternalRef]:
    """Refuse a model that references a file outside the bundle, or a byte range past a listed file's end.

    ``model`` is the model's path inside the bundle and ``files`` the manifest's listed files; ``root`` is the
    extracted bundle. A location must be a plain relative path (no ``..``, no absolute or drive path, no backslash,
    not ORT's memory-address tag) naming a listed file, which on disk must be a regular file (not a symlink planted
    after install) inside the bundle directory.
    """
    base = Path(root)
    if model.lower().endswith(".ort"):
        # ORT picks its flatbuffers loader by this extension, which this walk cannot read.
        raise BundleFormatError(f"{base}: {model}: an ORT-format model name; bundles carry ONNX (.onnx) models")
    model_dir = PurePosixPath(model).parent
    refs = external_refs(base.joinpath(*PurePosixPath(model).parts))
    for ref in refs:
        what = f"{base}: {model}: {ref.what}"
        loc = ref.location
        if not loc:
            raise BundleFormatError(f"{what} has no location")
        if loc == _MEM_ADDR_TAG:
            raise UnsafeArchiveError(f"{what} location is ONNX Runtime's in-memory address tag {loc!r}")
        parts = loc.split("/")
        if (loc.startswith("/") or "\\" in loc or ":" in loc or "\x00" in loc or len(loc) > 255
                or any(part in ("", ".", "..") for part in parts) or not loc.isprintable()):
            raise UnsafeArchiveError(f"{what} location {loc[:80]!r} is not a plain path inside the bundle")
        name = str(model_dir / loc) if str(model_dir) != "." else loc
        if name not in files:
            raise UnsafeArchiveError(f"{what} location {loc!r} is not a file the signed manifest lists")
        path = base.joinpath(*PurePosixPath(name).parts)
        if path.is_symlink() or not path.is_file():
            raise UnsafeArchiveError(f"{what} location {loc!r} is not a regular file")
        if not os.path.realpath(path).startswith(os.path.realpath(base) + os.sep):
            raise UnsafeArchiveError(f"{what} location {loc!r} resolves outside the bundle (a symlinked directory)")
        size = path.stat().st_size
        if ref.offset > size or (ref.length is not None and ref.offset + ref.length > size):
            raise BundleFormatError(f"{what}: offset {ref.offset} + length {ref.length} lies past the end of "
                                    f"{loc!r} ({size} bytes)")
    return refs
