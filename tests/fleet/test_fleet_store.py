"""The SQLite store on its own: migrations, de-duplication, derived views, quantiles, deployment state moves."""

from __future__ import annotations

import json
import random
import sqlite3
import threading

import pytest
from edgefleet.fleet.store import Batch, SQLiteStore, Store, open_store
from edgefleet.fleet.store.sqlite import MIGRATIONS
from edgefleet.sdk.errors import ConfigError
from edgefleet.sdk.protocol import Deployment, DeploymentTarget, Event, ModelWindow, Reply, Telemetry
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


def test_store_implements_the_interface_and_records_its_schema_version(tmp_path) -> None:
    store = SQLiteStore(tmp_path / "f.db")
    assert isinstance(store, Store)
    assert store.schema_version() == 4
    store.close()
    # Opening again applies nothing twice; the file is in WAL mode.
    again = open_store(f"sqlite:///{tmp_path / 'f.db'}")
    assert isinstance(again, SQLiteStore)
    assert again.schema_version() == 4
    conn = sqlite3.connect(tmp_path / "f.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")] == [1, 2, 3, 4]
    conn.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
    conn.commit()
    conn.close()
    again.close()
    with pytest.raises(ConfigError, match="schema version 99, newer than this edgefleet"):
        SQLiteStore(tmp_path / "f.db")
    with pytest.raises(ConfigError, match="PostgreSQL stores are not implemented yet"):
        open_store("postgresql://db/fleet")


def test_store_write_deduplicates_on_device_boot_seq_within_and_across_batches(tmp_path) -> None:
    store = SQLiteStore(tmp_path / "f.db")
    b = Batch("f", telemetry=[_tel("d1", 1), _tel("d1", 2), _tel("d1", 1), _tel("d1", 1, boot="other")])
    assert store.write(b).telemetry == 3
    assert store.write(Batch("f", telemetry=[_tel("d1", 2), _tel("d2", 2)])).telemetry == 1
    assert store.counts("f")["telemetry"] == 4
    assert store.counts("f")["windows"] == 4
    (total,) = store.version_totals("f")
    assert total.count == 80
    assert store.counts("other-fleet")["telemetry"] == 0


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


def test_version_minutes_merge_sketches_across_devices_and_batches(tmp_path) -> None:
    store = SQLiteStore(tmp_path / "f.db")
    recs = [_tel(f"d{i}", 1, latency=2.0 + i) for i in range(6)]
    store.write(Batch("f", telemetry=recs[:3]))
    store.write(Batch("f", telemetry=recs[3:]))
    (v,) = store.version_stats("f", since=0)
    expected = DDSketch.merged(DDSketch.from_wire(r.models[0].sketch) for r in recs)
    assert v.count == expected.count == 120
    assert v.sketch.quantile(0.95) == expected.quantile(0.95)


def test_concurrent_writers_on_one_file_lose_nothing(tmp_path) -> None:
    # Two store objects on one file stand in for two controller processes sharing it.
    stores = [SQLiteStore(tmp_path / "f.db"), SQLiteStore(tmp_path / "f.db")]

    def write(s: SQLiteStore, offset: int) -> None:
        for k in range(40):
            s.write(Batch("f", telemetry=[_tel(f"d{offset}", offset * 1000 + k * 5 + j) for j in range(5)]))

    threads = [threading.Thread(target=write, args=(s, i)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stores[0].counts("f")["telemetry"] == 400


def test_deployment_targets_follow_events_and_replies_and_never_go_back(tmp_path) -> None:
    store = SQLiteStore(tmp_path / "f.db")
    store.create_deployment(
        _deployment("dep1", "rolling-out"),
        [DeploymentTarget(device="a", profile="x86-cpu", phase="rest", state="pending", name="m", version="2"),
         DeploymentTarget(device="b", profile="x86-cpu", phase="rest", state="pending", name="m", version="2")])
    store.update_target("dep1", "a", cmd_id="c-a")
    store.update_target("dep1", "b", cmd_id="c-b")

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


def test_store_migrates_a_version_1_database_and_keeps_its_rows(tmp_path) -> None:
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
    assert store.schema_version() == 4
    assert store.counts("f")["telemetry"] == 1


def test_prune_deletes_only_what_is_older_than_the_cut(tmp_path) -> None:
    store = SQLiteStore(tmp_path / "f.db")
    old = [_tel("d1", s, ts=1000.0 + s) for s in range(30)]
    new = [_tel("d1", 100 + s) for s in range(5)]
    store.write(Batch("f", telemetry=old + new,
                      events=[Event(device="d1", boot="b", seq=1, kind="install", message="x")]))
    removed = store.prune("f", before=2000.0, chunk=7)  # several chunks
    assert removed["telemetry"] == 30 and removed["windows"] == 30
    assert store.counts("f")["telemetry"] == 5 and store.counts("f")["windows"] == 5
    assert store.counts("f")["events"] == 1  # received now: newer than the cut
    assert len(store.devices("f")) == 1  # devices and deployments are not time series: kept


def test_rollout_leases_are_claimed_once_and_only_when_expired(tmp_path) -> None:
    stores = [SQLiteStore(tmp_path / "f.db"), SQLiteStore(tmp_path / "f.db")]
    stores[0].create_deployment(_deployment("dep1", "canary", canary_pct=10, owner="a", lease_until=100.0), [])
    assert stores[1].claim_deployments("f", "b", now=50.0, until=150.0) == []  # a's lease still runs
    assert stores[1].claim_deployments("f", "b", now=101.0, until=150.0) == ["dep1"]
    assert stores[0].claim_deployments("f", "c", now=102.0, until=160.0) == []  # b holds it now
    assert not stores[0].renew_lease("dep1", "a", 200.0)  # a lost it
    assert stores[1].renew_lease("dep1", "b", 200.0)
    stores[1].update_deployment("dep1", state="completed")
    assert stores[0].claim_deployments("f", "c", now=1e9, until=2e9) == []  # finished rollouts are never claimed


def test_sums_in_the_store_saturate_instead_of_overflowing(tmp_path) -> None:
    """A minute bucket that already holds (near) 2^63 - 1 requests takes more records; totals stay readable."""
    store = SQLiteStore(tmp_path / "f.db")
    rec = _tel("d1", 1)
    store.write(Batch("f", telemetry=[rec]))
    minute = int(rec.ts // 60)
    big = 2**63 - 5
    sketch = {"alpha": 0.01, "count": big, "zero": big, "sum": 0.0, "min": 0.0, "max": 0.0, "offset": 0,
              "counts": []}
    conn = sqlite3.connect(tmp_path / "f.db")
    conn.execute("UPDATE version_minutes SET count=?, errors=?, sketch=? WHERE minute=?",
                 (big, big, json.dumps(sketch), minute))
    conn.commit()
    conn.close()
    store.write(Batch("f", telemetry=[_tel(f"d{i}", 1) for i in range(2, 6)]))  # 4 more: 80 requests
    assert store.counts("f")["telemetry"] == 5
    (v,) = store.version_stats("f", since=0)
    assert v.count == 2**63 - 1 and v.sketch.count == 2**63 - 1  # saturated, not wrapped around
    (total,) = store.version_totals("f")
    assert total.count == pytest.approx(2**63 - 1)
