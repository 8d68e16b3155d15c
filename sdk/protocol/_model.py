"""The base of every protocol class: msgspec Structs validated on construction and on decode, with one-line errors.

Why msgspec and not frozen dataclasses: the controller decodes every telemetry record an agent publishes, and
msgspec decodes *and* checks types and ranges in C, in one pass over the bytes (bench/protocol.py measures it
against the previous dict parser and a dataclass model). It also generates the JSON Schemas (``sdk/schemas/``).

Rules every class here follows:

* **Validated on construction and on decode.** Types and ranges (``Meta`` constraints) are checked by msgspec when
  a message is decoded; a message built in code is checked the same way in ``__post_init__`` (it is converted once
  through the same validator, which also turns a dict given for a nested class into that class), so a producer can
  never put on the wire what a consumer refuses. Cross-field rules (a sketch's buckets add up to its count ...)
  live in ``_check`` and run in both cases.
* **Readers ignore unknown fields; writers only add within a major version** (docs/mqtt-protocol.md,
  "Compatibility"). Top-level messages carry ``"v": 1`` (the struct tag), and a reader refuses any other ``v``.
* **Bounded.** Every string, list, dict, number and free-form object has a limit (``_limits``); a JSON number that
  has no float (``1e999``) or an integer beyond 64 bits is refused, so nothing downstream can overflow.
* **One line naming the field** for anything refused: ``telemetry.models[0].count: expected int <= 1099511627776``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import msgspec
import msgspec.structs

from ..errors import PayloadTooLargeError, ProtocolError, ProtocolVersionError
from . import _limits as L

__all__ = ["Decoder", "Message", "Model", "check_free_form", "prevalidated"]

M = TypeVar("M", bound="Model")
T = TypeVar("T")

# Set while msgspec builds instances from data it has just validated (decode, from_dict, the revalidation in
# __post_init__): the per-field checks already ran, only the cross-field ``_check`` is left.
_VALIDATED: contextvars.ContextVar[bool] = contextvars.ContextVar("edgefleet_protocol_validated", default=False)

_PATH_RE = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def _error(what: str, exc: Exception) -> ProtocolError:
    """A msgspec error as one line that names the field: ``telemetry.models[0].count: Expected `int` ...``."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    m = _PATH_RE.match(text)
    msg, path = (m.group("msg"), m.group("path") or "") if m else (text, "")
    if path == ".v" or (msg.startswith("Object missing required field `v`") and not path):
        return ProtocolVersionError(f"{what}: unsupported version ({msg}); this edgefleet speaks v={L.VERSION}")
    return ProtocolError(f"{what}{path}: {msg}")


