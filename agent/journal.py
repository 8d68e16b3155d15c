"""The command journal: which command ids were received and which are done, on disk.

A command is journaled inside paho's ``on_message`` callback and acknowledged (manual PUBACK) only then, so once
the broker forgets a command the agent has it on disk. A command whose id is already journaled is never executed again
(idempotent by id, also across restarts). A command that was pending when the agent died is executed again after
restart; its reply goes through the outbox, so exactly one reply per id reaches the broker.

It also remembers the replay guards of signed commands, in the transaction that journals them: the highest
``counter`` accepted, and every accepted ``nonce`` until its command expires (at most ``max_nonces``; the oldest go
first, and the counter still refuses them).

Bounded (issue 18: 1,000 refused commands left 1,000 whole journal entries): a finished command keeps only its id
and kind (payload and MQTT properties are dropped when it is answered), at most ``max_entries`` finished ids are
remembered (older ones are forgotten, counted in ``journal.forgotten``), and at most ``max_pending`` commands wait to
run — beyond that :meth:`Journal.check_room` refuses the newcomer with ``journal.full`` (the dispatcher answers it at
``receive``, counted in ``journal.refused``), so a flood can neither fill the disk nor queue work without end. A
command that is refused at once (malformed, unsigned, for another device ...) is journaled with at most
:data:`MAX_REFUSED_PAYLOAD` bytes of its payload, and none once answered.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from edgefleet.sdk.errors import EdgefleetError

from .db import Database

__all__ = ["MAX_REFUSED_PAYLOAD", "Journal", "JournalEntry", "JournalFullError"]

MAX_REFUSED_PAYLOAD = 1024
"""Bytes of a refused command's payload kept while its refusal is being answered (for the log), never more."""


class JournalFullError(EdgefleetError):
    """Too many commands wait to run (``storage.journal_max_pending``): this one is refused, not queued."""

    code = "journal.full"


@dataclass(frozen=True)
class JournalEntry:
    """A journaled command."""

    id: str
    kind: str
    payload: bytes
    props: dict[str, Any]
    state: str


class Journal:
    """Commands by id with state pending/done; old done entries are pruned beyond ``keep``, pending ones are capped
    at ``max_pending``."""

    def __init__(self, db: Database, keep: int = 10_000, max_pending: int = 100, max_nonces: int = 100_000) -> None:
        if keep < 1 or max_pending < 1 or max_nonces < 1:
            raise ValueError(f"keep, max_pending and max_nonces must be >= 1, got {keep}, {max_pending}, "
                             f"{max_nonces}")
        self.db = db
        self.keep = keep
        self.max_pending = max_pending
        self.max_nonces = max_nonces

    def check_room(self) -> JournalFullError | None:
        """A refusal when ``max_pending`` commands already wait to run, else None (counted when refused)."""
        with self.db.lock:
            (n,) = self.db.conn.execute("SELECT COUNT(*) FROM commands WHERE state='pending'").fetchone()
        if n < self.max_pending:
            return None
        try:
            self.db.write(lambda c: c.execute(
                "INSERT INTO meta(key, value) VALUES('journal.refused', 1) ON CONFLICT(key) DO UPDATE SET "
                "value=CAST(value AS INTEGER) + 1"))
        except EdgefleetError:
            pass  # the refusal itself still goes out; only its count is lost
        return JournalFullError(f"{n} commands already wait to run (storage.journal_max_pending = "
                                f"{self.max_pending}); refused, send it again later")

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
        return self.db.write(run)

    def last_counter(self, c: Any) -> int:
        """The highest command counter this device accepted (0: none yet), inside the caller's transaction."""
        row = c.execute("SELECT value FROM meta WHERE key='cmd.counter'").fetchone()
        return int(row[0]) if row else 0

    def accept_counter(self, counter: int, c: Any) -> None:
        """Persist ``counter`` as the last accepted one (same transaction as the journal entry)."""
        c.execute("INSERT INTO meta(key, value) VALUES('cmd.counter', ?) "
                  "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(counter),))

    def nonce_seen(self, nonce: str, c: Any) -> bool:
        """Whether a command with this nonce was accepted before and has not expired (caller's transaction)."""
        return c.execute("SELECT 1 FROM cmd_nonces WHERE nonce=?", (nonce,)).fetchone() is not None

    def accept_nonce(self, nonce: str, expires: float, c: Any) -> None:
        """Remember an accepted nonce until ``expires``; forget expired ones and, over ``max_nonces``, the soonest
        to expire (the counter still refuses a replay of those)."""
        c.execute("DELETE FROM cmd_nonces WHERE expires < ?", (time.time(),))
        c.execute("INSERT OR REPLACE INTO cmd_nonces(nonce, expires) VALUES(?, ?)", (nonce, expires))
        c.execute("DELETE FROM cmd_nonces WHERE nonce IN (SELECT nonce FROM cmd_nonces ORDER BY expires DESC "
                  "LIMIT -1 OFFSET ?)", (self.max_nonces,))

    def finish(self, cmd_id: str, c: Any = None) -> None:
        """Mark a command done (inside the caller's transaction when given, with the reply stored); only its id and
        kind stay (the id is what makes a redelivery a duplicate), and beyond ``keep`` the oldest are forgotten."""
        def run(conn: Any) -> None:
            conn.execute("UPDATE commands SET state='done', finished=?, payload=x'', props='{}' WHERE id=?",
                         (time.time(), cmd_id))
            gone = conn.execute("DELETE FROM commands WHERE state='done' AND id NOT IN "
                                "(SELECT id FROM commands ORDER BY received DESC LIMIT ?)", (self.keep,)).rowcount
            if gone:
                conn.execute("INSERT INTO meta(key, value) VALUES('journal.forgotten', ?) ON CONFLICT(key) DO UPDATE "
                             "SET value=CAST(value AS INTEGER) + excluded.value", (gone,))
        if c is not None:
            run(c)
        else:
            self.db.write(run)

    def start(self, cmd_id: str) -> int:
        """Count one more execution attempt (durably, before executing); returns the count including this one."""
        def run(c: Any) -> Any:
            c.execute("UPDATE commands SET attempts = attempts + 1 WHERE id=?", (cmd_id,))
            return c.execute("SELECT attempts FROM commands WHERE id=?", (cmd_id,)).fetchone()
        row = self.db.write(run)
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

    def status(self) -> dict[str, int]:
        """For telemetry: entries kept, pending, finished ids forgotten and commands refused as over the cap."""
        with self.db.lock:
            (n,) = self.db.conn.execute("SELECT COUNT(*) FROM commands").fetchone()
            (p,) = self.db.conn.execute("SELECT COUNT(*) FROM commands WHERE state='pending'").fetchone()
            meta = dict(self.db.conn.execute(
                "SELECT key, value FROM meta WHERE key IN ('journal.forgotten', 'journal.refused')").fetchall())
        return {"entries": int(n), "pending": int(p), "forgotten_total": int(meta.get("journal.forgotten", 0)),
                "refused_total": int(meta.get("journal.refused", 0))}
