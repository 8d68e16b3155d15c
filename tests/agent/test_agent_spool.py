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
    # Taken before start(): the agent can reconnect while start() is still probing the port, and its birth must
    # still count as the one after the restart (found flaky in CI: birth 0.0x s before start() returned).
    up_at = time.time()
    mosquitto.start()
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
    recs = [protocol.Telemetry.from_json(json.dumps(t)) for t in sub.payloads("telemetry")]
    assert seqs() == set(range(1, last + 1))
    during = [r for r in recs if down_at < r.ts < up_at]
    assert len(during) >= 3, "records made while the broker was down must arrive later"
    assert all(r.dropped == 0 for r in recs)
    sub.close()


def test_spool_caps_telemetry_drops_oldest_and_reports_it(tmp_path: Path) -> None:
    spool = Spool(Database(tmp_path / "agent.db"), max_records=5)

    def make(seq: int, dropped: int) -> bytes:
        return protocol.Telemetry(device="d", boot="b", seq=seq, models=[], interval_s=1.0,
                                  dropped=dropped).to_json()

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


class _Acked:
    def is_published(self) -> bool:
        return True


def _tele(spool: Spool, boot: str = "b1") -> int:
    return spool.add_telemetry("t/telemetry", lambda seq, dropped: protocol.Telemetry(
        device="d", boot=boot, seq=seq, models=[], interval_s=1.0, dropped=dropped).to_json(), boot=boot)[1]


def test_spool_keeps_delivered_rows_until_a_receipt_names_them_once_receipts_were_seen(tmp_path: Path) -> None:
    spool = Spool(Database(tmp_path / "agent.db"), max_records=100)
    assert not spool.receipts  # auto: no controller has sent one yet, so a PUBACK is final
    first = [_tele(spool) for _ in range(2)]
    spool.ack(*[r.id for r in spool.pending(10)])
    assert spool.count() == 0
    receipt = protocol.receipts("d", telemetry={"b1": first})[0]
    spool.confirm(protocol.Receipt.from_json(receipt.to_json()).to_dict())
    assert spool.receipts and Spool(Database(tmp_path / "agent.db")).receipts  # persisted for the next start
    seqs = [_tele(spool) for _ in range(5)]
    spool.add("reply", "t/reply", b"{}", ref="cmd-1")
    spool.add("reply", "other/topic", b"{}", ref=None)  # a copy for another consumer: no receipt will name it
    spool.ack(*[r.id for r in spool.pending(10)])
    assert spool.count() == 6 and spool.unconfirmed() == 6 and spool.pending(10) == []
    # a receipt for another boot, or for seqs it never sent, changes nothing
    spool.confirm(protocol.receipts("d", telemetry={"b0": seqs})[0].to_dict())
    assert spool.count() == 6
    spool.confirm(protocol.receipts("d", telemetry={"b1": [seqs[0], seqs[1], seqs[3]]},
                                    replies=["cmd-1"])[0].to_dict())
    assert spool.pending(10) == [] and spool.count() == 2
    assert spool.requeue(delivered_before=time.time() + 1) == 2
    assert sorted(json.loads(r.payload)["seq"] for r in spool.pending(10)) == [seqs[2], seqs[4]]


def test_spool_cap_does_not_count_delivered_rows_as_dropped(tmp_path: Path) -> None:
    spool = Spool(Database(tmp_path / "agent.db"), max_records=10, receipts="on")
    for _ in range(4):
        _tele(spool)
    spool.ack(*[r.id for r in spool.pending(10)])  # delivered, awaiting a receipt
    for _ in range(8):
        _tele(spool)
    # 12 stored, cap 10: the two oldest (delivered) rows went; the broker has them, so they are not reported lost
    assert spool.count("telemetry") == 10 and spool.dropped_total == 0
    for _ in range(4):
        _tele(spool)
    assert spool.dropped_total == 2  # now undelivered rows had to go: those are reported
    rows = spool.pending(100)
    assert json.loads(rows[-1].payload)["dropped"] == 1


