"""A bounded on-disk outbox: telemetry, events and replies are stored before they are published and kept until the
controller has stored them.

Each row is committed (SQLite WAL, synchronous=FULL) before the agent hands it to paho. The broker's PUBACK marks it
*delivered*; it is deleted when a controller's ``receipt`` names it (:func:`edgefleet.sdk.protocol.receipts`: seq
ranges per boot, reply ids). A PUBACK alone is not enough: a broker acknowledges before its subscribers have the
message, and Mosquitto 2.0.11 restores no shared subscription from its persistence when it restarts (and after a
SIGKILL nothing since its last autosave), so whatever it acknowledged before the controller had subscribed again
went nowhere (docs/reliability.md, soak with broker restarts). A row
delivered ``resend_after_s`` before the latest receipt and still not named by one is sent again: the controller is
alive and did not get it. With no receipt at all (no controller yet, or receipts ``off``) nothing is resent, and a
delivered row no receipt names within a day is forgotten (the broker has it; a controller may have stopped sending
receipts).

Receipts are ``auto`` by default: expected once this data dir has seen one (so an agent used with a plain MQTT
consumer, which sends none, deletes rows on PUBACK as before), ``on`` from the start, or ``off``.

While the broker is away rows accumulate, each kind up to its cap (telemetry ``max_records``, ``max_events``,
``max_replies``): over it the oldest rows not handed to paho go, command refusals and deploy progress before anything
else (1,000 refused commands must not push out the reply to a deploy), counted per kind in ``meta``
(:meth:`Spool.dropped`, reported in telemetry's ``system.dropped_by_kind``); a dropped telemetry record's count also
goes into the ``dropped`` field of the next record. A full disk does not stop the outbox: rows the database cannot
take are held in memory (bounded), sent from there, and stored once there is room. On reconnect the
:class:`Sender` drains the backlog in id order with a bounded window of unacknowledged messages. Rows already
handed to paho are not re-published after a reconnect: paho retransmits its own unacknowledged QoS 1 messages (with
DUP) on the new connection. Duplicates (a resend whose first copy did arrive, a kill between PUBACK and the row's
deletion) are harmless: the fleet de-duplicates by (device, boot, seq) and by reply id.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from .db import Database
from .storage import StorageFullError

__all__ = ["KINDS", "RECEIPT_MODES", "OutboxRow", "Sender", "Spool"]

log = logging.getLogger("edgefleet.agent.spool")

RECEIPT_MODES = ("auto", "on", "off")
RECEIPT_EXPIRY_S = 24 * 3600.0  # a delivered row no receipt named for this long is forgotten (the broker has it)
KINDS = ("telemetry", "event", "reply")
_SEQ_COUNTER = {"telemetry": "telemetry", "event": "events"}
_LOW_EVENTS = {"command.refused", "deploy.progress"}


@dataclass(frozen=True)
class OutboxRow:
    """One stored message (a negative id: held in memory because the disk was full)."""

    id: int
    kind: str
    topic: str
    payload: bytes
    props: dict[str, Any]


def _priority(kind: str, payload: bytes) -> int:
    """0 for rows dropped first over a cap (command refusals and their events, deploy progress), 1 for the rest: a
    flood of refused commands must not push out the reply to a deploy the controller waits for."""
    if kind == "telemetry":
        return 1
    try:
        obj = json.loads(payload)
    except ValueError:
        return 1
    if not isinstance(obj, dict):
        return 1
    if kind == "event":
        return 0 if obj.get("kind") in _LOW_EVENTS else 1
    err = obj.get("error")
    if kind == "reply" and obj.get("status") == "error" and isinstance(err, dict):
        return 0 if err.get("step") in ("receive", "parse") else 1
    return 1


class Spool:
    """The outbox table with a cap per kind, exact drop counters and persisted sequence counters.

    Caps (``max_records`` telemetry, ``max_events``, ``max_replies``) drop the oldest rows not handed to paho,
    low-priority ones first (:func:`_priority`); an undelivered row dropped is counted per kind in the ``meta`` table
    in the same transaction (``dropped.<kind>``, for the life of the data dir), so the counters are exact and survive
    restarts. A row the disk cannot take even after the ballast went (see :mod:`edgefleet.agent.storage`) is held in
    memory (at most ``max_held``, oldest dropped and counted), sent from there, and moved into the table once there
    is room.
    """

    def __init__(self, db: Database, max_records: int = 10_000, receipts: str = "auto", *, max_events: int = 1000,
                 max_replies: int = 1000, max_held: int = 1000) -> None:
        for what, n in (("max_records", max_records), ("max_events", max_events), ("max_replies", max_replies),
                        ("max_held", max_held)):
            if n < 1:
                raise ValueError(f"{what} must be >= 1, got {n}")
        if receipts not in RECEIPT_MODES:
            raise ValueError(f"receipts must be one of {', '.join(RECEIPT_MODES)}, got {receipts!r}")
        self.db = db
        self.max_records = max_records
        self.caps = {"telemetry": max_records, "event": max_events, "reply": max_replies}
        self.max_held = max_held
        self.receipt_mode = receipts
        self._seen = False
        self.dropped_total = 0  # telemetry records dropped by this process (the per-kind counters are persisted)
        self.in_flight: Callable[[], Collection[int]] = lambda: ()  # row ids paho holds (the Sender sets this)
        self._held: dict[int, dict[str, Any]] = {}  # negative id -> row the disk could not take
        self._held_lock = threading.Lock()
        self._next_held = -1
        self.held_dropped: dict[str, int] = dict.fromkeys(KINDS, 0)  # dropped from memory (not persisted)
        self._mem_pending = 0  # telemetry records lost from memory, for the next record's ``dropped``
        self._consumed = 0  # of the persisted ``dropped_pending``, what a held record already reported
        self._next_hold_log = 0.0
        db.on_lost_rows = self._hold

    @property
    def receipts(self) -> bool:
        """True when a PUBACK only marks a row delivered and a controller's receipt deletes it."""
        if self.receipt_mode == "auto":
            if not self._seen:  # once seen, for good: cache it (it is read on every PUBACK batch)
                self._seen = self.db.get_meta("receipts.seen") == "1"
            return self._seen
        return self.receipt_mode == "on"

    # -- storing ------------------------------------------------------------------------------------------------------

    def _insert(self, c: sqlite3.Connection, kind: str, topic: str, payload: bytes, props: str,
                boot: str | None = None, seq: int | None = None, ref: str | None = None) -> int:
        prio = _priority(kind, payload)
        cur = c.execute("INSERT INTO outbox(kind, topic, payload, props, created, boot, seq, ref, prio) "
                        "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)", (kind, topic, payload, props, time.time(), boot, seq, ref,
                                                              prio))
        self.db.tx_rows.append({"kind": kind, "topic": topic, "payload": payload, "props": props, "boot": boot,
                                "seq": seq, "ref": ref, "prio": prio})
        return int(cur.lastrowid or 0)

    def _cap(self, c: sqlite3.Connection, kind: str) -> tuple[int, int]:
        """Enforce ``kind``'s cap inside the caller's transaction; returns (undelivered rows dropped, the
        ``dropped`` counts those rows carried)."""
        (count,) = c.execute("SELECT COUNT(*) FROM outbox WHERE kind=?", (kind,)).fetchone()
        if count <= self.caps[kind]:
            return 0, 0
        protected = json.dumps(sorted(i for i in self.in_flight() if i > 0))
        (n_prot,) = c.execute("SELECT COUNT(*) FROM outbox WHERE kind=? AND id IN (SELECT value FROM json_each(?))",
                              (kind, protected)).fetchone()
        over = count - int(n_prot) - self.caps[kind]
        if over <= 0:
            return 0, 0
        victims = c.execute("SELECT id, payload, delivered FROM outbox WHERE kind=? AND id NOT IN "
                            "(SELECT value FROM json_each(?)) ORDER BY prio, id LIMIT ?",
                            (kind, protected, over)).fetchall()
        c.executemany("DELETE FROM outbox WHERE id=?", [(v[0],) for v in victims])
        # A delivered row (the broker has it, no receipt yet) most likely reaches the controller: counting it as
        # dropped as well would report more lost than are.
        lost = [v for v in victims if v[2] is None]
        if lost:
            c.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET "
                      "value=CAST(value AS INTEGER) + excluded.value", (f"dropped.{kind}", len(lost)))
        carried = sum(_carried(bytes(v[1])) for v in lost) if kind == "telemetry" else 0
        return len(lost), carried

    def add_telemetry(self, topic: str, make: Callable[[int, int], bytes], boot: str = "") -> tuple[int, int]:
        """Store a telemetry record built by ``make(seq, dropped)`` in one transaction; returns (row id, seq).

        Over the cap, the oldest stored records not already handed to paho (:attr:`in_flight`: paho retransmits
        those itself after a reconnect, so dropping them would report records as lost that still arrive) are
        deleted. ``dropped`` counts every record deleted since the last record stored, plus the counts that deleted
        records carried themselves: the ``dropped`` fields of the records that do arrive add up exactly to the
        records that never will. A record the full disk cannot take is held in memory (row id < 0).
        """
        used = {"pending": 0, "mem": 0}

        def run(c: sqlite3.Connection) -> tuple[int, int]:
            seq = self.db.next_seq(c, "telemetry")
            row = c.execute("SELECT value FROM meta WHERE key='dropped_pending'").fetchone()
            used["pending"] = max(0, (int(row[0]) if row else 0) - self._consumed)
            used["mem"] = self._mem_pending
            rowid = self._insert(c, "telemetry", topic, make(seq, used["pending"] + used["mem"]), "{}", boot, seq)
            lost, carried = self._cap(c, "telemetry")
            self.dropped_total += lost
            c.execute("INSERT INTO meta(key, value) VALUES('dropped_pending', ?) "
                      "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(lost + carried),))
            return rowid, seq

        try:
            out = self.db.write(run)
            self._consumed = 0
        except StorageFullError:
            held = self._last_held("telemetry")
            if held is None:
                raise
            self._consumed += used["pending"]  # the held record reports them; the stored counter still holds them
            out = held
        self._mem_pending -= used["mem"]
        return out

    def add_event(self, topic: str, make: Callable[[int], bytes], boot: str = "") -> int:
        """Store an event built by ``make(seq)`` (its own counter); returns the row id (< 0: held in memory)."""
        def run(c: sqlite3.Connection) -> int:
            seq = self.db.next_seq(c, "events")
            rowid = self._insert(c, "event", topic, make(seq), "{}", boot, seq)
            self._cap(c, "event")
            return rowid

        try:
            return self.db.write(run)
        except StorageFullError:
            held = self._last_held("event")
            if held is None:
                raise
            return held[0]

    def add(self, kind: str, topic: str, payload: bytes, props: dict[str, Any] | None = None,
            c: sqlite3.Connection | None = None, ref: str | None = None) -> int:
        """Store any other message (replies, ``ref`` = the command id a receipt names); inside the caller's
        transaction ``c`` when given. Returns the row id."""
        def run(conn: sqlite3.Connection) -> int:
            rowid = self._insert(conn, kind, topic, payload, json.dumps(props or {}), ref=ref)
            if kind in self.caps:
                self._cap(conn, kind)
            return rowid

        if c is not None:
            return run(c)
        try:
            return self.db.write(run)
        except StorageFullError:
            held = self._last_held(kind)
            if held is None:
                raise
            return held[0]

    # -- held in memory (the disk was full) ---------------------------------------------------------------------------

    def _hold(self, rows: list[dict[str, Any]]) -> None:
        """The database could not take these rows (full disk): keep them in memory, send them from there."""
        with self._held_lock:
            for row in rows:
                counter = _SEQ_COUNTER.get(row["kind"])
                if counter and row["seq"] is not None:
                    self.db.seq_floor[counter] = max(self.db.seq_floor.get(counter, 0), int(row["seq"]))
                self._held[self._next_held] = row
                self._next_held -= 1
            while len(self._held) > self.max_held:
                # Telemetry goes first, then refusals and progress, oldest first: what memory is for is the report
                # of a failure the controller waits for.
                flying = set(self.in_flight())
                order = sorted((i for i in self._held if i not in flying),
                               key=lambda i: (self._held[i]["kind"] != "telemetry", self._held[i]["prio"], -i))
                victim = order[0] if order else None
                if victim is None:
                    break
                row = self._held.pop(victim)
                self.held_dropped[row["kind"]] = self.held_dropped.get(row["kind"], 0) + 1
                if row["kind"] == "telemetry":
                    self._mem_pending += 1 + _carried(row["payload"])
            held, now = len(self._held), time.monotonic()
            if now >= self._next_hold_log:  # at most once a minute: the telemetry loop would flood the log
                self._next_hold_log = now + 60.0
                log.error("disk full: holding messages in memory until there is room", extra={
                    "held": held, "dropped_from_memory": dict(self.held_dropped)})

    def _last_held(self, kind: str) -> tuple[int, int] | None:
        """(id, seq) of the newest held row of ``kind``, or None."""
        with self._held_lock:
            for i in sorted(self._held):  # most negative = newest
                if self._held[i]["kind"] == kind:
                    return i, int(self._held[i]["seq"] or 0)
        return None

    def held(self) -> int:
        """Rows held in memory because the disk was full."""
        return len(self._held)

    def is_held(self, rowid: int) -> bool:
        """Whether a (negative) row id is still held."""
        return rowid in self._held

    def flush_held(self) -> int:
        """Move held rows not in flight into the table (the disk has room again); returns how many moved."""
        with self._held_lock:
            flying = set(self.in_flight())
            rows = [(i, r) for i, r in sorted(self._held.items(), reverse=True) if i not in flying]
        if not rows:
            return 0

        def run(c: sqlite3.Connection) -> None:
            for _, r in rows:
                c.execute("INSERT INTO outbox(kind, topic, payload, props, created, boot, seq, ref, prio) "
                          "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)", (r["kind"], r["topic"], r["payload"], r["props"],
                                                                time.time(), r["boot"], r["seq"], r["ref"], r["prio"]))
            for counter, floor in self.db.seq_floor.items():
                c.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET "
                          "value=MAX(CAST(value AS INTEGER), excluded.value)", (f"seq.{counter}", floor))

        try:
            with self.db.tx(hold=False) as c:
                run(c)
        except StorageFullError:
            return 0
        with self._held_lock:
            for i, _ in rows:
                self._held.pop(i, None)
        return len(rows)

    # -- reading and acknowledging ------------------------------------------------------------------------------------

    def pending(self, limit: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[OutboxRow]:
        """The oldest rows not yet delivered and not in ``exclude`` (the ones already in flight); held rows first."""
        out: list[OutboxRow] = []
        with self._held_lock:
            for i in sorted(self._held, reverse=True):
                if i not in exclude and len(out) < limit:
                    r = self._held[i]
                    out.append(OutboxRow(i, r["kind"], r["topic"], bytes(r["payload"]), json.loads(r["props"])))
        if len(out) >= limit:
            return out
        with self.db.lock:
            rows = self.db.conn.execute("SELECT id, kind, topic, payload, props FROM outbox WHERE delivered IS NULL "
                                        "ORDER BY id LIMIT ?", (limit + len(exclude),)).fetchall()
        out += [OutboxRow(r[0], r[1], r[2], bytes(r[3]), json.loads(r[4])) for r in rows if r[0] not in exclude]
        return out[:limit]

    def ack(self, *rowids: int) -> None:
        """The broker has these rows (PUBACK): delete them, or with receipts mark them delivered until one names
        them (rows without a key — another consumer's reply copy, rows from before receipts — go now). One
        transaction, so draining a backlog is not one fsync per row. Held rows are forgotten on PUBACK (the disk
        had no room to keep them for a receipt)."""
        held = [r for r in rowids if r < 0]
        if held:
            with self._held_lock:
                for r in held:
                    self._held.pop(r, None)
        rowids = tuple(r for r in rowids if r > 0)
        if not rowids:
            return
        keep = self.receipts
        now = time.time()

        def run(c: sqlite3.Connection) -> None:
            if keep:
                c.executemany("UPDATE outbox SET delivered=? WHERE id=? AND (seq IS NOT NULL OR ref IS NOT NULL)",
                              [(now, r) for r in rowids])
                c.executemany("DELETE FROM outbox WHERE id=? AND delivered IS NULL", [(r,) for r in rowids])
            else:
                c.executemany("DELETE FROM outbox WHERE id=?", [(r,) for r in rowids])

        self.db.write(run)

    def confirm(self, receipt: dict[str, Any]) -> int:
        """Delete the rows a controller's receipt names (any state: a row a previous run delivered is stored too).
        The first receipt switches ``auto`` receipts on for this data dir. A negative receipt (``refused``: the
        controller will never store them) deletes them the same way and counts them per kind (``refused.<kind>``
        in ``meta``, reported as ``system.refused_by_kind``). Returns the rows deleted."""
        refused = bool(receipt.get("refused"))

        def run(c: sqlite3.Connection) -> int:
            n = 0
            per_kind: dict[str, int] = {}
            for kind, key in (("telemetry", "telemetry"), ("event", "events")):
                for boot, ranges in receipt.get(key, {}).items():
                    for lo, hi in ranges:
                        k = c.execute("DELETE FROM outbox WHERE kind=? AND boot=? AND seq BETWEEN ? AND ?",
                                      (kind, boot, lo, hi)).rowcount
                        per_kind[kind] = per_kind.get(kind, 0) + k
                        n += k
            for ref in receipt.get("replies", []):
                k = c.execute("DELETE FROM outbox WHERE kind='reply' AND ref=?", (ref,)).rowcount
                per_kind["reply"] = per_kind.get("reply", 0) + k
                n += k
            if refused:
                for kind, k in per_kind.items():
                    if k:
                        c.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET "
                                  "value=CAST(value AS INTEGER) + excluded.value", (f"refused.{kind}", k))
            if self.receipt_mode == "auto":
                c.execute("INSERT INTO meta(key, value) VALUES('receipts.seen', '1') "
                          "ON CONFLICT(key) DO UPDATE SET value=excluded.value")
            return n

        n = self.db.write(run)
        self._seen = self.receipt_mode == "auto"
        if refused and n:
            log.warning("the controller refused %d of this device's messages for good: %s", n,
                        str(receipt.get("reason", ""))[:300])
        return n

    def requeue(self, delivered_before: float) -> int:
        """Rows delivered before this time and still not confirmed go back to pending (sent again); returns how
        many."""
        return self.db.write(lambda c: int(c.execute(
            "UPDATE outbox SET delivered=NULL WHERE delivered IS NOT NULL AND delivered < ?",
            (delivered_before,)).rowcount))

    def expire(self, delivered_before: float) -> int:
        """Forget rows the broker acknowledged before this time that no receipt ever named (a controller that stopped
        sending receipts, ``--no-receipts``): the broker has them, so they are not counted as dropped. Returns how
        many."""
        return self.db.write(lambda c: int(c.execute(
            "DELETE FROM outbox WHERE delivered IS NOT NULL AND delivered < ?", (delivered_before,)).rowcount))

    def unconfirmed(self) -> int:
        """Rows the broker has and no receipt has named yet."""
        with self.db.lock:
            (n,) = self.db.conn.execute("SELECT COUNT(*) FROM outbox WHERE delivered IS NOT NULL").fetchone()
        return int(n)

    def count(self, kind: str | None = None) -> int:
        """Rows waiting (of one kind, or all), held ones included."""
        with self.db.lock:
            if kind is None:
                (n,) = self.db.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
            else:
                (n,) = self.db.conn.execute("SELECT COUNT(*) FROM outbox WHERE kind=?", (kind,)).fetchone()
        with self._held_lock:
            n += sum(1 for r in self._held.values() if kind is None or r["kind"] == kind)
        return int(n)

    def dropped(self) -> dict[str, int]:
        """Undelivered rows dropped by the caps, per kind, since the data dir was made (plus those dropped from
        memory by this process while the disk was full)."""
        with self.db.lock:
            rows = dict(self.db.conn.execute("SELECT key, value FROM meta WHERE key LIKE 'dropped.%'").fetchall())
        return {k: int(rows.get(f"dropped.{k}", 0)) + self.held_dropped.get(k, 0) for k in KINDS}

    def refused(self) -> dict[str, int]:
        """Rows a controller refused for good (negative receipts), per kind, since the data dir was made."""
        with self.db.lock:
            rows = dict(self.db.conn.execute("SELECT key, value FROM meta WHERE key LIKE 'refused.%'").fetchall())
        return {k: int(rows.get(f"refused.{k}", 0)) for k in KINDS}

    def status(self) -> dict[str, Any]:
        """The outbox figures telemetry reports under ``system``."""
        return {"spool": self.count("telemetry"), "dropped_total": self.dropped_total,
                "unconfirmed": self.unconfirmed(), "dropped_by_kind": self.dropped(), "held": self.held(),
                "outbox": {k: self.count(k) for k in KINDS}, "refused_by_kind": self.refused()}


