"""The store on its own, on both backends (SQLite and a real PostgreSQL): migrations, de-duplication, derived
views, quantiles, deployment state moves, leases and fenced writes, concurrent writers."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from edgefleet.fleet.store import Batch, SQLiteStore, Store, open_store
from edgefleet.fleet.store.sqlite import MIGRATIONS
from edgefleet.sdk.errors import ConfigError
from edgefleet.sdk.protocol import (
    Deployment,
    DeploymentTarget,
    DeviceRow,
    Event,
    ModelWindow,
    Reply,
    Status,
    Telemetry,
)
from edgefleet.sdk.sketch import DDSketch, quantiles


def _tel(device: str, seq: int, version: str = "1", latency: float = 5.0, boot: str = "b",
         ts: float | None = None) -> Telemetry:
    sk = DDSketch()
    for i in range(20):
        sk.add(latency * (1 + i / 20))
    models = [ModelWindow(name="m", version=version, count=20, errors=0, providers=["CPUExecutionProvider"],
                          sketch=sk.to_wire())]
    extra = {} if ts is None else {"ts": ts}
    return Telemetry(device=device, boot=boot, seq=seq, models=models, interval_s=2.0, **extra)


def _deployment(dep_id: str, state: str, **kw: object) -> Deployment:
    return Deployment.from_dict({"id": dep_id, "fleet": "f", "state": state, "selector": ["all"], "canary_pct": 0,
                                 "max_p95_regression": 0.2, "max_error_increase": 0.01, "bundles": [],
                                 "decision": {}, "created": 1.0, **kw})


@dataclass
class Backend:
    """One store location on one backend; ``open()`` gives another store object on it (another controller)."""

    kind: str
    url: str
    open: Callable[[], Store]

    def sql(self, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run SQL straight on the database (behind the store's back), committed."""
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.url)
            try:
                rows = conn.execute(statement, args).fetchall()
                conn.commit()
                return rows
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(self.url) as conn:
            cur = conn.execute(statement.replace("?", "%s"), args)
            return cur.fetchall() if cur.description else []


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path) -> Iterator[Backend]:
    """The same tests on the embedded SQLite file and on a fresh database of the session's real PostgreSQL."""
    url = str(tmp_path / "f.db") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    opened: list[Store] = []

    def open_() -> Store:
        s = open_store(url)
        opened.append(s)
        return s

    yield Backend(request.param, url, open_)
    for s in opened:
        s.close()


def test_store_implements_the_interface_and_records_its_schema_version(backend: Backend) -> None:
    store = backend.open()
    assert isinstance(store, Store)
    version = store.schema_version()
    assert version >= 1
    store.close()
    # Opening again applies nothing twice.
    again = backend.open()
    assert again.schema_version() == version
    applied = [r[0] for r in backend.sql("SELECT version FROM schema_migrations ORDER BY version")]
    assert applied == list(range(1, version + 1))
    if backend.kind == "sqlite":
        assert isinstance(again, SQLiteStore)
        assert backend.sql("PRAGMA journal_mode")[0][0] == "wal"
    again.close()
    backend.sql("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
    with pytest.raises(ConfigError, match="schema version 99, newer than this edgefleet"):
        backend.open()


def test_open_store_refuses_unknown_urls_and_unreachable_databases_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"unknown store URL mysql://"):
        open_store("mysql://db/fleet")
    pytest.importorskip("psycopg")
    with pytest.raises(ConfigError, match=r"cannot open the store postgresql://u:\*\*\*@127\.0\.0\.1:1/fleet"):
        open_store("postgresql://u:secret@127.0.0.1:1/fleet?connect_timeout=2")
    with pytest.raises(ConfigError, match="pool_min_size <= pool_max_size"):
        open_store("postgresql://127.0.0.1:1/fleet?pool_min_size=5&pool_max_size=2")


def test_store_write_deduplicates_on_device_boot_seq_within_and_across_batches(backend: Backend) -> None:
    store = backend.open()
    b = Batch("f", telemetry=[_tel("d1", 1), _tel("d1", 2), _tel("d1", 1), _tel("d1", 1, boot="other")])
    assert store.write(b).telemetry == 3
    assert store.write(Batch("f", telemetry=[_tel("d1", 2), _tel("d2", 2)])).telemetry == 1
    assert store.counts("f")["telemetry"] == 4
    assert store.counts("f")["windows"] == 4
    (total,) = store.version_totals("f")
    assert total.count == 80
    assert store.counts("other-fleet")["telemetry"] == 0
    ev = Event(device="d1", boot="b", seq=1, kind="install", message="x")
    assert store.write(Batch("f", events=[ev, ev], replies=[Reply.ok("c1", "d1")])).events == 1
    assert store.write(Batch("f", events=[ev], replies=[Reply.ok("c1", "d1")])).replies == 0
    assert store.counts("f")["events"] == 1 and store.counts("f")["replies"] == 1


