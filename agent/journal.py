"""The command journal: which command ids were received and which are done, on disk.

A command is journaled inside paho's ``on_message`` callback and acknowledged (manual PUBACK) only then, so once
the broker forgets a command the agent has it on disk. A command whose id is already journaled is never executed again
(idempotent by id, also across restarts). A command that was pending when the agent died is executed again after
restart; its reply goes through the outbox, so exactly one reply per id reaches the broker.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from .db import Database

__all__ = ["Journal", "JournalEntry"]


@dataclass(frozen=True)
class JournalEntry:
    """A journaled command."""

    id: str
    kind: str
    payload: bytes
    props: dict[str, Any]
    state: str


class Journal:
    """Commands by id with state pending/done; old done entries are pruned beyond ``keep``."""

    def __init__(self, db: Database, keep: int = 10_000) -> None:
        self.db = db
        self.keep = keep

    def receive(self, cmd_id: str, kind: str, payload: bytes, props: dict[str, Any], c: Any = None) -> bool:
        """Journal a command; False when this id was seen before (do not execute it again).

        Inside the caller's transaction ``c`` when given (with the counter update, or the refusal's reply).
        """
        def run(conn: Any) -> bool:
            cur = conn.execute("INSERT OR IGNORE INTO commands(id, kind, payload, props, state, received) "
                               "VALUES(?, ?, ?, ?, 'pending', ?)",
                               (cmd_id, kind, payload, json.dumps(props), time.time()))
            return bool(cur.rowcount == 1)
        if c is not None:
            return run(c)
        with self.db.tx() as conn:
            return run(conn)

    def last_counter(self, c: Any) -> int:
        """The highest command counter this device accepted (0: none yet), inside the caller's transaction."""
        row = c.execute("SELECT value FROM meta WHERE key='cmd.counter'").fetchone()
        return int(row[0]) if row else 0

    def accept_counter(self, counter: int, c: Any) -> None:
        """Persist ``counter`` as the last accepted one (same transaction as the journal entry)."""
        c.execute("INSERT INTO meta(key, value) VALUES('cmd.counter', ?) "
                  "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(counter),))

    def finish(self, cmd_id: str, c: Any = None) -> None:
        """Mark a command done (inside the caller's transaction when given, with the reply stored)."""
        def run(conn: Any) -> None:
            conn.execute("UPDATE commands SET state='done', finished=? WHERE id=?", (time.time(), cmd_id))
            conn.execute("DELETE FROM commands WHERE state='done' AND id NOT IN "
                         "(SELECT id FROM commands ORDER BY received DESC LIMIT ?)", (self.keep,))
        if c is not None:
            run(c)
        else:
            with self.db.tx() as conn:
                run(conn)

    def start(self, cmd_id: str) -> int:
        """Count one more execution attempt (durably, before executing); returns the count including this one."""
        with self.db.tx() as c:
            c.execute("UPDATE commands SET attempts = attempts + 1 WHERE id=?", (cmd_id,))
            row = c.execute("SELECT attempts FROM commands WHERE id=?", (cmd_id,)).fetchone()
        return int(row[0]) if row else 0

    def pending(self) -> list[JournalEntry]:
        """Commands received but not finished (the agent died while running them), oldest first."""
        with self.db.lock:
            rows = self.db.conn.execute("SELECT id, kind, payload, props, state FROM commands WHERE state='pending' "
                                        "ORDER BY received").fetchall()
        return [JournalEntry(r[0], r[1], bytes(r[2]), json.loads(r[3]), r[4]) for r in rows]

    def state(self, cmd_id: str) -> str | None:
        """pending, done, or None when unknown."""
        with self.db.lock:
            row = self.db.conn.execute("SELECT state FROM commands WHERE id=?", (cmd_id,)).fetchone()
        return row[0] if row else None