def _carried(payload: bytes) -> int:
    """The ``dropped`` count a stored telemetry record carries (0 if unreadable)."""
    try:
        value = json.loads(payload).get("dropped", 0)
    except (ValueError, AttributeError):
        return 0
    return int(value) if isinstance(value, int) else 0


class _Info(Protocol):
    def is_published(self) -> bool: ...


def acknowledged(info: _Info) -> bool:
    """Whether the broker has acknowledged a message paho took.

    ``MQTTMessageInfo.is_published()`` raises for ever for a message published while paho was not connected
    (``rc`` = MQTT_ERR_NO_CONN), although paho keeps it, sends it after reconnecting and marks it published on the
    PUBACK. Read that mark (the flag ``wait_for_publish`` reads) instead of letting the exception stall the outbox:
    before this, one such message stopped every later PUBACK from being applied until the agent restarted.
    """
    try:
        return info.is_published()
    except RuntimeError:
        return bool(getattr(info, "_published", False))
    except ValueError:  # not queued (paho's queue full): it never goes out, so never acknowledged
        return False


class _Claimed:
    """Stands for a row being handed to paho (not acknowledged)."""

    def is_published(self) -> bool:
        return False


_CLAIMED = _Claimed()

Publish = Callable[[str, bytes, dict[str, Any]], "_Info | None"]


