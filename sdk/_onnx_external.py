"""Check an ONNX model's external-data references without importing ``onnx``: a minimal protobuf walk.

ONNX Runtime 1.16 follows an initializer's ``external_data`` ``location`` wherever it points (``../../x``, a symlink)
and reads files outside the model's directory; newer builds refuse such paths, but devices run old builds. So before
a session is created, every tensor that keeps its data outside the model must name a file the signed manifest lists
(so it was hashed and extracted as a regular file next to the model), and its offset and length must lie inside it.

The walk reads only the fields that can hold tensors: ModelProto.graph (7) and functions (25); GraphProto.node (1),
initializer (5), sparse_initializer (15); NodeProto.attribute (5); AttributeProto.t (5), g (6), tensors (10),
graphs (11), sparse_tensor (22), sparse_tensors (23); FunctionProto.node (7); SparseTensorProto.values (1) and
indices (2); TensorProto.external_data (13) with StringStringEntryProto key (1) / value (2). Everything else
(raw weights included) is skipped by length without being copied.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import BundleFormatError, ModelError, UnsafeArchiveError

__all__ = ["ExternalRef", "check_external_data", "external_refs"]

_MAX_DEPTH = 64  # subgraphs nest (If/Loop bodies); a hostile model could nest them without end

# message kind -> {field number: message kind of that (length-delimited) field}
_MODEL, _GRAPH, _NODE, _ATTR, _FUNC, _TENSOR, _SPARSE, _ENTRY = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 25: _FUNC},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _FUNC: {7: _NODE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
}


@dataclass(frozen=True)
class ExternalRef:
    """One tensor's external data: where, from which byte, how many (None: to the end of the file)."""

    tensor: str
    location: str | None
    offset: int
    length: int | None


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes, what: str) -> None:
        self.buf = buf
        self.what = what

    def fail(self, why: str) -> ModelError:
        # A model this walk cannot read is refused, never passed on: ORT's parser might read it differently.
        return ModelError(f"cannot create an ONNX Runtime session for {self.what}: not a valid ONNX model ({why})")

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise self.fail("truncated or overlong varint")
            b = self.buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value, pos
            shift += 7

    def fields(self, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
        """Yield (field number, wire type, value or (start, end) of a length-delimited field)."""
        pos = start
        while pos < end:
            key, pos = self.varint(pos, end)
            num, wt = key >> 3, key & 7
            if num == 0:
                raise self.fail("field number 0")
            if wt == 0:
                value, pos = self.varint(pos, end)
                yield num, wt, value
            elif wt == 1:
                pos += 8
                yield num, wt, None
            elif wt == 5:
                pos += 4
                yield num, wt, None
            elif wt == 2:
                n, pos = self.varint(pos, end)
                if n > end - pos:
                    raise self.fail("length-delimited field runs past its message")
                yield num, wt, (pos, pos + n)
                pos += n
            elif wt == 3:  # a (deprecated) group: protobuf parsers skip it as an unknown field, so must we
                pos = self._skip_group(pos, end, num, 0)
                yield num, wt, None
            else:
                raise self.fail(f"wire type {wt}")
            if pos > end:
                raise self.fail("field runs past its message")

    def _skip_group(self, pos: int, end: int, num: int, depth: int) -> int:
        if depth > _MAX_DEPTH:
            raise self.fail("groups nested too deep")
        while pos < end:
            key, pos = self.varint(pos, end)
            n, wt = key >> 3, key & 7
            if wt == 4:
                if n != num:
                    raise self.fail("mismatched end of group")
                return pos
            if wt == 0:
                _, pos = self.varint(pos, end)
            elif wt in (1, 5):
                pos += 8 if wt == 1 else 4
            elif wt == 2:
                length, pos = self.varint(pos, end)
                pos += length
            elif wt == 3:
                pos = self._skip_group(pos, end, n, depth + 1)
            else:
                raise self.fail(f"wire type {wt}")
            if pos > end:
                raise self.fail("group runs past its message")
        raise self.fail("unterminated group")

    def text(self, span: tuple[int, int]) -> str:
        try:
            return bytes(self.buf[span[0]:span[1]]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"string is not UTF-8: {exc}") from exc


def _tensor(r: _Reader, start: int, end: int, out: list[ExternalRef]) -> None:
    name = ""
    external = False
    entries: dict[str, str] = {}
    for num, wt, v in r.fields(start, end):
        if num == 8 and wt == 2:
            name = r.text(v)
        elif num == 14 and wt == 0:
            external = v == 1
        elif num == 13 and wt == 2:
            key = value = ""
            for n2, w2, v2 in r.fields(*v):
                if n2 == 1 and w2 == 2:
                    key = r.text(v2)
                elif n2 == 2 and w2 == 2:
                    value = r.text(v2)
            entries[key] = value
    if not external and not entries:
        return
    what = f"{r.what}: tensor {name!r} external data"

    def number(key: str) -> int | None:
        raw = entries.get(key)
        if raw is None or raw == "":
            return None
        if not raw.isascii() or not raw.isdigit():
            raise BundleFormatError(f"{what}: {key} must be a non-negative integer, got {raw[:40]!r}")
        return int(raw)

    out.append(ExternalRef(name, entries.get("location"), number("offset") or 0, number("length")))


def _walk(r: _Reader, kind: int, start: int, end: int, depth: int, out: list[ExternalRef]) -> None:
    if depth > _MAX_DEPTH:
        raise r.fail(f"subgraphs nested deeper than {_MAX_DEPTH}")
    children = _CHILDREN[kind]
    for num, wt, v in r.fields(start, end):
        child = children.get(num)
        if child is None or wt != 2:
            continue
        s, e = v
        if child == _TENSOR:
            _tensor(r, s, e, out)
        else:
            _walk(r, child, s, e, depth + 1, out)


def external_refs(model_path: str | os.PathLike[str]) -> list[ExternalRef]:
    """Every tensor in the model (subgraphs and functions included) whose data lives in an external file."""
    p = Path(model_path)
    out: list[ExternalRef] = []
    try:
        with open(p, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise ModelError(f"{p}: not a valid ONNX model (empty file)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                _walk(_Reader(mm, str(p)), _MODEL, 0, size, 0, out)
    except OSError as exc:
        raise BundleFormatError(f"{p}: cannot read the model: {exc.strerror or exc}") from exc
    return out


def check_external_data(root: str | os.PathLike[str], model: str, files: Mapping[str, object]) -> list[ExternalRef]:
    """Refuse a model whose external data is not a listed bundle file next to it, or lies past that file's end.

    ``model`` is the model's path inside the bundle and ``files`` the manifest's listed files; ``root`` is the
    extracted bundle. A location must be a plain relative path (no ``..``, no absolute or drive path, no backslash)
    naming a listed file, which on disk must be a regular file (not a symlink planted after install).
    """
    base = Path(root)
    model_dir = PurePosixPath(model).parent
    refs = external_refs(base.joinpath(*PurePosixPath(model).parts))
    for ref in refs:
        what = f"{base}: {model}: tensor {ref.tensor!r} external data"
        loc = ref.location
        if not loc:
            raise BundleFormatError(f"{what} has no location")
        parts = loc.split("/")
        if (loc.startswith("/") or "\\" in loc or ":" in loc or "\x00" in loc or len(loc) > 255
                or any(part in ("", ".", "..") for part in parts)):
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
