"""The agent's one SQLite file (WAL): telemetry/reply outbox, command journal and counters.

One connection guarded by a lock: the writers are the MQTT network thread (acks), the command worker and the
telemetry loop, each writing a few rows per second at most. ``synchronous=FULL`` makes every commit durable before
the agent acts on it (a command is journaled before its PUBACK goes out; a record is on disk before it is published).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgefleet.sdk.errors import ConfigError

__all__ = ["Database"]

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
    delivered REAL                 -- when the broker acknowledged it (NULL: not yet); kept until a receipt
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
"""


class Database:
    """A locked SQLite connection with the agent's schema."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock = threading.RLock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(_SCHEMA)
            cols = {row[1] for row in self.conn.execute("PRAGMA table_info(commands)")}
            if "attempts" not in cols:  # a data dir from before the column existed
                self.conn.execute("ALTER TABLE commands ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")
            cols = {row[1] for row in self.conn.execute("PRAGMA table_info(outbox)")}
            for col, decl in (("boot", "TEXT"), ("seq", "INTEGER"), ("ref", "TEXT"), ("delivered", "REAL")):
                if col not in cols:  # a data dir from before receipts: its rows have no key and go on PUBACK
                    self.conn.execute(f"ALTER TABLE outbox ADD COLUMN {col} {decl}")
            self.conn.execute("CREATE INDEX IF NOT EXISTS outbox_key ON outbox(kind, boot, seq)")
            self.conn.execute("CREATE INDEX IF NOT EXISTS outbox_ref ON outbox(ref)")
        except sqlite3.Error as exc:
            raise ConfigError(f"agent.data_dir: cannot open {self.path}: {exc}") from exc

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One immediate transaction under the lock (commit on success, rollback on error)."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

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
        """Increment and return a persisted counter inside the caller's transaction."""
        row = c.execute("SELECT value FROM meta WHERE key=?", (f"seq.{counter}",)).fetchone()
        seq = int(row[0]) + 1 if row else 1
        c.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                  (f"seq.{counter}", str(seq)))
        return seq

    def close(self) -> None:
        """Close the connection (checkpoints the WAL)."""
        with self.lock:
            self.conn.close()
