"""Two controller processes in one shared-subscription group split the ingest: nothing lost, nothing doubled."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from _fleet_util import wait_until
from edgefleet.sdk.protocol import ModelWindow, Status, Telemetry, topic
from edgefleet.sdk.sketch import DDSketch

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

EDGEFLEET = Path(sys.executable).with_name("edgefleet")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _up(url: str) -> bool:
    try:
        return bool(_get(url + "/api/ingest")["connected"])
    except OSError:
        return False


def test_two_controller_processes_split_ingest_without_loss_or_duplicates(mosquitto, publisher, fleet_id, tmp_path,
                                                                           trust_file) -> None:
    db = tmp_path / "shared.db"
    procs, urls = [], []
    try:
        for name in ("a", "b"):
            port = _free_port()
            log = open(tmp_path / f"ctl-{name}.log", "wb")
            procs.append((subprocess.Popen(
                [str(EDGEFLEET), "fleet", "serve", "--broker", mosquitto.url, "--db", str(db), "--fleet", fleet_id,
                 "--http", f"127.0.0.1:{port}", "--bundles", str(tmp_path / f"bundles-{name}"), "--trust",
                 str(trust_file), "--client-id", f"{fleet_id}-{name}"],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}), log))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_until(lambda u=url: _up(u), timeout_s=30, what=f"controller {url} subscribed")

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
        wait_until(lambda: sum(_get(u + "/api/ingest")["received"].get("telemetry", 0) for u in urls) >= total,
                   timeout_s=60, what=f"{total} telemetry messages received by the two controllers")
        time.sleep(0.5)  # any doubled delivery would show up as more than `total`
        stats = [_get(u + "/api/ingest") for u in urls]
        received = [s["received"].get("telemetry", 0) for s in stats]
        stored = [s["stored"].get("telemetry", 0) for s in stats]
        # Each message went to exactly one controller, and both did part of the work.
        assert sum(received) == total, received
        assert all(r > 0 for r in received), received
        assert sum(stored) == total and all(s["duplicates"].get("telemetry", 0) == 0 for s in stats)
        assert stats[0]["store"]["telemetry"] == total
        # Statuses are not shared: each controller saw every device's retained status.
        assert all(s["received"].get("status", 0) >= n_dev for s in stats)
        # Either controller's API shows the whole fleet (the store is shared).
        for url in urls:
            assert len(_get(url + "/api/devices")["devices"]) == n_dev
    finally:
        for p, log in procs:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            log.close()
