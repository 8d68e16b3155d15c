"""Telemetry survives a broker restart: records made while the broker is down wait on disk and every seq arrives.
Also the outbox cap: oldest telemetry dropped first and the drop reported in the next record."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from _agent_util import Watcher, wait_until
from edgefleet.agent.db import Database
from edgefleet.agent.spool import Spool
from edgefleet.sdk import protocol


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory):
    """A Mosquitto whose persistence works when the tests run as root.

    Started as root, Mosquitto drops to the ``mosquitto`` user, which cannot write into pytest's private (0700) tmp
    dir: persistence and the log then fail silently and a restart loses every session and its queued messages.
    ``user root`` keeps it as root (ignored when the tests run as a normal user, who owns the directory anyway).
    """
    from tests.conftest import Mosquitto

    # tests/conftest.py's Mosquitto now writes ``user root`` itself (a second one is a config error).
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto-durable"))
    yield broker
    broker.stop()


def test_broker_restart_loses_no_telemetry_record(agent_factory, mosquitto) -> None:
    agent = agent_factory(interval=0.2, keepalive=2, start=False)
    # A controller with a persistent session at QoS 1: the broker queues for it across its own restart too.
    sub = Watcher(mosquitto, agent.device, client_id=f"ctl-{agent.device}", persistent=True,
                  channels=("telemetry", "status"))
    agent.start()
    wait_until(lambda: len(sub.payloads("telemetry")) >= 3, 10, what="first records")

    mosquitto.stop()
    assert (mosquitto.workdir / "data" / "mosquitto.db").exists(), "the broker must persist sessions to disk"
    down_at = time.time()
    time.sleep(1.5)  # ~7 records are made while nobody can take them
    mosquitto.start()
    up_at = time.time()
    sub.wait_for("status", lambda s: s["state"] == "online" and s["ts"] > up_at, timeout=15)
    time.sleep(0.6)
    assert agent.terminate() == 0

    db = sqlite3.connect(agent.data_dir / "state" / "agent.db")
    last = int(db.execute("SELECT value FROM meta WHERE key='seq.telemetry'").fetchone()[0])
    left = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    assert left == 0, f"{left} records left unacknowledged at shutdown"

    def seqs() -> set[int]:
        return {t["seq"] for t in sub.payloads("telemetry")}

    deadline = time.monotonic() + 15
    while (missing := sorted(set(range(1, last + 1)) - seqs())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not missing, f"seqs never delivered: {missing} of 1..{last}"
    recs = [protocol.parse_telemetry(json.dumps(t)) for t in sub.payloads("telemetry")]
    assert seqs() == set(range(1, last + 1))
    during = [r for r in recs if down_at < r["ts"] < up_at]
    assert len(during) >= 3, "records made while the broker was down must arrive later"
    assert all(r["dropped"] == 0 for r in recs)
    sub.close()


def test_spool_caps_telemetry_drops_oldest_and_reports_it(tmp_path: Path) -> None:
    spool = Spool(Database(tmp_path / "agent.db"), max_records=5)

    def make(seq: int, dropped: int) -> bytes:
        return protocol.encode(protocol.telemetry("d", "b", seq, [], interval_s=1.0, dropped=dropped))

    spool.add("reply", "t/reply", b"{}")  # replies never count against the cap
    for _ in range(8):
        spool.add_telemetry("t/telemetry", make)
    rows = spool.pending(100)
    tele = [json.loads(r.payload) for r in rows if r.kind == "telemetry"]
    assert [t["seq"] for t in tele] == [4, 5, 6, 7, 8]
    assert [r.kind for r in rows].count("reply") == 1
    # each insert over the cap dropped one; the next record reports the drop made when the previous was stored
    assert [t["dropped"] for t in tele] == [0, 0, 0, 1, 1]
    for r in rows:
        spool.ack(r.id)
    _, seq = spool.add_telemetry("t/telemetry", make)
    assert seq == 9 and json.loads(spool.pending(10)[0].payload)["dropped"] == 1
    assert spool.dropped_total == 3
    # seq survives a reopen (a restart)
    again = Spool(Database(tmp_path / "agent.db"), max_records=5)
    assert again.add_telemetry("t/telemetry", make)[1] == 10
