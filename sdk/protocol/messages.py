"""MQTT payloads: status (birth, Last Will), telemetry, events, commands, replies, receipts.

Each class is the one definition of its payload for the agent that writes it and the controller (or ``fleet top``,
or the simulator) that reads it; ``sdk/schemas/<name>.json`` is generated from it and docs/mqtt-protocol.md checked
against both.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from msgspec import Meta, field

from ..errors import ProtocolError
from . import _limits as L
from ._model import Message, Model, check_free_form

__all__ = [
    "COMMAND_ARGS",
    "COMMAND_KINDS",
    "EVENT_LEVELS",
    "BenchmarkArgs",
    "ColdStart",
    "Command",
    "ConfigureArgs",
    "CpuInfo",
    "DeployArgs",
    "DescribeArgs",
    "Description",
    "Event",
    "JournalStats",
    "ModelTotals",
    "ModelWindow",
    "OrtInfo",
    "OutboxKinds",
    "OutputWindow",
    "ProcessStats",
    "Receipt",
    "RemoveArgs",
    "Reply",
    "ReplyError",
    "RollbackArgs",
    "ServedModel",
    "Signature",
    "Sketch",
    "Status",
    "StorageStats",
    "SystemStats",
    "Telemetry",
    "command",
    "receipts",
    "seq_ranges",
]

# -- field types ----------------------------------------------------------------------------------------------------

Id = Annotated[str, Meta(pattern=L.ID_PATTERN, description="[A-Za-z0-9_.-]{1,64}: never a wildcard or topic level")]
Boot = Annotated[str, Meta(pattern=L.BOOT_PATTERN, description="id of one agent process run (new at every start)")]
Kind = Annotated[str, Meta(pattern=L.KIND_PATTERN)]
Name = Annotated[str, Meta(min_length=1, max_length=L.MAX_NAME)]
Label = Annotated[str, Meta(max_length=L.MAX_NAME)]
Text = Annotated[str, Meta(max_length=L.MAX_TEXT)]
Sha256 = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}$", description="64 lowercase hex digits")]
Digest = Annotated[str, Meta(pattern=r"^([0-9a-f]{64})?$", description="sha256 hex, or empty")]
Count = Annotated[int, Meta(ge=0, le=L.MAX_COUNT, description="0..2^40: a 64-bit sum of 2^23 of them cannot overflow")]
Total = Annotated[int, Meta(ge=0, le=L.INT64_MAX)]
Seq = Annotated[int, Meta(ge=0, le=L.INT64_MAX, description="per boot and kind, only goes up")]
Bytes = Annotated[int, Meta(ge=0, le=L.MAX_BYTES)]
Timestamp = Annotated[float, Meta(ge=0.0, le=L.MAX_TS, description="seconds since the epoch, the sender's clock")]
Ms = Annotated[float, Meta(ge=0.0, le=L.MAX_MS, description="milliseconds")]
Ratio = Annotated[float, Meta(ge=0.0, le=1e6)]
Interval = Annotated[float, Meta(gt=0.0, le=L.MAX_INTERVAL_S, description="seconds")]
Providers = Annotated[list[Name], Meta(max_length=16, description="ONNX Runtime execution providers, in order")]
Names = Annotated[list[Label], Meta(max_length=L.MAX_LIST)]
Ids = Annotated[list[Id], Meta(max_length=L.MAX_LIST)]
Texts = Annotated[list[Text], Meta(max_length=64)]
FreeForm = Annotated[dict[str, Any], Meta(description="free-form object: at most 8 levels, 1024 keys per level, "
                                                    "64-bit integers, finite numbers")]

COMMAND_KINDS = ("deploy", "rollback", "remove", "benchmark", "describe", "configure")
EVENT_LEVELS = ("debug", "info", "warning", "error")
CommandKind = Literal["deploy", "rollback", "remove", "benchmark", "describe", "configure"]
Level = Literal["debug", "info", "warning", "error"]


_ID = re.compile(L.ID_PATTERN)
A = TypeVar("A", bound=Model)


def _now() -> float:
    return time.time()


# -- status ---------------------------------------------------------------------------------------------------------

class OrtInfo(Model, frozen=True, kw_only=True):
    """The ONNX Runtime on the device."""

    version: Label = ""
    flavour: Label = ""
    providers: Providers = []


class CpuInfo(Model, frozen=True, kw_only=True):
    """The device's CPU."""

    model: Text | None = None
    cores: Annotated[int, Meta(ge=0, le=1 << 20)] | None = None
    flags: Names = []