def test_sender_resends_only_what_a_later_receipt_skipped(tmp_path: Path) -> None:
    from edgefleet.agent.spool import Sender

    spool = Spool(Database(tmp_path / "agent.db"), max_records=100, receipts="on")
    sent: list[int] = []

    def publish(topic: str, payload: bytes, props: dict) -> _Acked:
        sent.append(json.loads(payload)["seq"])
        return _Acked()

    sender = Sender(spool, publish, resend_after_s=0.2)
    sender.set_connected(True)
    sender.start()
    try:
        seqs = [_tele(spool) for _ in range(6)]
        sender.wake()
        wait_until(lambda: spool.unconfirmed() == 6, 5, what="all delivered")
        time.sleep(1.5)  # no receipt yet: the controller may be away, so nothing is resent
        assert sorted(sent) == seqs
        time.sleep(0.3)
        sender.receipt(protocol.receipts("d", telemetry={"b1": seqs[:2] + seqs[3:5]})[0].to_dict())
        wait_until(lambda: len(sent) == 8, 5, what="the two skipped records resent")
        assert sorted(sent[6:]) == [seqs[2], seqs[5]]
        sender.receipt(protocol.receipts("d", telemetry={"b1": [seqs[2], seqs[5]]})[0].to_dict())
        wait_until(lambda: spool.count() == 0, 5, what="outbox empty")
        assert sender.resent == 2 and sender.confirmed == 6 and sender.drained(confirmed=True)
    finally:
        sender.stop()


def test_acknowledged_sees_the_puback_of_a_message_paho_queued_while_disconnected(mosquitto) -> None:
    import paho.mqtt.client as mqtt
    from edgefleet.agent.spool import acknowledged
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="noconn-test", protocol=mqtt.MQTTv5)
    info = c.publish("edgefleet/v1/testfleet/noconn/telemetry", b"{}", qos=1)  # not connected yet
    assert info.rc == mqtt.MQTT_ERR_NO_CONN
    c.connect(mosquitto.host, mosquitto.port)
    c.loop_start()
    try:
        wait_until(lambda: acknowledged(info), 10, what="PUBACK of the queued message")
        with pytest.raises(RuntimeError):  # what stalled the outbox: paho's own check raises for ever
            info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


def test_spool_forgets_delivered_rows_no_receipt_named_within_the_expiry(tmp_path: Path) -> None:
    spool = Spool(Database(tmp_path / "agent.db"), receipts="on")
    _tele(spool)
    spool.add("reply", "t/reply", b"{}", ref="cmd-9")
    spool.ack(*[r.id for r in spool.pending(10)])
    _tele(spool)  # not delivered: never expires (it is the broker that would have it, and it does not yet)
    assert spool.expire(delivered_before=time.time() - 60) == 0
    assert spool.expire(delivered_before=time.time() + 1) == 2
    assert spool.count() == 1 and len(spool.pending(10)) == 1


def test_mqtt_link_hands_over_only_valid_receipts_for_its_own_device(tmp_path: Path) -> None:
    from edgefleet.agent.config import BrokerConfig
    from edgefleet.agent.mqtt import MqttLink

    got: list[dict] = []
    link = MqttLink(BrokerConfig(), "testfleet", "dev-a", "boot", describe=protocol.Description,
                    on_command=lambda m: None, on_receipt=got.append)

    class Msg:
        def __init__(self, payload: bytes) -> None:
            self.payload = payload

    mine = protocol.receipts("dev-a", telemetry={"b": [1, 2]})[0]
    for bad in (protocol.receipts("dev-b", telemetry={"b": [1]})[0].to_json(),  # another device's
                b"{not json", json.dumps({**mine.to_dict(), "telemetry": {"b": [[2, 1]]}}).encode()):
        link._receipt(Msg(bad))  # type: ignore[arg-type]
    assert got == [] and link._bad_receipts == 3
    link._receipt(Msg(mine.to_json()))  # type: ignore[arg-type]
    assert [r["telemetry"] for r in got] == [{"b": [[1, 2]]}]


def _reply(cmd_id: str, *, ok: bool = False, step: str = "receive") -> bytes:
    if ok:
        return protocol.Reply.ok(cmd_id, "d").to_json()
    return protocol.Reply.failed(cmd_id, "d", "command.signature", "no", step).to_json()


def _event(spool: Spool, kind: str) -> int:
    return spool.add_event("t/events", lambda seq: protocol.Event(device="d", boot="b1", seq=seq, kind=kind,
                                                                  message="m").to_json(), boot="b1")


