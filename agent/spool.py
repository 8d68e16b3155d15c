"""A bounded on-disk outbox: telemetry, events and replies are stored before they are published, removed on PUBACK.

Each row is committed (SQLite WAL, synchronous=FULL) before the agent hands it to paho, and deleted only once paho
has the broker's PUBACK for it (its message info is marked published). While the broker is away rows accumulate;
telemetry is capped at ``max_records`` (oldest dropped first, the number dropped added to the ``dropped`` field of
the next record) while replies and events, which are rare and which the controller waits for, are never
dropped. On reconnect the :class:`Sender` drains the backlog in id order with a bounded window of unacknowledged
messages. Rows already handed to paho are not re-published after a reconnect: paho retransmits its own unacknowledged
QoS 1 messages (with DUP) on the new connection, so a record is sent twice only if the process dies between the
broker's PUBACK and the row's deletion; the fleet de-duplicates by (device, boot, seq).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from .db import Database

__all__ = ["OutboxRow", "Sender", "Spool"]

log = logging.getLogger("edgefleet.agent.spool")


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

    def __init__(self, db: Database, max_records: int = 10_000) -> None:
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        self.db = db
        self.max_records = max_records
        self.dropped_total = 0
        self.in_flight: Callable[[], Collection[int]] = lambda: ()  # row ids paho holds (the Sender sets this)

    def add_telemetry(self, topic: str, make: Callable[[int, int], bytes]) -> tuple[int, int]:
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
            cur = c.execute("INSERT INTO outbox(kind, topic, payload, props, created) "
                            "VALUES('telemetry', ?, ?, '{}', ?)", (topic, payload, time.time()))
            rowid = int(cur.lastrowid or 0)
            (count,) = c.execute("SELECT COUNT(*) FROM outbox WHERE kind='telemetry'").fetchone()
            pending = 0
            if count > self.max_records:
                protected = json.dumps(sorted(self.in_flight()))
                (n_prot,) = c.execute("SELECT COUNT(*) FROM outbox WHERE kind='telemetry' AND id IN "
                                      "(SELECT value FROM json_each(?))", (protected,)).fetchone()
                over = count - int(n_prot) - self.max_records
                if over > 0:
                    victims = c.execute("SELECT id, payload FROM outbox WHERE kind='telemetry' AND id NOT IN "
                                        "(SELECT value FROM json_each(?)) ORDER BY id LIMIT ?",
                                        (protected, over)).fetchall()
                    c.executemany("DELETE FROM outbox WHERE id=?", [(v[0],) for v in victims])
                    pending = len(victims) + sum(_carried(bytes(v[1])) for v in victims)
                    self.dropped_total += len(victims)
            c.execute("INSERT INTO meta(key, value) VALUES('dropped_pending', ?) "
                      "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(pending),))
        return rowid, seq

    def add_event(self, topic: str, make: Callable[[int], bytes]) -> int:
        """Store an event built by ``make(seq)`` (its own counter); returns the row id."""
        with self.db.tx() as c:
            seq = self.db.next_seq(c, "events")
            cur = c.execute("INSERT INTO outbox(kind, topic, payload, props, created) VALUES('event', ?, ?, '{}', ?)",
                            (topic, make(seq), time.time()))
            return int(cur.lastrowid or 0)

    def add(self, kind: str, topic: str, payload: bytes, props: dict[str, Any] | None = None,
            c: sqlite3.Connection | None = None) -> int:
        """Store any other message (replies); inside the caller's transaction ``c`` when given. Returns the row id."""
        sql = "INSERT INTO outbox(kind, topic, payload, props, created) VALUES(?, ?, ?, ?, ?)"
        args = (kind, topic, payload, json.dumps(props or {}), time.time())
        if c is not None:
            return int(c.execute(sql, args).lastrowid or 0)
        with self.db.tx() as conn:
            return int(conn.execute(sql, args).lastrowid or 0)

    def pending(self, limit: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[OutboxRow]:
        """The oldest stored rows not in ``exclude`` (the ones already in flight)."""
        with self.db.lock:
            rows = self.db.conn.execute("SELECT id, kind, topic, payload, props FROM outbox ORDER BY id LIMIT ?",
                                        (limit + len(exclude),)).fetchall()
        out = [OutboxRow(r[0], r[1], r[2], bytes(r[3]), json.loads(r[4])) for r in rows if r[0] not in exclude]
        return out[:limit]

    def ack(self, *rowids: int) -> None:
        """The broker has these rows: delete them (one transaction, so draining a backlog is not one fsync per row)."""
        if not rowids:
            return
        with self.db.tx() as c:
            c.executemany("DELETE FROM outbox WHERE id=?", [(r,) for r in rowids])

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


class _Claimed:
    """Stands for a row being handed to paho (not acknowledged)."""

    def is_published(self) -> bool:
        return False


_CLAIMED = _Claimed()

Publish = Callable[[str, bytes, dict[str, Any]], "_Info | None"]


class Sender:
    """Publishes outbox rows while connected, at most ``window`` unacknowledged; deletes each once acknowledged.

    Acknowledgement is read from paho's per-message info (``is_published()``, set on PUBACK) rather than by mapping
    message ids in ``on_publish``: paho calls ``on_publish`` holding its own lock, so the callback only wakes this
    thread, and there is no window where an early PUBACK is missed or a reused message id is confused.
    """

    def __init__(self, spool: Spool, publish: Publish, window: int = 50) -> None:
        self.spool = spool
        self.publish = publish
        self.window = window
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

    def _in_flight_ids(self) -> list[int]:
        with self._inflight_lock:
            return list(self._inflight)

    def inflight(self) -> int:
        """Messages handed to paho and not yet acknowledged."""
        return len(self._inflight)

    def drained(self) -> bool:
        """Nothing stored and nothing in flight."""
        return not self._inflight and self.spool.count() == 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                self._reap()
                if self._connected:
                    self._send_some()
            except Exception:
                log.exception("outbox sender error")
                time.sleep(0.5)

    def _reap(self) -> None:
        with self._inflight_lock:
            items = list(self._inflight.items())
        done = [rowid for rowid, info in items if info.is_published()]
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
