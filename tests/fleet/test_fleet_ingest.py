"""Ingest against a real Mosquitto: rows stored = messages sent, replays ignored, bad input counted and skipped."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import urllib.request

import pytest
from _fleet_util import wait_until
from edgefleet.fleet.controller import Controller, ControllerConfig
from edgefleet.fleet.simulate import Simulator, make_devices
from edgefleet.fleet.store import Batch, SQLiteStore, WriteResult
from edgefleet.sdk.protocol import MAX_PAYLOAD, Event, ModelWindow, Status, Telemetry, topic
from edgefleet.sdk.sketch import DDSketch

pytestmark = pytest.mark.mosquitto


def _record(device: str, seq: int, boot: str = "boot1", latency: float = 5.0) -> bytes:
    sk = DDSketch()
    for i in range(10):
        sk.add(latency + i * 0.1)
    models = [ModelWindow(name="m", version="1.0.0", count=10, errors=1, providers=["CPUExecutionProvider"],
                          sketch=sk.to_wire())]
    return Telemetry(device=device, boot=boot, seq=seq, models=models, interval_s=1.0).to_json()


def test_ingest_stores_one_row_per_message_and_ignores_replays(controller_factory, publisher, fleet_id) -> None:
    ctl = controller_factory()
    payloads = [(topic(fleet_id, f"dev{d}", "telemetry"), _record(f"dev{d}", s)) for d in range(5) for s in range(40)]
    for t, p in payloads:
        publisher.publish(t, p)
    publisher.flush()
    wait_until(lambda: ctl.store.counts(fleet_id)["telemetry"] == 200, what="200 telemetry rows")
    # Replay the first 50 exactly (as a reconnecting agent re-sending un-acked messages would).
    for t, p in payloads[:50]:
        publisher.publish(t, p)
    publisher.flush()
    wait_until(lambda: ctl.ingest.stats.duplicates["telemetry"] == 50, what="50 duplicates counted")
    counts = ctl.store.counts(fleet_id)
    assert counts["telemetry"] == 200
    assert counts["windows"] == 200
    assert counts["devices"] == 5
    # Derived views count each window once: the replay did not inflate the fleet-wide totals.
    totals = ctl.store.version_totals(fleet_id)
    assert [(t.name, t.version, t.count, t.errors) for t in totals] == [("m", "1.0.0", 2000, 200)]


def test_ingest_counts_bad_payloads_logs_once_and_keeps_going(controller_factory, publisher, fleet_id, caplog) -> None:
    ctl = controller_factory()
    caplog.set_level(logging.WARNING, logger="edgefleet.fleet.ingest")
    tel = topic(fleet_id, "bad1", "telemetry")
    bad = [
        (tel, b"{not json"),
        (tel, b'{"v": 2, "device": "bad1"}'),
        (tel, b"[1,2,3]"),
        (tel, b'{"v":1,"device":"bad1","boot":"b","seq":1,"ts":1,"interval_s":1,"models":[{"name":"m"}]}'),
        (tel, b"x" * (MAX_PAYLOAD + 10)),
        (tel, _record("someone-else", 1)),  # payload about another device than the topic's
        (topic(fleet_id, "bad1", "events"), b'{"v":1,"device":"bad1","kind":"x"}'),
        (topic(fleet_id, "bad1", "status"), b'{"v":1,"device":"bad1","state":"sideways"}'),
    ]
    for i, (t, p) in enumerate(bad):
        publisher.publish(t, p)
        publisher.publish(topic(fleet_id, "good", "telemetry"), _record("good", i))
    publisher.publish(topic(fleet_id, "good", "events"),
                      Event(device="good", boot="boot1", seq=1, kind="install", message="installed m 1.0.0").to_json())
    publisher.flush()
    wait_until(lambda: ctl.store.counts(fleet_id)["telemetry"] == len(bad), what="every good record stored")
    wait_until(lambda: ctl.ingest.stats.snapshot()["rejected_total"] == len(bad), what="every bad payload counted")
    rejected = {(r["channel"], r["reason"]): r["count"] for r in ctl.ingest.stats.snapshot()["rejected"]}
    assert rejected[("telemetry", "version")] == 1
    assert rejected[("telemetry", "oversized")] == 1
    assert rejected[("telemetry", "malformed")] == 4
    assert rejected[("events", "malformed")] == 1
    assert rejected[("status", "malformed")] == 1
    wait_until(lambda: ctl.store.counts(fleet_id)["events"] == 1, what="the good event stored")
    logged = [r for r in caplog.records if "bad1" in r.getMessage()]
    # Once per (device, channel): 6 bad telemetry payloads, 1 event, 1 status from bad1 → 3 log lines.
    assert len(logged) == 3, [r.getMessage() for r in logged]


def test_status_birth_and_last_will_reach_the_store(controller_factory, mosquitto, fleet_id) -> None:
    ctl = controller_factory()
    devs = make_devices(3, prefix="w", profiles=["jetson-orin", "raspberry-pi-5"], tags=["lab"])
    sim = Simulator(mosquitto.url, fleet_id, devs, interval_s=0.2, client_prefix=f"{fleet_id}-sim")
    sim.start()
    try:
        wait_until(lambda: sum(d.state == "online" for d in ctl.store.devices(fleet_id)) == 3, what="3 online")
        by_id = {d.device: d for d in ctl.store.devices(fleet_id)}
        assert by_id["w-0000"].profile == "jetson-orin"
        assert by_id["w-0001"].profile == "raspberry-pi-5"
        assert by_id["w-0000"].tags == ["lab"]
    finally:
        sim.stop(graceful=False)  # drop the connections: the broker publishes each device's Last Will
    wait_until(lambda: all(d.state == "offline" for d in ctl.store.devices(fleet_id)), timeout_s=30,
               what="Last Will offline statuses")
    # The will carries no description: the profile learnt from the birth is kept.
    assert {d.profile for d in ctl.store.devices(fleet_id)} == {"jetson-orin", "raspberry-pi-5"}


def test_statuses_are_ordered_by_arrival_not_by_the_device_clock(controller_factory, publisher, fleet_id) -> None:
    """The broker delivers one topic in order and retains the last: the controller agrees with it. A device whose
    clock is behind (no RTC after a reboot) still shows its newest status, and one from the future (within the skew
    window) does not outlive the next one."""
    ctl = controller_factory()
    st = topic(fleet_id, "o1", "status")
    first = Status(device="o1", state="online", boot="b1", ts=time.time() + 200, description={"profile": "x86-cpu"})
    behind = Status(device="o1", state="online", boot="b2", ts=time.time() - 3600, description={"profile": "x86-cpu"})
    publisher.publish(st, first.to_json())
    publisher.flush()
    wait_until(lambda: getattr(ctl.store.device(fleet_id, "o1"), "boot", None) == "b1", what="first birth")
    publisher.publish(st, behind.to_json())
    publisher.flush()
    wait_until(lambda: getattr(ctl.store.device(fleet_id, "o1"), "boot", None) == "b2",
               what="the later birth wins although its clock is an hour behind")
    d = ctl.store.device(fleet_id, "o1")
    assert d is not None and d.state == "online" and d.status_ts is not None and abs(d.status_ts - time.time()) < 60


def test_a_valid_message_the_store_cannot_take_is_dropped_alone(mosquitto, tmp_path, publisher, fleet_id) -> None:
    class RefusingStore(SQLiteStore):
        """A real SQLite store that cannot take one device's records (as a broken row or a constraint would)."""

        def write(self, batch: Batch) -> WriteResult:
            if any(t.device == "big" for t in batch.telemetry):
                raise sqlite3.IntegrityError("cannot store this one")
            return super().write(batch)

    ctl = Controller(ControllerConfig(broker=mosquitto.url, db=str(tmp_path / "f.db"), fleet=fleet_id, http_port=0,
                                      bundles_dir=tmp_path / "b", client_id=f"{fleet_id}-refusing"),
                     store=RefusingStore(tmp_path / "f.db"))
    ctl.start()
    try:
        for i in range(10):
            publisher.publish(topic(fleet_id, "ok", "telemetry"), _record("ok", i))
            if i == 5:
                publisher.publish(topic(fleet_id, "big", "telemetry"), _record("big", 1))
        publisher.flush()
        wait_until(lambda: ctl.store.counts(fleet_id)["telemetry"] == 10, what="the 10 storable records")
        wait_until(lambda: ctl.ingest.stats.rejected[("telemetry", "unstorable")] == 1, what="the poison one counted")
        # Ingest goes on afterwards.
        publisher.publish(topic(fleet_id, "ok", "telemetry"), _record("ok", 99))
        publisher.flush()
        wait_until(lambda: ctl.store.counts(fleet_id)["telemetry"] == 11, what="ingest after the poison message")
    finally:
        ctl.stop()


