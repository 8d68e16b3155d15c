"""The MQTT contract between agents and controllers (docs/mqtt-protocol.md).

Topics are ``edgefleet/v1/<fleet>/<device>/<channel>``; ids match ``[A-Za-z0-9_.-]{1,64}`` so they can never be the
wildcards ``+``/``#`` or add a level. Payloads are JSON objects with ``"v": 1``; ``parse_*`` validate a payload's
schema and raise :class:`ProtocolError` with one line naming the field. Both ends use these functions.

| channel   | publisher  | QoS | retained | payload            |
|-----------|------------|-----|----------|--------------------|
| status    | agent      | 1   | yes      | :func:`status`     |
| telemetry | agent      | 1   | no       | :func:`telemetry`  |
| events    | agent      | 1   | no       | :func:`event`      |
| cmd       | controller | 1   | no       | :func:`command`    |
| reply     | agent      | 1   | no       | :func:`reply`      |
| receipt   | controller | 1   | no       | :func:`receipts`   |

A ``receipt`` tells an agent which of its telemetry records, events and replies a controller has *stored*: the agent
keeps each one on disk until then and sends it again if a receipt for later ones comes first (the broker lost it:
Mosquitto 2.0.11, for one, restores no shared subscription when it restarts, so it acknowledges messages that no
controller will get until the controllers subscribe again).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import (
    BundleSignatureError,
    CommandExpiredError,
    CommandSignatureError,
    ProtocolError,
)

if TYPE_CHECKING:
    from .keys import PrivateKey, TrustedKeys

__all__ = [
    "CHANNELS",
    "COMMAND_KINDS",
    "MAX_PAYLOAD",
    "MAX_RECEIPT_RANGES",
    "PROTOCOL_VERSION",
    "SKETCH_ALPHA",
    "Topic",
    "check_expiry",
    "check_id",
    "command",
    "decode",
    "encode",
    "event",
    "parse_command",
    "parse_event",
    "parse_receipt",
    "parse_reply",
    "parse_status",
    "parse_telemetry",
    "parse_topic",
    "receipts",
    "reply",
    "seq_ranges",
    "sign_command",
    "status",
    "subscription",
    "telemetry",
    "topic",
    "verify_command",
]

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


def topic(fleet: str, device: str, channel: str) -> str:
    """The topic of one device's channel."""
    if channel not in CHANNELS:
        raise ProtocolError(f"unknown channel {channel!r}; channels are {', '.join(CHANNELS)}")
    return f"{ROOT}/{check_id('fleet', fleet)}/{check_id('device', device)}/{channel}"


def subscription(fleet: str, channel: str, share_group: str | None = None) -> str:
    """Topic filter for one channel of every device in a fleet, optionally as an MQTT 5 shared subscription."""
    f = f"{ROOT}/{check_id('fleet', fleet)}/+/{channel}"
    return f"$share/{check_id('share group', share_group)}/{f}" if share_group else f


@dataclass(frozen=True)
class Topic:
    """A parsed topic."""

    fleet: str
    device: str
    channel: str


def parse_topic(name: str) -> Topic:
    """Split a topic into fleet, device and channel, validating each."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != ROOT:
        raise ProtocolError(f"topic {name!r} is not {ROOT}/<fleet>/<device>/<channel>")
    if parts[4] not in CHANNELS:
        raise ProtocolError(f"topic {name!r} has unknown channel {parts[4]!r}")
    return Topic(check_id("fleet", parts[2]), check_id("device", parts[3]), parts[4])


def encode(payload: Mapping[str, Any]) -> bytes:
    """Compact JSON bytes."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")


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


# -- status ---------------------------------------------------------------------------------------------------------

def status(device: str, state: str, *, boot: str = "", description: Mapping[str, Any] | None = None,
           reason: str = "") -> dict[str, Any]:
    """A retained status message: ``online`` with a device description (birth) or ``offline`` (will or shutdown)."""
    msg: dict[str, Any] = {"v": 1, "device": device, "state": state, "ts": time.time(), "boot": boot}
    if description is not None:
        msg["description"] = dict(description)
    if reason:
        msg["reason"] = reason
    return msg


