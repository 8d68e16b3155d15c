"""The PostgreSQL store: several controllers, on one or many hosts, sharing one database.

``fleet serve --store postgresql://user@host/db?sslmode=verify-full`` selects it (psycopg 3 and psycopg_pool, the
``postgres`` install extra). The same guarantees as every backend (``base``), kept by the database rather than by
one process:

* **Idempotent ingest.** ``(fleet, device, boot, seq)`` is the primary key of telemetry and events, the command id
  of replies. A batch is copied in with ``COPY ... (FORMAT BINARY)`` (the cheapest way in for the controller's CPU,
  bench/results/fleet.md); when a row is already there (a redelivery, possibly racing another controller that
  stored it a moment ago) the copy fails on the key, the savepoint is rolled back and the batch goes in again with
  ``INSERT ... ON CONFLICT DO NOTHING RETURNING``, which says which rows were new. Only new rows feed the derived
  views, so a replay never inflates a count.
* **Hot rows locked late and in order.** Every batch of every controller touches the same few per-minute sketch
  rows and many device rows. They are written last in the transaction, in key order (no deadlock between two
  controllers' batches), and the per-minute sketches are merged under the row lock of ``INSERT ... ON CONFLICT DO
  UPDATE`` (read, merge in Python, write), so two controllers never lose each other's requests. A deadlock or
  serialization failure (a redelivery racing a status) rolls back and retries the whole batch.
* **Versioned migrations under an advisory lock.** Controllers starting together serialise on
  ``pg_advisory_xact_lock``; each migration runs once, in one transaction with its ``schema_migrations`` row
  (PostgreSQL DDL is transactional). A database from a newer edgefleet is refused with a clear message.
* **Leases on the database clock** (``clock_timestamp()``), so controllers with skewed clocks cannot both drive a
  rollout; fenced writes check the lease in the same statement.
* **Retention as SQL**: chunked ``DELETE ... WHERE ctid = ANY(ARRAY(SELECT ctid ... LIMIT n))``, one short
  transaction per chunk, so ingest keeps going.

Durability is PostgreSQL's (``synchronous_commit`` on by default): a commit that returned survives a crash of the
database server too, which is what receipts promise the agents.

URL query parameters ``pool_min_size`` (default 1) and ``pool_max_size`` (default 8) size the connection pool; every
other parameter goes to libpq (``sslmode``, ``sslrootcert``, ``sslcert``, ``sslkey``, ``application_name``,
``connect_timeout``, ``options`` ...).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
from edgefleet.sdk.errors import ConfigError
from edgefleet.sdk.protocol import (
    RUNNING_STATES,
    BundleInfo,
    Command,
    Deployment,
    DeploymentDecision,
    DeploymentTarget,
    Description,
    DeviceRow,
    Event,
    EventRow,
    ModelSummary,
    ProcessStats,
    Reply,
    Status,
    Telemetry,
    TelemetryWindow,
)
from edgefleet.sdk.protocol._model import Decoder, prevalidated
from edgefleet.sdk.sketch import SketchSum, saturating_add

from ..rollout import TargetMove, advances, target_moves
from ._derive import Derived, derive, json_text, merge_minute
from ._read import UNREADABLE, or_default, unreadable
from .base import (
    CONTROLLER_BOOTS,
    LIVENESS_BOOT,
    ApiToken,
    Batch,
    Store,
    TrackedCommand,
    VersionSketch,
    VersionTotal,
    WriteResult,
    check_target_fields,
    liveness_event,
)

try:  # the `postgres` extra; SQLite, the default, needs none of it
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg.rows import dict_row
    from psycopg_pool import ConnectionPool
except ImportError:  # pragma: no cover - tested by the import check of open_store
    psycopg = None  # type: ignore[assignment]

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PostgresStore"]

# Each migration runs once, in order, in one transaction with its schema_migrations row. PostgreSQL's versions are
# its own (the SQLite backend has a history this one never had).
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "initial schema", """
        CREATE TABLE devices (
            fleet text NOT NULL, device text NOT NULL,
            state text NOT NULL DEFAULT 'unknown', boot text NOT NULL DEFAULT '',
            status_ts double precision NOT NULL DEFAULT 0, description json NOT NULL DEFAULT '{}',
            profile text NOT NULL DEFAULT '', tags json NOT NULL DEFAULT '[]',
            last_seen double precision NOT NULL DEFAULT 0, summary json NOT NULL DEFAULT '[]',
            summary_ts double precision NOT NULL DEFAULT 0, process json NOT NULL DEFAULT '{}',
            updated double precision NOT NULL DEFAULT 0,
            PRIMARY KEY (fleet, device));
        CREATE INDEX devices_updated ON devices (fleet, updated);
        CREATE TABLE telemetry (
            fleet text NOT NULL, device text NOT NULL, boot text NOT NULL, seq bigint NOT NULL,
            ts double precision NOT NULL, received double precision NOT NULL, interval_s double precision NOT NULL,
            dropped bigint NOT NULL, process text NOT NULL, system text NOT NULL,
            PRIMARY KEY (fleet, device, boot, seq));
        CREATE INDEX telemetry_ts ON telemetry (fleet, ts);
        CREATE TABLE windows (
            fleet text NOT NULL, device text NOT NULL, boot text NOT NULL, seq bigint NOT NULL,
            ts double precision NOT NULL, name text NOT NULL, version text NOT NULL, count bigint NOT NULL,
            errors bigint NOT NULL, interval_s double precision NOT NULL, p50 double precision,
            p95 double precision, p99 double precision, providers text NOT NULL, sketch text NOT NULL);
        CREATE INDEX windows_device_ts ON windows (fleet, device, ts);
        CREATE INDEX windows_ts ON windows (fleet, ts);
        CREATE TABLE version_minutes (
            fleet text NOT NULL, name text NOT NULL, version text NOT NULL, minute bigint NOT NULL,
            count bigint NOT NULL, errors bigint NOT NULL, sum_ms double precision NOT NULL, sketch text NOT NULL,
            PRIMARY KEY (fleet, name, version, minute));
        CREATE TABLE events (
            fleet text NOT NULL, device text NOT NULL, boot text NOT NULL, seq bigint NOT NULL,
            ts double precision NOT NULL, received double precision NOT NULL, kind text NOT NULL,
            level text NOT NULL, message text NOT NULL, data text NOT NULL,
            PRIMARY KEY (fleet, device, boot, seq));
        CREATE INDEX events_received ON events (fleet, received);
        CREATE TABLE replies (
            cmd_id text PRIMARY KEY, fleet text NOT NULL, device text NOT NULL, ts double precision NOT NULL,
            received double precision NOT NULL, status text NOT NULL, body text NOT NULL);
        CREATE INDEX replies_received ON replies (fleet, received);
        CREATE TABLE deployments (
            id text PRIMARY KEY, fleet text NOT NULL, created double precision NOT NULL,
            updated double precision NOT NULL, state text NOT NULL, selector text NOT NULL,
            canary_pct double precision NOT NULL, max_p95_regression double precision NOT NULL,
            max_error_increase double precision NOT NULL, bundles text NOT NULL,
            decision text NOT NULL DEFAULT '{}', message text NOT NULL DEFAULT '',
            owner text NOT NULL DEFAULT '', lease_until double precision NOT NULL DEFAULT 0);
        CREATE INDEX deployments_fleet ON deployments (fleet, created);
        CREATE TABLE deployment_targets (
            deployment_id text NOT NULL REFERENCES deployments (id), device text NOT NULL,
            profile text NOT NULL, name text NOT NULL DEFAULT '', version text NOT NULL DEFAULT '',
            sha256 text NOT NULL DEFAULT '', previous_version text NOT NULL DEFAULT '',
            phase text NOT NULL, state text NOT NULL, reason text NOT NULL DEFAULT '',
            cmd_id text NOT NULL DEFAULT '', rollback_cmd_id text NOT NULL DEFAULT '',
            activated double precision NOT NULL DEFAULT 0, updated double precision NOT NULL,
            PRIMARY KEY (deployment_id, device));
        CREATE INDEX targets_cmd ON deployment_targets (cmd_id) WHERE cmd_id <> '';
        CREATE INDEX targets_rollback_cmd ON deployment_targets (rollback_cmd_id) WHERE rollback_cmd_id <> '';
    """),
    # Every command a controller sends, until answered or expired (fleet/commands.py); API tokens (fleet/auth.py:
    # the public id and a SHA-256 of the secret, never the secret).
    (2, "tracked commands and API tokens", """
        CREATE TABLE commands (
            id text PRIMARY KEY, fleet text NOT NULL, device text NOT NULL, kind text NOT NULL, body text NOT NULL,
            created double precision NOT NULL, expires double precision NOT NULL, sent double precision NOT NULL,
            sends bigint NOT NULL DEFAULT 1);
        CREATE INDEX commands_expires ON commands (fleet, expires);
        CREATE TABLE api_tokens (
            id text PRIMARY KEY, name text NOT NULL, scope text NOT NULL, fleet text NOT NULL,
            created double precision NOT NULL, expires double precision NOT NULL, secret_hash text NOT NULL);
    """),
    # The output statistic's sketch of each window (drift, sdk/outputs.py), JSON; NULL when the bundle names none.
    (3, "output statistics in windows", """
        ALTER TABLE windows ADD COLUMN output text;
    """),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
_MIGRATION_LOCK = 0x6564676566_6C74  # "edgeflt": the advisory lock key every edgefleet controller takes to migrate
_RETRIES = 8  # deadlocks and serialization failures: the whole batch again
_NOW = "extract(epoch from clock_timestamp())"  # the database's clock, for leases

_TELEMETRY_TYPES = ["text", "text", "text", "int8", "float8", "float8", "float8", "int8", "text", "text"]
_WINDOW_TYPES = ["text", "text", "text", "int8", "float8", "text", "text", "int8", "int8", "float8", "float8",
                 "float8", "float8", "text", "text", "text"]
_STAGE_DEVICES = "edgefleet_stage_devices"
_DEVICE_COLS = ("device, state, boot, status_ts, description::text AS description, profile, tags::text AS tags, "
                "last_seen, summary::text AS summary, summary_ts, process::text AS process, updated")

_summary_dec: Decoder[list[ModelSummary]] = Decoder(list[ModelSummary], "devices.summary")
_process_dec: Decoder[ProcessStats] = Decoder(ProcessStats, "devices.process")
_desc_dec: Decoder[Description] = Decoder(Description, "devices.description")
_strings_dec: Decoder[list[str]] = Decoder(list[str])
_bundles_dec: Decoder[list[BundleInfo]] = Decoder(list[BundleInfo], "deployments.bundles")
_decision_dec: Decoder[DeploymentDecision] = Decoder(DeploymentDecision, "deployments.decision")
_any_dec = msgspec.json.Decoder()


def _split_url(url: str) -> tuple[str, int, int]:
    """``(libpq URL, pool min, pool max)``: the pool's own parameters taken out of the query string."""
    parts = urlsplit(url)
    query, pool = [], {"pool_min_size": 1, "pool_max_size": 8}
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in pool:
            try:
                pool[k] = int(v)
            except ValueError:
                raise ConfigError(f"store URL: {k} must be an integer, got {v!r}") from None
        else:
            query.append((k, v))
    if not 1 <= pool["pool_min_size"] <= pool["pool_max_size"] <= 1000:
        raise ConfigError(f"store URL: need 1 <= pool_min_size <= pool_max_size <= 1000, got "
                          f"{pool['pool_min_size']} and {pool['pool_max_size']}")
    names = {k for k, _ in query}
    if "application_name" not in names:
        query.append(("application_name", "edgefleet-controller"))
    if "connect_timeout" not in names:
        query.append(("connect_timeout", "10"))
    return urlunsplit(parts._replace(query=urlencode(query))), pool["pool_min_size"], pool["pool_max_size"]


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