class ServedModel(Model, frozen=True, kw_only=True):
    """A bundle the device serves (one per model name)."""

    name: Name
    version: Name
    digest: Digest = ""
    target: Label = ""
    precision: Label = ""
    providers: Providers = []
    requested_providers: Providers = []
    fallback: bool = False
    previous: Digest | None = None
    variant: Annotated[Label, Meta(description="the variant pinned here, for a multi-variant bundle")] | None = None


class Description(Model, frozen=True, kw_only=True, omit_defaults=False):
    """What a device is and serves: in its birth message and the ``describe`` reply."""

    _what: ClassVar[str] = "status.description"

    profile: Label = ""
    profile_reasons: Texts = []
    tags: Ids = []
    agent_version: Label = ""
    python: Label = ""
    os: Text = ""
    arch: Label | None = None
    cpu: CpuInfo | None = None
    ram_bytes: Bytes | None = None
    markers: Names = []
    ort: OrtInfo | None = None
    providers: Providers = []
    kernel_boot_id: Label = ""
    models: Annotated[list[ServedModel], Meta(max_length=L.MAX_MODELS)] = []
    executable: Text = ""
    accept_targets: Ids = []
    api: Label | None = None
    boot: Boot = ""
    telemetry_interval_s: Interval | None = None
    started: Timestamp | None = None


class Status(Message, frozen=True, kw_only=True):
    """Retained ``status``: ``online`` with a description (birth, on every connect) or ``offline`` (the Last Will,
    set before connecting, or a clean shutdown)."""

    _what: ClassVar[str] = "status"

    device: Id
    state: Literal["online", "offline"]
    ts: Timestamp = field(default_factory=_now)
    boot: Boot = ""
    description: Description | None = None
    reason: Annotated[Text, Meta(description="why offline: 'connection lost' (Last Will), 'shutdown'")] = ""


# -- telemetry ------------------------------------------------------------------------------------------------------

class Sketch(Model, frozen=True, kw_only=True, omit_defaults=False):
    """A DDSketch in dense form: bucket ``k`` holds values in ``(γ^(k-1), γ^k]`` ms, ``γ = (1+α)/(1-α)``; ``counts``
    are dense from ``offset``; values below 1e-6 ms count in ``zero``. Merging adds bucket counts (exact)."""

    _what: ClassVar[str] = "sketch"

    alpha: Annotated[float, Meta(gt=0.0, lt=1.0, description="relative accuracy: 0.01 in every telemetry sketch")]
    count: Count
    zero: Count
    sum: Annotated[float, Meta(ge=0.0, le=L.MAX_COUNT * L.MAX_MS)]
    min: Ms | None
    max: Ms | None
    offset: Annotated[int, Meta(ge=L.MIN_KEY, le=L.MAX_KEY)]
    counts: Annotated[list[Count], Meta(max_length=L.MAX_BINS)]

    def _check(self) -> None:
        if self.alpha != L.SKETCH_ALPHA:  # the fleet merges sketches across devices: one accuracy for all
            raise ProtocolError(f"alpha must be {L.SKETCH_ALPHA}, got {self.alpha!r}")
        if self.counts and self.offset + len(self.counts) - 1 > L.MAX_KEY:
            raise ProtocolError(f"buckets {self.offset}..{self.offset + len(self.counts) - 1} go past {L.MAX_KEY}")
        total = self.zero + sum(self.counts)
        if total != self.count:
            raise ProtocolError(f"buckets add up to {total}, count says {self.count}")
        if self.count:
            if self.min is None or self.max is None or self.min > self.max:
                raise ProtocolError(f"min {self.min!r} and max {self.max!r} are inconsistent")
        elif self.min is not None or self.max is not None or self.sum:
            raise ProtocolError("an empty sketch has no min, max or sum")


class ColdStart(Model, frozen=True, kw_only=True):
    """What opening the model cost on the device."""

    session_ms: Ms | None = None
    first_run_ms: Ms | None = None