def parse_status(data: bytes | str) -> dict[str, Any]:
    """Validate a status payload."""
    obj = decode(data, "status")
    check_id("status.device", obj.get("device"))
    if obj.get("state") not in ("online", "offline"):
        raise ProtocolError(f"status: state must be online or offline, got {obj.get('state')!r}")
    if "description" in obj and not isinstance(obj["description"], dict):
        raise ProtocolError("status: description must be an object")
    return obj


# -- telemetry ------------------------------------------------------------------------------------------------------

def telemetry(device: str, boot: str, seq: int, models: list[dict[str, Any]], *, interval_s: float,
              process: Mapping[str, Any] | None = None, system: Mapping[str, Any] | None = None,
              dropped: int = 0, ts: float | None = None) -> dict[str, Any]:
    """One telemetry record; (device, boot, seq) identifies it uniquely so the fleet can de-duplicate."""
    return {"v": 1, "device": device, "boot": boot, "seq": seq, "ts": time.time() if ts is None else ts,
            "interval_s": interval_s, "models": models, "process": dict(process or {}), "system": dict(system or {}),
            "dropped": dropped}


def parse_telemetry(data: bytes | str) -> dict[str, Any]:
    """Validate a telemetry payload, including every model entry and its sketch."""
    from .sketch import DDSketch

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
        sk = DDSketch.from_dict(_req(m, "sketch", dict, w))
        if sk.alpha != SKETCH_ALPHA:  # the fleet merges sketches across devices: one accuracy for all
            raise ProtocolError(f"{w}: sketch alpha must be {SKETCH_ALPHA}, got {sk.alpha!r}")
        if sk.count != m["count"]:
            raise ProtocolError(f"{w}: sketch holds {sk.count} values but count is {m['count']}")
    for key in ("process", "system"):
        if key in obj and not isinstance(obj[key], dict):
            raise ProtocolError(f"{what}: {key} must be an object")
    return obj


# -- events ---------------------------------------------------------------------------------------------------------

