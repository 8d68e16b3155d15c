"""Bounded everything on the device (issue 18): 1,000 refused commands while the controller is away left 1,000
events, 1,000 replies queued and 1,000 whole journal entries. A real agent and a real Mosquitto: the outbox keeps at
most its caps per kind (refusals dropped first, every undelivered drop counted exactly and reported in telemetry),
the journal keeps at most ``journal_max_entries`` ids with no payloads, commands beyond ``journal_max_pending`` are
answered ``journal.full`` at once, and the agent still answers a real command afterwards.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from _agents import FLEET, BundleServer, Watcher, make_agent, sha_size, wait_until
from edgefleet.sdk import protocol
from edgefleet.sdk.testing import build_test_bundle

pytestmark = [pytest.mark.mosquitto]

N_JUNK = 1000
CAP = 100


def _db(agent: Any) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{agent.data_dir / 'state' / 'agent.db'}?mode=ro", uri=True, timeout=5)


@pytest.mark.timeout(300)
def test_a_flood_of_refused_commands_leaves_bounded_outbox_and_journal(tmp_path: Path, mosquitto, signing_key,
                                                                        mlp_model: Path, figures: Any) -> None:
    pub = tmp_path / "fleet.pub"
    pub.write_bytes(signing_key.public.to_pem())
    agent = make_agent(tmp_path, mosquitto.url, pub, require_signed=True, interval=0.5,
                       telemetry='receipts = "on"',  # the controller is away: rows wait for receipts that never come
                       extra=f"[storage]\nmax_events = {CAP}\nmax_replies = {CAP}\njournal_max_entries = {CAP}\n")
    w = Watcher(mosquitto, agent.device)
    agent.start()
    try:
        w.wait_for("status", lambda st: st["state"] == "online")  # subscribed: commands reach it
        import psutil

        proc = psutil.Process(agent.proc.pid)  # type: ignore[union-attr]
        rss_before = proc.memory_info().rss
        pad = "x" * 20_000  # each junk command carries 20 kB: journalled whole, 1,000 of them would be 20 MB
        t0 = time.monotonic()
        for i in range(N_JUNK):
            cmd = {**protocol.command("describe", {}, cmd_id=f"junk-{i:04d}").to_dict(), "pad": pad}
            w.send_raw(json.dumps(cmd).encode())
        # every refusal is answered or counted as dropped by the reply cap (the flood outruns the sender's window)
        def accounted() -> tuple[int, int, int, int]:
            with _db(agent) as db:
                meta = dict(db.execute("SELECT key, value FROM meta WHERE key LIKE 'dropped.%'").fetchall())
            replies = len({r["id"] for r in w.payloads("reply")})
            events = sum(e["kind"] == "command.refused" for e in w.payloads("events"))
            return replies, int(meta.get("dropped.reply", 0)), events, int(meta.get("dropped.event", 0))

        wait_until(lambda: (lambda a: a[0] + a[1] == N_JUNK and a[2] + a[3] == N_JUNK)(accounted()), 120,
                   what="1,000 refusals answered or counted as dropped")
        took = time.monotonic() - t0
        rss_after = proc.memory_info().rss
        got_replies, dropped_replies, got_events, dropped_events = accounted()
        replies = w.payloads("reply")
        assert len(replies) == got_replies, "a reply arrived twice"
        assert {r["error"]["code"] for r in replies} == {"command.signature"}
        assert dropped_replies > 0  # the cap did bite

        # a real, signed command still runs (and its reply is kept over the refusals)
        bundle = build_test_bundle(mlp_model, tmp_path / "v1.efb", signing_key, version="1.0.0")
        sha, size = sha_size(bundle)
        cmd = protocol.sign_command(protocol.command("deploy", {"url": bundle.as_uri(), "sha256": sha, "size": size}),
                                    signing_key, counter=int(time.time() * 1e6), ttl_s=60, device=agent.device,
                                    fleet=FLEET)
        w.send_raw(cmd.to_json())
        assert w.wait_reply(cmd.id)["status"] == "ok"

        t_after = time.time()
        wait_until(lambda: any(r["ts"] > t_after for r in w.payloads("telemetry")), 10, what="telemetry after")
        rec = [r for r in w.payloads("telemetry") if r["ts"] > t_after][-1]
        system = rec["system"]
        with _db(agent) as db:
            outbox = dict(db.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind").fetchall())
            journal_rows, journal_bytes = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM commands").fetchone()
        db_bytes = sum(p.stat().st_size for p in (agent.data_dir / "state").glob("agent.db*"))
        # 50 rows may be in flight above a cap (paho retransmits them; never dropped)
        assert outbox.get("reply", 0) <= CAP + 50 and outbox.get("event", 0) <= CAP + 50, outbox
        assert journal_rows <= CAP and journal_bytes == 0, (journal_rows, journal_bytes)
        assert system["journal"]["forgotten_total"] >= N_JUNK + 1 - CAP
        # the counters telemetry reports are the exact ones (persisted with the drops)
        assert system["dropped_by_kind"] == {"telemetry": 0, "event": dropped_events, "reply": dropped_replies}
        figures.add("device_bounds", "refusal_flood", {
            "commands": N_JUNK, "seconds": round(took, 1),
            "rss_mib_before_after": (round(rss_before / 2**20, 1), round(rss_after / 2**20, 1)),
            "outbox_rows": outbox, "journal_rows": journal_rows,
            "journal_payload_bytes": journal_bytes, "agent_db_bytes": db_bytes, "replies_received": got_replies,
            "replies_dropped": dropped_replies, "events_received": got_events, "events_dropped": dropped_events,
            "telemetry_system": {k: system[k] for k in ("dropped_by_kind", "journal", "outbox", "storage")}})
    finally:
        agent.kill()
        w.close()


@pytest.mark.timeout(120)
def test_commands_beyond_the_pending_cap_are_answered_journal_full_at_once(tmp_path: Path, mosquitto, signing_key,
                                                                           mlp_model: Path) -> None:
    """While a slow deploy runs, at most ``journal_max_pending`` commands wait; the rest are answered at once with
    ``journal.full`` (acknowledged, not left in the broker's in-flight window), and the waiting ones run after."""
    pub = tmp_path / "fleet.pub"
    pub.write_bytes(signing_key.public.to_pem())
    agent = make_agent(tmp_path, mosquitto.url, pub, require_signed=False, extra="[storage]\njournal_max_pending = 3\n")
    w = Watcher(mosquitto, agent.device)
    (tmp_path / "srv").mkdir()
    bundle = build_test_bundle(mlp_model, tmp_path / "srv" / "v1.efb", signing_key, version="1.0.0")
    sha, size = sha_size(bundle)
    server = BundleServer(tmp_path / "srv", rate=size / 3.0)  # ~3 s
    agent.start()
    try:
        w.wait_for("status", lambda st: st["state"] == "online")  # subscribed: commands reach it
        deploy = w.send("deploy", {"url": server.url("v1.efb"), "sha256": sha, "size": size})
        w.wait_for("events", lambda e: e["kind"] == "deploy.progress" and e["data"].get("command") == deploy)
        ids = [w.send("describe", cmd_id=f"d-{i}-{uuid.uuid4().hex[:6]}") for i in range(6)]
        full = [w.wait_reply(i, timeout=2.5) for i in ids[2:]]  # answered while the deploy still runs
        assert all((r["status"], r["error"]["code"], r["error"]["step"]) == ("error", "journal.full", "receive")
                   for r in full), full
        assert w.wait_reply(deploy)["status"] == "ok"
        assert all(w.wait_reply(i)["status"] == "ok" for i in ids[:2])
        wait_until(lambda: any(r["system"]["journal"]["refused_total"] == 4 for r in w.payloads("telemetry")), 10,
                   what="refusals counted in telemetry")
        wait_until(lambda: w.payloads("telemetry")[-1]["system"]["journal"]["pending"] == 0, 10,
                   what="no command left waiting")
    finally:
        agent.kill()
        server.close()
        w.close()


def test_storage_limits_come_from_config_and_bad_values_name_the_key(tmp_path: Path, signing_key) -> None:
    from edgefleet.agent.config import parse_config
    from edgefleet.sdk.errors import ConfigError

    pub = tmp_path / "fleet.pub"
    pub.write_bytes(signing_key.public.to_pem())
    base = {"agent": {"device": "d", "fleet": "f", "data_dir": str(tmp_path), "trusted_keys": [str(pub)]}}
    cfg = parse_config({**base, "storage": {"reserve_bytes": 0, "ballast_bytes": 1 << 20, "max_events": 10,
                                            "max_replies": 20, "max_held": 30, "journal_max_entries": 100,
                                            "journal_max_pending": 1}})
    assert (cfg.reserve_bytes, cfg.ballast_bytes, cfg.max_events, cfg.max_replies, cfg.max_held,
            cfg.journal_max_entries, cfg.journal_max_pending) == (0, 1 << 20, 10, 20, 30, 100, 1)
    for key, bad in (("reserve_bytes", -1), ("max_events", 0), ("max_replies", "many"), ("journal_max_pending", 0),
                     ("journal_max_entries", 5), ("max_held", True), ("unknown", 1)):
        with pytest.raises(ConfigError, match=f"storage.{key}"):
            parse_config({**base, "storage": {key: bad}})