def test_spool_caps_replies_and_events_refusals_first_with_exact_drop_counts(tmp_path: Path) -> None:
    """Issue 18: 1,000 refused commands while nobody takes the outbox. Replies and events are capped; refusals
    (and deploy progress) go before anything else, so the reply to a real deploy stored before the flood survives;
    every undelivered row dropped is counted, per kind, exactly, and the counts survive a reopen."""
    spool = Spool(Database(tmp_path / "agent.db"), max_records=10, max_events=50, max_replies=40)
    spool.add("reply", "t/reply", _reply("deploy-1", step="download"), ref="deploy-1")  # a real failure: kept
    spool.add("reply", "t/reply", _reply("deploy-2", ok=True), ref="deploy-2")
    _event(spool, "deploy")
    for i in range(1000):
        spool.add("reply", "t/reply", _reply(f"junk-{i}"), ref=f"junk-{i}")
        _event(spool, "command.refused")
    assert spool.count("reply") == 40 and spool.count("event") == 50
    refs = {json.loads(r.payload)["id"] for r in spool.pending(1000) if r.kind == "reply"}
    assert {"deploy-1", "deploy-2"} <= refs
    assert {f"junk-{i}" for i in range(962, 1000)} <= refs  # the newest refusals, the oldest went first
    kinds = [json.loads(r.payload)["kind"] for r in spool.pending(1000) if r.kind == "event"]
    assert kinds.count("deploy") == 1
    assert spool.dropped() == {"telemetry": 0, "event": 1001 - 50, "reply": 1002 - 40}
    assert Spool(Database(tmp_path / "agent.db")).dropped() == spool.dropped()  # persisted
    assert spool.status()["dropped_by_kind"] == spool.dropped()


def test_spool_cap_never_drops_rows_in_flight_and_counts_delivered_drops_as_delivered(tmp_path: Path) -> None:
    spool = Spool(Database(tmp_path / "agent.db"), max_replies=10, receipts="on")
    for i in range(10):
        spool.add("reply", "t/reply", _reply(f"a-{i}"), ref=f"a-{i}")
    first = spool.pending(5)
    spool.ack(*[r.id for r in first])  # delivered (the broker has them), awaiting a receipt
    nxt = spool.pending(3)
    spool.in_flight = lambda: [r.id for r in nxt]  # handed to paho, not yet acknowledged
    for i in range(10):
        spool.add("reply", "t/reply", _reply(f"b-{i}"), ref=f"b-{i}")
    ids = {r.id for r in spool.pending(100)}
    assert {r.id for r in nxt} <= ids  # paho retransmits these itself: never dropped
    # 20 stored, cap 10 (+3 in flight kept beyond it): the 5 delivered went uncounted, 2 undelivered counted
    assert spool.count("reply") == 13 and spool.dropped()["reply"] == 2


def test_spool_holds_rows_in_memory_when_the_database_cannot_take_them(tmp_path: Path) -> None:
    """The in-memory fallback, driven through the real database: a transaction failing as SQLite fails on a full
    disk hands its outbox rows to the spool, which sends them first and stores them once there is room."""
    import sqlite3

    db = Database(tmp_path / "agent.db")
    spool = Spool(db, max_held=3)
    real = db.conn
    failing = {"on": True}

    class FullDisk:  # the connection, but COMMIT fails with SQLITE_FULL while "on"
        def __getattr__(self, name: str):
            return getattr(real, name)

        def execute(self, sql: str, *a):
            if failing["on"] and sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            return real.execute(sql, *a)

    db.conn = FullDisk()  # type: ignore[assignment]
    _tele(spool)
    held_id = _event(spool, "deploy")
    assert held_id < 0 and spool.held() == 2
    spool.add("reply", "t/reply", _reply("r1", step="download"), ref="r1")
    for _ in range(2):
        _tele(spool)
    assert spool.held() == 3 and spool.held_dropped["telemetry"] == 2  # the oldest held went, counted
    pending = spool.pending(10)
    assert [r.id < 0 for r in pending] == [True] * 3
    tele_seqs = [json.loads(r.payload)["seq"] for r in pending if r.kind == "telemetry"]
    failing["on"] = False
    assert _tele(spool) > max(tele_seqs)  # a stored record never reuses a seq handed to a held one
    assert spool.flush_held() == 3 and spool.held() == 0
    assert spool.count() == 4 and all(r.id > 0 for r in spool.pending(10))
    # exact accounting: the dropped fields of the records that remain add up to the records lost from memory
    tele = [json.loads(r.payload) for r in spool.pending(10) if r.kind == "telemetry"]
    assert sum(t["dropped"] for t in tele) == spool.held_dropped["telemetry"] == 2
    assert len({t["seq"] for t in tele}) == len(tele)
    _tele(spool)
    assert json.loads(spool.pending(10)[-1].payload)["dropped"] == 0
    assert spool.dropped()["telemetry"] == 2 and spool.dropped()["event"] == 0