class PostgresStore(Store):
    """The PostgreSQL store (see the module docstring)."""

    def __init__(self, url: str, *, connect_timeout_s: float = 30.0) -> None:
        if psycopg is None:
            raise ConfigError("a postgresql:// store needs psycopg 3 and psycopg_pool: "
                              "pip install 'edgefleet[postgres]'")
        self.url = _redact(url)
        conninfo, min_size, max_size = _split_url(url)
        try:
            with psycopg.connect(conninfo, autocommit=False) as conn:
                self._migrate(conn)
        except psycopg.Error as exc:
            raise ConfigError(f"cannot open the store {self.url}: {str(exc).strip().splitlines()[0]}") from exc
        self._pool = ConnectionPool(conninfo, min_size=min_size, max_size=max_size, open=False,
                                    configure=self._configure, name="edgefleet-store", timeout=connect_timeout_s)
        self._pool.open(wait=True, timeout=connect_timeout_s)

    def __str__(self) -> str:
        return self.url  # the password, if the URL has one, is masked

    # connections ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _configure(conn: Any) -> None:
        # A controller that stalls inside a transaction (SIGSTOP, a partition) must not hold the hot rows for ever:
        # the server ends such a session; its batch was not acknowledged, so the broker delivers it again.
        conn.autocommit = True
        conn.execute("SET idle_in_transaction_session_timeout = '60s'")
        conn.execute("SET lock_timeout = '60s'")
        # The staging table of device summaries (upserted from it in one statement): one per connection.
        conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE_DEVICES} (device text, summary text, "
                     "summary_ts double precision, process text) ON COMMIT DELETE ROWS")
        conn.autocommit = False

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """One transaction on a pooled connection: committed when the block ends, rolled back on an error (an
        explicit block, so a nested ``conn.transaction()`` is a savepoint, never a commit of its own)."""
        with self._pool.connection() as conn, conn.transaction():
            yield conn

    def close(self) -> None:
        """Close the pool (and every connection)."""
        self._pool.close()

    def _migrate(self, conn: Any) -> None:
        with conn.transaction():
            # Controllers starting together take turns here; the lock ends with the transaction.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                         "name text NOT NULL, applied double precision NOT NULL)")
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            if done and max(done) > SCHEMA_VERSION:
                raise ConfigError(f"store {self.url} has schema version {max(done)}, newer than this edgefleet "
                                  f"({SCHEMA_VERSION}); upgrade edgefleet")
            for version, name, sql in MIGRATIONS:
                if version in done:
                    continue
                conn.execute(sql)
                conn.execute(f"INSERT INTO schema_migrations VALUES (%s, %s, {_NOW})", (version, name))

    def schema_version(self) -> int:
        """The highest applied migration."""
        with self._tx() as conn:
            return int(conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0])

    # ingest --------------------------------------------------------------------------------------------------------
    def write(self, batch: Batch) -> WriteResult:
        """Write statuses, telemetry, events and replies in one transaction, ignoring replays; a deadlock or
        serialization failure with another controller's transaction is retried (the whole batch, from scratch)."""
        for attempt in range(_RETRIES):
            try:
                with self._tx() as conn:
                    return self._write(conn, batch)
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
                if attempt == _RETRIES - 1:
                    raise
                time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def _write(self, conn: Any, batch: Batch) -> WriteResult:
        fleet, now = batch.fleet, batch.received
        derived = None
        n_tel = 0
        if batch.telemetry:
            fresh = self._insert_telemetry(conn, fleet, batch.telemetry, now)
            n_tel = len(fresh)
            if fresh:
                derived = derive(fresh)
                self._copy(conn, "windows", _WINDOW_TYPES, [(fleet, *w) for w in derived.windows])
        n_ev = n_rep = 0
        cur = conn.cursor()
        for ev in batch.events:
            if ev.boot in CONTROLLER_BOOTS:
                continue  # only a controller records these: an agent's claiming such a boot is ignored
            self._insert_event(cur, fleet, ev, now)
            if cur.rowcount == 1:
                n_ev += 1
                self._apply_moves(conn, target_moves(ev), now)
        for ev in batch.controller_events:
            self._insert_event(cur, fleet, ev, now)
            n_ev += cur.rowcount == 1
        for rep in batch.replies:
            cur.execute("INSERT INTO replies VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                        (rep.id, fleet, rep.device, rep.ts, now, rep.status, json_text(rep)))
            if cur.rowcount == 1:
                n_rep += 1
                self._apply_moves(conn, target_moves(rep), now)
        # The rows every controller's batches share go last, in key order, just before the commit: device rows (locked
        # together up front, since statuses and summaries both write them), then the per-minute sketches. A
        # transaction that waits for another's telemetry key (a redelivery race) holds none of them yet.
        touched = sorted({st.device for st in batch.statuses} | (set(derived.latest) if derived else set()))
        states: dict[str, tuple[str, str]] = {}
        if touched:
            states = {r[0]: (r[1], r[2]) for r in conn.execute(
                "SELECT device, state, boot FROM devices WHERE fleet=%s AND device = ANY(%s) ORDER BY device "
                "FOR UPDATE", (fleet, touched)).fetchall()}
        n_st = self._write_statuses(conn, fleet, batch.statuses, now, states)
        if derived is not None:
            self._write_summaries(conn, fleet, derived, now)
            self._merge_minutes(conn, fleet, derived)
            self._revive(conn, fleet, {(t.device, t.boot) for t in fresh}, states, now)
        return WriteResult(telemetry=n_tel, events=n_ev, replies=n_rep, statuses=n_st)

    @staticmethod
    def _copy(conn: Any, table: str, types: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        with conn.cursor().copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(types)
            for row in rows:
                cp.write_row(row)

    def _insert_telemetry(self, conn: Any, fleet: str, records: list[Telemetry], now: float) -> list[Telemetry]:
        """Store the records; return those that were new."""
        rows = sorted(((fleet, t.device, t.boot, t.seq, t.ts, now, t.interval_s, t.dropped, json_text(t.process),
                        json_text(t.system)) for t in records), key=lambda r: (r[1], r[2], r[3]))
        try:
            with conn.transaction():  # a savepoint: a row already there undoes only this copy
                self._copy(conn, "telemetry", _TELEMETRY_TYPES, rows)
            return records  # every row was new (a record given twice in the batch fails the copy too)
        except pg_errors.UniqueViolation:
            pass
        # A replay in the batch: the same rows again, skipping those stored (by us earlier, or by another
        # controller a moment ago: ON CONFLICT waits for its transaction and then skips them).
        cur = conn.cursor()
        new: set[tuple[str, str, int]] = set()
        for row in rows:
            cur.execute("INSERT INTO telemetry VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING "
                        "RETURNING device, boot, seq", row)
            got = cur.fetchone()
            if got is not None:
                new.add((got[0], got[1], got[2]))
        fresh = []
        for t in records:
            key = (t.device, t.boot, t.seq)
            if key in new:
                new.discard(key)  # a record given twice in one batch is new once
                fresh.append(t)
        return fresh

    @staticmethod
    def _insert_event(cur: Any, fleet: str, ev: Event, now: float) -> None:
        cur.execute("INSERT INTO events VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                    (fleet, ev.device, ev.boot, ev.seq, ev.ts, now, ev.kind, ev.level, ev.message,
                     json_text(ev.data)))

    @classmethod
    def _revive(cls, conn: Any, fleet: str, sources: set[tuple[str, str]], states: dict[str, tuple[str, str]],
                now: float) -> None:
        """Devices marked offline by silence whose telemetry (same boot) comes again are online again (sqlite.py's
        rule); ``states`` holds the device rows this transaction locked, as they were before it."""
        cur = conn.cursor()
        for dev, boot in sorted(sources):
            if states.get(dev, ("", ""))[0] != "offline" or states[dev][1] != boot:
                continue
            last = cur.execute("SELECT data FROM events WHERE fleet=%s AND device=%s AND boot=%s ORDER BY seq DESC "
                               "LIMIT 1", (fleet, dev, LIVENESS_BOOT)).fetchone()
            if last is None or '"reason":"silence"' not in last[0]:
                continue
            cur.execute("UPDATE devices SET state='online', updated=%s WHERE fleet=%s AND device=%s AND "
                        "state='offline'", (now, fleet, dev))
            if cur.rowcount == 1:
                cls._insert_event(cur, fleet, liveness_event(dev, True, "telemetry", now, boot=boot), now)

    def mark_silent(self, fleet: str, before: float, now: float) -> list[str]:
        """Mark offline the online devices not heard from since ``before``, each with a ``device.offline`` event;
        ``UPDATE ... WHERE state='online'`` takes each row once, whichever controller gets there first."""
        with self._tx() as conn:
            rows = conn.execute(
                "WITH due AS (SELECT device, updated FROM devices WHERE fleet=%s AND state='online' AND updated<%s "
                "ORDER BY device FOR UPDATE SKIP LOCKED) "
                "UPDATE devices d SET state='offline', updated=%s FROM due WHERE d.fleet=%s AND d.device=due.device "
                "AND d.state='online' RETURNING d.device, d.boot, due.updated", (fleet, before, now, fleet)).fetchall()
            cur = conn.cursor()
            for dev, boot, updated in rows:
                self._insert_event(cur, fleet, liveness_event(dev, False, "silence", now, boot=boot,
                                                              quiet_s=now - updated), now)
        return sorted(r[0] for r in rows)

    @classmethod
    def _write_statuses(cls, conn: Any, fleet: str, statuses: list[Status], now: float,
                        states: dict[str, tuple[str, str]]) -> int:
        if not statuses:
            return 0
        # Every controller writes every status (they are not shared): devices in key order, each device's statuses
        # in arrival order, so two controllers' batches take the device rows in the same order.
        order = sorted(range(len(statuses)), key=lambda i: (statuses[i].device, i))
        n = 0
        cur = conn.cursor()
        for i in order:
            st = statuses[i]
            desc = st.description
            has = desc is not None
            # The rules of sqlite.py's _write_status: another boot's status must be newer; "offline" within a boot
            # always wins; an offline will keeps the last known description.
            cur.execute(
                "INSERT INTO devices AS d (fleet, device, state, boot, status_ts, description, profile, tags, "
                "updated) VALUES (%s,%s,%s,%s,%s,%s::json,%s,%s::json,%s) ON CONFLICT (fleet, device) DO UPDATE SET "
                "state=excluded.state, boot=excluded.boot, updated=excluded.updated, "
                "status_ts=greatest(excluded.status_ts, d.status_ts), "
                "description=CASE WHEN %s THEN excluded.description ELSE d.description END, "
                "profile=CASE WHEN %s THEN excluded.profile ELSE d.profile END, "
                "tags=CASE WHEN %s THEN excluded.tags ELSE d.tags END "
                "WHERE excluded.status_ts >= d.status_ts OR (excluded.boot = d.boot AND excluded.state = 'offline')",
                (fleet, st.device, st.state, st.boot, st.ts, json_text(desc) if desc is not None else "{}",
                 desc.profile if desc is not None else "", json_text(desc.tags) if desc is not None else "[]", now,
                 has, has, has))
            n += cur.rowcount
            old = states.get(st.device)
            # A change between known states is a liveness event (a device's first status is not; sqlite.py).
            if cur.rowcount == 1 and old is not None and old[0] in ("online", "offline") and old[0] != st.state:
                cls._insert_event(cur, fleet, liveness_event(st.device, st.state == "online", "status", now,
                                                             boot=st.boot), now)
            if cur.rowcount == 1:
                states[st.device] = (st.state, st.boot)
        return n

    def _write_summaries(self, conn: Any, fleet: str, d: Derived, now: float) -> None:
        self._copy(conn, _STAGE_DEVICES, ["text", "text", "float8", "text"],
                   [(dev, summary, ts, process) for dev, (ts, summary, process) in d.latest.items()])
        conn.execute(
            "INSERT INTO devices AS d (fleet, device, last_seen, summary, summary_ts, process, updated) "
            f"SELECT %s, device, %s, summary::json, summary_ts, process::json, %s FROM {_STAGE_DEVICES} "
            "ORDER BY device ON CONFLICT (fleet, device) DO UPDATE SET "
            "last_seen=greatest(d.last_seen, excluded.last_seen), updated=excluded.updated, "
            "summary=CASE WHEN excluded.summary_ts >= d.summary_ts THEN excluded.summary ELSE d.summary END, "
            "process=CASE WHEN excluded.summary_ts >= d.summary_ts THEN excluded.process ELSE d.process END, "
            "summary_ts=greatest(d.summary_ts, excluded.summary_ts)",
            (fleet, now, now))

    @staticmethod
    def _merge_minutes(conn: Any, fleet: str, d: Derived) -> None:
        keys = sorted(d.minutes)
        # Lock (and read) every minute row this batch adds to, creating the missing ones, in key order: the no-op
        # update takes the row lock that makes read-merge-write safe against another controller doing the same.
        rows = conn.execute(
            "INSERT INTO version_minutes AS v (fleet, name, version, minute, count, errors, sum_ms, sketch) "
            "SELECT %s, n, ver, m, 0, 0, 0, '' FROM unnest(%s::text[], %s::text[], %s::int8[]) AS u(n, ver, m) "
            "ORDER BY n, ver, m ON CONFLICT (fleet, name, version, minute) DO UPDATE SET count = v.count "
            "RETURNING name, version, minute, count, errors, sketch",
            (fleet, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys])).fetchall()
        stored = {(r[0], r[1], r[2]): (r[3], r[4], r[5]) for r in rows}
        params = []
        for key in keys:
            old = stored.get(key)
            count, errors, sum_ms, sketch = merge_minute(d.minutes[key], old if old and old[2] else None)
            params.append((count, errors, sum_ms, sketch, fleet, *key))
        conn.cursor().executemany("UPDATE version_minutes SET count=%s, errors=%s, sum_ms=%s, sketch=%s "
                                  "WHERE fleet=%s AND name=%s AND version=%s AND minute=%s", params)

    @staticmethod
    def _apply_moves(conn: Any, moves: Iterable[TargetMove], now: float) -> None:
        for mv in moves:
            if mv.state is None:
                conn.execute(f"UPDATE deployment_targets SET reason=%s, updated=%s WHERE {mv.column}=%s",
                             (mv.reason[:4096], now, mv.cmd_id))
                continue
            # FOR UPDATE: an event and the reply of one command stored by two controllers at once take turns, and
            # the second sees the state the first left.
            rows = conn.execute(f"SELECT deployment_id, device, state FROM deployment_targets WHERE {mv.column}=%s "
                                "ORDER BY deployment_id, device FOR UPDATE", (mv.cmd_id,)).fetchall()
            for dep_id, device, state in rows:
                if not advances(state, mv.state):
                    continue
                extra = ", activated=%s" if mv.state == "active" else ""
                params: list[Any] = [mv.state, mv.reason[:4096], now]
                if mv.state == "active":
                    params.append(now)
                conn.execute(f"UPDATE deployment_targets SET state=%s, reason=%s, updated=%s{extra} "
                             "WHERE deployment_id=%s AND device=%s", (*params, dep_id, device))

    # reads ---------------------------------------------------------------------------------------------------------
    @staticmethod
    def _device_row(r: Mapping[str, Any], full: bool) -> DeviceRow:
        # Rows hold what ingest validated: decode them without validating every field again.
        # A part that does not read is shown empty: the device is still listed (_read.py).
        with prevalidated():
            return DeviceRow(
                device=r["device"], state=r["state"], boot=r["boot"], profile=r["profile"],
                tags=or_default([], "devices.tags", lambda: _strings_dec.decode(r["tags"])), last_seen=r["last_seen"],
                models=or_default([], "devices.summary", lambda: _summary_dec.decode(r["summary"])),
                telemetry_ts=r["summary_ts"],
                process=or_default(ProcessStats(), "devices.process", lambda: _process_dec.decode(r["process"])),
                updated=r["updated"], status_ts=r["status_ts"] if full else None,
                description=or_default(None, "devices.description", lambda: _desc_dec.decode(r["description"]))
                if full and r["description"] != "{}" else None)

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._tx() as conn:
            rows: list[dict[str, Any]] = conn.cursor(row_factory=dict_row).execute(sql, args).fetchall()
            return rows

    def devices(self, fleet: str, changed_since: float = 0.0, full: bool = True) -> list[DeviceRow]:
        """Every known device (or those changed after ``changed_since``, controller clock), sorted by id."""
        rows = self._rows(f"SELECT {_DEVICE_COLS} FROM devices WHERE fleet=%s AND updated>%s ORDER BY device",
                          (fleet, changed_since))
        return [self._device_row(r, full) for r in rows]

    def devices_json(self, fleet: str, changed_since: float = 0.0, limit: int | None = None) -> tuple[int, str]:
        """``(matching, JSON array)`` of the compact rows, built by PostgreSQL from columns that already hold JSON
        (the same fields as ``DeviceRow`` without description; a test checks the two agree)."""
        with self._tx() as conn:
            total = int(conn.execute("SELECT count(*) FROM devices WHERE fleet=%s AND updated>%s",
                                     (fleet, changed_since)).fetchone()[0])
            text = conn.execute(
                "SELECT coalesce(json_agg(json_build_object('device', device, 'state', state, 'boot', boot, "
                "'profile', profile, 'tags', tags, 'last_seen', last_seen, 'models', summary, "
                "'telemetry_ts', summary_ts, 'process', process, 'updated', updated) ORDER BY device), '[]')::text "
                "FROM (SELECT * FROM devices WHERE fleet=%s AND updated>%s ORDER BY device LIMIT %s) d",
                (fleet, changed_since, limit)).fetchone()[0]
        return total, text

    def device(self, fleet: str, device: str) -> DeviceRow | None:
        """One device, or None."""
        rows = self._rows(f"SELECT {_DEVICE_COLS} FROM devices WHERE fleet=%s AND device=%s", (fleet, device))
        return self._device_row(rows[0], True) if rows else None

    def windows(self, fleet: str, device: str | None = None, since: float = 0.0, until: float = math.inf,
                name: str | None = None, version: str | None = None, limit: int = 10_000,
                with_sketch: bool = False) -> list[TelemetryWindow]:
        """Telemetry windows (one per model per message) in a device-timestamp range, oldest first."""
        where = ["fleet=%s", "ts>=%s", "ts<=%s"]
        args: list[Any] = [fleet, since, until if math.isfinite(until) else 1e300]
        for col, val in (("device", device), ("name", name), ("version", version)):
            if val is not None:
                where.append(f"{col}=%s")
                args.append(val)
        cols = "device, boot, seq, ts, name, version, count, errors, interval_s, p50, p95, p99, providers" + (
            ", sketch, output" if with_sketch else "")
        rows = self._rows(f"SELECT * FROM (SELECT {cols} FROM windows WHERE {' AND '.join(where)} "
                          "ORDER BY ts DESC LIMIT %s) w ORDER BY ts", (*args, limit))
        out = []
        for d in rows:
            try:
                d["providers"] = _strings_dec.decode(d["providers"])
                if with_sketch:
                    d["sketch"] = _any_dec.decode(d["sketch"])
                    d["output"] = _any_dec.decode(d["output"]) if d["output"] else None
                out.append(TelemetryWindow.from_dict(d))
            except UNREADABLE as exc:
                unreadable("telemetry window", exc)
        return out

    def version_stats(self, fleet: str, since: float, until: float = math.inf) -> list[VersionSketch]:
        """Per (model, version): merged sketch, count and errors over whole minutes overlapping the range."""
        hi = int(until // 60) if math.isfinite(until) else 2**62
        acc: dict[tuple[str, str], list[Any]] = {}
        with self._tx() as conn:
            rows = conn.execute("SELECT name, version, count, errors, sketch FROM version_minutes WHERE fleet=%s "
                                "AND minute>=%s AND minute<=%s AND sketch <> ''",
                                (fleet, int(since // 60), hi)).fetchall()
        for name, version, count, errors, sketch in rows:
            try:
                d = _any_dec.decode(sketch)
                a = acc.setdefault((name, version), [0, 0, SketchSum(d["alpha"])])
                SketchSum(a[2].alpha).add(d)  # a minute that does not merge is left out whole, before it counts
                a[2].add(d)
                a[0] = saturating_add(a[0], int(count))
                a[1] = saturating_add(a[1], int(errors))
            except UNREADABLE as exc:
                unreadable("per-minute version sketch", exc)
        out = []
        for (n, v), a in sorted(acc.items()):
            try:
                out.append(VersionSketch(name=n, version=v, count=a[0], errors=a[1], sketch=a[2].to_ddsketch()))
            except UNREADABLE as exc:
                unreadable("per-minute version sketch", exc)
        return out

    def version_totals(self, fleet: str) -> list[VersionTotal]:
        """Per (model, version), over all time: requests, errors and latency sum, summed as floats (cannot
        overflow the way a bigint sum would)."""
        rows = self._rows("SELECT name, version, coalesce(sum(count::float8), 0) AS count, "
                          "coalesce(sum(errors::float8), 0) AS errors, coalesce(sum(sum_ms), 0) AS sum_ms "
                          "FROM version_minutes WHERE fleet=%s GROUP BY name, version ORDER BY name, version",
                          (fleet,))
        return [VersionTotal(name=r["name"], version=r["version"], count=r["count"], errors=r["errors"],
                             sum_ms=r["sum_ms"]) for r in rows]

    def counts(self, fleet: str) -> dict[str, int]:
        """Row counts per table for one fleet."""
        out = {}
        with self._tx() as conn:
            for table in ("telemetry", "windows", "events", "replies", "devices"):
                out[table] = int(conn.execute(f"SELECT count(*) FROM {table} WHERE fleet=%s",
                                              (fleet,)).fetchone()[0])
        return out

    def events(self, fleet: str, device: str | None = None, since: float = 0.0, limit: int = 500) -> list[EventRow]:
        """The newest events received after ``since``, returned oldest first."""
        where, args = "fleet=%s AND received>%s", [fleet, since]
        if device:
            where += " AND device=%s"
            args.append(device)
        rows = self._rows("SELECT * FROM (SELECT device, boot, seq, ts, received, kind, level, message, data "
                          f"FROM events WHERE {where} ORDER BY received DESC LIMIT %s) e ORDER BY received",
                          (*args, limit))
        out = []
        for r in rows:
            try:
                out.append(EventRow.from_dict({**r, "data": _any_dec.decode(r["data"])}))
            except UNREADABLE as exc:
                unreadable("event", exc)
        return out

    def reply(self, cmd_id: str) -> Reply | None:
        """The stored reply to a command, or None."""
        rows = self._rows("SELECT body FROM replies WHERE cmd_id=%s", (cmd_id,))
        return or_default(None, "reply", lambda: Reply.from_json(rows[0]["body"])) if rows else None

    # commands ------------------------------------------------------------------------------------------------------
    def add_command(self, fleet: str, device: str, cmd: Command, sent: float) -> None:
        """Track a command just sent (idempotent by id)."""
        if cmd.expires is None:
            raise ValueError(f"command {cmd.id} has no expiry: a tracked command must end")
        with self._tx() as conn:
            conn.execute("INSERT INTO commands (id, fleet, device, kind, body, created, expires, sent) "
                         "VALUES (%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                         (cmd.id, fleet, device, cmd.kind, json_text(cmd), cmd.ts, cmd.expires, sent))

    @staticmethod
    def _tracked(r: Mapping[str, Any]) -> TrackedCommand:
        return TrackedCommand(device=r["device"], command=Command.from_json(r["body"]), created=r["created"],
                              expires=r["expires"], sent=r["sent"], sends=int(r["sends"]),
                              replied=bool(r["replied"]))

    def commands_due(self, fleet: str, now: float, grace_s: float, limit: int = 500) -> list[TrackedCommand]:
        """Unanswered, unexpired commands whose device came online after they last went out (and long enough
        ago)."""
        rows = self._rows(
            "SELECT c.*, false AS replied FROM commands c JOIN devices d ON d.fleet = c.fleet AND d.device = c.device "
            "WHERE c.fleet=%s AND c.expires>%s AND d.state='online' AND d.status_ts>c.sent AND d.status_ts<%s "
            "AND NOT EXISTS (SELECT 1 FROM replies r WHERE r.cmd_id = c.id) ORDER BY c.created LIMIT %s",
            (fleet, now, now - grace_s, limit))
        out = []
        for r in rows:
            try:
                out.append(self._tracked(r))
            except UNREADABLE as exc:  # a row this version cannot read is never resent, and never blocks
                unreadable("tracked command", exc)
        return out

    def claim_resend(self, cmd_id: str, last_sent: float, now: float) -> bool:
        """Mark a command sent again unless another controller did since ``last_sent``."""
        with self._tx() as conn:
            return bool(conn.execute("UPDATE commands SET sent=%s, sends=sends+1 WHERE id=%s AND sent=%s",
                                     (now, cmd_id, last_sent)).rowcount == 1)

    def tracked_command(self, cmd_id: str) -> TrackedCommand | None:
        """One tracked command, or None."""
        rows = self._rows("SELECT c.*, EXISTS (SELECT 1 FROM replies r WHERE r.cmd_id = c.id) AS replied "
                          "FROM commands c WHERE c.id=%s", (cmd_id,))
        return self._tracked(rows[0]) if rows else None

    # API tokens ----------------------------------------------------------------------------------------------------
    def add_token(self, token: ApiToken) -> None:
        """Store a new token (hash only)."""
        with self._tx() as conn:
            conn.execute("INSERT INTO api_tokens VALUES (%s,%s,%s,%s,%s,%s,%s)",
                         (token.id, token.name, token.scope, token.fleet, token.created, token.expires,
                          token.secret_hash))

    def token(self, token_id: str) -> ApiToken | None:
        """A token by id, with its hash."""
        rows = self._rows("SELECT * FROM api_tokens WHERE id=%s", (token_id,))
        return ApiToken(**rows[0]) if rows else None

    def tokens(self) -> list[ApiToken]:
        """Every token, oldest first, without hashes."""
        return [ApiToken(**r) for r in self._rows("SELECT id, name, scope, fleet, created, expires FROM api_tokens "
                                                  "ORDER BY created")]

    def revoke_token(self, token_id: str) -> bool:
        """Delete a token."""
        with self._tx() as conn:
            return bool(conn.execute("DELETE FROM api_tokens WHERE id=%s", (token_id,)).rowcount == 1)

    # maintenance ---------------------------------------------------------------------------------------------------
    def prune(self, fleet: str, before: float, chunk: int = 5000) -> dict[str, int]:
        """Delete telemetry, windows, minute sketches, events and replies older than ``before``; counts per table.

        Each chunk is one short transaction (a ctid list of at most ``chunk`` rows), so ingest and the other
        controllers keep writing in between; every controller may prune at once (a row deleted twice is not there
        the second time).
        """
        minute = int(before // 60)
        jobs = {"telemetry": ("ts", before), "windows": ("ts", before), "version_minutes": ("minute", minute),
                "events": ("received", before), "replies": ("received", before), "commands": ("expires", before)}
        out = {}
        for table, (col, cut) in jobs.items():
            total = 0
            while True:
                with self._tx() as conn:
                    n = conn.execute(f"DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} "
                                     f"WHERE fleet=%s AND {col}<%s LIMIT %s))", (fleet, cut, chunk)).rowcount
                total += n
                if n < chunk:
                    break
            out[table] = total
        return out

    # deployments ---------------------------------------------------------------------------------------------------
    # A fenced write applies only while the owner holds an unexpired lease (database clock) on a running deployment.
    _FENCE = (f"EXISTS (SELECT 1 FROM deployments f WHERE f.id=%s AND f.owner=%s AND f.lease_until >= {_NOW} "
              "AND f.state = ANY(%s))")

    def create_deployment(self, deployment: Deployment, targets: Iterable[DeploymentTarget], *,
                          lease_s: float = 0.0) -> None:
        """Store a new deployment and its targets in one transaction (the owner's lease on the database clock)."""
        d = deployment
        now = time.time()
        with self._tx() as conn:
            conn.execute(f"INSERT INTO deployments VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,"
                         f"CASE WHEN %s > 0 THEN {_NOW} + %s ELSE 0 END)",
                         (d.id, d.fleet, d.created or now, now, d.state, json_text(d.selector), d.canary_pct,
                          d.max_p95_regression, d.max_error_increase, json_text(d.bundles), json_text(d.decision),
                          d.message, d.owner, lease_s, lease_s))
            conn.cursor().executemany(
                "INSERT INTO deployment_targets (deployment_id, device, profile, name, version, sha256, "
                "previous_version, phase, state, reason, updated) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                [(d.id, t.device, t.profile, t.name, t.version, t.sha256, t.previous_version, t.phase, t.state,
                  t.reason, now) for t in targets])

    def renew_lease(self, dep_id: str, owner: str, lease_s: float) -> bool:
        """Extend ``owner``'s lease on a running rollout; False when another controller took it over or the
        deployment no longer runs."""
        with self._tx() as conn:
            return bool(conn.execute(f"UPDATE deployments SET lease_until = CASE WHEN %s > 0 THEN {_NOW} + %s ELSE 0 "
                                     "END WHERE id=%s AND owner=%s AND state = ANY(%s)",
                                     (lease_s, lease_s, dep_id, owner, list(RUNNING_STATES))).rowcount == 1)

    def claim_deployments(self, fleet: str, owner: str, lease_s: float) -> list[str]:
        """Take over running rollouts whose lease expired (their controller died or stopped); returns ids.

        ``FOR UPDATE SKIP LOCKED`` plus the expiry check in the update itself: two controllers claiming at once
        never both get a deployment (the second finds it locked, or no longer expired)."""
        with self._tx() as conn:
            rows = conn.execute(
                f"UPDATE deployments SET owner=%s, lease_until={_NOW} + %s WHERE id IN (SELECT id FROM deployments "
                f"WHERE fleet=%s AND state = ANY(%s) AND lease_until < {_NOW} ORDER BY created FOR UPDATE SKIP LOCKED) "
                f"AND lease_until < {_NOW} RETURNING id, created",
                (owner, lease_s, fleet, list(RUNNING_STATES))).fetchall()
        return [r[0] for r in sorted(rows, key=lambda r: r[1])]

    def update_deployment(self, dep_id: str, *, state: str | None = None,
                          decision: DeploymentDecision | None = None, message: str | None = None,
                          owner: str | None = None) -> bool:
        """Set state, decision or message of a deployment (fenced by ``owner``'s lease when given)."""
        vals: dict[str, Any] = {}
        if state is not None:
            vals["state"] = state
        if decision is not None:
            vals["decision"] = json_text(decision)
        if message is not None:
            vals["message"] = message[:4096]
        sets = "".join(f"{k}=%s, " for k in vals)
        where = "id=%s"
        args: list[Any] = [dep_id]
        if owner is not None:
            where += " AND " + self._FENCE
            args += [dep_id, owner, list(RUNNING_STATES)]
        with self._tx() as conn:
            return bool(conn.execute(f"UPDATE deployments SET {sets}updated=%s WHERE {where}",
                                     (*vals.values(), time.time(), *args)).rowcount == 1)

    def update_target(self, dep_id: str, device: str, *, owner: str | None = None, **fields: Any) -> bool:
        """Set fields of one deployment target (fenced by ``owner``'s lease when given)."""
        check_target_fields(list(fields))
        sets = ", ".join(f"{k}=%s" for k in fields)
        where = "deployment_id=%s AND device=%s"
        args: list[Any] = [dep_id, device]
        if owner is not None:
            where += " AND " + self._FENCE
            args += [dep_id, owner, list(RUNNING_STATES)]
        with self._tx() as conn:
            return bool(conn.execute(f"UPDATE deployment_targets SET {sets}, updated=%s WHERE {where}",
                                     (*fields.values(), time.time(), *args)).rowcount == 1)

    @staticmethod
    def _deployment(r: Mapping[str, Any], progress: Mapping[str, int],
                    targets: list[DeploymentTarget] | None = None) -> Deployment:
        with prevalidated():
            return Deployment(
                id=r["id"], fleet=r["fleet"], state=r["state"], selector=_strings_dec.decode(r["selector"]),
                canary_pct=r["canary_pct"], max_p95_regression=r["max_p95_regression"],
                max_error_increase=r["max_error_increase"], bundles=_bundles_dec.decode(r["bundles"]),
                decision=_decision_dec.decode(r["decision"]), created=r["created"], updated=r["updated"],
                message=r["message"], owner=r["owner"], lease_until=r["lease_until"], progress=dict(progress),
                targets=targets)

    def deployments(self, fleet: str, limit: int = 100) -> list[Deployment]:
        """Deployments, newest first, each with ``progress``: target counts per state."""
        with self._tx() as conn:
            cur = conn.cursor(row_factory=dict_row)
            deps = cur.execute("SELECT * FROM deployments WHERE fleet=%s ORDER BY created DESC LIMIT %s",
                               (fleet, limit)).fetchall()
            progress: dict[str, dict[str, int]] = {d["id"]: {} for d in deps}
            for dep_id, state, n in conn.execute(
                    "SELECT deployment_id, state, count(*) FROM deployment_targets WHERE deployment_id = ANY(%s) "
                    "GROUP BY deployment_id, state", (list(progress),)):
                progress[dep_id][state] = int(n)
        out = []
        for d in deps:
            try:
                out.append(self._deployment(d, progress[d["id"]]))
            except UNREADABLE as exc:
                unreadable("deployment", exc)
        return out

    def deployment(self, dep_id: str) -> Deployment | None:
        """One deployment with its targets and progress, or None."""
        with self._tx() as conn:
            cur = conn.cursor(row_factory=dict_row)
            r = cur.execute("SELECT * FROM deployments WHERE id=%s", (dep_id,)).fetchone()
            if r is None:
                return None
            trows = cur.execute("SELECT * FROM deployment_targets WHERE deployment_id=%s ORDER BY phase, device",
                                (dep_id,)).fetchall()
        targets = [DeploymentTarget.from_dict({k: v for k, v in t.items() if k != "deployment_id"}) for t in trows]
        progress: dict[str, int] = {}
        for t in targets:
            progress[t.state] = progress.get(t.state, 0) + 1
        return self._deployment(r, progress, targets)

