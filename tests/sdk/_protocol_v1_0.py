"""The v1 reader as edgefleet 0.1.0 shipped it (before the typed model), frozen here to test compatibility.

Agents and controllers already in the field parse with this code: what the new model writes must pass it (writers
only add within v1), and what they wrote must pass the new model (tests/sdk/data/v1_payloads_0.1.0.json). Do not
change it: it stands for released software.
"""
# ruff: noqa
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from edgefleet.sdk.errors import ProtocolError

PROTOCOL_VERSION = 1
ROOT = "edgefleet/v1"
CHANNELS = ("status", "telemetry", "events", "cmd", "reply", "receipt")
COMMAND_KINDS = ("deploy", "rollback", "remove", "benchmark", "describe", "configure")
MAX_PAYLOAD = 256 * 1024
SKETCH_ALPHA = 0.01
"""Relative accuracy of every latency sketch in telemetry (what agents record and the fleet merges)."""
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_id(what: str, value: object) -> str:
    """Return ``value`` if it is a valid fleet/device/command id, else raise ProtocolError naming ``what``."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ProtocolError(f"{what} must match [A-Za-z0-9_.-]{{1,64}}, got {value!r}")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def decode(data: bytes | bytearray | str, what: str = "payload") -> dict[str, Any]:
    """Parse a payload: size cap, JSON object, ``v`` == 1."""
    size = len(data.encode("utf-8", "surrogatepass")) if isinstance(data, str) else len(data)
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"{what}: {size} bytes, over the {MAX_PAYLOAD}-byte cap")
    try:
        # NaN and Infinity are not JSON: refuse them rather than let them poison sums and sketches downstream.
        obj = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeError, RecursionError) as exc:  # RecursionError: "[[[[..." nested past the stack
        raise ProtocolError(f"{what}: not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: must be a JSON object")
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{what}: unsupported version v={obj.get('v')!r} (this edgefleet speaks v={PROTOCOL_VERSION})"
        )
    return obj


def _req(obj: Mapping[str, Any], key: str, types: type | tuple[type, ...], what: str) -> Any:
    if key not in obj:
        raise ProtocolError(f"{what}: missing field {key!r}")
    val = obj[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(val, allowed) or (isinstance(val, bool) and bool not in allowed):
        raise ProtocolError(f"{what}: field {key!r} has type {type(val).__name__}")
    return val


def _num(obj: Mapping[str, Any], key: str, what: str, minimum: float = 0.0) -> float:
    val = _req(obj, key, (int, float), what)
    if not val >= minimum:
        raise ProtocolError(f"{what}: field {key!r} must be >= {minimum}, got {val!r}")
    try:
        return float(val)
    except OverflowError:  # a JSON integer of 309+ digits has no float
        raise ProtocolError(f"{what}: field {key!r} is too large ({len(str(val))} digits)") from None


def _int(obj: Mapping[str, Any], key: str, what: str, minimum: int = 0) -> int:
    val = _req(obj, key, int, what)
    if val < minimum:
        raise ProtocolError(f"{what}: field {key!r} must be >= {minimum}, got {val!r}")
    return int(val)


def parse_status(data: bytes | str) -> dict[str, Any]:
    """Validate a status payload."""
    obj = decode(data, "status")
    check_id("status.device", obj.get("device"))
    if obj.get("state") not in ("online", "offline"):
        raise ProtocolError(f"status: state must be online or offline, got {obj.get('state')!r}")
    if "description" in obj and not isinstance(obj["description"], dict):
        raise ProtocolError("status: description must be an object")
    return obj


def parse_telemetry(data: bytes | str) -> dict[str, Any]:
    """Validate a telemetry payload, including every model entry and its sketch."""
    what = "telemetry"
    obj = decode(data, what)
    check_id("telemetry.device", obj.get("device"))
    _req(obj, "boot", str, what)
    _int(obj, "seq", what)
    _num(obj, "ts", what)
    _num(obj, "interval_s", what)
    _int(obj, "dropped", what) if "dropped" in obj else None
    models = _req(obj, "models", list, what)
    for i, m in enumerate(models):
        w = f"telemetry.models[{i}]"
        if not isinstance(m, dict):
            raise ProtocolError(f"{w}: must be an object")
        _req(m, "name", str, w)
        _req(m, "version", str, w)
        _int(m, "count", w)
        _int(m, "errors", w)
        providers = _req(m, "providers", list, w)
        if not all(isinstance(p, str) for p in providers):
            raise ProtocolError(f"{w}: providers must be strings")
        sk = _sketch_from_dict(_req(m, "sketch", dict, w))
        if sk.alpha != SKETCH_ALPHA:  # the fleet merges sketches across devices: one accuracy for all
            raise ProtocolError(f"{w}: sketch alpha must be {SKETCH_ALPHA}, got {sk.alpha!r}")
        if sk.count != m["count"]:
            raise ProtocolError(f"{w}: sketch holds {sk.count} values but count is {m['count']}")
    for key in ("process", "system"):
        if key in obj and not isinstance(obj[key], dict):
            raise ProtocolError(f"{what}: {key} must be an object")
    return obj


def parse_event(data: bytes | str) -> dict[str, Any]:
    """Validate an event payload."""
    obj = decode(data, "event")
    check_id("event.device", obj.get("device"))
    _req(obj, "kind", str, "event")
    _req(obj, "message", str, "event")
    if obj.get("level") not in ("debug", "info", "warning", "error"):
        raise ProtocolError(f"event: level must be debug, info, warning or error, got {obj.get('level')!r}")
    if not isinstance(obj.get("data", {}), dict):
        raise ProtocolError("event: data must be an object")
    return obj


_COMMAND_ARGS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "deploy": {"url": str, "sha256": str, "size": int},
    "rollback": {},
    "remove": {"name": str},
    "benchmark": {},
    "describe": {},
    "configure": {},
}


def parse_command(data: bytes | str) -> dict[str, Any]:
    """Validate a command: id, kind, and the arguments that kind needs."""
    what = "cmd"
    obj = decode(data, what)
    check_id("cmd.id", obj.get("id"))
    kind = obj.get("kind")
    if kind not in COMMAND_KINDS:
        raise ProtocolError(f"cmd: unknown kind {kind!r}; kinds are {', '.join(COMMAND_KINDS)}")
    args = _req(obj, "args", dict, what)
    for key, types in _COMMAND_ARGS[kind].items():
        _req(args, key, types, f"cmd {kind} args")
    if kind == "deploy":
        if not re.fullmatch(r"[0-9a-f]{64}", args["sha256"]):
            raise ProtocolError("cmd deploy args: sha256 must be 64 lowercase hex digits")
        if args["size"] <= 0:
            raise ProtocolError(f"cmd deploy args: size must be > 0, got {args['size']}")
        if not args["url"].startswith(("http://", "https://", "file://")):
            raise ProtocolError(f"cmd deploy args: url must be http(s):// or file://, got {args['url'][:60]!r}")
    if kind == "benchmark" and "runs" in args:
        if not isinstance(args["runs"], int) or not 1 <= args["runs"] <= 100_000:
            raise ProtocolError(f"cmd benchmark args: runs must be an int in 1..100000, got {args['runs']!r}")
    if kind == "configure" and "telemetry_interval_s" in args:
        iv = args["telemetry_interval_s"]
        if not isinstance(iv, (int, float)) or isinstance(iv, bool) or not 0.1 <= iv <= 3600:
            raise ProtocolError(f"cmd configure args: telemetry_interval_s must be in 0.1..3600, got {iv!r}")
    if "expires" in obj:
        _num(obj, "expires", what)
    if "counter" in obj:
        _int(obj, "counter", what, minimum=1)
    if "signature" in obj:
        sig = _req(obj, "signature", dict, what)
        for key in ("alg", "keyid", "sig"):
            _req(sig, key, str, "cmd signature")
    return obj


def parse_reply(data: bytes | str) -> dict[str, Any]:
    """Validate a reply payload."""
    obj = decode(data, "reply")
    check_id("reply.id", obj.get("id"))
    check_id("reply.device", obj.get("device"))
    if obj.get("status") == "ok":
        _req(obj, "result", dict, "reply")
    elif obj.get("status") == "error":
        err = _req(obj, "error", dict, "reply")
        _req(err, "code", str, "reply.error")
        _req(err, "message", str, "reply.error")
    else:
        raise ProtocolError(f"reply: status must be ok or error, got {obj.get('status')!r}")
    return obj


MAX_RECEIPT_RANGES = 1000


def parse_receipt(data: bytes | str) -> dict[str, Any]:
    """Validate a receipt: ``telemetry``/``events`` map a boot to ``[first, last]`` seq ranges, ``replies`` ids."""
    what = "receipt"
    obj = decode(data, what)
    check_id("receipt.device", obj.get("device"))
    for key in ("telemetry", "events"):
        per_boot = _req(obj, key, dict, what)
        for boot, ranges in per_boot.items():
            w = f"receipt.{key}[{boot[:40]!r}]"
            if not isinstance(ranges, list) or len(ranges) > MAX_RECEIPT_RANGES:
                raise ProtocolError(f"{w}: must be a list of at most {MAX_RECEIPT_RANGES} ranges")
            for r in ranges:
                if (not isinstance(r, list) or len(r) != 2 or not all(type(x) is int for x in r)
                        or not 0 <= r[0] <= r[1] < 2**63):
                    raise ProtocolError(f"{w}: a range must be [first, last] with 0 <= first <= last < 2^63, "
                                        f"got {str(r)[:60]}")
    replies = _req(obj, "replies", list, what)
    for r in replies:
        check_id("receipt.replies[]", r)
    return obj


class _Sketch:
    """Enough of 0.1.0's DDSketch for its from_dict checks."""

    def __init__(self, alpha: float) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha = alpha
        self._gamma_ln = math.log((1.0 + alpha) / (1.0 - alpha))
        self._bins: dict[int, int] = {}
        self.count = 0
        self.zero = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf


def _sketch_from_dict(d: Mapping[str, Any]) -> _Sketch:
    cls = _Sketch
    try:
        sk = cls(float(d["alpha"]))
        counts = d["counts"]
        offset = d["offset"]
        if not isinstance(counts, list) or not isinstance(offset, int) or len(counts) > 4096:
            raise ValueError("counts must be a list of at most 4096 ints and offset an int")
        zero = d["zero"]
        if not isinstance(zero, int) or isinstance(zero, bool) or zero < 0:
            raise ValueError(f"zero count {zero!r} is not a non-negative int")
        total = zero
        for i, c in enumerate(counts):
            if not isinstance(c, int) or isinstance(c, bool) or c < 0:
                raise ValueError(f"bucket count {c!r} is not a non-negative int")
            if c:
                sk._bins[offset + i] = c
                total += c
        if sk._bins and max(-min(sk._bins), max(sk._bins)) * sk._gamma_ln > 700.0:
            # a bucket whose value exp(key * ln gamma) has no float: quantile() would raise OverflowError
            raise ValueError(f"bucket keys {min(sk._bins)}..{max(sk._bins)} are out of range")
        if isinstance(d["count"], bool) or total != d["count"]:
            raise ValueError(f"bucket counts add up to {total}, count says {d['count']}")
        sk.count = total
        sk.zero = zero
        sk.sum = float(d["sum"])
        if not math.isfinite(sk.sum) or sk.sum < 0:
            raise ValueError(f"sum must be a finite number >= 0, got {d['sum']!r}")
        if total:
            sk.min = float(d["min"])
            sk.max = float(d["max"])
            if not (0.0 <= sk.min <= sk.max < math.inf):
                raise ValueError(f"min {d['min']!r} and max {d['max']!r} are inconsistent")
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: float() of a 309-digit int
        raise ProtocolError(f"invalid latency sketch: {exc}") from exc
    return sk