class ModelTotals(Model, frozen=True, kw_only=True):
    """Requests since the model was opened in this agent run."""

    count: Total = 0
    errors: Total = 0


class OutputWindow(Model, frozen=True, kw_only=True):
    """A window's output statistic (drift, sdk/outputs.py): which output, which statistic, one value per sample
    served, in a sketch like latency's."""

    output: Name
    stat: Annotated[Label, Meta(description="top1 (classifier), top_score (detector) or norm")]
    sketch: Sketch


class ModelWindow(Model, frozen=True, kw_only=True):
    """One model version's telemetry window."""

    _what: ClassVar[str] = "telemetry.models[]"

    name: Name
    version: Name
    count: Annotated[Count, Meta(description="requests served in the window (= sketch.count)")]
    errors: Annotated[Count, Meta(description="requests that failed in the window")]
    providers: Annotated[Providers, Meta(description="execution providers actually serving, in order")]
    sketch: Sketch
    digest: Digest = ""
    target: Label = ""
    window_s: Annotated[float, Meta(ge=0.0, le=L.MAX_INTERVAL_S * 1000)] | None = None
    throughput: Annotated[float, Meta(ge=0.0, le=float(L.MAX_COUNT))] | None = None
    p50_ms: Ms | None = None
    p95_ms: Ms | None = None
    p99_ms: Ms | None = None
    mean_ms: Ms | None = None
    fallback: bool = False
    cold_start: ColdStart | None = None
    total: ModelTotals | None = None
    variant: Annotated[Label, Meta(description="the variant pinned here, for a multi-variant bundle")] | None = None
    output: OutputWindow | None = None

    def _check(self) -> None:
        if self.sketch.count != self.count:
            raise ProtocolError(f"sketch holds {self.sketch.count} values but count is {self.count}")


class ProcessStats(Model, frozen=True, kw_only=True):
    """The agent process."""

    cpu_percent: Annotated[float, Meta(ge=0.0, le=1e5)] | None = None
    rss_bytes: Bytes | None = None
    threads: Annotated[int, Meta(ge=0, le=1 << 20)] | None = None


class OutboxKinds(Model, frozen=True, kw_only=True, omit_defaults=False):
    """A count per outbox kind."""

    telemetry: Total = 0
    event: Total = 0
    reply: Total = 0


class JournalStats(Model, frozen=True, kw_only=True, omit_defaults=False):
    """The agent's command journal."""

    entries: Total = 0
    pending: Total = 0
    forgotten_total: Total = 0
    refused_total: Total = 0


class StorageStats(Model, frozen=True, kw_only=True, omit_defaults=False):
    """The agent's data disk."""

    free_bytes: Bytes | None = None
    reserve_bytes: Bytes | None = None
    ballast: bool | None = None
    full_events: Total = 0


class SystemStats(Model, frozen=True, kw_only=True):
    """The device, and the agent's outbox, journal and disk (docs/agent.md, "Telemetry")."""

    mem_available_bytes: Bytes | None = None
    mem_total_bytes: Bytes | None = None
    temperature_c: Annotated[float, Meta(ge=-273.15, le=1000.0)] | None = None
    load1: Annotated[float, Meta(ge=0.0, le=1e6)] | None = None
    spool: Annotated[Total, Meta(description="telemetry records waiting in the outbox")] | None = None
    dropped_total: Total | None = None
    unconfirmed: Annotated[Total, Meta(description="rows the broker has and no receipt named yet")] | None = None
    resent_total: Total | None = None
    dropped_by_kind: Annotated[OutboxKinds, Meta(description="undelivered rows the caps dropped, per kind")] | \
        None = None
    outbox: Annotated[OutboxKinds, Meta(description="rows waiting, per kind")] | None = None
    held: Annotated[Total, Meta(description="rows held in memory while the disk is full")] | None = None
    journal: JournalStats | None = None
    storage: StorageStats | None = None
    refused_by_kind: Annotated[OutboxKinds, Meta(description="rows a controller refused for good (negative "
                                                              "receipts), per kind")] | None = None


