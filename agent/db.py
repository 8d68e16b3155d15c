"""The agent's one SQLite file (WAL): telemetry/reply outbox, command journal and counters.

One connection guarded by a lock: the writers are the MQTT network thread (acks), the command worker and the
telemetry loop, each writing a few rows per second at most. ``synchronous=FULL`` makes every commit durable before
the agent acts on it (a command is journaled before its PUBACK goes out; a record is on disk before it is published).

A full disk (issue 18: every write failed with "database or disk is full", the failure reply included): before each
transaction, with less than ``storage.HEADROOM_BYTES`` free, the disk ballast is released; a transaction that still
fails because the disk is full releases it too and raises :class:`~edgefleet.agent.storage.StorageFullError`, and
the outbox rows it was storing are handed to :attr:`Database.on_lost_rows` (the outbox keeps them in memory and
sends them: the failure report still goes out).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from edgefleet.sdk.errors import ConfigError

from .storage import HEADROOM_BYTES, Storage, StorageFullError, is_disk_full

__all__ = ["Database"]

log = logging.getLogger("edgefleet.agent.db")

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,            -- telemetry | event | reply | status
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    props TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    boot TEXT,                     -- telemetry and events: (boot, seq) as in the payload; what a receipt names
    seq INTEGER,
    ref TEXT,                      -- replies: the command id
    delivered REAL,                -- when the broker acknowledged it (NULL: not yet); kept until a receipt
    prio INTEGER NOT NULL DEFAULT 1 -- 0: dropped first over the cap (refusals, progress), 1: the rest
);
CREATE INDEX IF NOT EXISTS outbox_kind ON outbox(kind, id);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    props TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL,           -- pending | done
    received REAL NOT NULL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cmd_nonces (      -- nonces of accepted signed commands, kept until they expire
    nonce TEXT PRIMARY KEY,
    expires REAL NOT NULL
);
"""


class Database:
    """A locked SQLite connection with the agent's schema."""

    def __init__(self, path: str | Path, storage: Storage | None = None) -> None:
        self.path = Path(path)
        self.lock = threading.RLock()
        self.storage = storage
        # Outbox rows inserted by the running transaction, handed to ``on_lost_rows`` when a full disk fails it.
        self.tx_rows: list[dict[str, Any]] = []
        self.on_lost_rows: Callable[[list[dict[str, Any]]], None] | None = None
        self.seq_floor: dict[str, int] = {}  # counters handed out to rows the disk could not take (kept in memory)
        self.degraded = False  # opened with exclusive locking because the disk was full
        try:
            self._open_somehow()
        except sqlite3.Error as exc:
            raise ConfigError(f"agent.data_dir: cannot open {self.path}: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"agent.data_dir: cannot open {self.path}: {exc.strerror or exc}") from exc

    def _open_somehow(self) -> None:
        """Open normally; on a full disk release the ballast and retry; if the disk is still full, open with
        exclusive locking, which keeps SQLite's WAL index in memory instead of the ``-shm`` file it cannot create
        (a clean stop removed it): reads work, writes fail until there is room (the outbox holds rows in memory).
        So the agent restarts, and serves, on a full disk."""
        try:
            self._open()
            return
        except sqlite3.Error as exc:
            if not self._full(exc):
                raise
            if self.storage is not None and self.storage.release_ballast(f"opening the database: {exc}"):
                try:
                    self._open()
                    return
                except sqlite3.Error as again:
                    if not self._full(again):
                        raise
        self._open(exclusive=True)
        self.degraded = True
        log.error("disk full: opened the agent database with exclusive locking (WAL index in memory)",
                  extra={"path": str(self.path)})

    def _full(self, exc: BaseException) -> bool:
        # Opening on a full disk fails as "disk I/O error" (the -shm file cannot be sized), not SQLITE_FULL.
        return is_disk_full(exc) or (self.storage is not None and self.storage.free() < HEADROOM_BYTES)

    def _open(self, exclusive: bool = False) -> None:
        if self.storage is not None:
            self.storage.ensure_headroom("opening the agent database")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
        try:
            if exclusive:
                self.conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(_SCHEMA)
            cols = {row[1] for row in self.conn.execute("PRAGMA table_info(commands)")}
            if "attempts" not in cols:  # a data dir from before the column existed
                self.conn.execute("ALTER TABLE commands ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
            cols = {row[1] for row in self.conn.execute("PRAGMA table_info(outbox)")}
            for col, decl in (("boot", "TEXT"), ("seq", "INTEGER"), ("ref", "TEXT"), ("delivered", "REAL"),
                              ("prio", "INTEGER NOT NULL DEFAULT 1")):
                if col not in cols:  # a data dir from before receipts / caps: its rows have no key and go on PUBACK
                    self.conn.execute(f"ALTER TABLE outbox ADD COLUMN {col} {decl}")
            self.conn.execute("CREATE INDEX IF NOT EXISTS outbox_key ON outbox(kind, boot, seq)")
            self.conn.execute("CREATE INDEX IF NOT EXISTS outbox_ref ON outbox(ref)")
            self.conn.execute("CREATE INDEX IF NOT EXISTS commands_state ON commands(state, received)")
        except BaseException:
            self.conn.close()
            raise

    @contextmanager
    def tx(self, hold: bool = True) -> Iterator[sqlite3.Connection]:
        """One immediate transaction under the lock (commit on success, rollback on error).

        A full disk raises StorageFullError (after releasing the ballast, so a second attempt has room); with
        ``hold``, the outbox rows the transaction was storing are handed to :attr:`on_lost_rows` first.
        """
        with self.lock:
            if self.storage is not None:
                self.storage.ensure_headroom("database write")
            self.tx_rows = []
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException as exc:
                if self.conn.in_transaction:
                    try:
                        self.conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # SQLite may have rolled back already (e.g. after SQLITE_FULL)
                if isinstance(exc, (sqlite3.Error, OSError)) and is_disk_full(exc):
                    lost, self.tx_rows = self.tx_rows, []
                    if self.storage is not None:
                        self.storage.release_ballast(f"database write: {exc}")
                    if hold and lost and self.on_lost_rows is not None:
                        self.on_lost_rows(lost)
                    raise StorageFullError(f"cannot write {self.path}: {exc}") from exc
                raise
            finally:
                self.tx_rows = []

    def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(c)`` in a transaction; tried once more after a full disk (the ballast is released by then). Only
        when the second attempt fails too are its outbox rows held in memory."""
        try:
            with self.tx(hold=False) as c:
                return fn(c)
        except StorageFullError:
            with self.tx() as c:
                return fn(c)

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        """A value from the meta table."""
        with self.lock:
            row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        """Store a value in the meta table (durably)."""
        with self.tx() as c:
            c.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                      (key, value))

    def next_seq(self, c: sqlite3.Connection, counter: str) -> int:
        """Increment and return a persisted counter inside the caller's transaction (never below a value already
        handed to a row the disk could not take, so no two rows of this boot share a seq)."""
        row = c.execute("SELECT value FROM meta WHERE key=?", (f"seq.{counter}",)).fetchone()
        seq = max(int(row[0]) if row else 0, self.seq_floor.get(counter, 0)) + 1
        c.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                  (f"seq.{counter}", str(seq)))
        return seq

    def close(self) -> None:
        """Close the connection (checkpoints the WAL)."""
        with self.lock:
            self.conn.close()