def _raw(device: str, seq: int, count: int, ts: float | None = None) -> bytes:
    """A telemetry record written by hand, to put values at the edges of what the protocol allows."""
    sketch = {"alpha": 0.01, "count": count, "zero": count, "sum": 0.0, "min": 0.0 if count else None,
              "max": 0.0 if count else None, "offset": 0, "counts": []}
    rec = {"v": 1, "device": device, "boot": "b", "seq": seq, "ts": time.time() if ts is None else ts,
           "interval_s": 1.0, "models": [{"name": "edge", "version": "1", "count": count, "errors": count,
                                          "providers": [], "sketch": sketch}]}
    return json.dumps(rec).encode()


def test_records_at_the_int64_edge_are_refused_or_stored_and_never_poison_others(controller_factory, publisher,
                                                                                  fleet_id) -> None:
    """Issue 18: one record with int64-edge counters made every later record of that model unstorable."""
    ctl = controller_factory()
    tel = topic(fleet_id, "edge", "telemetry")
    publisher.publish(tel, _raw("edge", 2**70, 1))  # seq beyond 64 bits: refused by the protocol
    publisher.publish(tel, _raw("edge", 1, 2**63 - 1))  # a window of 2^63 - 1 requests: over the 2^40 limit
    publisher.publish(tel, _raw("edge", 2, 2**40))  # the largest window allowed: stored
    publisher.publish(tel, b'{"v":1,"device":"edge","boot":"b","seq":3,"ts":1e999}')  # no float for it
    publisher.publish(tel, _raw("edge", 4, 1, ts=time.time() + 86400))  # a day ahead of the controller's clock
    for i in range(20):  # other devices, same model and minute, after the edge ones
        publisher.publish(topic(fleet_id, f"ok{i % 4}", "telemetry"), _raw(f"ok{i % 4}", i, 10))
    publisher.flush()
    wait_until(lambda: ctl.store.counts(fleet_id)["telemetry"] == 21, what="the 20 normal records and the edge one")
    rejected = ctl.ingest.stats.rejected
    assert rejected[("telemetry", "malformed")] == 3 and rejected[("telemetry", "clock")] == 1
    assert rejected[("telemetry", "unstorable")] == 0
    (total,) = ctl.store.version_totals(fleet_id)
    assert total.count == 2**40 + 200
    with urllib.request.urlopen(f"{ctl.url}/metrics") as r:
        assert r.status == 200 and b'edgefleet_model_latency_seconds_count{fleet="' in r.read()


def test_graceful_restart_under_load_loses_nothing_and_stores_nothing_twice(controller_factory, publisher,
                                                                            fleet_id) -> None:
    ctl = controller_factory("restart")
    n = 3000

    def send(seqs: range) -> None:
        for s in seqs:
            publisher.publish(topic(fleet_id, f"g{s % 30}", "telemetry"), _record(f"g{s % 30}", s))

    send(range(n // 2))
    wait_until(lambda: ctl.store.counts(fleet_id)["telemetry"] > 300, what="ingest under way")
    ctl.stop()  # mid-stream: what it queued is written and acked, the rest stays with the broker
    stored_before = ctl.ingest.stats.stored["telemetry"]
    send(range(n // 2, n))  # while it is down: queued in its persistent session
    publisher.flush()
    again = controller_factory("restart")  # same client id: resumes the persistent session
    wait_until(lambda: again.store.counts(fleet_id)["telemetry"] == n, timeout_s=60, what="every record stored")
    assert stored_before < n
    assert again.ingest.stats.duplicates["telemetry"] == 0
    assert again.ingest.stats.stored["telemetry"] == n - stored_before