class Telemetry(Message, frozen=True, kw_only=True, omit_defaults=False):
    """One telemetry record: a window per served model version, process and system figures. ``(device, boot,
    seq)`` identifies it; ``dropped`` counts records the agent's outbox had to drop since the last one."""

    _what: ClassVar[str] = "telemetry"

    device: Id
    boot: Boot
    seq: Seq
    interval_s: Annotated[Interval, Meta(description="the telemetry interval (seconds) this record closes")]
    models: Annotated[list[ModelWindow], Meta(max_length=L.MAX_MODELS,
                                               description="one window per model version served in the interval")]
    ts: Timestamp = field(default_factory=_now)
    dropped: Annotated[Total, Meta(description="records the outbox dropped since the previous record")] = 0
    process: ProcessStats = field(default_factory=ProcessStats)
    system: SystemStats = field(default_factory=SystemStats)


# -- events ---------------------------------------------------------------------------------------------------------

class Event(Message, frozen=True, kw_only=True, omit_defaults=False):
    """Something that happened on a device (install, self-test, rollback, refused command, load error ...).

    ``data.command`` names the command an event is about; ``data.state`` is the deployment state it reports
    (``downloading``, ``verifying``, ``self-test`` ...) — the controller moves a deployment target on them.
    """

    _what: ClassVar[str] = "event"

    device: Id
    boot: Boot
    seq: Seq
    kind: Annotated[Kind, Meta(description="deploy, deploy.progress, rollback, remove, command.refused, load ...")]
    message: Text
    level: Level = "info"
    ts: Timestamp = field(default_factory=_now)
    data: FreeForm = {}

    def _check(self) -> None:
        check_free_form(self.data, "data")
        cmd = self.data.get("command")
        if cmd is not None and (not isinstance(cmd, str) or not _ID.match(cmd)):
            raise ProtocolError(f"data.command must be a command id, got {str(cmd)[:70]!r}")
        st = self.data.get("state")
        if st is not None and (not isinstance(st, str) or len(st) > 32):
            raise ProtocolError(f"data.state must be a state name, got {str(st)[:40]!r}")

    @property
    def command(self) -> str | None:
        """The id of the command this event is about, if any."""
        cmd = self.data.get("command")
        return cmd if isinstance(cmd, str) else None

    @property
    def state(self) -> str | None:
        """The deployment state this event reports, if any."""
        st = self.data.get("state")
        return st if isinstance(st, str) else None


# -- commands -------------------------------------------------------------------------------------------------------

class DeployArgs(Model, frozen=True, kw_only=True):
    """``deploy``: fetch the bundle at ``url`` (exactly ``size`` bytes with this sha256), verify, install."""

    _what: ClassVar[str] = "args"

    url: Annotated[str, Meta(max_length=L.MAX_URL, pattern=r"^(https?|file)://")]
    sha256: Sha256
    size: Annotated[int, Meta(ge=1, le=L.MAX_BYTES)]
    split_pct: Annotated[float, Meta(ge=0.0, le=100.0, description="a canary's traffic split: percent of the "
                                     "requests the previous version keeps serving after the install, so the new "
                                     "version is judged against it on the same device at the same time")] = 0.0
    split_s: Annotated[float, Meta(ge=0.0, le=30 * 86400.0, description="how long the split lasts after the "
                                   "install (seconds); then only the new version serves")] = 0.0


class RollbackArgs(Model, frozen=True, kw_only=True):
    """``rollback``: serve the previous bundle of ``name`` (optional when one model is installed)."""

    _what: ClassVar[str] = "args"

    name: Name | None = None


class RemoveArgs(Model, frozen=True, kw_only=True):
    """``remove``: stop serving ``name`` and delete its bundles."""

    _what: ClassVar[str] = "args"

    name: Name


class BenchmarkArgs(Model, frozen=True, kw_only=True):
    """``benchmark``: time ``runs`` inferences of ``name`` on the device."""

    _what: ClassVar[str] = "args"

    name: Name | None = None
    runs: Annotated[int, Meta(ge=1, le=100_000)] = 100


class DescribeArgs(Model, frozen=True, kw_only=True):
    """``describe``: reply with the device description."""

    _what: ClassVar[str] = "args"


class ConfigureArgs(Model, frozen=True, kw_only=True):
    """``configure``: change settings at run time."""

    _what: ClassVar[str] = "args"

    telemetry_interval_s: Annotated[float, Meta(ge=0.1, le=3600.0)] | None = None