def event(device: str, boot: str, seq: int, kind: str, message: str, *, level: str = "info",
          data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An event (install, self-test, rollback, error ...) for people and the deployment state machine."""
    return {"v": 1, "device": device, "boot": boot, "seq": seq, "ts": time.time(), "kind": kind, "level": level,
            "message": message, "data": dict(data or {})}


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


# -- commands and replies -------------------------------------------------------------------------------------------

_COMMAND_ARGS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "deploy": {"url": str, "sha256": str, "size": int},
    "rollback": {},
    "remove": {"name": str},
    "benchmark": {},
    "describe": {},
    "configure": {},
}


def command(kind: str, args: Mapping[str, Any] | None = None, *, cmd_id: str | None = None,
            ttl_s: float | None = None) -> dict[str, Any]:
    """A command for one device; ``id`` makes it idempotent and pairs it with exactly one reply."""
    now = time.time()
    msg: dict[str, Any] = {"v": 1, "id": cmd_id or uuid.uuid4().hex, "kind": kind, "ts": now, "args": dict(args or {})}
    if ttl_s is not None:
        msg["expires"] = now + ttl_s
    return parse_command(encode(msg))


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


def _signed_part(cmd: Mapping[str, Any]) -> bytes:
    from .bundle import canonical_json  # lazy: the agent's hot path never needs the bundle module for this

    return canonical_json({k: v for k, v in cmd.items() if k != "signature"})


def sign_command(cmd: Mapping[str, Any], key: PrivateKey, *, counter: int, ttl_s: float) -> dict[str, Any]:
    """``cmd`` with a per-device ``counter``, an ``expires`` time and an Ed25519 ``signature``.

    The signature covers the canonical JSON of the whole command except ``signature`` itself (id, kind, args, ts,
    expires, counter), so none of them can be changed, and a signed command cannot be replayed to another device
    with a higher counter.
    """
    if counter < 1:
        raise ValueError(f"counter must be >= 1, got {counter}")
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
    msg = {k: v for k, v in cmd.items() if k != "signature"}
    msg["counter"] = int(counter)
    msg["expires"] = float(msg.get("ts", time.time())) + float(ttl_s)
    msg["signature"] = key.sign(_signed_part(msg))
    return parse_command(encode(msg))


def verify_command(cmd: Mapping[str, Any], trusted: TrustedKeys, *, now: float | None = None) -> str:
    """Check a parsed command's signature and expiry; returns the signing key's id.

    Raises :class:`CommandSignatureError` (unsigned, untrusted key, signature not matching) or
    :class:`CommandExpiredError`. The counter is the receiver's to check: only it knows the last one it accepted.
    """
    sig = cmd.get("signature")
    if not isinstance(sig, dict):
        raise CommandSignatureError(f"command {cmd.get('id')!r} is not signed")
    if not isinstance(cmd.get("counter"), int) or "expires" not in cmd:
        raise CommandSignatureError(f"command {cmd.get('id')!r}: a signed command must carry counter and expires")
    try:
        keyid = trusted.verify([sig], _signed_part(cmd), f"command {cmd.get('id')!r}")
    except BundleSignatureError as exc:
        raise CommandSignatureError(str(exc).replace("the manifest", "the command")) from None
    check_expiry(cmd, now)
    return keyid


def check_expiry(cmd: Mapping[str, Any], now: float | None = None) -> None:
    """Raise :class:`CommandExpiredError` when ``cmd`` carries an ``expires`` time that has passed."""
    if "expires" in cmd:
        t = time.time() if now is None else now
        if t > float(cmd["expires"]):
            raise CommandExpiredError(f"command {cmd.get('id')!r} expired {t - float(cmd['expires']):.0f} s ago")


def reply(cmd_id: str, device: str, ok: bool, *, result: Mapping[str, Any] | None = None, code: str = "",
          message: str = "", step: str = "") -> dict[str, Any]:
    """The one reply to a command: ok with a result, or error with a stable code, the failing step and a reason."""
    msg: dict[str, Any] = {"v": 1, "id": cmd_id, "device": device, "ts": time.time(), "status": "ok" if ok else "error"}
    if ok:
        msg["result"] = dict(result or {})
    else:
        msg["error"] = {"code": code or "edgefleet", "message": message, "step": step}
    return msg


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


# -- receipts -------------------------------------------------------------------------------------------------------

MAX_RECEIPT_RANGES = 1000
"""Seq ranges per boot and kind in one receipt (a controller batch of 500 messages needs at most 500)."""


def seq_ranges(seqs: Iterable[int]) -> list[list[int]]:
    """Sorted inclusive ``[first, last]`` ranges covering ``seqs``: ``{1, 2, 3, 7}`` → ``[[1, 3], [7, 7]]``."""
    out: list[list[int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def receipts(device: str, *, telemetry: Mapping[str, Iterable[int]] | None = None,
             events: Mapping[str, Iterable[int]] | None = None, replies: Iterable[str] = ()) -> list[dict[str, Any]]:
    """What a controller has stored of one device's messages — telemetry and event seqs per boot, reply ids — as
    one receipt, or as few as keep each within :data:`MAX_RECEIPT_RANGES` ranges per boot and kind and as many reply
    ids (the agent refuses a receipt over those limits)."""
    chunks: list[tuple[str, str, list[list[list[int]]]]] = []
    for key, per_boot in (("telemetry", telemetry or {}), ("events", events or {})):
        for boot, seqs in per_boot.items():
            r = seq_ranges(seqs)
            chunks.append((key, boot, [r[i:i + MAX_RECEIPT_RANGES] for i in range(0, len(r), MAX_RECEIPT_RANGES)]))
    ids = sorted(set(replies))
    n = max([len(c) for _, _, c in chunks] + [math.ceil(len(ids) / MAX_RECEIPT_RANGES), 1])
    out = []
    for i in range(n):
        msg: dict[str, Any] = {"v": 1, "device": device, "ts": time.time(), "telemetry": {}, "events": {},
                               "replies": ids[i * MAX_RECEIPT_RANGES:(i + 1) * MAX_RECEIPT_RANGES]}
        for key, boot, parts in chunks:
            if i < len(parts):
                msg[key][boot] = parts[i]
        out.append(msg)
    return out


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
