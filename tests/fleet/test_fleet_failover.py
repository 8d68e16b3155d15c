"""Failover on real parts: Mosquitto, a real PostgreSQL, three controller processes in one share group, simulated
devices that keep every message until a receipt names it. Controllers are SIGKILLed mid-stream and mid-rollout.

What must hold: every record stored exactly once (rows = records sent, the derived per-minute totals = the raw
windows' sum), every rollout driven to its end exactly once by whichever controller holds its lease (one deploy
command per device, one rollback per halted canary), and any controller answering the API with the same data.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from _fleet_util import ControllerProc, wait_until
from edgefleet.fleet.simulate import Simulator, make_devices

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

LEASE_S = 3.0  # --rollout-lease: a dead controller's rollout is resumed within about 4/3 of this
# --mqtt-session-expiry: the broker keeps a dead controller's session this long, and goes on giving it its share of
# the group's messages meanwhile (the devices send them again once later receipts show they were not stored).
SESSION_S = 5


def _post(ctl: ControllerProc, path: str, body: dict[str, Any] | bytes, token: str) -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    ctype = "application/octet-stream" if isinstance(body, bytes) else "application/json"
    req = urllib.request.Request(ctl.url + path, data=data, method="POST",
                                 headers={"Content-Type": ctype, "Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _sql(url: str, statement: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(statement).fetchall()


def test_controllers_killed_mid_stream_and_mid_rollout_lose_nothing_double_nothing_and_finish_each_rollout_once(
        mosquitto, postgres_url, fleet_id, trust_file, key_file, mlp_model, make_bundle, tmp_path: Path) -> None:
    from edgefleet.fleet.auth import issue_token
    from edgefleet.fleet.store import open_store

    store = open_store(postgres_url)  # migrates once, before the controllers start
    token = issue_token(store, "failover test", "admin").token
    store.close()
    bundles = tmp_path / "bundles"  # one directory for the group: whoever resumes a rollout serves its bundle
    ctls = {name: ControllerProc(tmp_path, name, broker=mosquitto.url, store=postgres_url, fleet=fleet_id,
                                 trust=trust_file, key=key_file, bundles=bundles,
                                 extra=("--rollout-lease", str(LEASE_S), "--mqtt-session-expiry", str(SESSION_S)))
            for name in ("a", "b", "c")}
    devs = make_devices(15, prefix="g1", profiles=["x86-cpu"], model="testmodel", tags=["g1"])
    devs += make_devices(15, prefix="g2", profiles=["x86-cpu"], model="testmodel", tags=["g2"])
    sim = Simulator(mosquitto.url, fleet_id, devs, interval_s=0.1, per_window=40, slow={"2.0.0": 2.5},
                    client_prefix=f"{fleet_id}-sim", receipts=True, resend_after_s=2.0)
    try:
        for c in ctls.values():
            wait_until(c.up, 60, what=f"controller {c.name} up")
        sim.start()
        sim.run_telemetry(duration_s=120)
        wait_until(lambda: len(ctls["b"].get("/api/devices")["devices"]) == 30 and all(
            d["models"] for d in ctls["b"].get("/api/devices")["devices"]), 30, what="30 devices reporting")
        wait_until(lambda: all(c.get("/api/ingest")["stored"].get("telemetry", 0) > 0 for c in ctls.values()), 20,
                   what="each of the three controllers storing part of the stream (the share group splits it)")

        # Mid-stream: a loses its share of what the broker had handed it; the devices send that again.
        ctls["a"].kill()
        time.sleep(1.0)

        # Two rollouts driven by b: a healthy version for g1, a 2.5x slower one for g2.
        info = {}
        for version in ("1.5.0", "2.0.0"):
            info[version] = _post(ctls["b"], "/api/bundles",
                                  make_bundle(mlp_model, version=version, filename=f"{version}.efb").read_bytes(),
                                  token)
        policy = {"canary": 33, "observe_s": 4, "min_samples": 100, "baseline_s": 60}
        good = _post(ctls["b"], "/api/deployments", {"bundles": [info["1.5.0"]["sha256"]], "to": "tag:g1", **policy},
                     token)
        bad = _post(ctls["b"], "/api/deployments", {"bundles": [info["2.0.0"]["sha256"]], "to": "tag:g2", **policy},
                    token)
        assert good["owner"] == bad["owner"] == ctls["b"].client_id

        def dep(d: dict[str, Any]) -> dict[str, Any]:
            return ctls["c"].get(f"/api/deployments/{d['id']}")
        def past_canaries() -> bool:  # observing or rolling out (the healthy one may be judged first)
            return all(dep(d)["state"] in ("observing", "rolling-out") for d in (good, bad))
        wait_until(past_canaries, 30, what="both rollouts past installing their canaries")
        # Mid-rollout: the controller driving both dies without releasing its leases.
        killed_at = time.monotonic()
        ctls["b"].kill()
        wait_until(lambda: dep(good)["owner"] == dep(bad)["owner"] == ctls["c"].client_id, 30,
                   what="c taking both rollouts over")
        takeover_s = time.monotonic() - killed_at
        wait_until(lambda: dep(good)["state"] == "completed", 60, what="the healthy rollout completed")
        wait_until(lambda: dep(bad)["state"] == "halted", 60, what="the slow rollout halted")
        wait_until(lambda: dep(bad)["progress"].get("rolled-back", 0) == 5, 30, what="g2's canaries rolled back")

        # a comes back (same client id: the broker hands it what its session kept — stored already by now).
        ctls["a"].start()
        wait_until(ctls["a"].up, 60, what="controller a up again")
        time.sleep(1.0)
        sim.stop_telemetry()
        wait_until(lambda: sim.unconfirmed() == 0, 60, what="every message receipted")

        # -- nothing lost, nothing doubled -----------------------------------------------------------------------
        (n_rows,) = _sql(postgres_url, f"SELECT count(*) FROM telemetry WHERE fleet='{fleet_id}'")[0]
        (n_keys,) = _sql(postgres_url, f"SELECT count(DISTINCT (device, boot, seq)) FROM telemetry "
                                       f"WHERE fleet='{fleet_id}'")[0]
        assert n_rows == n_keys == sim.sent, (n_rows, n_keys, sim.sent)
        (windows_sum,) = _sql(postgres_url, f"SELECT sum(count) FROM windows WHERE fleet='{fleet_id}'")[0]
        (minutes_sum,) = _sql(postgres_url, f"SELECT sum(count) FROM version_minutes WHERE fleet='{fleet_id}'")[0]
        assert minutes_sum == windows_sum  # no replay counted twice in the derived per-minute sketches
        assert sim.resent > 0  # the kills did cost messages in flight, and the devices' resends covered them

        # -- each rollout driven to its end once ------------------------------------------------------------------
        good_final, bad_final = dep(good), dep(bad)
        assert good_final["progress"] == {"active": 15}, good_final
        canaries = {t["device"] for t in bad_final["targets"] if t["phase"] == "canary"}
        assert len(canaries) == 5 and bad_final["progress"] == {"rolled-back": 5, "skipped": 10}, bad_final
        assert "regressed over the +20% limit" in bad_final["message"], bad_final["message"]
        deploy_ids = Counter((c["device"], c["id"]) for c in sim.commands if c["kind"] == "deploy")
        per_device = Counter(dev for dev, _ in deploy_ids)
        assert per_device == Counter({d.device: 1 for d in devs if d.device.startswith("g1")} |
                                     dict.fromkeys(canaries, 1)), per_device  # one command id per device
        rollbacks = Counter(c["device"] for c in sim.commands if c["kind"] == "rollback")
        assert set(rollbacks) == canaries and len({(c["device"], c["id"]) for c in sim.commands
                                                  if c["kind"] == "rollback"}) == 5

        # -- any controller answers with the same data --------------------------------------------------------------
        def same() -> bool:  # the device rows, not the "now" each answer carries
            return bool(ctls["a"].get("/api/devices")["devices"] == ctls["c"].get("/api/devices")["devices"])
        wait_until(same, 10, what="the same device list from a and c")
        assert len(ctls["a"].get("/api/devices")["devices"]) == 30
        assert ctls["a"].get(f"/api/deployments/{good['id']}") == good_final
        print(f"\nfailover: {sim.sent} records, {sim.resent} resent after the kills, rollouts taken over "
              f"{takeover_s:.1f} s after their controller died (lease {LEASE_S:g} s)")
    finally:
        sim.stop()
        for c in ctls.values():
            c.stop()
