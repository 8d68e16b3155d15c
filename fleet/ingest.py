"""Ingest: what agents publish, from MQTT into the store, with nothing lost, doubled or able to stop it.

One paho-mqtt MQTT 5 client per controller holds a persistent session and subscribes to

* ``edgefleet/v1/<fleet>/+/status`` plainly: statuses are retained and small, and every controller must know every
  device (for the dashboard, selectors and Last Will offline notices);
* ``$share/<group>/edgefleet/v1/<fleet>/+/{telemetry,events,reply}``: the broker gives each message to one controller
  of the group, so controllers split the ingest.

Messages are acknowledged by hand, only after the batch holding them is committed: a controller that dies loses
nothing (the broker redelivers), and what it had already committed is de-duplicated on ``(device, boot, seq)``.
Then each device whose messages were stored gets a ``receipt`` (at most one per device every
``receipt_interval_s``, QoS 0 by default: ``receipt_qos``) naming them: the agent keeps every
record until one does, and sends again what a receipt skipped, so a broker that acknowledged a message and then
lost it (a restart: Mosquitto 2.0.11 restores no shared subscription, and after a SIGKILL nothing since its last
autosave) loses nothing either. A receipt is only ever a hint to stop resending: one that is lost makes the agent
send those records again (stored once, receipted again), so QoS 0 is enough and saves the broker and this controller
a PUBACK and an in-flight entry per receipt; ``receipt_qos=1`` trades that for fewer resends on a lossy broker.
The network thread only queues; a writer thread parses every payload with its :mod:`edgefleet.sdk.protocol` class
(types and ranges), writes batches in one transaction and acks. A payload that is malformed, oversized, of an
unknown protocol version or about another device is counted per channel and reason, logged once per (device,
channel), acked and dropped: it never stops ingest. A status or telemetry record whose timestamp is more than
``max_future_skew_s`` ahead of this controller's clock is refused the same way (reason ``clock``); a refused
telemetry record is still named in the device's receipt, since sending it again would not change the verdict.
A valid message the store still cannot take is isolated the same way (``unstorable``); a store that fails
altogether is retried with backoff, the messages staying un-acked.

Refused for good is said to the agent: every telemetry record, event or reply that is refused (out of range, from the
future, about another device, unstorable) and whose ``(boot, seq)`` or command id can be read — from the parsed
message, or from the top level of one that does not parse — is named in a *negative receipt* (``refused: true`` with
the reason), so the agent stops sending it and counts it (``system.refused_by_kind``). Receipts go out only after the
batch that stored what they name is committed (SQLite with ``synchronous=FULL``: on disk).

Statuses are ordered by when this controller received them, not by the device's clock: a status whose ``ts`` is
ahead (another client's forgery within the skew window, a device clock that jumped) must not outlive the device's
next birth or its Last Will, and a device whose clock is behind (no RTC after a reboot) must not lose to its own
older statuses. The broker delivers one topic's messages in order, and controllers sharing a store write by their
receive times, so the newest birth or Last Will wins. Who may publish on a device's ``status`` topic at all is the
broker ACL's to decide (``edgefleet fleet enroll``; docs/operations.md).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
from edgefleet.sdk.errors import PayloadTooLargeError, ProtocolError, ProtocolVersionError
from edgefleet.sdk.protocol import (
    INT64_MAX,
    MAX_FUTURE_SKEW_S,
    Event,
    Reply,
    Status,
    Telemetry,
    check_clock,
    check_id,
    parse_topic,
    receipts,
    subscription,
    topic,
)
from edgefleet.sdk.protocol._model import prevalidated
from edgefleet.sdk.transport import Incoming, MqttOptions, MqttTransport

from .store import Batch, Store, WriteResult

__all__ = ["IngestStats", "Ingestor"]

log = logging.getLogger(__name__)

_SHARED_CHANNELS = ("telemetry", "events", "reply")
_MAX_LOGGED = 10_000  # distinct (device, channel) pairs remembered for log-once; bounded against id floods
_MAX_TOPICS = 200_000  # receipt topics remembered (one short string per device)


@dataclass
class IngestStats:
    """Counters of one controller's ingest (exported on /metrics)."""

    received: Counter[str] = field(default_factory=Counter)  # per channel
    stored: Counter[str] = field(default_factory=Counter)  # new rows per channel
    duplicates: Counter[str] = field(default_factory=Counter)  # replays ignored per channel
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)  # per (channel, reason)
    rejected_devices: Counter[str] = field(default_factory=Counter)  # per device id ("?" when the topic is bad)
    batches: int = 0
    receipts: int = 0  # receipt messages published to agents
    write_errors: int = 0
    last_batch_s: float = 0.0

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able copy."""
        return {
            "received": dict(self.received), "stored": dict(self.stored), "duplicates": dict(self.duplicates),
            "rejected": [{"channel": c, "reason": r, "count": n} for (c, r), n in sorted(self.rejected.items())],
            "rejected_total": sum(self.rejected.values()), "batches": self.batches, "receipts": self.receipts,
            "write_errors": self.write_errors,
        }


def _reason(exc: ProtocolError) -> str:
    if isinstance(exc, PayloadTooLargeError):
        return "oversized"
    if isinstance(exc, ProtocolVersionError):
        return "version"
    return "malformed"


_TYPES: dict[str, type[Status | Telemetry | Event | Reply]] = {
    "status": Status, "telemetry": Telemetry, "events": Event, "reply": Reply,
}

# The key of a message that did not parse, for its negative receipt: top-level fields before any nested value (where
# edgefleet's encoder puts them), read with bounded regexes over the first bytes — never a JSON parser, so no size or
# nesting can make salvaging fail.
_TOP = rb'^\s*\{[^{}\[\]]*?"%s"\s*:\s*'
_BOOT_RE = re.compile(_TOP % b"boot" + rb'"([A-Za-z0-9_.-]{0,64})"')
_SEQ_RE = re.compile(_TOP % b"seq" + rb'(\d{1,19})(?![\d.eE])')
_ID_RE = re.compile(_TOP % b"id" + rb'"([A-Za-z0-9_.-]{1,64})"')


class Refused(NamedTuple):
    """A message refused for good that its agent can be told about (a negative receipt)."""

    device: str
    kind: str  # "telemetry" | "events" | "reply"
    boot: str
    seq: int  # -1 for a reply
    reply_id: str
    reason: str


def _salvage(device: str, channel: str, payload: bytes, reason: str) -> Refused | None:
    head = payload[:2048]
    if channel == "reply":
        m = _ID_RE.match(head)
        return Refused(device, "reply", "", -1, m.group(1).decode(), reason) if m else None
    b, q = _BOOT_RE.match(head), _SEQ_RE.match(head)
    if b is None or q is None or int(q.group(1)) > INT64_MAX:
        return None
    return Refused(device, channel, b.group(1).decode(), int(q.group(1)), "", reason)


def _refused_of(obj: Telemetry | Event | Reply, reason: str) -> Refused:
    if isinstance(obj, Reply):
        return Refused(obj.device, "reply", "", -1, obj.id, reason)
    return Refused(obj.device, "telemetry" if isinstance(obj, Telemetry) else "events", obj.boot, obj.seq, "", reason)


class Ingestor:
    """Subscribe, validate, batch, write, ack. ``start()`` returns once subscribed; ``stop()`` flushes."""

    def __init__(self, store: Store, *, broker: MqttOptions, fleet: str, client_id: str,
                 share_group: str = "edgefleet", batch_max: int = 500, batch_linger_s: float = 0.05,
                 session_expiry_s: int = 60,
                 receipts: bool = True, receipt_qos: int = 0,
                 receipt_interval_s: float = 0.5, max_future_skew_s: float = MAX_FUTURE_SKEW_S,
                 on_write: Callable[[WriteResult], None] | None = None) -> None:
        self.store = store
        self.fleet = check_id("fleet", fleet)
        self.client_id = check_id("client id", client_id)
        self.share_group = check_id("share group", share_group)
        self.broker = broker
        self.batch_max = batch_max
        if not 0 <= batch_linger_s <= 1:
            raise ValueError(f"batch_linger_s must be in [0, 1], got {batch_linger_s!r}")
        # A batch smaller than half of batch_max waits this long once for more: a controller with spare capacity
        # (several in a group, a modest stream) otherwise writes many small batches, paying each transaction's fixed
        # cost for few messages (bench/results/fleet.md). Acks and receipts wait as long; nothing is lost by it.
        self.batch_linger_s = batch_linger_s
        self.session_expiry_s = session_expiry_s
        self.receipts = receipts
        if receipt_qos not in (0, 1):
            raise ValueError(f"receipt_qos must be 0 or 1, got {receipt_qos!r}")
        self.receipt_qos = receipt_qos
        self.receipt_interval_s = receipt_interval_s
        self.max_future_skew_s = max_future_skew_s
        # What is stored and not yet receipted: (device, "telemetry" | "events") -> boot -> seqs; device -> reply ids
        self._unreceipted: dict[tuple[str, str], dict[str, set[int]]] = {}
        self._unreceipted_replies: dict[str, set[str]] = {}
        self._refused: list[Refused] = []  # refused for good, not yet named in a negative receipt
        self._receipts_due = 0.0
        self._topics: dict[str, str] = {}  # device -> its receipt topic (validated once)
        self.on_write = on_write
        self.stats = IngestStats()
        self._q: queue.Queue[tuple[str, bytes, int, int, int]] = queue.Queue(maxsize=100_000)
        self._gen = 0  # connection generation: message ids are only meaningful within one connection
        self._logged: set[tuple[str, str]] = set()
        self._running = threading.Event()
        self._draining = threading.Event()
        self._writer: threading.Thread | None = None
        subs = [(subscription(self.fleet, "status"), 1)]
        subs += [(subscription(self.fleet, ch, self.share_group), 1) for ch in _SHARED_CHANNELS]
        # Acknowledged by hand, after the commit: a controller that dies loses nothing (the broker redelivers).
        self.transport = MqttTransport(broker, self.client_id, clean_start=False, session_expiry_s=session_expiry_s,
                                       manual_ack=True, subscriptions=subs, on_message=self._on_message,
                                       on_connect=self._on_connect, on_disconnect=self._on_disconnect)

    # lifecycle -----------------------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> None:
        """Connect with a persistent session, subscribe, and start the writer thread."""
        self._running.set()
        self._writer = threading.Thread(target=self._write_loop, name=f"ingest-writer-{self.client_id}", daemon=True)
        self._writer.start()
        self.transport.start()
        try:
            self.transport.wait_ready(timeout_s)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Stop at once and end the MQTT session on the broker (no share of the fleet's messages is kept for a
        controller that is not running): for a start that failed."""
        self._running.clear()
        self.transport.stop(end_session=True, timeout_s=2.0)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking messages, write and acknowledge those already queued, then disconnect.

        Messages arriving meanwhile are left un-acknowledged: the broker keeps them in the persistent session and
        delivers them after a restart (or to another controller of the group). So a graceful stop neither loses nor
        duplicates anything; after a crash the un-acked ones come again and are de-duplicated.
        """
        self._draining.set()
        self._running.clear()
        if self._writer is not None:
            # The writer drains what is queued (bounded: batches of batch_max) before it exits; a slow disk or a
            # loaded machine can take more than timeout_s for that, and stopping early would leave it writing.
            self._writer.join(max(timeout_s, 60.0))
        if self.receipts:
            self._flush_receipts(force=True)
        # Without this barrier, closing the socket while the broker is still sending could lose our last acks and
        # have the broker deliver those (already stored) messages again (docs/fleet.md, "Restarts").
        if not self.transport.ack_barrier(f"edgefleet/v1/{self.fleet}/.ack-barrier/{self.client_id}", timeout_s):
            log.warning("broker %s did not confirm our last acks within %g s; a few stored messages may come "
                        "again (they are de-duplicated)", self.broker, timeout_s)
        self.transport.stop(timeout_s=timeout_s)

    @property
    def connected(self) -> bool:
        """True while subscribed to the broker."""
        return self.transport.ready.is_set()

    @property
    def backlog(self) -> int:
        """Messages received but not yet written."""
        return self._q.qsize()

    # transport callbacks (network thread) ---------------------------------------------------------------------------
    def _on_connect(self, session_present: bool) -> None:
        self._gen += 1  # message ids are only meaningful within one connection

    def _on_disconnect(self) -> None:
        if self._running.is_set():
            log.warning("disconnected from %s; reconnecting", self.broker)

    def _on_message(self, msg: Incoming) -> None:
        if self._draining.is_set():
            return  # stopping: not acked, so the broker redelivers it to this session or another controller
        # Only queue: validation and SQLite run in the writer thread so the network loop keeps up with the broker.
        self._q.put((msg.topic, msg.payload, msg.mid, msg.qos, self._gen))

    # writer thread -------------------------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while self._running.is_set() or not self._q.empty():
            try:
                items = [self._q.get(timeout=0.1)]
            except queue.Empty:
                with self.transport.corked():
                    self._flush_receipts()
                continue
            self._take(items)
            if len(items) < self.batch_max // 2 and self.batch_linger_s > 0 and self._running.is_set():
                time.sleep(self.batch_linger_s)
                self._take(items)
            self._flush(items)

    def _take(self, items: list[tuple[str, bytes, int, int, int]]) -> None:
        """Add what is queued to ``items``, up to ``batch_max``."""
        while len(items) < self.batch_max:
            try:
                items.append(self._q.get_nowait())
            except queue.Empty:
                return

    def _flush(self, items: list[tuple[str, bytes, int, int, int]]) -> None:
        batch = Batch(self.fleet)
        refused: list[Refused] = []  # refused for good: named in a negative receipt so the agent stops resending
        for topic_name, payload, _mid, _qos, _gen in items:
            self._parse_into(batch, topic_name, payload, refused)
        if len(batch) and not self._write(batch, refused):
            return  # shutting down while the store fails: leave them un-acked, the broker redelivers to the session
        gen = self._gen
        with self.transport.corked():  # the batch's acks and receipts leave in a few large writes
            for _topic, _payload, mid, qos, item_gen in items:
                # A message id from before a reconnect may now name another, unwritten message: never ack across.
                if qos > 0 and item_gen == gen:
                    self.transport.ack(mid, qos)
            if self.receipts:
                self._note_receipts(batch, refused)
                self._flush_receipts()
        self.stats.batches += 1
        self.stats.last_batch_s = time.time()

    def _note_receipts(self, batch: Batch, refused: list[Refused]) -> None:
        """Remember what of each device this controller is done with: stored (new rows and duplicates alike), or
        refused for good (sending it again would not change that: a negative receipt)."""
        seqs = self._unreceipted
        for kind, objs in (("telemetry", batch.telemetry), ("events", batch.events)):
            for o in objs:
                seqs.setdefault((o.device, kind), {}).setdefault(o.boot, set()).add(o.seq)
        for r in batch.replies:
            self._unreceipted_replies.setdefault(r.device, set()).add(r.id)
        if len(self._refused) < 100_000:  # bounded: beyond, the agent just sends them again later
            self._refused.extend(refused)

    def _flush_receipts(self, force: bool = False) -> None:
        """Publish one receipt per device for what was stored since the last flush (at most every interval)."""
        now = time.monotonic()
        if not (self._unreceipted or self._unreceipted_replies or self._refused) or (
                not force and now < self._receipts_due):
            return
        self._receipts_due = now + self.receipt_interval_s
        seqs, replies, refused = self._unreceipted, self._unreceipted_replies, self._refused
        self._unreceipted, self._unreceipted_replies, self._refused = {}, {}, []
        out = []
        for device in {d for d, _ in seqs} | set(replies):
            with prevalidated():  # built from ids and seqs this controller validated and stored
                out += receipts(device, telemetry=seqs.get((device, "telemetry")),
                                events=seqs.get((device, "events")), replies=replies.get(device, ()))
        per_device: dict[str, tuple[dict[str, dict[str, set[int]]], set[str], str]] = {}
        for r in refused:
            tel_ev, ids, reason = per_device.setdefault(r.device, ({"telemetry": {}, "events": {}}, set(), r.reason))
            if r.kind == "reply":
                ids.add(r.reply_id)
            else:
                tel_ev[r.kind].setdefault(r.boot, set()).add(r.seq)
        for device, (tel_ev, ids, reason) in per_device.items():
            out += receipts(device, telemetry=tel_ev["telemetry"], events=tel_ev["events"], replies=ids,
                            refused=True, reason=reason)
        for msg in out:
            if self.transport.publish(self._receipt_topic(msg.device), msg.to_json(), qos=self.receipt_qos) is not None:
                self.stats.receipts += 1
            # Not connected: paho queues it; and a receipt that never arrives only makes the agent send again.

    def _receipt_topic(self, device: str) -> str:
        t = self._topics.get(device)
        if t is None:
            if len(self._topics) >= _MAX_TOPICS:  # bounded: a fleet larger than this rebuilds some topics
                self._topics.clear()
            t = self._topics[device] = topic(self.fleet, device, "receipt")
        return t

    def _write(self, batch: Batch, refused: list[Refused]) -> bool:
        """Write a batch; isolate messages the store cannot take (taken out of ``batch``, added to ``refused``);
        wait out a store outage. False: gave up (stop)."""
        delay = 0.1
        while True:
            try:
                result = self.store.write(batch)
            except Exception as exc:  # noqa: BLE001 - decided below: poison message or store outage
                self.stats.write_errors += 1
                if self._store_ok():
                    # The store works, so something in this batch cannot be stored (e.g. a seq beyond 64 bits):
                    # write message by message and drop only what fails, or it would block ingest for ever.
                    self._write_singly(batch, refused)
                    return True
                log.error("store write of %d messages failed (%s); retrying in %.1f s", len(batch), exc, delay)
                if not self._running.is_set() and delay > 5:
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            self._count(batch, result)
            if self.on_write is not None:
                self.on_write(result)
            return True

    def _store_ok(self) -> bool:
        try:
            self.store.write(Batch(self.fleet))  # an empty transaction: does the store commit at all?
        except Exception:  # noqa: BLE001 - any failure means the store is not usable right now
            return False
        return True

    def _write_singly(self, batch: Batch, refused: list[Refused]) -> None:
        for field_name, channel in (("statuses", "status"), ("telemetry", "telemetry"), ("events", "events"),
                                    ("replies", "reply")):
            kept = []
            for obj in getattr(batch, field_name):
                one = Batch(self.fleet, received=batch.received)
                getattr(one, field_name).append(obj)
                try:
                    result = self.store.write(one)
                except Exception as exc:  # noqa: BLE001 - this one message is unstorable: count, log once, drop
                    self._reject(obj.device, channel, "unstorable", exc)
                    if not isinstance(obj, Status):
                        refused.append(_refused_of(obj, f"unstorable: {exc}"[:500]))
                    continue
                kept.append(obj)
                self._count(one, result)
            setattr(batch, field_name, kept)  # only what was stored is receipted as stored

    def _count(self, batch: Batch, result: WriteResult) -> None:
        s = self.stats
        for channel, sent, new in (("status", len(batch.statuses), result.statuses),
                                   ("telemetry", len(batch.telemetry), result.telemetry),
                                   ("events", len(batch.events), result.events),
                                   ("reply", len(batch.replies), result.replies)):
            s.stored[channel] += new
            if channel != "status":  # a status not newer than the stored one is not a duplicate, just stale
                s.duplicates[channel] += sent - new

    def _parse_into(self, batch: Batch, topic_name: str, payload: bytes, refused: list[Refused]) -> None:
        try:
            t = parse_topic(topic_name)
        except ProtocolError as exc:
            self._reject("?", "topic", "malformed", exc)
            return
        if t.fleet != self.fleet:
            return
        self.stats.received[t.channel] += 1
        cls = _TYPES.get(t.channel)
        if cls is None:
            return  # cmd: the controller's own commands; not subscribed, but a wildcard broker bridge may send them
        if t.channel == "status" and not payload:
            return  # an empty retained payload is how an operator clears a device's retained status
        try:
            obj = cls.from_json(payload)
            if obj.device != t.device:
                raise ProtocolError(f"{t.channel}: payload is about device {obj.device!r} but came on "
                                    f"{t.device!r}'s topic")
        except ProtocolError as exc:
            self._reject(t.device, t.channel, _reason(exc), exc)
            salvaged = _salvage(t.device, t.channel, payload, str(exc)[:500]) if t.channel != "status" else None
            if salvaged is not None:
                refused.append(salvaged)
            return
        if isinstance(obj, (Status, Telemetry)):
            try:
                check_clock(obj.ts, batch.received, t.channel, self.max_future_skew_s)
            except ProtocolError as exc:
                self._reject(t.device, t.channel, "clock", exc)
                if isinstance(obj, Telemetry):
                    refused.append(_refused_of(obj, str(exc)[:500]))
                return
        if isinstance(obj, Status):
            # Ordered by our receive time (module docstring). A retained copy (what the broker replays when we
            # subscribe) is the broker's newest: it too is written as received now.
            batch.statuses.append(msgspec.structs.replace(obj, ts=batch.received))
        elif isinstance(obj, Telemetry):
            batch.telemetry.append(obj)
        elif isinstance(obj, Event):
            batch.events.append(obj)
        else:
            batch.replies.append(obj)

    def _reject(self, device: str, channel: str, reason: str, exc: Exception) -> None:
        self.stats.rejected[(channel, reason)] += 1
        self.stats.rejected_devices[device] += 1
        key = (device, channel)
        if key not in self._logged and len(self._logged) < _MAX_LOGGED:
            self._logged.add(key)
            log.warning("dropped %s %s payload from device %s: %s (further ones from it are counted, not logged)",
                        reason, channel, device, exc)