COMMAND_ARGS: dict[str, type[Model]] = {
    "deploy": DeployArgs, "rollback": RollbackArgs, "remove": RemoveArgs, "benchmark": BenchmarkArgs,
    "describe": DescribeArgs, "configure": ConfigureArgs,
}


class Signature(Model, frozen=True, kw_only=True):
    """Ed25519 over the canonical JSON of the whole command as sent, without ``signature``."""

    alg: Literal["ed25519"]
    keyid: Annotated[str, Meta(pattern=r"^[0-9a-f]{16}$")]
    sig: Annotated[str, Meta(max_length=256)]


class Command(Message, frozen=True, kw_only=True):
    """A command for one device (``cmd``); ``id`` makes it idempotent and pairs it with exactly one reply.

    ``args`` depends on ``kind`` (``COMMAND_ARGS``: the schema says which with if/then); ``typed_args()`` returns
    them as their class. A signed command also carries ``expires``, a per-device ``counter``, the ``device`` and
    ``fleet`` it is for, a ``nonce`` and ``signature`` (docs/mqtt-protocol.md, "Signed commands").
    """

    _what: ClassVar[str] = "cmd"

    id: Id
    kind: CommandKind
    args: Annotated[FreeForm, Meta(description="the arguments of this kind: DeployArgs, RollbackArgs ...")]
    ts: Timestamp = field(default_factory=_now)
    expires: Annotated[Timestamp, Meta(description="not executed after this time")] | None = None
    counter: Annotated[int, Meta(ge=1, le=L.INT64_MAX,
                                 description="per device, only goes up: replays are refused")] | None = None
    device: Annotated[Id, Meta(description="the one device this command is for (signed: refused anywhere "
                                           "else)")] | None = None
    fleet: Annotated[Id, Meta(description="the fleet of that device (signed: refused in another fleet)")] | None = None
    nonce: Annotated[str, Meta(pattern=r"^[0-9a-f]{32}$",
                               description="128 random bits, unique per signature: a device refuses one it has "
                                           "seen")] | None = None
    signature: Signature | None = None

    def _check(self) -> None:
        check_free_form(self.args, "args")
        self.typed_args()

    def typed_args(self) -> Model:
        """``args`` validated as the class of this command's kind."""
        return COMMAND_ARGS[self.kind].from_dict(self.args)

    def args_as(self, cls: type[A]) -> A:
        """``args`` as ``cls`` (the class of this command's kind: ``cmd.args_as(DeployArgs)``)."""
        if COMMAND_ARGS[self.kind] is not cls:
            raise ProtocolError(f"cmd: a {self.kind} command has no {cls.__name__}")
        return cls.from_dict(self.args)


def command(kind: str, args: Mapping[str, Any] | Model | None = None, *, cmd_id: str | None = None,
            ttl_s: float | None = None) -> Command:
    """A new command with a random id (unless given) and, with ``ttl_s``, an expiry."""
    now = time.time()
    body = args.to_dict() if isinstance(args, Model) else dict(args or {})
    kind_: Any = kind
    if kind not in COMMAND_KINDS:
        raise ProtocolError(f"cmd.kind: unknown kind {kind!r}; kinds are {', '.join(COMMAND_KINDS)}")
    return Command(id=cmd_id or uuid.uuid4().hex, kind=kind_, args=body, ts=now,
                   expires=None if ttl_s is None else now + ttl_s)


# -- replies --------------------------------------------------------------------------------------------------------

class ReplyError(Model, frozen=True, kw_only=True):
    """Why a command failed: the stable ``code`` of the edgefleet error class and the ``step`` that failed."""

    code: Kind
    message: Text
    step: Annotated[str, Meta(max_length=64)] = ""