class Sender:
    """Publishes outbox rows while connected, at most ``window`` unacknowledged; applies PUBACKs and receipts.

    Acknowledgement is read from paho's per-message info (``is_published()``, set on PUBACK) rather than by mapping
    message ids in ``on_publish``: paho calls ``on_publish`` holding its own lock, so the callback only wakes this
    thread, and there is no window where an early PUBACK is missed or a reused message id is confused. Receipts are
    queued by the network thread (:meth:`receipt`) and applied here, so SQLite never runs in paho's loop.
    """

    def __init__(self, spool: Spool, publish: Publish, window: int = 50, resend_after_s: float = 10.0) -> None:
        if not resend_after_s > 0:
            raise ValueError(f"resend_after_s must be > 0, got {resend_after_s}")
        self.spool = spool
        self.publish = publish
        self.window = window
        self.resend_after_s = resend_after_s
        self._receipts: deque[dict[str, Any]] = deque(maxlen=10_000)
        self._last_receipt = 0.0  # wall clock: rows carry their delivery time across restarts
        self._next_requeue = 0.0
        self._next_expire = 0.0
        self._next_flush = 0.0
        self._next_full_log = 0.0
        self._unacked: set[int] = set()  # acknowledged rows whose PUBACK the full disk could not record yet
        self.confirmed = 0
        self.resent = 0
        self._inflight: dict[int, _Info] = {}  # row id -> paho message info
        self._inflight_lock = threading.Lock()
        spool.in_flight = self._in_flight_ids
        self._wake = threading.Event()
        self._connected = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self.acked = 0

    def start(self) -> None:
        """Start the sending thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sending (stored rows stay for the next start)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(5)

    def set_connected(self, connected: bool) -> None:
        """Called on CONNACK and on disconnect."""
        self._connected = connected
        self._wake.set()

    def wake(self) -> None:
        """New rows were stored, or paho reported an acknowledgement."""
        self._wake.set()

    def receipt(self, parsed: dict[str, Any]) -> None:
        """A controller's receipt arrived (network thread): applied by the sending thread."""
        self._receipts.append(parsed)
        self._wake.set()

    def _in_flight_ids(self) -> list[int]:
        with self._inflight_lock:
            return [*self._inflight, *self._unacked]

    def inflight(self) -> int:
        """Messages handed to paho and not yet acknowledged."""
        return len(self._inflight)

    def drained(self, confirmed: bool = False) -> bool:
        """Nothing waiting to be sent and nothing in flight (and, with ``confirmed``, nothing awaiting a receipt)."""
        if self._inflight or self._receipts:
            return False
        return self.spool.count() == 0 if confirmed else not self.spool.pending(1)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            # Each step on its own: a database that cannot be written (full disk) must not stop the sending of rows
            # held in memory.
            failed = False
            for step in (self._reap, self._apply_receipts, self._maintain, self._send_some):
                try:
                    step()
                except StorageFullError as exc:
                    failed = True
                    now = time.monotonic()
                    if now >= self._next_full_log:
                        self._next_full_log = now + 60.0
                        log.error("outbox: disk full", extra={"step": step.__name__, "error": str(exc)})
                except Exception:
                    failed = True
                    log.exception("outbox sender error")
            if failed:
                time.sleep(0.5)

    def _maintain(self) -> None:
        if time.monotonic() < self._next_flush:
            return
        self._next_flush = time.monotonic() + 1.0
        if self.spool.held():
            # The disk had no room for these: store them now if it has (receipts then apply as usual).
            self.spool.flush_held()
        if self.spool.db.storage is not None:
            self.spool.db.storage.refill()  # the ballast, once the disk has room again

    def _apply_receipts(self) -> None:
        got = False
        while self._receipts:
            self.confirmed += self.spool.confirm(self._receipts.popleft())
            got = True
        if got:
            self._last_receipt = time.time()
        now = time.monotonic()
        if now >= self._next_expire and self.spool.receipts:  # without receipts no row stays delivered
            self._next_expire = now + 60.0
            n = self.spool.expire(time.time() - RECEIPT_EXPIRY_S)
            if n:
                log.warning("no receipt within a day for messages the broker has; forgetting them",
                            extra={"count": n})
        if self._last_receipt and now >= self._next_requeue and self.spool.receipts:
            self._next_requeue = now + 1.0
            # A receipt came this long after a row was delivered, and did not name it: the controller is there
            # and did not get it (the broker lost it). Without receipts (no controller) nothing is resent.
            n = self.spool.requeue(self._last_receipt - self.resend_after_s)
            if n:
                self.resent += n
                log.warning("resending messages the controller never stored", extra={"count": n})

    def _reap(self) -> None:
        with self._inflight_lock:
            items = list(self._inflight.items())
        done = [rowid for rowid, info in items if acknowledged(info)]
        todo = done + sorted(self._unacked)
        if not todo:
            return
        try:
            self.spool.ack(*todo)
            self._unacked.clear()
        except StorageFullError:
            # PUBACKs the full disk cannot record yet: kept here (never sent again meanwhile), applied later.
            self._unacked.update(r for r in done if r > 0)
            raise
        finally:
            with self._inflight_lock:
                for rowid in done:
                    del self._inflight[rowid]
            self.acked += len(done)

    def _send_some(self) -> None:
        if not self._connected:
            return
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        for row in self.spool.pending(room, set(self._in_flight_ids())):
            if not self._connected or self._stop.is_set():
                return
            # Claim the row under the database lock (the lock add_telemetry's cap holds): either the cap dropped it
            # already, or it is in flight now and the cap leaves it alone. Never both published and counted dropped.
            with self.spool.db.lock:
                gone = (not self.spool.is_held(row.id)) if row.id < 0 else self.spool.db.conn.execute(
                    "SELECT 1 FROM outbox WHERE id=?", (row.id,)).fetchone() is None
                if gone:
                    continue
                with self._inflight_lock:
                    self._inflight[row.id] = _CLAIMED
            info = self.publish(row.topic, row.payload, row.props)
            with self._inflight_lock:
                if info is None:
                    del self._inflight[row.id]
                    return
                self._inflight[row.id] = info