def test_quantiles_of_the_dense_form_match_ddsketch_quantile() -> None:
    rng = random.Random(7)
    for _ in range(50):
        sk = DDSketch()
        for _ in range(rng.randint(1, 400)):
            sk.add(rng.choice([0.0, rng.lognormvariate(1.0, 1.2)]))
        qs = (0.0, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0)
        assert quantiles(sk.to_wire(), qs) == [sk.quantile(q) for q in qs]
        assert quantiles(sk.to_dict(), qs) == [sk.quantile(q) for q in qs]
    assert quantiles(DDSketch().to_wire()) == [None, None, None]


def test_version_minutes_merge_sketches_across_devices_and_batches(backend: Backend) -> None:
    store = backend.open()
    recs = [_tel(f"d{i}", 1, latency=2.0 + i) for i in range(6)]
    store.write(Batch("f", telemetry=recs[:3]))
    store.write(Batch("f", telemetry=recs[3:]))
    (v,) = store.version_stats("f", since=0)
    expected = DDSketch.merged(DDSketch.from_wire(r.models[0].sketch) for r in recs)
    assert v.count == expected.count == 120
    assert v.sketch.quantile(0.95) == expected.quantile(0.95)


def test_concurrent_writers_lose_nothing(backend: Backend) -> None:
    # Two store objects on one database stand in for two controller processes sharing it.
    stores = [backend.open(), backend.open()]

    def write(s: Store, offset: int) -> None:
        for k in range(40):
            s.write(Batch("f", telemetry=[_tel(f"d{offset}", offset * 1000 + k * 5 + j) for j in range(5)]))

    threads = [threading.Thread(target=write, args=(s, i)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stores[0].counts("f")["telemetry"] == 400
    (total,) = stores[1].version_totals("f")
    assert total.count == 400 * 20


def test_two_writers_racing_on_the_same_records_store_each_once_and_count_it_once(backend: Backend) -> None:
    """A redelivery racing the original in another controller: each record is new for exactly one of them, and the
    derived views (per-minute sketches, totals, device summaries) count it once."""
    stores = [backend.open(), backend.open(), backend.open()]
    devices = [f"d{i}" for i in range(30)]
    records = [_tel(d, s, latency=3.0 + s % 7) for s in range(1, 21) for d in devices]  # 600 records
    news = [0] * len(stores)
    errors: list[BaseException] = []

    def write(i: int) -> None:
        rng = random.Random(i)
        mine = records[:]
        rng.shuffle(mine)  # each controller sees the same records in another order and other batches
        try:
            for k in range(0, len(mine), 50):
                news[i] += stores[i].write(Batch("f", telemetry=mine[k:k + 50],
                                                 statuses=[Status(device=rng.choice(devices), state="online",
                                                                  boot="b")])).telemetry
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(news) == len(records)
    counts = stores[0].counts("f")
    assert counts["telemetry"] == counts["windows"] == len(records)
    (total,) = stores[0].version_totals("f")
    assert total.count == len(records) * 20
    (v,) = stores[0].version_stats("f", since=0)
    assert v.count == len(records) * 20 == v.sketch.count
    assert {d.device: d.models[0].count for d in stores[0].devices("f")} == dict.fromkeys(devices, 20)


def test_devices_json_built_by_the_database_matches_the_typed_rows(backend: Backend) -> None:
    store = backend.open()
    store.write(Batch("f", statuses=[Status(device=f"d{i}", state="online", boot="b", ts=1000.0 + i / 7,
                                            description={"profile": "x86-cpu", "tags": ["a", "b"]})
                                     for i in range(5)],
                      telemetry=[_tel(f"d{i}", 1, latency=1.5 + i) for i in range(4)]))
    total, text = store.devices_json("f")
    rows = json.loads(text)
    assert total == 5 and [r["device"] for r in rows] == [f"d{i}" for i in range(5)]
    typed = [d.to_dict() for d in store.devices("f", full=False)]
    assert [DeviceRow.from_dict(r).to_dict() for r in rows] == typed
    total, text = store.devices_json("f", limit=2)
    assert total == 5 and len(json.loads(text)) == 2
    assert store.devices_json("nobody") == (0, "[]")


def test_deployment_targets_follow_events_and_replies_and_never_go_back(backend: Backend) -> None:
    store = backend.open()
    store.create_deployment(
        _deployment("dep1", "rolling-out"),
        [DeploymentTarget(device="a", profile="x86-cpu", phase="rest", state="pending", name="m", version="2"),
         DeploymentTarget(device="b", profile="x86-cpu", phase="rest", state="pending", name="m", version="2")])
    assert store.update_target("dep1", "a", cmd_id="c-a")
    assert store.update_target("dep1", "b", cmd_id="c-b")

    def states() -> dict[str, str]:
        dep = store.deployment("dep1")
        assert dep is not None and dep.targets is not None
        return {t.device: t.state for t in dep.targets}

    ev = Event(device="a", boot="b", seq=1, kind="deploy.progress", message="downloading",
               data={"command": "c-a", "state": "downloading"})
    store.write(Batch("f", events=[ev]))
    assert states()["a"] == "downloading"
    store.write(Batch("f", replies=[Reply.ok("c-a", "a"),
                                    Reply.failed("c-b", "b", "selftest", "cosine 0.9 < 0.99", "self-test")]))
    late = Event(device="a", boot="b", seq=2, kind="deploy.progress", message="verifying",
                 data={"command": "c-a", "state": "verifying"})
    store.write(Batch("f", events=[late]))
    dep = store.deployment("dep1")
    assert dep is not None and dep.targets is not None
    targets = {t.device: t for t in dep.targets}
    assert targets["a"].state == "active" and targets["a"].activated > 0
    assert targets["b"].state == "failed" and targets["b"].reason == "selftest: cosine 0.9 < 0.99"
    # A rollback command's ok reply moves an active target to rolled-back.
    store.update_target("dep1", "a", rollback_cmd_id="r-a")
    store.write(Batch("f", replies=[Reply.ok("r-a", "a")]))
    assert states()["a"] == "rolled-back"
    assert store.deployments("f")[0].progress == {"rolled-back": 1, "failed": 1}
    with pytest.raises(ValueError, match="unknown target field"):
        store.update_target("dep1", "a", sha256="x")


def test_store_migrates_a_version_1_sqlite_database_and_keeps_its_rows(tmp_path) -> None:
    conn = sqlite3.connect(tmp_path / "old.db")
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied REAL)")
    for stmt in MIGRATIONS[0][2].split(";"):
        if stmt.strip():
            conn.execute(stmt)
    conn.execute("INSERT INTO schema_migrations VALUES (1, 'initial schema', 0)")
    conn.execute("INSERT INTO telemetry VALUES ('f','d','b',1,5.0,5.0,1.0,0,'{}','{}')")
    conn.commit()
    conn.close()
    store = SQLiteStore(tmp_path / "old.db")
    assert store.schema_version() == MIGRATIONS[-1][0]
    assert store.counts("f")["telemetry"] == 1


def test_controllers_starting_together_migrate_a_postgresql_database_once(postgres_url: str) -> None:
    from edgefleet.fleet.store.postgres import SCHEMA_VERSION

    opened: list[Store] = []
    errors: list[BaseException] = []
    go = threading.Barrier(6)

    def start() -> None:
        go.wait()
        try:
            opened.append(open_store(postgres_url))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        assert all(s.schema_version() == SCHEMA_VERSION for s in opened)
        import psycopg

        with psycopg.connect(postgres_url) as conn:
            assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == SCHEMA_VERSION
    finally:
        for s in opened:
            s.close()


def test_prune_deletes_only_what_is_older_than_the_cut(backend: Backend) -> None:
    store = backend.open()
    old = [_tel("d1", s, ts=1000.0 + s) for s in range(30)]
    new = [_tel("d1", 100 + s) for s in range(5)]
    store.write(Batch("f", telemetry=old + new,
                      events=[Event(device="d1", boot="b", seq=1, kind="install", message="x")]))
    removed = store.prune("f", before=2000.0, chunk=7)  # several chunks
    assert removed["telemetry"] == 30 and removed["windows"] == 30 and removed["version_minutes"] == 2
    assert store.counts("f")["telemetry"] == 5 and store.counts("f")["windows"] == 5
    assert store.counts("f")["events"] == 1  # received now: newer than the cut
    assert len(store.devices("f")) == 1  # devices and deployments are not time series: kept
    (total,) = store.version_totals("f")
    assert total.count == 5 * 20


def test_rollout_leases_are_claimed_once_only_when_expired_and_fence_writes(backend: Backend) -> None:
    stores = [backend.open(), backend.open()]
    stores[0].create_deployment(_deployment("dep1", "canary", canary_pct=10, owner="a"),
                                [DeploymentTarget(device="x", profile="p", phase="canary", state="pending")],
                                lease_s=0.5)
    assert stores[1].claim_deployments("f", "b", lease_s=30) == []  # a's lease still runs
    assert stores[0].update_target("dep1", "x", owner="a", cmd_id="c1")  # a holds it: its write applies
    time.sleep(0.7)
    # Expired: a's fenced writes no longer apply, even before anyone claims it.
    assert not stores[0].update_target("dep1", "x", owner="a", cmd_id="c2")
    assert not stores[0].update_deployment("dep1", owner="a", state="observing")
    assert stores[1].claim_deployments("f", "b", lease_s=30) == ["dep1"]
    assert stores[0].claim_deployments("f", "c", lease_s=30) == []  # b holds it now
    assert not stores[0].renew_lease("dep1", "a", 30)  # a lost it
    assert stores[1].renew_lease("dep1", "b", 30)
    assert not stores[0].update_target("dep1", "x", owner="a", cmd_id="c3")
    assert stores[1].update_deployment("dep1", owner="b", state="observing")
    dep = stores[0].deployment("dep1")
    assert dep is not None and dep.targets is not None
    assert dep.owner == "b" and dep.state == "observing" and dep.targets[0].cmd_id == "c1"
    assert dep.lease_until > time.time() + 20
    # An operator's (unfenced) rollback stops the rollout: its owner's fenced writes no longer apply.
    assert stores[0].update_deployment("dep1", state="rolled-back")
    assert not stores[1].update_deployment("dep1", owner="b", state="completed")
    assert not stores[1].renew_lease("dep1", "b", 30)
    assert stores[0].claim_deployments("f", "c", lease_s=30) == []  # finished rollouts are never claimed
    # Releasing (lease 0) hands a running rollout over at once.
    stores[0].create_deployment(_deployment("dep2", "rolling-out", owner="a"), [], lease_s=30)
    assert stores[1].claim_deployments("f", "b", lease_s=30) == []
    assert stores[0].renew_lease("dep2", "a", 0)
    assert stores[1].claim_deployments("f", "b", lease_s=30) == ["dep2"]


def test_many_controllers_claiming_at_once_never_share_a_rollout(backend: Backend) -> None:
    stores = [backend.open() for _ in range(4)]
    for i in range(12):
        stores[0].create_deployment(_deployment(f"dep{i}", "rolling-out", owner="gone"), [], lease_s=0)
    got: dict[str, list[str]] = {}
    go = threading.Barrier(len(stores))

    def claim(i: int) -> None:
        go.wait()
        got[f"c{i}"] = stores[i].claim_deployments("f", f"c{i}", lease_s=30)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [d for ids in got.values() for d in ids]
    assert sorted(claimed) == sorted(f"dep{i}" for i in range(12))  # each exactly once
    for owner, ids in got.items():
        for dep_id in ids:
            dep = stores[0].deployment(dep_id)
            assert dep is not None and dep.owner == owner


def test_sums_in_the_store_saturate_instead_of_overflowing(backend: Backend) -> None:
    """A minute bucket that already holds (near) 2^63 - 1 requests takes more records; totals stay readable."""
    store = backend.open()
    rec = _tel("d1", 1)
    store.write(Batch("f", telemetry=[rec]))
    minute = int(rec.ts // 60)
    big = 2**63 - 5
    sketch = {"alpha": 0.01, "count": big, "zero": big, "sum": 0.0, "min": 0.0, "max": 0.0, "offset": 0,
              "counts": []}
    backend.sql("UPDATE version_minutes SET count=?, errors=?, sketch=? WHERE minute=?",
                (big, big, json.dumps(sketch), minute))
    store.write(Batch("f", telemetry=[_tel(f"d{i}", 1) for i in range(2, 6)]))  # 4 more: 80 requests
    assert store.counts("f")["telemetry"] == 5
    (v,) = store.version_stats("f", since=0)
    assert v.count == 2**63 - 1 and v.sketch.count == 2**63 - 1  # saturated, not wrapped around
    (total,) = store.version_totals("f")
    assert total.count == pytest.approx(2**63 - 1)
