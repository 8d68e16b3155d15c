"""Where the controller keeps what the fleet reports: a ``Store`` interface and its SQLite implementation.

The interface is what a PostgreSQL store would implement as well (docs/fleet.md, "Store interface"): every method
is one transaction, every write is idempotent (telemetry and events are keyed by ``(fleet, device, boot, seq)``,
replies by command id), and no method relies on state kept in the process, so several controllers can share one
database. SQLite runs in WAL mode so the dashboard reads while the ingest writes, and two controller processes on
one machine can share a file (``BEGIN IMMEDIATE`` serialises their writers).

Besides the raw rows the store keeps two derived views, updated in the same transaction as the rows they derive
from and only for rows that were new (a replayed message changes nothing):

* ``devices.summary``: each device's latest window per model (p50/p95/p99, throughput, errors, providers);
* ``version_minutes``: one merged latency sketch per (model, version, minute), so fleet-wide percentiles per
  version come from merged sketches (never averaged percentiles) without reading every device's windows.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from edgefleet.sdk.errors import ConfigError
from edgefleet.sdk.sketch import DDSketch

__all__ = [
    "DEPLOY_STATES",
    "TERMINAL_STATES",
    "Batch",
    "SQLiteStore",
    "Store",
    "WriteResult",
    "open_store",
    "window_quantiles",
]

_MAX_BINS = 4096  # as in DDSketch: a sketch JSON form never holds more buckets

# Per-device deployment states, in the order a healthy install goes through them.
DEPLOY_STATES = ("pending", "downloading", "verifying", "self-test", "active", "failed", "rolled-back", "skipped")
TERMINAL_STATES = frozenset({"active", "failed", "rolled-back", "skipped"})
_RANK = {s: i for i, s in enumerate(DEPLOY_STATES)}


def window_quantiles(sketch: Mapping[str, Any], qs: Sequence[float] = (0.5, 0.95, 0.99)) -> list[float | None]:
    """Quantiles (ascending ``qs``) of a sketch in its JSON form, in one pass over the dense buckets.

    Same rule as :meth:`DDSketch.quantile` (tests check they agree) without building the sketch and sorting its
    buckets once per quantile: ingest computes three quantiles for every model window it stores. (A plain loop beats
    numpy here: a window has tens of buckets, numpy's per-call overhead dominates.)
    """
    count = sketch["count"]
    n = len(qs)
    if not count:
        return [None] * n
    gamma_ln = math.log((1.0 + sketch["alpha"]) / (1.0 - sketch["alpha"]))
    gamma = math.exp(gamma_ln)
    lo, hi = float(sketch["min"]), float(sketch["max"])
    ranks = [q * (count - 1) for q in qs]
    out: list[float | None] = [hi] * n
    seen = sketch["zero"]
    todo = 0
    while todo < n and ranks[todo] < seen:
        out[todo] = max(lo, 0.0)
        todo += 1
    key = sketch["offset"]
    for c in sketch["counts"]:
        if todo == n:
            break
        seen += c
        while todo < n and seen > ranks[todo]:
            out[todo] = min(max(2.0 * math.exp(key * gamma_ln) / (gamma + 1.0), lo), hi)
            todo += 1
        key += 1
    return out


class _DenseSum:
    """Adds validated sketches in their JSON form (dense bucket arrays) without building DDSketch objects."""

    __slots__ = ("alpha", "count", "counts", "hi", "lo", "max", "min", "sum", "zero")

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.lo = 0
        self.counts: np.ndarray | None = None
        self.zero = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, d: Mapping[str, Any]) -> None:
        if d["alpha"] != self.alpha:
            raise ValueError(f"cannot merge sketches with alpha {self.alpha} and {d['alpha']}")
        c = d["counts"]
        if c:
            off = d["offset"]
            if self.counts is None:
                self.lo, self.counts = off, np.array(c, dtype=np.int64)
            else:
                lo, top = min(self.lo, off), max(self.lo + len(self.counts), off + len(c))
                if lo != self.lo or top != self.lo + len(self.counts):
                    grown = np.zeros(top - lo, np.int64)
                    grown[self.lo - lo:self.lo - lo + len(self.counts)] = self.counts
                    self.lo, self.counts = lo, grown
                self.counts[off - self.lo:off - self.lo + len(c)] += np.asarray(c, dtype=np.int64)
        self.zero += d["zero"]
        self.count += d["count"]
        self.sum += d["sum"]
        if d["count"]:
            self.min = min(self.min, d["min"])
            self.max = max(self.max, d["max"])

    def to_dict(self) -> dict[str, Any]:
        counts = self.counts if self.counts is not None else np.zeros(0, np.int64)
        lo = self.lo
        if len(counts) > _MAX_BINS:
            # Same policy as DDSketch: fold the lowest buckets, the high quantiles keep their accuracy.
            excess = len(counts) - _MAX_BINS
            counts = counts[excess:].copy()
            counts[0] += int(self.counts[:excess].sum()) if self.counts is not None else 0
            lo += excess
        return {"alpha": self.alpha, "count": self.count, "zero": self.zero, "sum": self.sum,
                "min": self.min if self.count else None, "max": self.max if self.count else None,
                "offset": lo if len(counts) else 0, "counts": counts.tolist()}


@dataclass
class Batch:
    """Validated messages to write in one transaction (the ingest writer fills one per flush)."""

    fleet: str
    received: float = field(default_factory=time.time)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    replies: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.statuses) + len(self.telemetry) + len(self.events) + len(self.replies)


@dataclass(frozen=True)
class WriteResult:
    """How many rows of a batch were new (the rest were replays, de-duplicated)."""

    telemetry: int = 0
    events: int = 0
    replies: int = 0
    statuses: int = 0


@runtime_checkable
class Store(Protocol):
    """Everything the controller, the HTTP API and the rollout engine need from storage."""

    def write(self, batch: Batch) -> WriteResult:
        """Write a batch in one transaction; replays of stored messages are ignored."""
        ...

    def devices(self, fleet: str, changed_since: float = 0.0, full: bool = True) -> list[dict[str, Any]]:
        """Every known device with status and latest summary (only those changed after ``changed_since``)."""
        ...

    def devices_json(self, fleet: str, changed_since: float = 0.0, limit: int | None = None) -> tuple[int, str]:
        """``(matching, JSON array text)``: the compact rows (the first ``limit`` by id), without re-encoding."""
        ...

    def device(self, fleet: str, device: str) -> dict[str, Any] | None:
        """One device, or None."""
        ...

    def windows(self, fleet: str, device: str | None = None, since: float = 0.0, until: float = math.inf,
                name: str | None = None, version: str | None = None, limit: int = 10_000,
                with_sketch: bool = False) -> list[dict[str, Any]]:
        """Telemetry windows (one row per model per message), oldest first."""
        ...

    def version_stats(self, fleet: str, since: float, until: float = math.inf) -> list[dict[str, Any]]:
        """Per (model, version): merged sketch, count and errors over a time range (minute resolution)."""
        ...

    def version_totals(self, fleet: str) -> list[dict[str, Any]]:
        """Per (model, version), over all time: request count, errors and latency sum in ms."""
        ...

    def counts(self, fleet: str) -> dict[str, int]:
        """Row counts: telemetry messages, windows, events, replies, devices."""
        ...

    def prune(self, fleet: str, before: float, chunk: int = 5000) -> dict[str, int]:
        """Delete time series older than ``before`` (retention); deployments and devices are kept."""
        ...

    def events(self, fleet: str, device: str | None = None, since: float = 0.0,
               limit: int = 500) -> list[dict[str, Any]]:
        """Recent events, newest last."""
        ...

    def create_deployment(self, deployment: Mapping[str, Any], targets: Iterable[Mapping[str, Any]]) -> None:
        """Store a new deployment and its per-device targets."""
        ...

    def update_deployment(self, dep_id: str, **fields: Any) -> None:
        """Change a deployment's state, decision or message."""
        ...

    def renew_lease(self, dep_id: str, owner: str, until: float) -> bool:
        """Extend ``owner``'s lease on a rollout; False when another controller took it over."""
        ...

    def claim_deployments(self, fleet: str, owner: str, now: float, until: float) -> list[str]:
        """Atomically take over running rollouts whose lease has expired; returns their ids."""
        ...

    def update_target(self, dep_id: str, device: str, **fields: Any) -> None:
        """Change one target's state, reason or command ids."""
        ...

    def deployments(self, fleet: str, limit: int = 100) -> list[dict[str, Any]]:
        """Deployments, newest first, each with its per-state target counts."""
        ...

    def deployment(self, dep_id: str) -> dict[str, Any] | None:
        """One deployment with its targets."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


# -- SQLite ---------------------------------------------------------------------------------------------------------

# Each migration runs once, in order, in its own transaction; the applied versions are in schema_migrations.
_MIGRATIONS: tuple[tuple[int, str, str], ...] = (
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
)
# A deployment in one of these states has a rollout that some controller must be driving (it holds the lease).
RUNNING_STATES = ("canary", "observing", "rolling-out")
SCHEMA_VERSION = _MIGRATIONS[-1][0]

_DEVICE_COLS = ("device, state, boot, status_ts, description, profile, tags, last_seen, summary, summary_ts, process, "
                "updated")
_TARGET_FIELDS = frozenset({"state", "reason", "cmd_id", "rollback_cmd_id", "activated", "previous_version"})
_DEPLOYMENT_FIELDS = frozenset({"state", "decision", "message"})


_dumps = json.JSONEncoder(separators=(",", ":")).encode  # one encoder: ingest encodes several values per message


def _event_target_state(ev: Mapping[str, Any]) -> str | None:
    """Which deployment state an agent event reports: ``data.state`` if given, else from the kind and level.

    The agent reports each deploy/rollback command's outcome as an event of that kind (level error on failure);
    progress events (``data.state``: downloading, verifying, self-test) move the state on while it installs.
    """
    data = ev.get("data") or {}
    state = data.get("state")
    if isinstance(state, str):
        state = state.replace("_", "-").replace("selftest", "self-test")
        if state in _RANK:
            return state
    kind = str(ev.get("kind", "")).lower()
    if ev.get("level") == "error" and ("deploy" in kind or "install" in kind):
        return "failed"
    for needle, st in (("download", "downloading"), ("verif", "verifying"), ("self", "self-test"),
                       ("rollback", "rolled-back"), ("rolled", "rolled-back"), ("fail", "failed"),
                       ("activ", "active"), ("install", "active"), ("deploy", "active")):
        if needle in kind:
            return st
    return None


class SQLiteStore:
    """The default store: one SQLite file in WAL mode, one connection per thread."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._migrate()

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
                # NORMAL in WAL: a commit survives a crash of the controller; an OS crash or power loss can undo
                # the last commits (already acked): the usual SQLite trade-off, taken for ingest speed.
                conn.execute("PRAGMA synchronous=NORMAL")
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
            for version, name, sql in _MIGRATIONS:
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
                cur = c.execute(
                    "INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (fleet, ev["device"], str(ev.get("boot", "")), int(ev.get("seq", 0)), float(ev.get("ts", now)), now,
                     ev["kind"], ev["level"], ev["message"], _dumps(ev.get("data", {}))),
                )
                if cur.rowcount == 1:
                    n_ev += 1
                    self._apply_event(c, ev, now)
            for rep in batch.replies:
                cur = c.execute("INSERT OR IGNORE INTO replies VALUES (?,?,?,?,?,?,?)",
                                (rep["id"], fleet, rep["device"], float(rep.get("ts", now)), now, rep["status"],
                                 _dumps(rep)))
                if cur.rowcount == 1:
                    n_rep += 1
                    self._apply_reply(c, rep, now)
        return WriteResult(telemetry=n_tel, events=n_ev, replies=n_rep, statuses=n_st)

    @staticmethod
    def _write_status(c: sqlite3.Connection, fleet: str, st: Mapping[str, Any], now: float) -> int:
        desc = st.get("description")
        ts = float(st.get("ts", now))
        profile = str(desc.get("profile", "")) if desc else ""
        tags = desc.get("tags", []) if desc else []
        # Statuses can arrive out of order across boots: a status of another boot must be newer to win. Within a
        # boot, "offline" always wins: it is usually the Last Will, composed before the birth it follows, so its
        # timestamp is older. An offline will carries no description: keep the last one so the profile stays known.
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
            (fleet, st["device"], st["state"], str(st.get("boot", "")), ts, _dumps(desc or {}), profile,
             _dumps(tags if isinstance(tags, list) else []), now, desc is not None, desc is not None, desc is not None),
        )
        return cur.rowcount

    @staticmethod
    def _write_telemetry(c: sqlite3.Connection, fleet: str, records: list[dict[str, Any]], now: float) -> int:
        rows = []
        for t in records:
            process, system = t.get("process"), t.get("system")
            rows.append((fleet, t["device"], t["boot"], t["seq"], float(t["ts"]), now, float(t["interval_s"]),
                         int(t.get("dropped", 0)), _dumps(process) if process else "{}",
                         _dumps(system) if system else "{}"))
        insert = "INSERT OR IGNORE INTO telemetry VALUES (?,?,?,?,?,?,?,?,?,?)"
        # Fast path: one executemany; when every row was new (the normal case) every record feeds the derived views.
        # Otherwise (a replay in the batch) redo it row by row to learn which ones were new.
        c.execute("SAVEPOINT telemetry_batch")
        cur = c.executemany(insert, rows)
        if cur.rowcount == len(rows):
            fresh = list(zip(records, rows, strict=True))
        else:
            c.execute("ROLLBACK TO telemetry_batch")
            fresh = [(t, row) for t, row in zip(records, rows, strict=True) if c.execute(insert, row).rowcount == 1]
        c.execute("RELEASE telemetry_batch")
        windows: list[tuple[Any, ...]] = []
        latest: dict[str, tuple[float, list[dict[str, Any]], str]] = {}
        encoded: dict[tuple[str, ...], str] = {}  # provider lists repeat across a fleet: encode each once
        minutes: dict[tuple[str, str, int], list[Any]] = {}
        for t, row in fresh:
            dev, boot, seq, ts = row[1], row[2], row[3], row[4]
            interval = row[6] or 1.0
            summary = []
            for m in t["models"]:
                sk = m["sketch"]
                p50, p95, p99 = window_quantiles(sk)
                providers = m["providers"]
                pkey = tuple(providers)
                providers_json = encoded.get(pkey)
                if providers_json is None:
                    providers_json = encoded[pkey] = _dumps(providers)
                windows.append((fleet, dev, boot, seq, ts, m["name"], m["version"], m["count"], m["errors"], interval,
                                p50, p95, p99, providers_json, _dumps(sk)))
                summary.append({"name": m["name"], "version": m["version"], "count": m["count"], "errors": m["errors"],
                                "p50": p50, "p95": p95, "p99": p99, "throughput": m["count"] / interval,
                                "providers": providers})
                acc = minutes.setdefault((m["name"], m["version"], int(ts // 60)), [0, 0, []])
                acc[0] += m["count"]
                acc[1] += m["errors"]
                acc[2].append(sk)
            if dev not in latest or ts >= latest[dev][0]:
                latest[dev] = (ts, summary, row[8])  # encoded once per device per batch, below
        if windows:
            c.executemany("INSERT INTO windows VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", windows)
        c.executemany(
            "INSERT INTO devices (fleet, device, last_seen, summary, summary_ts, process, updated) "
            "VALUES (?,?,?,?,?,?,?) ON CONFLICT(fleet, device) DO UPDATE SET "
            "last_seen=max(devices.last_seen, excluded.last_seen), updated=excluded.updated, "
            "summary=CASE WHEN excluded.summary_ts >= devices.summary_ts THEN excluded.summary "
            "ELSE devices.summary END, "
            "process=CASE WHEN excluded.summary_ts >= devices.summary_ts THEN excluded.process "
            "ELSE devices.process END, "
            "summary_ts=max(devices.summary_ts, excluded.summary_ts)",
            [(fleet, dev, now, _dumps(summary), ts, process_json, now)
             for dev, (ts, summary, process_json) in latest.items()])
        for (name, version, minute), (count, errors, sketches) in minutes.items():
            row = c.execute("SELECT count, errors, sketch FROM version_minutes WHERE fleet=? AND name=? AND version=? "
                            "AND minute=?", (fleet, name, version, minute)).fetchone()
            total = _DenseSum(sketches[0]["alpha"])
            for sk in sketches:
                total.add(sk)
            if row is not None:
                total.add(json.loads(row["sketch"]))
                count += row["count"]
                errors += row["errors"]
            c.execute("INSERT OR REPLACE INTO version_minutes VALUES (?,?,?,?,?,?,?,?)",
                      (fleet, name, version, minute, count, errors, total.sum, _dumps(total.to_dict())))
        return len(fresh)

    @staticmethod
    def _move_target(c: sqlite3.Connection, where: str, arg: str, state: str, reason: str, now: float) -> None:
        rows = c.execute(f"SELECT deployment_id, device, state FROM deployment_targets WHERE {where}=?",
                         (arg,)).fetchall()
        for row in rows:
            cur = row["state"]
            # Never move backwards (a late "downloading" event after the reply), never leave a terminal state,
            # except that a rollback may follow an install.
            if cur == state or (cur in TERMINAL_STATES and state != "rolled-back") or _RANK[state] < _RANK[cur]:
                continue
            extra = ", activated=?" if state == "active" else ""
            params: list[Any] = [state, reason, now]
            if state == "active":
                params.append(now)
            c.execute(f"UPDATE deployment_targets SET state=?, reason=?, updated=?{extra} "
                      "WHERE deployment_id=? AND device=?", (*params, row["deployment_id"], row["device"]))

    def _apply_event(self, c: sqlite3.Connection, ev: Mapping[str, Any], now: float) -> None:
        data = ev.get("data") or {}
        cmd_id = data.get("command") or data.get("cmd_id") or data.get("cmd")
        if not isinstance(cmd_id, str) or not cmd_id:
            return
        state = _event_target_state(ev)
        if state is None:
            return
        failed = ev.get("level") == "error"
        reason = ev["message"] if failed or state in ("failed", "rolled-back") else ""
        if failed and state != "failed":
            state = "failed"
        self._move_target(c, "cmd_id", cmd_id, state, reason, now)
        if state == "rolled-back":
            self._move_target(c, "rollback_cmd_id", cmd_id, state, reason, now)
        elif failed:
            c.execute("UPDATE deployment_targets SET reason=?, updated=? WHERE rollback_cmd_id=?",
                      (f"rollback failed: {reason}", now, cmd_id))

    def _apply_reply(self, c: sqlite3.Connection, rep: Mapping[str, Any], now: float) -> None:
        ok = rep["status"] == "ok"
        msg = "" if ok else f"{rep['error'].get('code', '')}: {rep['error'].get('message', '')}".strip(": ")
        self._move_target(c, "cmd_id", rep["id"], "active" if ok else "failed", msg, now)
        if ok:
            self._move_target(c, "rollback_cmd_id", rep["id"], "rolled-back", "rolled back", now)
        else:
            c.execute("UPDATE deployment_targets SET reason=?, updated=? WHERE rollback_cmd_id=?",
                      (f"rollback failed: {msg}", now, rep["id"]))

    # reads ---------------------------------------------------------------------------------------------------------
    @staticmethod
    def _device_row(r: sqlite3.Row) -> dict[str, Any]:
        return {"device": r["device"], "state": r["state"], "boot": r["boot"], "status_ts": r["status_ts"],
                "description": json.loads(r["description"]), "profile": r["profile"], "tags": json.loads(r["tags"]),
                "last_seen": r["last_seen"], "models": json.loads(r["summary"]), "telemetry_ts": r["summary_ts"],
                "process": json.loads(r["process"]), "updated": r["updated"]}

    def devices(self, fleet: str, changed_since: float = 0.0, full: bool = True) -> list[dict[str, Any]]:
        """Every known device (or those changed after ``changed_since``, controller clock), sorted by id.

        ``full=False`` leaves out the status description (the bulk of a row), for lists of many devices.
        """
        rows = self._conn().execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE fleet=? AND updated>? ORDER BY device",
                                    (fleet, changed_since)).fetchall()
        out = [self._device_row(r) for r in rows] if full else [self._compact_row(r) for r in rows]
        return out

    @staticmethod
    def _compact_row(r: sqlite3.Row) -> dict[str, Any]:
        return {"device": r["device"], "state": r["state"], "boot": r["boot"], "profile": r["profile"],
                "tags": json.loads(r["tags"]), "last_seen": r["last_seen"], "models": json.loads(r["summary"]),
                "telemetry_ts": r["summary_ts"], "process": json.loads(r["process"]), "updated": r["updated"]}

    def devices_json(self, fleet: str, changed_since: float = 0.0, limit: int | None = None) -> tuple[int, str]:
        """``(matching, JSON array)``: the compact rows of ``devices(full=False)`` (the first ``limit`` by id, all
        by default) built by SQLite itself, and how many rows match in all.

        The dashboard loads every device at once; building 10,000 rows' JSON in SQL (from columns that already hold
        JSON) costs a fraction of decoding and re-encoding them in Python.
        """
        c = self._conn()
        total = int(c.execute("SELECT count(*) FROM devices WHERE fleet=? AND updated>?",
                              (fleet, changed_since)).fetchone()[0])
        row = c.execute(
            "SELECT json_group_array(json_object('device', device, 'state', state, 'boot', boot, "
            "'profile', profile, 'tags', json(tags), 'last_seen', last_seen, 'models', json(summary), "
            "'telemetry_ts', summary_ts, 'process', json(process), 'updated', updated)) "
            "FROM (SELECT * FROM devices WHERE fleet=? AND updated>? ORDER BY device LIMIT ?)",
            (fleet, changed_since, -1 if limit is None else limit)).fetchone()
        return total, row[0]

    def device(self, fleet: str, device: str) -> dict[str, Any] | None:
        """One device, or None."""
        r = self._conn().execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE fleet=? AND device=?",
                                 (fleet, device)).fetchone()
        return self._device_row(r) if r else None

    def windows(self, fleet: str, device: str | None = None, since: float = 0.0, until: float = math.inf,
                name: str | None = None, version: str | None = None, limit: int = 10_000,
                with_sketch: bool = False) -> list[dict[str, Any]]:
        """Telemetry windows (one per model per message) in a device-timestamp range, oldest first."""
        where, args = ["fleet=?", "ts>=?", "ts<=?"], [fleet, since, until if math.isfinite(until) else 1e300]
        for col, val in (("device", device), ("name", name), ("version", version)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        cols = "device, boot, seq, ts, name, version, count, errors, interval_s, p50, p95, p99, providers" + (
            ", sketch" if with_sketch else "")
        # The newest `limit` rows, returned oldest first: a chart wants the recent end of a long range.
        rows = self._conn().execute(
            f"SELECT * FROM (SELECT {cols} FROM windows WHERE {' AND '.join(where)} ORDER BY ts DESC LIMIT ?) "
            "ORDER BY ts",
            (*args, limit)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["providers"] = json.loads(d["providers"])
            if with_sketch:
                d["sketch"] = json.loads(d["sketch"])
            out.append(d)
        return out

    def version_stats(self, fleet: str, since: float, until: float = math.inf) -> list[dict[str, Any]]:
        """Per (model, version): merged sketch, count and errors over whole minutes overlapping the range."""
        hi = int(until // 60) if math.isfinite(until) else 2**62
        acc: dict[tuple[str, str], list[Any]] = {}
        for r in self._conn().execute("SELECT name, version, count, errors, sketch FROM version_minutes WHERE fleet=? "
                                      "AND minute>=? AND minute<=?", (fleet, int(since // 60), hi)):
            a = acc.setdefault((r["name"], r["version"]), [0, 0, DDSketch()])
            a[0] += r["count"]
            a[1] += r["errors"]
            a[2].merge(DDSketch.from_dict(json.loads(r["sketch"])))
        return [{"name": n, "version": v, "count": a[0], "errors": a[1], "sketch": a[2]}
                for (n, v), a in sorted(acc.items())]

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

    def version_totals(self, fleet: str) -> list[dict[str, Any]]:
        """Per (model, version), over all time: request count, errors and latency sum in ms (for /metrics)."""
        rows = self._conn().execute("SELECT name, version, sum(count) AS count, sum(errors) AS errors, "
                                    "sum(sum_ms) AS sum_ms FROM version_minutes WHERE fleet=? GROUP BY name, version "
                                    "ORDER BY name, version", (fleet,))
        return [dict(r) for r in rows]

    def counts(self, fleet: str) -> dict[str, int]:
        """Row counts per table for one fleet."""
        c = self._conn()
        out = {}
        for table in ("telemetry", "windows", "events", "replies", "devices"):
            out[table] = int(c.execute(f"SELECT count(*) FROM {table} WHERE fleet=?", (fleet,)).fetchone()[0])
        return out

    def events(self, fleet: str, device: str | None = None, since: float = 0.0,
               limit: int = 500) -> list[dict[str, Any]]:
        """The newest events received after ``since``, returned oldest first."""
        where, args = "fleet=? AND received>?", [fleet, since]
        if device:
            where += " AND device=?"
            args.append(device)
        rows = self._conn().execute("SELECT * FROM (SELECT device, boot, seq, ts, received, kind, level, message, "
                                    f"data FROM events WHERE {where} ORDER BY received DESC LIMIT ?) ORDER BY received",
                                    (*args, limit)).fetchall()
        return [{**dict(r), "data": json.loads(r["data"])} for r in rows]

    def reply(self, cmd_id: str) -> dict[str, Any] | None:
        """The stored reply to a command, or None."""
        r = self._conn().execute("SELECT body FROM replies WHERE cmd_id=?", (cmd_id,)).fetchone()
        return json.loads(r["body"]) if r else None

    # deployments ---------------------------------------------------------------------------------------------------
    def create_deployment(self, deployment: Mapping[str, Any], targets: Iterable[Mapping[str, Any]]) -> None:
        """Store a new deployment and its targets in one transaction."""
        d = deployment
        now = time.time()
        with self._tx() as c:
            c.execute("INSERT INTO deployments VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (d["id"], d["fleet"], d.get("created", now), now, d["state"], _dumps(d["selector"]),
                       float(d["canary_pct"]), float(d["max_p95_regression"]), float(d["max_error_increase"]),
                       _dumps(d["bundles"]), _dumps(d.get("decision", {})), d.get("message", ""),
                       d.get("owner", ""), float(d.get("lease_until", 0.0))))
            c.executemany(
                "INSERT INTO deployment_targets (deployment_id, device, profile, name, version, sha256, "
                "previous_version, phase, state, reason, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [(d["id"], t["device"], t["profile"], t.get("name", ""), t.get("version", ""), t.get("sha256", ""),
                  t.get("previous_version", ""), t["phase"], t["state"], t.get("reason", ""), now) for t in targets])

    def renew_lease(self, dep_id: str, owner: str, until: float) -> bool:
        """Extend ``owner``'s lease on a running rollout; False when another controller has taken it over or the
        deployment is no longer running (an operator rolled it back)."""
        marks = ",".join("?" * len(RUNNING_STATES))
        with self._tx() as c:
            return c.execute(f"UPDATE deployments SET lease_until=? WHERE id=? AND owner=? AND state IN ({marks})",
                             (until, dep_id, owner, *RUNNING_STATES)).rowcount == 1

    def claim_deployments(self, fleet: str, owner: str, now: float, until: float) -> list[str]:
        """Take over running rollouts whose lease expired before ``now`` (their controller died); returns ids."""
        marks = ",".join("?" * len(RUNNING_STATES))
        with self._tx() as c:  # BEGIN IMMEDIATE: two controllers claiming at once cannot both win a deployment
            ids = [r[0] for r in c.execute(f"SELECT id FROM deployments WHERE fleet=? AND state IN ({marks}) "
                                           "AND lease_until<?", (fleet, *RUNNING_STATES, now))]
            for dep_id in ids:
                c.execute("UPDATE deployments SET owner=?, lease_until=? WHERE id=?", (owner, until, dep_id))
        return ids

    def update_deployment(self, dep_id: str, **fields: Any) -> None:
        """Set state, decision (a dict) or message of a deployment."""
        bad = set(fields) - _DEPLOYMENT_FIELDS
        if bad:
            raise ValueError(f"unknown deployment field(s) {sorted(bad)}")
        vals = {k: (_dumps(v) if k == "decision" else v) for k, v in fields.items()}
        sets = ", ".join(f"{k}=?" for k in vals)
        with self._tx() as c:
            c.execute(f"UPDATE deployments SET {sets}, updated=? WHERE id=?", (*vals.values(), time.time(), dep_id))

    def update_target(self, dep_id: str, device: str, **fields: Any) -> None:
        """Set fields of one deployment target (state, reason, cmd_id, rollback_cmd_id, activated, ...)."""
        bad = set(fields) - _TARGET_FIELDS
        if bad:
            raise ValueError(f"unknown target field(s) {sorted(bad)}")
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as c:
            c.execute(f"UPDATE deployment_targets SET {sets}, updated=? WHERE deployment_id=? AND device=?",
                      (*fields.values(), time.time(), dep_id, device))

    @staticmethod
    def _deployment_row(r: sqlite3.Row) -> dict[str, Any]:
        d = dict(r)
        for k in ("selector", "bundles", "decision"):
            d[k] = json.loads(d[k])
        return d

    def deployments(self, fleet: str, limit: int = 100) -> list[dict[str, Any]]:
        """Deployments, newest first, each with ``progress``: target counts per state."""
        c = self._conn()
        deps = [self._deployment_row(r) for r in c.execute(
            "SELECT * FROM deployments WHERE fleet=? ORDER BY created DESC LIMIT ?", (fleet, limit))]
        for d in deps:
            d["progress"] = {r[0]: r[1] for r in c.execute(
                "SELECT state, count(*) FROM deployment_targets WHERE deployment_id=? GROUP BY state", (d["id"],))}
        return deps

    def deployment(self, dep_id: str) -> dict[str, Any] | None:
        """One deployment with its targets and progress, or None."""
        c = self._conn()
        r = c.execute("SELECT * FROM deployments WHERE id=?", (dep_id,)).fetchone()
        if r is None:
            return None
        d = self._deployment_row(r)
        d["targets"] = [dict(t) for t in c.execute(
            "SELECT * FROM deployment_targets WHERE deployment_id=? ORDER BY phase, device", (dep_id,))]
        d["progress"] = {}
        for t in d["targets"]:
            d["progress"][t["state"]] = d["progress"].get(t["state"], 0) + 1
        return d


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


def open_store(url: str | Path) -> Store:
    """Open a store from a path or URL: ``path/to/fleet.db`` or ``sqlite:///path`` (PostgreSQL: not yet)."""
    s = str(url)
    if s.startswith(("postgres://", "postgresql://")):
        raise ConfigError("PostgreSQL stores are not implemented yet; the Store interface in edgefleet.fleet.store "
                          "is what one would implement (docs/fleet.md)")
    if s.startswith("sqlite:///"):
        s = s[len("sqlite:///"):]
    return SQLiteStore(s)
