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

While the broker is away rows accumulate; telemetry is capped at ``max_records`` (oldest dropped first, the number
dropped added to the ``dropped`` field of the next record) while replies and events, which are rare and which the
controller waits for, are never dropped. On reconnect the :class:`Sender` drains the backlog in id order with a
bounded window of unacknowledged messages. Rows already handed to paho are not re-published after a reconnect: paho
retransmits its own unacknowledged QoS 1 messages (with DUP) on the new connection. Duplicates (a resend whose first
copy did arrive, a kill between PUBACK and the row's deletion) are harmless: the fleet de-duplicates by
(device, boot, seq) and by reply id.
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

__all__ = ["RECEIPT_MODES", "OutboxRow", "Sender", "Spool"]

log = logging.getLogger("edgefleet.agent.spool")

RECEIPT_MODES = ("auto", "on", "off")
RECEIPT_EXPIRY_S = 24 * 3600.0  # a delivered row no receipt named for this long is forgotten (the broker has it)


@dataclass(frozen=True)
class OutboxRow:
    """One stored message."""

    id: int
    kind: str
    topic: str
    payload: bytes
    props: dict[str, Any]


class Spool:
    """The outbox table with a telemetry cap and persisted sequence counters."""

    def __init__(self, db: Database, max_records: int = 10_000, receipts: str = "auto") -> None:
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        if receipts not in RECEIPT_MODES:
            raise ValueError(f"receipts must be one of {', '.join(RECEIPT_MODES)}, got {receipts!r}")
        self.db = db
        self.max_records = max_records
        self.receipt_mode = receipts
        self._seen = False
        self.dropped_total = 0
        self.in_flight: Callable[[], Collection[int]] = lambda: ()  # row ids paho holds (the Sender sets this)

    @property
    def receipts(self) -> bool:
        """True when a PUBACK only marks a row delivered and a controller's receipt deletes it."""
        if self.receipt_mode == "auto":
            if not self._seen:  # once seen, for good: cache it (it is read on every PUBACK batch)
                self._seen = self.db.get_meta("receipts.seen") == "1"
            return self._seen
        return self.receipt_mode == "on"

    def add_telemetry(self, topic: str, make: Callable[[int, int], bytes], boot: str = "") -> tuple[int, int]:
        """Store a telemetry record built by ``make(seq, dropped)`` in one transaction; returns (row id, seq).

        Over the cap, the oldest stored records not already handed to paho (:attr:`in_flight`: paho retransmits
        those itself after a reconnect, so dropping them would report records as lost that still arrive) are
        deleted. ``dropped`` counts every record deleted since the last record stored, plus the counts that deleted
        records carried themselves: the ``dropped`` fields of the records that do arrive add up exactly to the
        records that never will.
        """
        with self.db.tx() as c:
            seq = self.db.next_seq(c, "telemetry")
            row = c.execute("SELECT value FROM meta WHERE key='dropped_pending'").fetchone()
            dropped = int(row[0]) if row else 0
            payload = make(seq, dropped)
            cur = c.execute("INSERT INTO outbox(kind, topic, payload, props, created, boot, seq) "
                            "VALUES('telemetry', ?, ?, '{}', ?, ?, ?)", (topic, payload, time.time(), boot, seq))
            rowid = int(cur.lastrowid or 0)
            (count,) = c.execute("SELECT COUNT(*) FROM outbox WHERE kind='telemetry'").fetchone()
            pending = 0
            if count > self.max_records:
                protected = json.dumps(sorted(self.in_flight()))
                (n_prot,) = c.execute("SELECT COUNT(*) FROM outbox WHERE kind='telemetry' AND id IN "
                                      "(SELECT value FROM json_each(?))", (protected,)).fetchone()
                over = count - int(n_prot) - self.max_records
                if over > 0:
                    victims = c.execute("SELECT id, payload, delivered FROM outbox WHERE kind='telemetry' AND "
                                        "id NOT IN (SELECT value FROM json_each(?)) ORDER BY id LIMIT ?",
                                        (protected, over)).fetchall()
                    c.executemany("DELETE FROM outbox WHERE id=?", [(v[0],) for v in victims])
                    # A delivered row (the broker has it, no receipt yet) most likely reaches the controller: counting
                    # it as dropped as well would report more lost than are.
                    lost = [v for v in victims if v[2] is None]
                    pending = len(lost) + sum(_carried(bytes(v[1])) for v in lost)
                    self.dropped_total += len(lost)
            c.execute("INSERT INTO meta(key, value) VALUES('dropped_pending', ?) "
                      "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(pending),))
        return rowid, seq

    def add_event(self, topic: str, make: Callable[[int], bytes], boot: str = "") -> int:
        """Store an event built by ``make(seq)`` (its own counter); returns the row id."""
        with self.db.tx() as c:
            seq = self.db.next_seq(c, "events")
            cur = c.execute("INSERT INTO outbox(kind, topic, payload, props, created, boot, seq) "
                            "VALUES('event', ?, ?, '{}', ?, ?, ?)", (topic, make(seq), time.time(), boot, seq))
            return int(cur.lastrowid or 0)

    def add(self, kind: str, topic: str, payload: bytes, props: dict[str, Any] | None = None,
            c: sqlite3.Connection | None = None, ref: str | None = None) -> int:
        """Store any other message (replies, ``ref`` = the command id a receipt names); inside the caller's
        transaction ``c`` when given. Returns the row id."""
        sql = "INSERT INTO outbox(kind, topic, payload, props, created, ref) VALUES(?, ?, ?, ?, ?, ?)"
        args = (kind, topic, payload, json.dumps(props or {}), time.time(), ref)
        if c is not None:
            return int(c.execute(sql, args).lastrowid or 0)
        with self.db.tx() as conn:
            return int(conn.execute(sql, args).lastrowid or 0)

    def pending(self, limit: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[OutboxRow]:
        """The oldest rows not yet delivered and not in ``exclude`` (the ones already in flight)."""
        with self.db.lock:
            rows = self.db.conn.execute("SELECT id, kind, topic, payload, props FROM outbox WHERE delivered IS NULL "
                                        "ORDER BY id LIMIT ?", (limit + len(exclude),)).fetchall()
        out = [OutboxRow(r[0], r[1], r[2], bytes(r[3]), json.loads(r[4])) for r in rows if r[0] not in exclude]
        return out[:limit]

    def ack(self, *rowids: int) -> None:
        """The broker has these rows (PUBACK): delete them, or with receipts mark them delivered until one names
        them (rows without a key — another consumer's reply copy, rows from before receipts — go now). One
        transaction, so draining a backlog is not one fsync per row."""
        if not rowids:
            return
        keep = self.receipts
        now = time.time()
        with self.db.tx() as c:
            if keep:
                c.executemany("UPDATE outbox SET delivered=? WHERE id=? AND (seq IS NOT NULL OR ref IS NOT NULL)",
                              [(now, r) for r in rowids])
                c.executemany("DELETE FROM outbox WHERE id=? AND delivered IS NULL", [(r,) for r in rowids])
            else:
                c.executemany("DELETE FROM outbox WHERE id=?", [(r,) for r in rowids])

    def confirm(self, receipt: dict[str, Any]) -> int:
        """Delete the rows a controller's receipt names (any state: a row a previous run delivered is stored too).
        The first receipt switches ``auto`` receipts on for this data dir. Returns the rows deleted."""
        n = 0
        with self.db.tx() as c:
            for kind, key in (("telemetry", "telemetry"), ("event", "events")):
                for boot, ranges in receipt.get(key, {}).items():
                    for lo, hi in ranges:
                        n += c.execute("DELETE FROM outbox WHERE kind=? AND boot=? AND seq BETWEEN ? AND ?",
                                       (kind, boot, lo, hi)).rowcount
            for ref in receipt.get("replies", []):
                n += c.execute("DELETE FROM outbox WHERE kind='reply' AND ref=?", (ref,)).rowcount
            if self.receipt_mode == "auto":
                c.execute("INSERT INTO meta(key, value) VALUES('receipts.seen', '1') "
                          "ON CONFLICT(key) DO UPDATE SET value=excluded.value")
        self._seen = self.receipt_mode == "auto"
        return n

    def requeue(self, delivered_before: float) -> int:
        """Rows delivered before this time and still not confirmed go back to pending (sent again); returns how
        many."""
        with self.db.tx() as c:
            return int(c.execute("UPDATE outbox SET delivered=NULL WHERE delivered IS NOT NULL AND delivered < ?",
                                 (delivered_before,)).rowcount)

    def expire(self, delivered_before: float) -> int:
        """Forget rows the broker acknowledged before this time that no receipt ever named (a controller that stopped
        sending receipts, ``--no-receipts``): the broker has them, and replies and events are never capped, so
        without this they would pile up for ever. Returns how many."""
        with self.db.tx() as c:
            return int(c.execute("DELETE FROM outbox WHERE delivered IS NOT NULL AND delivered < ?",
                                 (delivered_before,)).rowcount)

    def unconfirmed(self) -> int:
        """Rows the broker has and no receipt has named yet."""
        with self.db.lock:
            (n,) = self.db.conn.execute("SELECT COUNT(*) FROM outbox WHERE delivered IS NOT NULL").fetchone()
        return int(n)

    def count(self, kind: str | None = None) -> int:
        """Rows waiting (of one kind, or all)."""
        with self.db.lock:
            if kind is None:
                (n,) = self.db.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
            else:
                (n,) = self.db.conn.execute("SELECT COUNT(*) FROM outbox WHERE kind=?", (kind,)).fetchone()
        return int(n)


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
            return list(self._inflight)

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
            try:
                self._reap()
                self._apply_receipts()
                if self._connected:
                    self._send_some()
            except Exception:
                log.exception("outbox sender error")
                time.sleep(0.5)

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
        if done:
            self.spool.ack(*done)
            with self._inflight_lock:
                for rowid in done:
                    del self._inflight[rowid]
            self.acked += len(done)

    def _send_some(self) -> None:
        room = self.window - len(self._inflight)
        if room <= 0:
            return
        for row in self.spool.pending(room, set(self._in_flight_ids())):
            if not self._connected or self._stop.is_set():
                return
            # Claim the row under the database lock (the lock add_telemetry's cap holds): either the cap dropped it
            # already, or it is in flight now and the cap leaves it alone. Never both published and counted dropped.
            with self.spool.db.lock:
                if self.spool.db.conn.execute("SELECT 1 FROM outbox WHERE id=?", (row.id,)).fetchone() is None:
                    continue
                with self._inflight_lock:
                    self._inflight[row.id] = _CLAIMED
            info = self.publish(row.topic, row.payload, row.props)
            with self._inflight_lock:
                if info is None:
                    del self._inflight[row.id]
                    return
                self._inflight[row.id] = info