class Reply(Message, frozen=True, kw_only=True):
    """The one reply to a command id: ``ok`` with a result, or ``error``."""

    _what: ClassVar[str] = "reply"

    id: Annotated[Id, Meta(description="the command's id")]
    device: Id
    status: Literal["ok", "error"]
    ts: Timestamp = field(default_factory=_now)
    result: Annotated[FreeForm, Meta(description="with ok: what the command produced")] | None = None
    error: ReplyError | None = None

    def _check(self) -> None:
        if self.status == "ok":
            if self.result is None:
                raise ProtocolError("an ok reply carries a result")
            check_free_form(self.result, "result")
        elif self.error is None:
            raise ProtocolError("an error reply carries an error")

    @classmethod
    def ok(cls, cmd_id: str, device: str, result: Mapping[str, Any] | None = None) -> Reply:
        """An ok reply."""
        return cls(id=cmd_id, device=device, status="ok", result=dict(result or {}))

    @classmethod
    def failed(cls, cmd_id: str, device: str, code: str, message: str, step: str = "") -> Reply:
        """An error reply (the message is cut to the protocol's text limit)."""
        return cls(id=cmd_id, device=device, status="error",
                   error=ReplyError(code=code or "edgefleet", message=message[:L.MAX_TEXT], step=step[:64]))


# -- receipts -------------------------------------------------------------------------------------------------------

SeqRange = Annotated[list[Seq], Meta(min_length=2, max_length=2, description="[first, last], inclusive")]
Ranges = Annotated[dict[Boot, Annotated[list[SeqRange], Meta(max_length=L.MAX_RECEIPT_RANGES)]],
                   Meta(max_length=L.MAX_RECEIPT_BOOTS)]


class Receipt(Message, frozen=True, kw_only=True, omit_defaults=False):
    """What a controller is done with of one device's messages — stored (new or duplicate), or refused for good —
    as seq ranges per boot and kind, and reply ids. The agent deletes what a receipt names and resends what a later
    receipt skipped. A negative receipt (``refused``) names only messages refused for good (out of range, from the
    future, unstorable): an agent that predates the field deletes them all the same."""

    _what: ClassVar[str] = "receipt"

    device: Id
    telemetry: Ranges
    events: Ranges
    replies: Annotated[list[Id], Meta(max_length=L.MAX_RECEIPT_RANGES)]
    ts: Timestamp = field(default_factory=_now)
    refused: Annotated[bool, Meta(description="true: the controller refused (never stored) everything this receipt "
                                              "names; the agent stops sending it and counts it")] = False
    reason: Annotated[Text, Meta(description="why, with refused: one line")] = ""

    def _check(self) -> None:
        for key in ("telemetry", "events"):
            for boot, ranges in getattr(self, key).items():
                for lo, hi in ranges:
                    if lo > hi:
                        raise ProtocolError(f"{key}[{boot[:40]!r}]: range [{lo}, {hi}] is not [first, last]")


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
             events: Mapping[str, Iterable[int]] | None = None, replies: Iterable[str] = (),
             refused: bool = False, reason: str = "") -> list[Receipt]:
    """One device's receipt — or as few as keep each within the receipt limits (ranges per boot and kind, boots,
    reply ids), since an agent refuses a receipt over them. ``refused``: a negative receipt, with ``reason``."""
    chunks: list[tuple[str, str, list[list[list[int]]]]] = []
    for key, per_boot in (("telemetry", telemetry or {}), ("events", events or {})):
        for boot, seqs in per_boot.items():
            r = seq_ranges(seqs)
            step = L.MAX_RECEIPT_RANGES
            chunks.append((key, boot, [r[i:i + step] for i in range(0, len(r), step)]))
    ids = sorted(set(replies))
    out: list[Receipt] = []
    parts: list[dict[str, Any]] = []
    # Lay chunks out message by message: chunk i of every (kind, boot) in message i (then split by boot count).
    n = max([len(c) for _, _, c in chunks] + [math.ceil(len(ids) / L.MAX_RECEIPT_RANGES), 1])
    for i in range(n):
        body: dict[str, Any] = {"telemetry": {}, "events": {},
                                "replies": ids[i * L.MAX_RECEIPT_RANGES:(i + 1) * L.MAX_RECEIPT_RANGES]}
        for key, boot, pieces in chunks:
            if i < len(pieces):
                if len(body[key]) >= L.MAX_RECEIPT_BOOTS:
                    parts.append(body)
                    body = {"telemetry": {}, "events": {}, "replies": []}
                body[key][boot] = pieces[i]
        parts.append(body)
    now = time.time()
    for body in parts:
        out.append(Receipt(device=device, ts=now, refused=refused, reason=reason[:L.MAX_TEXT], **body))
    return out