class Model(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A typed, validated protocol object (nested parts of messages, HTTP bodies, store rows)."""

    # Name used in error messages ("telemetry", "status" ...); subclasses set it.
    _what: ClassVar[str] = "object"

    def __post_init__(self) -> None:
        if not _VALIDATED.get():
            token = _VALIDATED.set(True)
            try:
                # Built in code: run the same validator a decoded message goes through (types, ranges, lengths),
                # and keep what it made (a dict given for a nested class becomes that class, an int a float).
                checked = msgspec.convert(msgspec.to_builtins(self), type(self))
            except (msgspec.ValidationError, TypeError) as exc:
                raise _error(self._what, exc) from None
            finally:
                _VALIDATED.reset(token)
            for name in self.__struct_fields__:
                msgspec.structs.force_setattr(self, name, getattr(checked, name))
        self._check()

    def _check(self) -> None:
        """Cross-field rules; raise ProtocolError (during decode msgspec adds the path)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (the wire form; fields at their default are left out where the class says so)."""
        out = msgspec.to_builtins(self)
        assert isinstance(out, dict)
        return out

    def to_json(self) -> bytes:
        """Compact JSON bytes."""
        return msgspec.json.encode(self)

    @classmethod
    def from_dict(cls: type[M], data: Mapping[str, Any]) -> M:
        """Validate a dict (already parsed JSON) into this class, or raise ProtocolError naming the field."""
        token = _VALIDATED.set(True)
        try:
            return msgspec.convert(data, cls)
        except (msgspec.ValidationError, TypeError) as exc:
            raise _error(cls._what, exc) from None
        finally:
            _VALIDATED.reset(token)

    @classmethod
    def from_json(cls: type[M], data: bytes | bytearray | memoryview | str) -> M:
        """Parse and validate JSON text (size-capped at :data:`MAX_PAYLOAD`), or raise ProtocolError."""
        size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
        if size > L.MAX_PAYLOAD:
            raise PayloadTooLargeError(f"{cls._what}: {size} bytes, over the {L.MAX_PAYLOAD}-byte cap")
        token = _VALIDATED.set(True)
        try:
            msg: M = _decoder(cls).decode(data)
            return msg
        except (msgspec.ValidationError, TypeError) as exc:  # ValidationError is a DecodeError: first
            raise _error(cls._what, exc) from None
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"{cls._what}: not JSON: {exc}") from None
        except RecursionError:
            raise ProtocolError(f"{cls._what}: nested deeper than this parser goes") from None
        finally:
            _VALIDATED.reset(token)


class Message(Model, frozen=True, kw_only=True, tag_field="v", tag=L.VERSION):
    """A top-level MQTT payload: a JSON object with ``"v": 1`` (the struct tag), at most 256 KiB."""


@contextlib.contextmanager
def prevalidated() -> Iterator[None]:
    """Build protocol objects from values that were validated when they entered (a store's own columns): only the
    cross-field checks run, not the per-field validation again. Never for data from outside the process."""
    token = _VALIDATED.set(True)
    try:
        yield
    finally:
        _VALIDATED.reset(token)


class Decoder(Generic[T]):
    """A reusable JSON decoder for any protocol type (``list[ModelSummary]`` ...), with one-line ProtocolErrors.

    For JSON this process stored itself (it was validated on the way in): ``decode`` skips the revalidation a
    constructor would do, while msgspec still checks every type as it decodes.
    """

    def __init__(self, type_: Any, what: str = "stored value") -> None:
        self._dec: msgspec.json.Decoder[Any] = msgspec.json.Decoder(type_)
        self.what = what

    def decode(self, data: bytes | str) -> T:
        """Decode, or raise ProtocolError naming the field."""
        token = _VALIDATED.set(True)
        try:
            out: T = self._dec.decode(data)
            return out
        except (msgspec.ValidationError, TypeError) as exc:
            raise _error(self.what, exc) from None
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"{self.what}: not JSON: {exc}") from None
        finally:
            _VALIDATED.reset(token)


class _Never(msgspec.Struct, frozen=True, tag_field="v", tag=-1):
    """Never valid: decoding ``X | _Never`` makes msgspec require the ``v`` tag instead of defaulting it."""

    def __post_init__(self) -> None:
        raise ProtocolError("Invalid value -1")


_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {}


def _decoder(cls: type[M]) -> msgspec.json.Decoder[Any]:
    dec = _DECODERS.get(cls)
    if dec is None:
        target: Any = cls | _Never if issubclass(cls, Message) else cls
        dec = _DECODERS[cls] = msgspec.json.Decoder(target)
    return dec


def check_free_form(value: Any, what: str, depth: int = 0) -> None:
    """Bound a free-form JSON value (event data, reply results, command args): depth, sizes, 64-bit ints, finite
    floats. Typed fields are bounded by their ``Meta``; this covers the parts the protocol leaves open."""
    if depth > L.MAX_DEPTH:
        raise ProtocolError(f"{what}: nested deeper than {L.MAX_DEPTH} levels")
    if isinstance(value, dict):
        if len(value) > L.MAX_ITEMS:
            raise ProtocolError(f"{what}: {len(value)} keys, over {L.MAX_ITEMS}")
        for k, v in value.items():
            if not isinstance(k, str) or len(k) > L.MAX_NAME:
                raise ProtocolError(f"{what}: key {str(k)[:40]!r} is not a string of at most {L.MAX_NAME} chars")
            if isinstance(v, (dict, list)) or not _scalar_ok(v):
                check_free_form(v, f"{what}.{k[:40]}", depth + 1)
    elif isinstance(value, (list, tuple)):
        if len(value) > L.MAX_ITEMS:
            raise ProtocolError(f"{what}: {len(value)} items, over {L.MAX_ITEMS}")
        for i, v in enumerate(value):
            if isinstance(v, (dict, list)) or not _scalar_ok(v):
                check_free_form(v, f"{what}[{i}]", depth + 1)
    elif not _scalar_ok(value):
        if isinstance(value, str):
            raise ProtocolError(f"{what}: string of {len(value)} chars, over {L.MAX_TEXT}")
        if isinstance(value, int):
            raise ProtocolError(f"{what}: integer {value} is outside 64 bits")
        if isinstance(value, float):
            raise ProtocolError(f"{what}: {value!r} is not a finite number")
        raise ProtocolError(f"{what}: {type(value).__name__} is not a JSON value")


def _scalar_ok(v: Any) -> bool:
    if v is None or isinstance(v, bool):
        return True
    if isinstance(v, str):
        return len(v) <= L.MAX_TEXT
    if isinstance(v, int):
        return L.INT64_MIN <= v <= L.INT64_MAX
    if isinstance(v, float):
        return math.isfinite(v)
    return False
