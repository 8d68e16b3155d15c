"""The default store: one SQLite file in WAL mode, one connection per thread, versioned migrations.

SQLite runs in WAL mode so the dashboard reads while the ingest writes, and two controller processes on one machine
can share a file (``BEGIN IMMEDIATE`` serialises their writers). Besides the raw rows it keeps two derived views,
updated in the same transaction as the rows they derive from and only for rows that were new:

* ``devices.summary``: each device's latest window per model (p50/p95/p99, throughput, errors, providers);
* ``version_minutes``: one merged latency sketch per (model, version, minute) (:class:`SketchSum`, saturating), so
  fleet-wide percentiles per version come from merged sketches without reading every device's windows.

Reads never fail on a stored value: a row this version cannot read (written by an older or broken controller, or
by hand; out of today's ranges, not even JSON) is left out of a list, or shows its readable parts, and is logged
once per table — the rest of the fleet is always answered (issue 18: one record made /metrics and /api/devices
answer 500).
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec
from edgefleet.sdk.errors import ConfigError, ProtocolError
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
from ._derive import derive, merge_minute
from ._read import UNREADABLE as _UNREADABLE
from ._read import or_default as _or
from ._read import unreadable as _unreadable
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

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "SQLiteStore"]


# Each migration runs once, in order, in its own transaction; the applied versions are in schema_migrations.
MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (1, "initial schema", """
        CREATE TABLE devices (
            fleet TEXT NOT NULL, device TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'unknown', boot TEXT NOT NULL DEFAULT '',
            status_ts REAL NOT NULL DEFAULT 0, description TEXT NOT NULL DEFAULT '{}',
            profile TEXT NOT NULL DEFAULT '', tags TEXT NOT NULL DEFAULT '[]',
            last_seen REAL NOT NULL DEFAULT 0, summary TEXT NOT NULL DEFAULT '[]', summary_ts REAL NOT NULL DEFAULT 0,
            process TEXT NOT NULL DEFAULT '{}', updated REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (fleet, device));
        CREATE INDEX devices_updated ON devices(fleet, updated);
        CREATE TABLE telemetry (
            fleet TEXT NOT NULL, device TEXT NOT NULL, boot TEXT NOT NULL, seq INTEGER NOT NULL,
            ts REAL NOT NULL, received REAL NOT NULL, interval_s REAL NOT NULL, dropped INTEGER NOT NULL,
            process TEXT NOT NULL, system TEXT NOT NULL,
            PRIMARY KEY (fleet, device, boot, seq)) WITHOUT ROWID;
        CREATE TABLE windows (
            fleet TEXT NOT NULL, device TEXT NOT NULL, boot TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL,
            name TEXT NOT NULL, version TEXT NOT NULL, count INTEGER NOT NULL, errors INTEGER NOT NULL,
            interval_s REAL NOT NULL, p50 REAL, p95 REAL, p99 REAL, providers TEXT NOT NULL, sketch TEXT NOT NULL);
        CREATE INDEX windows_device_ts ON windows(fleet, device, ts);
        CREATE INDEX windows_version_ts ON windows(fleet, name, version, ts);
        CREATE TABLE version_minutes (
            fleet TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL, minute INTEGER NOT NULL,
            count INTEGER NOT NULL, errors INTEGER NOT NULL, sum_ms REAL NOT NULL, sketch TEXT NOT NULL,
            PRIMARY KEY (fleet, name, version, minute)) WITHOUT ROWID;
        CREATE TABLE events (
            fleet TEXT NOT NULL, device TEXT NOT NULL, boot TEXT NOT NULL, seq INTEGER NOT NULL,
            ts REAL NOT NULL, received REAL NOT NULL, kind TEXT NOT NULL, level TEXT NOT NULL,
            message TEXT NOT NULL, data TEXT NOT NULL,
            PRIMARY KEY (fleet, device, boot, seq)) WITHOUT ROWID;
        CREATE INDEX events_received ON events(fleet, received);
        CREATE TABLE replies (
            cmd_id TEXT PRIMARY KEY, fleet TEXT NOT NULL, device TEXT NOT NULL, ts REAL NOT NULL,
            received REAL NOT NULL, status TEXT NOT NULL, body TEXT NOT NULL);
        CREATE TABLE deployments (
            id TEXT PRIMARY KEY, fleet TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
            state TEXT NOT NULL, selector TEXT NOT NULL, canary_pct REAL NOT NULL,
            max_p95_regression REAL NOT NULL, max_error_increase REAL NOT NULL,
            bundles TEXT NOT NULL, decision TEXT NOT NULL DEFAULT '{}', message TEXT NOT NULL DEFAULT '');
        CREATE INDEX deployments_fleet ON deployments(fleet, created);
        CREATE TABLE deployment_targets (
            deployment_id TEXT NOT NULL REFERENCES deployments(id), device TEXT NOT NULL,
            profile TEXT NOT NULL, name TEXT NOT NULL DEFAULT '', version TEXT NOT NULL DEFAULT '',
            sha256 TEXT NOT NULL DEFAULT '', previous_version TEXT NOT NULL DEFAULT '',
            phase TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
            cmd_id TEXT NOT NULL DEFAULT '', rollback_cmd_id TEXT NOT NULL DEFAULT '',
            activated REAL NOT NULL DEFAULT 0, updated REAL NOT NULL,
            PRIMARY KEY (deployment_id, device));
        CREATE INDEX targets_cmd ON deployment_targets(cmd_id);
        CREATE INDEX targets_rollback_cmd ON deployment_targets(rollback_cmd_id);
    """),
    (2, "time indexes for retention", """
        CREATE INDEX telemetry_ts ON telemetry(fleet, ts);
        CREATE INDEX windows_ts ON windows(fleet, ts);
    """),
    (3, "rollout leases", """
        ALTER TABLE deployments ADD COLUMN owner TEXT NOT NULL DEFAULT '';
        ALTER TABLE deployments ADD COLUMN lease_until REAL NOT NULL DEFAULT 0;
    """),
    # Queries by version without a device are time-bounded and served by windows_ts; fleet-wide per-version
    # figures come from version_minutes. One index fewer to update per stored window.
    (4, "drop the per-version windows index", """
        DROP INDEX IF EXISTS windows_version_ts;
    """),
    # Every command a controller sends, until answered or expired (fleet/commands.py resends after a reconnect).
    (5, "tracked commands", """
        CREATE TABLE commands (
            id TEXT PRIMARY KEY, fleet TEXT NOT NULL, device TEXT NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL,
            created REAL NOT NULL, expires REAL NOT NULL, sent REAL NOT NULL, sends INTEGER NOT NULL DEFAULT 1);
        CREATE INDEX commands_expires ON commands(fleet, expires);
    """),
    # API tokens (fleet/auth.py): the public id, a SHA-256 of the secret, never the secret.
    (6, "api tokens", """
        CREATE TABLE api_tokens (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, scope TEXT NOT NULL, fleet TEXT NOT NULL,
            created REAL NOT NULL, expires REAL NOT NULL, secret_hash TEXT NOT NULL);
    """),
    # The output statistic's sketch of each window (drift, sdk/outputs.py), JSON; NULL when the bundle names none.
    (7, "output statistics in windows", """
        ALTER TABLE windows ADD COLUMN output TEXT;
    """),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
_INT64_MAX = 2**63 - 1

_DEVICE_COLS = ("device, state, boot, status_ts, description, profile, tags, last_seen, summary, summary_ts, process, "
                "updated")
_enc = msgspec.json.Encoder()
_dumps = _enc.encode  # bytes; stored as TEXT via decode below
_summary_dec: Decoder[list[ModelSummary]] = Decoder(list[ModelSummary], "devices.summary")
_process_dec: Decoder[ProcessStats] = Decoder(ProcessStats, "devices.process")
_desc_dec: Decoder[Description] = Decoder(Description, "devices.description")
_strings_dec: Decoder[list[str]] = Decoder(list[str])
_any_dec = msgspec.json.Decoder()
_bundles_dec: Decoder[list[BundleInfo]] = Decoder(list[BundleInfo], "deployments.bundles")
_decision_dec: Decoder[DeploymentDecision] = Decoder(DeploymentDecision, "deployments.decision")


def _text(obj: Any) -> str:
    return _dumps(obj).decode()


class SQLiteStore(Store):
    """The default store (see the module docstring)."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._migrate()

    def __str__(self) -> str:
        return f"sqlite:///{self.path}"

    # connections ---------------------------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                # isolation_level=None: we issue BEGIN IMMEDIATE ourselves so a writer takes the lock up front and
                # never fails half-way with "database is locked" when another controller writes the same file.
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=self._busy_ms / 1000)
                conn.execute("PRAGMA journal_mode=WAL")
                # FULL: a commit is on disk before it returns, so a receipt (sent after the commit) never names a
                # record a power loss could undo while the agent has already deleted it. Measured: within the noise
                # for ingest batches of 500 records, 2-3x slower for batches of 5 (an fsync each; docs/reliability.md).
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
                conn.row_factory = sqlite3.Row
            except sqlite3.Error as exc:
                raise ConfigError(f"cannot open the store {self.path}: {exc}") from exc
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _tx(self) -> _Tx:
        return _Tx(self._conn())

    def close(self) -> None:
        """Close every connection this store opened."""
        with self._lock:
            for c in self._all:
                c.close()
            self._all.clear()
        self._local = threading.local()

    def _migrate(self) -> None:
        with self._tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                      "applied REAL NOT NULL)")
            done = {r[0] for r in c.execute("SELECT version FROM schema_migrations")}
            if done and max(done) > SCHEMA_VERSION:
                raise ConfigError(f"store {self.path} has schema version {max(done)}, newer than this edgefleet "
                                  f"({SCHEMA_VERSION}); upgrade edgefleet")
            for version, name, sql in MIGRATIONS:
                if version in done:
                    continue
                for stmt in (s.strip() for s in sql.split(";")):
                    if stmt:
                        c.execute(stmt)
                c.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, time.time()))

    def schema_version(self) -> int:
        """The highest applied migration."""
        return int(self._conn().execute("SELECT max(version) FROM schema_migrations").fetchone()[0])

    # ingest --------------------------------------------------------------------------------------------------------
    def write(self, batch: Batch) -> WriteResult:
        """Write statuses, telemetry, events and replies in one transaction, ignoring replays."""
        fleet, now = batch.fleet, batch.received
        n_tel = n_ev = n_rep = n_st = 0
        with self._tx() as c:
            for st in batch.statuses:
                n_st += self._write_status(c, fleet, st, now)
            if batch.telemetry:
                n_tel = self._write_telemetry(c, fleet, batch.telemetry, now)
            for ev in batch.events:
                if ev.boot in CONTROLLER_BOOTS:
                    continue  # only a controller records these: an agent's claiming such a boot is ignored
                cur = self._insert_event(c, fleet, ev, now)
                if cur.rowcount == 1:
                    n_ev += 1
                    self._apply_moves(c, target_moves(ev), now)
            for ev in batch.controller_events:
                if self._insert_event(c, fleet, ev, now).rowcount == 1:
                    n_ev += 1
            for rep in batch.replies:
                cur = c.execute("INSERT OR IGNORE INTO replies VALUES (?,?,?,?,?,?,?)",
                                (rep.id, fleet, rep.device, rep.ts, now, rep.status, _text(rep)))
                if cur.rowcount == 1:
                    n_rep += 1
                    self._apply_moves(c, target_moves(rep), now)
        return WriteResult(telemetry=n_tel, events=n_ev, replies=n_rep, statuses=n_st)

    @staticmethod
    def _insert_event(c: sqlite3.Connection, fleet: str, ev: Event, now: float) -> sqlite3.Cursor:
        return c.execute("INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?,?,?,?)",
                         (fleet, ev.device, ev.boot, ev.seq, ev.ts, now, ev.kind, ev.level, ev.message,
                          _text(ev.data)))

    @classmethod
    def _write_status(cls, c: sqlite3.Connection, fleet: str, st: Status, now: float) -> int:
        old = c.execute("SELECT state FROM devices WHERE fleet=? AND device=?", (fleet, st.device)).fetchone()
        n = cls._upsert_status(c, fleet, st, now)
        # A change between known states is a liveness event (a device's first status is not: a new controller
        # would otherwise record one for every retained status of the fleet).
        if n and old is not None and old[0] in ("online", "offline") and old[0] != st.state:
            cls._insert_event(c, fleet, liveness_event(st.device, st.state == "online", "status", now, boot=st.boot),
                              now)
        return n

    @staticmethod
    def _upsert_status(c: sqlite3.Connection, fleet: str, st: Status, now: float) -> int:
        desc = st.description
        # Statuses can arrive out of order across boots: a status of another boot must be newer to win. Within a
        # boot, "offline" always wins: it is usually the Last Will, composed before the birth it follows, so its
        # timestamp is older. An offline will carries no description: keep the last one so the profile stays known.
        has = desc is not None
        cur = c.execute(
            "INSERT INTO devices (fleet, device, state, boot, status_ts, description, profile, tags, updated) "
            "VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(fleet, device) DO UPDATE SET "
            "state=excluded.state, boot=excluded.boot, updated=excluded.updated, "
            "status_ts=max(excluded.status_ts, devices.status_ts), "
            "description=CASE WHEN ? THEN excluded.description ELSE devices.description END, "
            "profile=CASE WHEN ? THEN excluded.profile ELSE devices.profile END, "
            "tags=CASE WHEN ? THEN excluded.tags ELSE devices.tags END "
            "WHERE excluded.status_ts >= devices.status_ts "
            "OR (excluded.boot = devices.boot AND excluded.state = 'offline')",
            (fleet, st.device, st.state, st.boot, st.ts, _text(desc) if desc is not None else "{}",
             desc.profile if desc is not None else "", _text(desc.tags) if desc is not None else "[]", now,
             has, has, has),
        )
        return cur.rowcount

    @staticmethod
    def _write_telemetry(c: sqlite3.Connection, fleet: str, records: list[Telemetry], now: float) -> int:
        rows = [(fleet, t.device, t.boot, t.seq, t.ts, now, t.interval_s, t.dropped, _text(t.process),
                 _text(t.system)) for t in records]
        insert = "INSERT OR IGNORE INTO telemetry VALUES (?,?,?,?,?,?,?,?,?,?)"
        # Fast path: one executemany; when every row was new (the normal case) every record feeds the derived views.
        # Otherwise (a replay in the batch) redo it row by row to learn which ones were new.
        c.execute("SAVEPOINT telemetry_batch")
        cur = c.executemany(insert, rows)
        if cur.rowcount == len(rows):
            fresh = records
        else:
            c.execute("ROLLBACK TO telemetry_batch")
            fresh = [t for t, row in zip(records, rows, strict=True) if c.execute(insert, row).rowcount == 1]
        c.execute("RELEASE telemetry_batch")
        d = derive(fresh)
        if d.windows:
            c.executemany("INSERT INTO windows VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                          [(fleet, *w) for w in d.windows])
        c.executemany(
            "INSERT INTO devices (fleet, device, last_seen, summary, summary_ts, process, updated) "
            "VALUES (?,?,?,?,?,?,?) ON CONFLICT(fleet, device) DO UPDATE SET "
            "last_seen=max(devices.last_seen, excluded.last_seen), updated=excluded.updated, "
            "summary=CASE WHEN excluded.summary_ts >= devices.summary_ts THEN excluded.summary "
            "ELSE devices.summary END, "
            "process=CASE WHEN excluded.summary_ts >= devices.summary_ts THEN excluded.process "
            "ELSE devices.process END, "
            "summary_ts=max(devices.summary_ts, excluded.summary_ts)",
            [(fleet, dev, now, summary, ts, process_json, now)
             for dev, (ts, summary, process_json) in d.latest.items()])
        SQLiteStore._revive(c, fleet, {(t.device, t.boot) for t in fresh}, now)
        for (name, version, minute), acc in d.minutes.items():
            row = c.execute("SELECT count, errors, sketch FROM version_minutes WHERE fleet=? AND name=? AND version=? "
                            "AND minute=?", (fleet, name, version, minute)).fetchone()
            count, errors, sum_ms, sketch = merge_minute(acc, None if row is None else tuple(row))
            c.execute("INSERT OR REPLACE INTO version_minutes VALUES (?,?,?,?,?,?,?,?)",
                      (fleet, name, version, minute, count, errors, sum_ms, sketch))
        return len(fresh)

    @classmethod
    def _revive(cls, c: sqlite3.Connection, fleet: str, sources: set[tuple[str, str]], now: float) -> None:
        """Devices marked offline by silence whose telemetry (same boot) comes again are online again. Not after a
        Last Will or shutdown status: telemetry sent before the will may be stored after it."""
        if not sources:
            return
        devices = sorted({d for d, _ in sources})
        offline = c.execute("SELECT device, boot FROM devices WHERE fleet=? AND state='offline' "
                            "AND device IN (SELECT value FROM json_each(?))", (fleet, _text(devices))).fetchall()
        for dev, boot in offline:
            if (dev, boot) not in sources:
                continue
            last = c.execute("SELECT data FROM events WHERE fleet=? AND device=? AND boot=? ORDER BY seq DESC LIMIT 1",
                             (fleet, dev, LIVENESS_BOOT)).fetchone()
            if last is None or '"reason":"silence"' not in last[0]:
                continue
            c.execute("UPDATE devices SET state='online', updated=? WHERE fleet=? AND device=?", (now, fleet, dev))
            cls._insert_event(c, fleet, liveness_event(dev, True, "telemetry", now, boot=boot), now)

    def mark_silent(self, fleet: str, before: float, now: float) -> list[str]:
        """Mark offline the online devices not heard from since ``before``, each with a ``device.offline`` event."""
        with self._tx() as c:
            rows = c.execute("SELECT device, boot, updated FROM devices WHERE fleet=? AND state='online' AND updated<? "
                             "ORDER BY device", (fleet, before)).fetchall()
            for dev, boot, updated in rows:
                c.execute("UPDATE devices SET state='offline', updated=? WHERE fleet=? AND device=?", (now, fleet, dev))
                self._insert_event(c, fleet, liveness_event(dev, False, "silence", now, boot=boot,
                                                            quiet_s=now - updated), now)
        return [r[0] for r in rows]

    @staticmethod
    def _apply_moves(c: sqlite3.Connection, moves: Iterable[TargetMove], now: float) -> None:
        for mv in moves:
            if mv.state is None:
                c.execute(f"UPDATE deployment_targets SET reason=?, updated=? WHERE {mv.column}=?",
                          (mv.reason[:4096], now, mv.cmd_id))
                continue
            rows = c.execute(f"SELECT deployment_id, device, state FROM deployment_targets WHERE {mv.column}=?",
                             (mv.cmd_id,)).fetchall()
            for row in rows:
                if not advances(row["state"], mv.state):
                    continue
                extra = ", activated=?" if mv.state == "active" else ""
                params: list[Any] = [mv.state, mv.reason[:4096], now]
                if mv.state == "active":
                    params.append(now)
                c.execute(f"UPDATE deployment_targets SET state=?, reason=?, updated=?{extra} "
                          "WHERE deployment_id=? AND device=?", (*params, row["deployment_id"], row["device"]))

    # reads ---------------------------------------------------------------------------------------------------------
    @staticmethod
    def _device_row(r: sqlite3.Row, full: bool) -> DeviceRow:
        # Rows hold what ingest validated: decode them without validating every field again.
        # A part that does not read is shown empty: the device is still listed.
        with prevalidated():
            return DeviceRow(
                device=r["device"], state=r["state"], boot=r["boot"], profile=r["profile"],
                tags=_or([], "devices.tags", lambda: _strings_dec.decode(r["tags"])), last_seen=r["last_seen"],
                models=_or([], "devices.summary", lambda: _summary_dec.decode(r["summary"])),
                telemetry_ts=r["summary_ts"],
                process=_or(ProcessStats(), "devices.process", lambda: _process_dec.decode(r["process"])),
                updated=r["updated"], status_ts=r["status_ts"] if full else None,
                description=_or(None, "devices.description", lambda: _desc_dec.decode(r["description"]))
                if full and r["description"] != "{}" else None)

    def devices(self, fleet: str, changed_since: float = 0.0, full: bool = True) -> list[DeviceRow]:
        """Every known device (or those changed after ``changed_since``, controller clock), sorted by id."""
        rows = self._conn().execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE fleet=? AND updated>? ORDER BY device",
                                    (fleet, changed_since)).fetchall()
        return [self._device_row(r, full) for r in rows]

    def devices_json(self, fleet: str, changed_since: float = 0.0, limit: int | None = None) -> tuple[int, str]:
        """``(matching, JSON array)`` of the compact rows built by SQLite from columns that already hold JSON (the
        same fields as ``DeviceRow`` without description; a test checks the two agree)."""
        c = self._conn()
        total = int(c.execute("SELECT count(*) FROM devices WHERE fleet=? AND updated>?",
                              (fleet, changed_since)).fetchone()[0])
        row = c.execute(
            # Times through printf('%!.17g'): SQLite writes a REAL into JSON with 15 significant digits, which
            # would round a timestamp differently from the typed row.
            "SELECT json_group_array(json_object('device', device, 'state', state, 'boot', boot, "
            "'profile', profile, 'tags', json(tags), 'last_seen', json(printf('%!.17g', last_seen)), "
            "'models', json(summary), 'telemetry_ts', json(printf('%!.17g', summary_ts)), 'process', json(process), "
            "'updated', json(printf('%!.17g', updated)))) "
            "FROM (SELECT * FROM devices WHERE fleet=? AND updated>? ORDER BY device LIMIT ?)",
            (fleet, changed_since, -1 if limit is None else limit)).fetchone()
        return total, row[0]

    def device(self, fleet: str, device: str) -> DeviceRow | None:
        """One device, or None."""
        r = self._conn().execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE fleet=? AND device=?",
                                 (fleet, device)).fetchone()
        return self._device_row(r, True) if r else None

    def windows(self, fleet: str, device: str | None = None, since: float = 0.0, until: float = math.inf,
                name: str | None = None, version: str | None = None, limit: int = 10_000,
                with_sketch: bool = False) -> list[TelemetryWindow]:
        """Telemetry windows (one per model per message) in a device-timestamp range, oldest first."""
        where, args = ["fleet=?", "ts>=?", "ts<=?"], [fleet, since, until if math.isfinite(until) else 1e300]
        for col, val in (("device", device), ("name", name), ("version", version)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        cols = "device, boot, seq, ts, name, version, count, errors, interval_s, p50, p95, p99, providers" + (
            ", sketch, output" if with_sketch else "")
        # The newest `limit` rows, returned oldest first: a chart wants the recent end of a long range.
        rows = self._conn().execute(
            f"SELECT * FROM (SELECT {cols} FROM windows WHERE {' AND '.join(where)} ORDER BY ts DESC LIMIT ?) "
            "ORDER BY ts",
            (*args, limit)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            try:
                d["providers"] = _strings_dec.decode(d["providers"])
                if with_sketch:
                    d["sketch"] = _any_dec.decode(d["sketch"])
                    d["output"] = _any_dec.decode(d["output"]) if d["output"] else None
                out.append(TelemetryWindow.from_dict(d))
            except _UNREADABLE as exc:
                _unreadable("telemetry window", exc)
        return out

    def version_stats(self, fleet: str, since: float, until: float = math.inf) -> list[VersionSketch]:
        """Per (model, version): merged sketch, count and errors over whole minutes overlapping the range."""
        hi = int(until // 60) if math.isfinite(until) else 2**62
        acc: dict[tuple[str, str], list[Any]] = {}
        for r in self._conn().execute("SELECT name, version, count, errors, sketch FROM version_minutes WHERE fleet=? "
                                      "AND minute>=? AND minute<=?", (fleet, int(since // 60), hi)):
            try:
                d = _any_dec.decode(r["sketch"])
                a = acc.setdefault((r["name"], r["version"]), [0, 0, SketchSum(d["alpha"])])
                probe = SketchSum(a[2].alpha)
                probe.add(d)  # a minute that does not merge is left out whole, before it touches the sum
                a[2].add(d)
                a[0] = saturating_add(a[0], int(r["count"]))
                a[1] = saturating_add(a[1], int(r["errors"]))
            except _UNREADABLE as exc:
                _unreadable("per-minute version sketch", exc)
        out = []
        for (n, v), a in sorted(acc.items()):
            try:
                out.append(VersionSketch(name=n, version=v, count=a[0], errors=a[1], sketch=a[2].to_ddsketch()))
            except _UNREADABLE as exc:
                _unreadable("per-minute version sketch", exc)
        return out

    def prune(self, fleet: str, before: float, chunk: int = 5000) -> dict[str, int]:
        """Delete telemetry, windows, minute sketches, events and replies older than ``before``; counts per table.

        Deletes run in small transactions so ingest (and other controllers) keep writing in between.
        """
        minute = int(before // 60)
        jobs = {
            "telemetry": ("DELETE FROM telemetry WHERE (fleet, device, boot, seq) IN (SELECT fleet, device, boot, seq "
                          "FROM telemetry WHERE fleet=? AND ts<? LIMIT ?)", (fleet, before)),
            "windows": ("DELETE FROM windows WHERE rowid IN (SELECT rowid FROM windows WHERE fleet=? AND ts<? LIMIT ?)",
                        (fleet, before)),
            "version_minutes": ("DELETE FROM version_minutes WHERE (fleet, name, version, minute) IN (SELECT fleet, "
                                "name, version, minute FROM version_minutes WHERE fleet=? AND minute<? LIMIT ?)",
                                (fleet, minute)),
            "events": ("DELETE FROM events WHERE (fleet, device, boot, seq) IN (SELECT fleet, device, boot, seq "
                       "FROM events WHERE fleet=? AND received<? LIMIT ?)", (fleet, before)),
            "replies": ("DELETE FROM replies WHERE cmd_id IN (SELECT cmd_id FROM replies WHERE fleet=? AND "
                        "received<? LIMIT ?)", (fleet, before)),
            "commands": ("DELETE FROM commands WHERE id IN (SELECT id FROM commands WHERE fleet=? AND expires<? "
                         "LIMIT ?)", (fleet, before)),
        }
        out = {}
        for table, (sql, args) in jobs.items():
            total = 0
            while True:
                with self._tx() as c:
                    n = c.execute(sql, (*args, chunk)).rowcount
                total += n
                if n < chunk:
                    break
            out[table] = total
        return out

    def version_totals(self, fleet: str) -> list[VersionTotal]:
        """Per (model, version), over all time: requests, errors and latency sum (``total()``: a float sum, which
        cannot overflow the way SQLite's integer ``sum()`` does)."""
        rows = self._conn().execute("SELECT name, version, total(count) AS count, total(errors) AS errors, "
                                    "total(sum_ms) AS sum_ms FROM version_minutes WHERE fleet=? GROUP BY name, "
                                    "version ORDER BY name, version", (fleet,))
        return [VersionTotal(name=r["name"], version=r["version"], count=r["count"], errors=r["errors"],
                             sum_ms=r["sum_ms"]) for r in rows]

    def counts(self, fleet: str) -> dict[str, int]:
        """Row counts per table for one fleet."""
        c = self._conn()
        out = {}
        for table in ("telemetry", "windows", "events", "replies", "devices"):
            out[table] = int(c.execute(f"SELECT count(*) FROM {table} WHERE fleet=?", (fleet,)).fetchone()[0])
        return out

    def events(self, fleet: str, device: str | None = None, since: float = 0.0, limit: int = 500) -> list[EventRow]:
        """The newest events received after ``since``, returned oldest first."""
        where, args = "fleet=? AND received>?", [fleet, since]
        if device:
            where += " AND device=?"
            args.append(device)
        rows = self._conn().execute("SELECT * FROM (SELECT device, boot, seq, ts, received, kind, level, message, "
                                    f"data FROM events WHERE {where} ORDER BY received DESC LIMIT ?) ORDER BY received",
                                    (*args, limit)).fetchall()
        out = []
        for r in rows:
            try:
                out.append(EventRow.from_dict({**dict(r), "data": _any_dec.decode(r["data"])}))
            except _UNREADABLE as exc:
                _unreadable("event", exc)
        return out

    def reply(self, cmd_id: str) -> Reply | None:
        """The stored reply to a command, or None."""
        r = self._conn().execute("SELECT body FROM replies WHERE cmd_id=?", (cmd_id,)).fetchone()
        return _or(None, "reply", lambda: Reply.from_json(r["body"])) if r else None

    # commands ------------------------------------------------------------------------------------------------------
    def add_command(self, fleet: str, device: str, cmd: Command, sent: float) -> None:
        """Track a command just sent (idempotent by id)."""
        if cmd.expires is None:
            raise ValueError(f"command {cmd.id} has no expiry: a tracked command must end")
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO commands (id, fleet, device, kind, body, created, expires, sent) "
                      "VALUES (?,?,?,?,?,?,?,?)", (cmd.id, fleet, device, cmd.kind, _text(cmd), cmd.ts, cmd.expires,
                                                   sent))

    @staticmethod
    def _tracked(r: sqlite3.Row) -> TrackedCommand:
        return TrackedCommand(device=r["device"], command=Command.from_json(r["body"]), created=r["created"],
                              expires=r["expires"], sent=r["sent"], sends=r["sends"], replied=bool(r["replied"]))

    def commands_due(self, fleet: str, now: float, grace_s: float, limit: int = 500) -> list[TrackedCommand]:
        """Unanswered, unexpired commands whose device came online after they last went out (and long enough
        ago)."""
        rows = self._conn().execute(
            "SELECT c.*, 0 AS replied FROM commands c JOIN devices d ON d.fleet = c.fleet AND d.device = c.device "
            "WHERE c.fleet=? AND c.expires>? AND d.state='online' AND d.status_ts>c.sent AND d.status_ts<? "
            "AND NOT EXISTS (SELECT 1 FROM replies r WHERE r.cmd_id = c.id) ORDER BY c.created LIMIT ?",
            (fleet, now, now - grace_s, limit)).fetchall()
        out = []
        for r in rows:
            try:
                out.append(self._tracked(r))
            except ProtocolError:  # a row this version cannot read is never resent, and never blocks
                continue
        return out

    def claim_resend(self, cmd_id: str, last_sent: float, now: float) -> bool:
        """Mark a command sent again unless another controller did since ``last_sent``."""
        with self._tx() as c:
            return c.execute("UPDATE commands SET sent=?, sends=sends+1 WHERE id=? AND sent=?",
                             (now, cmd_id, last_sent)).rowcount == 1

    def tracked_command(self, cmd_id: str) -> TrackedCommand | None:
        """One tracked command, or None."""
        r = self._conn().execute("SELECT c.*, EXISTS (SELECT 1 FROM replies r WHERE r.cmd_id = c.id) AS replied "
                                 "FROM commands c WHERE c.id=?", (cmd_id,)).fetchone()
        return self._tracked(r) if r else None

    # API tokens ----------------------------------------------------------------------------------------------------
    def add_token(self, token: ApiToken) -> None:
        """Store a new token (hash only)."""
        with self._tx() as c:
            c.execute("INSERT INTO api_tokens VALUES (?,?,?,?,?,?,?)", (token.id, token.name, token.scope,
                                                                        token.fleet, token.created, token.expires,
                                                                        token.secret_hash))

    def token(self, token_id: str) -> ApiToken | None:
        """A token by id, with its hash."""
        r = self._conn().execute("SELECT * FROM api_tokens WHERE id=?", (token_id,)).fetchone()
        return ApiToken(**dict(r)) if r else None

    def tokens(self) -> list[ApiToken]:
        """Every token, oldest first, without hashes."""
        rows = self._conn().execute("SELECT id, name, scope, fleet, created, expires FROM api_tokens "
                                    "ORDER BY created").fetchall()
        return [ApiToken(**dict(r)) for r in rows]

    def revoke_token(self, token_id: str) -> bool:
        """Delete a token."""
        with self._tx() as c:
            return c.execute("DELETE FROM api_tokens WHERE id=?", (token_id,)).rowcount == 1

    # deployments ---------------------------------------------------------------------------------------------------
    def create_deployment(self, deployment: Deployment, targets: Iterable[DeploymentTarget], *,
                          lease_s: float = 0.0) -> None:
        """Store a new deployment and its targets in one transaction (the owner's lease from this host's clock)."""
        d = deployment
        now = time.time()
        with self._tx() as c:
            c.execute("INSERT INTO deployments VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (d.id, d.fleet, d.created or now, now, d.state, _text(d.selector), d.canary_pct,
                       d.max_p95_regression, d.max_error_increase, _text(d.bundles), _text(d.decision), d.message,
                       d.owner, now + lease_s if lease_s > 0 else 0.0))
            c.executemany(
                "INSERT INTO deployment_targets (deployment_id, device, profile, name, version, sha256, "
                "previous_version, phase, state, reason, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [(d.id, t.device, t.profile, t.name, t.version, t.sha256, t.previous_version, t.phase, t.state,
                  t.reason, now) for t in targets])

    # A fenced write applies only while the owner holds an unexpired lease on a running deployment.
    _FENCE = (f"EXISTS (SELECT 1 FROM deployments f WHERE f.id=? AND f.owner=? AND f.lease_until>=? "
              f"AND f.state IN ({','.join('?' * len(RUNNING_STATES))}))")

    def renew_lease(self, dep_id: str, owner: str, lease_s: float) -> bool:
        """Extend ``owner``'s lease on a running rollout; False when another controller has taken it over or the
        deployment is no longer running (an operator rolled it back)."""
        marks = ",".join("?" * len(RUNNING_STATES))
        now = time.time()
        with self._tx() as c:
            return c.execute(f"UPDATE deployments SET lease_until=? WHERE id=? AND owner=? AND state IN ({marks})",
                             (now + lease_s if lease_s > 0 else 0.0, dep_id, owner, *RUNNING_STATES)).rowcount == 1

    def claim_deployments(self, fleet: str, owner: str, lease_s: float) -> list[str]:
        """Take over running rollouts whose lease expired (their controller died); returns ids."""
        marks = ",".join("?" * len(RUNNING_STATES))
        with self._tx() as c:  # BEGIN IMMEDIATE: two controllers claiming at once cannot both win a deployment
            now = time.time()
            ids = [r[0] for r in c.execute(f"SELECT id FROM deployments WHERE fleet=? AND state IN ({marks}) "
                                           "AND lease_until<? ORDER BY created", (fleet, *RUNNING_STATES, now))]
            for dep_id in ids:
                c.execute("UPDATE deployments SET owner=?, lease_until=? WHERE id=?", (owner, now + lease_s, dep_id))
        return ids

    def update_deployment(self, dep_id: str, *, state: str | None = None,
                          decision: DeploymentDecision | None = None, message: str | None = None,
                          owner: str | None = None) -> bool:
        """Set state, decision or message of a deployment (fenced by ``owner``'s lease when given)."""
        vals: dict[str, Any] = {}
        if state is not None:
            vals["state"] = state
        if decision is not None:
            vals["decision"] = _text(decision)
        if message is not None:
            vals["message"] = message[:4096]
        sets = "".join(f"{k}=?, " for k in vals)
        where = "id=?"
        args: list[Any] = [dep_id]
        with self._tx() as c:
            if owner is not None:
                where += " AND " + self._FENCE
                args += [dep_id, owner, time.time(), *RUNNING_STATES]
            return c.execute(f"UPDATE deployments SET {sets}updated=? WHERE {where}",
                             (*vals.values(), time.time(), *args)).rowcount == 1

    def update_target(self, dep_id: str, device: str, *, owner: str | None = None, **fields: Any) -> bool:
        """Set fields of one deployment target (state, reason, cmd_id, rollback_cmd_id, activated, ...)."""
        check_target_fields(list(fields))
        sets = ", ".join(f"{k}=?" for k in fields)
        where = "deployment_id=? AND device=?"
        args: list[Any] = [dep_id, device]
        with self._tx() as c:
            if owner is not None:
                where += " AND " + self._FENCE
                args += [dep_id, owner, time.time(), *RUNNING_STATES]
            return c.execute(f"UPDATE deployment_targets SET {sets}, updated=? WHERE {where}",
                             (*fields.values(), time.time(), *args)).rowcount == 1

    @staticmethod
    def _deployment(r: sqlite3.Row, progress: Mapping[str, int],
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
        c = self._conn()
        out = []
        for r in c.execute("SELECT * FROM deployments WHERE fleet=? ORDER BY created DESC LIMIT ?",
                           (fleet, limit)).fetchall():
            progress = {s: n for s, n in c.execute(
                "SELECT state, count(*) FROM deployment_targets WHERE deployment_id=? GROUP BY state", (r["id"],))}
            try:
                out.append(self._deployment(r, progress))
            except _UNREADABLE as exc:
                _unreadable("deployment", exc)
        return out

    def deployment(self, dep_id: str) -> Deployment | None:
        """One deployment with its targets and progress, or None."""
        c = self._conn()
        r = c.execute("SELECT * FROM deployments WHERE id=?", (dep_id,)).fetchone()
        if r is None:
            return None
        targets = [DeploymentTarget.from_dict({k: t[k] for k in t.keys() if k != "deployment_id"}) for t in c.execute(
            "SELECT * FROM deployment_targets WHERE deployment_id=? ORDER BY phase, device", (dep_id,))]
        progress: dict[str, int] = {}
        for t in targets:
            progress[t.state] = progress.get(t.state, 0) + 1
        return self._deployment(r, progress, targets)


class _Tx:
    """``with`` block around BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
