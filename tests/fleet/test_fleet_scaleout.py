"""Two controller processes in one shared-subscription group split the ingest: nothing lost, nothing doubled — on
one SQLite file (one host) and on a shared PostgreSQL (several hosts)."""

from __future__ import annotations

import time

import pytest
from _fleet_util import ControllerProc, wait_until
from edgefleet.sdk.protocol import ModelWindow, Status, Telemetry, topic
from edgefleet.sdk.sketch import DDSketch

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


def test_two_controller_processes_split_ingest_without_loss_or_duplicates(mosquitto, publisher, fleet_id, tmp_path,
                                                                           trust_file, store_url) -> None:
    ctls = [ControllerProc(tmp_path, name, broker=mosquitto.url, store=store_url, fleet=fleet_id, trust=trust_file)
            for name in ("a", "b")]
    try:
        for c in ctls:
            wait_until(c.up, 30, what=f"controller {c.name} subscribed")
        n_dev, n_seq = 20, 100
        for d in range(n_dev):
            publisher.publish(topic(fleet_id, f"s{d}", "status"),
                              Status(device=f"s{d}", state="online", boot="b",
                                     description={"profile": "x86-cpu"}).to_json(),
                              retain=True)
        sk = DDSketch()
        sk.add(4.2)
        models = [ModelWindow(name="m", version="1", count=1, errors=0, providers=["CPUExecutionProvider"],
                              sketch=sk.to_wire())]
        for seq in range(n_seq):
            for d in range(n_dev):
                publisher.publish(topic(fleet_id, f"s{d}", "telemetry"),
                                  Telemetry(device=f"s{d}", boot="b", seq=seq, models=models,
                                            interval_s=1.0).to_json())
        publisher.flush()
        total = n_dev * n_seq
        # ?store=0: the counters alone (a poller need not make the store count its rows)
        wait_until(lambda: sum(c.get("/api/ingest?store=0")["received"].get("telemetry", 0) for c in ctls) >= total,
                   timeout_s=60, what=f"{total} telemetry messages received by the two controllers")
        time.sleep(0.5)  # any doubled delivery would show up as more than `total`
        stats = [c.get("/api/ingest") for c in ctls]
        received = [s["received"].get("telemetry", 0) for s in stats]
        stored = [s["stored"].get("telemetry", 0) for s in stats]
        # Each message went to exactly one controller, and both did part of the work.
        assert sum(received) == total, received
        assert all(r > 0 for r in received), received
        assert sum(stored) == total and all(s["duplicates"].get("telemetry", 0) == 0 for s in stats)
        assert stats[0]["store"]["telemetry"] == total
        assert ctls[0].get("/api/ingest?store=0")["store"] == {}
        # Statuses are not shared: each controller saw every device's retained status.
        assert all(s["received"].get("status", 0) >= n_dev for s in stats)
        # Either controller's API shows the whole fleet (the store is shared), request counts included.
        for c in ctls:
            devices = c.get("/api/devices")["devices"]
            assert len(devices) == n_dev
        (v,) = ctls[1].get("/api/versions?window=3600")["versions"]
        assert v["count"] == total
    finally:
        for c in ctls:
            c.stop()
