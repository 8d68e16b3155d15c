"""Signed deployment commands (issue 7 part 2): an agent with its default config executes only commands signed by a
trusted key, not expired, with a counter above the last one it accepted (persisted across restarts).

The broker delivers every hostile command here (no ACL in the way): the refusal is the agent's. Each refused command
gets one error reply with its stable code and is never executed — asserted on outcomes: the version serving, the
bundle store, the deploy progress events and the agent's own "command done" log lines.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from _agents import FLEET, AgentProc, Watcher, make_agent, serving_version, sha_size, wait_until
from edgefleet.sdk import protocol
from edgefleet.sdk.keys import PrivateKey, generate_keypair

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


class Signer:
    """Signs commands like the controller does, with counters the test chooses."""

    def __init__(self, key: PrivateKey, device: str | None = None, fleet: str | None = FLEET) -> None:
        self.key = key
        self.device = device
        self.fleet = fleet
        self.counter = int(time.time() * 1e6)

    def sign(self, kind: str, args: dict[str, Any], *, cmd_id: str, counter: int | None = None,
             ttl_s: float = 600.0, ts: float | None = None, key: PrivateKey | None = None,
             device: str | None = None) -> dict[str, Any]:
        cmd = protocol.command(kind, args, cmd_id=cmd_id)
        if ts is not None:
            cmd = protocol.Command.from_dict({**cmd.to_dict(), "ts": ts})
        if counter is None:
            self.counter += 1
            counter = self.counter
        # A dict: the tests tamper with it the way an attacker on the wire would.
        return protocol.sign_command(cmd, key or self.key, counter=counter, ttl_s=ttl_s,
                                     device=device or self.device, fleet=self.fleet).to_dict()


def _publish(w: Watcher, cmd: dict[str, Any]) -> str:
    w.send_raw(json.dumps(cmd).encode())
    return str(cmd["id"])


def _executed(agent: AgentProc, w: Watcher, cmd_id: str) -> bool:
    """Did the agent run this command? (its worker logs "command done"; a deploy also reports progress events)"""
    ran = any(r.get("msg") == "command done" and r.get("id") == cmd_id for r in agent.logs())
    progress = any(e.get("data", {}).get("command") == cmd_id for e in w.payloads("events")
                   if e.get("kind", "").startswith(("deploy", "rollback")))
    return ran or progress


@pytest.fixture
def setup(tmp_path: Path, mosquitto, signing_key, make_bundle, mlp_model):
    pub = tmp_path / "trusted.pub"
    pub.write_bytes(signing_key.public.to_pem())
    agent = make_agent(tmp_path, mosquitto.url, pub, interval=5.0)
    w = Watcher(mosquitto, agent.device)
    agent.start()
    bundles = {}
    for v in ("1.0.0", "2.0.0"):
        b = make_bundle(mlp_model, version=v, filename=f"v{v}.efb")
        sha, size = sha_size(b)
        bundles[v] = {"url": b.as_uri(), "sha256": sha, "size": size}
    yield agent, w, Signer(signing_key, agent.device), bundles
    w.close()
    if agent.proc is not None and agent.proc.poll() is None:
        agent.kill()


def test_agent_refuses_forged_untrusted_tampered_unsigned_and_expired_commands(setup, tmp_path: Path) -> None:
    agent, w, s, bundles = setup
    ok = s.sign("deploy", bundles["1.0.0"], cmd_id="valid-1")
    assert w.wait_reply(_publish(w, ok))["status"] == "ok"
    assert serving_version(agent) == "1.0.0"
    store_before = sorted(p.name for p in (agent.data_dir / "store").iterdir())

    hostile: dict[str, tuple[dict[str, Any], str]] = {}
    forged = s.sign("deploy", bundles["2.0.0"], cmd_id="forged-1")
    raw = bytearray(base64.b64decode(forged["signature"]["sig"]))
    raw[5] ^= 0x01
    forged["signature"]["sig"] = base64.b64encode(bytes(raw)).decode()
    hostile["forged"] = (forged, "command.signature")
    other = generate_keypair(tmp_path / "attacker.key")
    hostile["untrusted key"] = (s.sign("deploy", bundles["2.0.0"], cmd_id="untrusted-1", key=other),
                                "command.signature")
    # Signed while pointing at a URL that does not exist, then switched to the real bundle: would install if run.
    tampered = s.sign("deploy", {**bundles["2.0.0"], "url": "file:///nonexistent.efb"}, cmd_id="tampered-1")
    tampered["args"] = dict(bundles["2.0.0"])
    hostile["tampered args"] = (tampered, "command.signature")
    # A valid signature made by the trusted key with its key id swapped for the attacker's is still unknown.
    relabelled = s.sign("deploy", bundles["2.0.0"], cmd_id="relabelled-1")
    relabelled["signature"]["keyid"] = other.public.key_id
    hostile["relabelled key id"] = (relabelled, "command.signature")
    unsigned = protocol.command("deploy", bundles["2.0.0"], cmd_id="unsigned-1").to_dict()
    hostile["unsigned"] = (unsigned, "command.signature")
    stripped = s.sign("deploy", bundles["2.0.0"], cmd_id="stripped-1")
    del stripped["signature"]
    hostile["signature stripped"] = (stripped, "command.signature")
    hostile["expired"] = (s.sign("deploy", bundles["2.0.0"], cmd_id="expired-1", ts=time.time() - 120, ttl_s=60),
                          "command.expired")

    for name, (cmd, code) in hostile.items():
        reply = w.wait_reply(_publish(w, cmd))
        assert reply["status"] == "error", (name, reply)
        assert reply["error"]["code"] == code, (name, reply)
        assert reply["error"]["step"] == "receive", (name, reply)
    time.sleep(1.0)  # anything wrongly queued would have started by now
    for name, (cmd, _) in hostile.items():
        assert not _executed(agent, w, cmd["id"]), name
        assert len(w.replies(cmd["id"])) == 1, name
    assert serving_version(agent) == "1.0.0"
    assert sorted(p.name for p in (agent.data_dir / "store").iterdir()) == store_before
    refused = [e for e in w.payloads("events") if e["kind"] == "command.refused"]
    assert {e["data"]["command"] for e in refused} == {c["id"] for c, _ in hostile.values()}

    # After all that, a valid command still executes.
    good = s.sign("deploy", bundles["2.0.0"], cmd_id="valid-2")
    assert w.wait_reply(_publish(w, good))["status"] == "ok"
    assert serving_version(agent) == "2.0.0"
    assert agent.terminate() == 0


def test_agent_refuses_replayed_and_rolled_back_counters_also_after_restart(setup) -> None:
    agent, w, s, bundles = setup
    base = s.counter
    old_deploy = s.sign("deploy", bundles["1.0.0"], cmd_id="old-deploy", counter=base + 1)
    newer = s.sign("describe", {}, cmd_id="newer-describe", counter=base + 10)
    assert w.wait_reply(_publish(w, newer))["status"] == "ok"

    # The same message re-published raw: not executed again, not answered again (one reply per id).
    _publish(w, newer)
    _publish(w, newer)
    time.sleep(1.0)
    assert len(w.replies("newer-describe")) == 1
    done = [r for r in agent.logs() if r.get("msg") == "command done" and r.get("id") == "newer-describe"]
    assert len(done) == 1

    # A validly signed command captured earlier (lower counter), delivered late: refused, never run.
    reply = w.wait_reply(_publish(w, old_deploy))
    assert reply["status"] == "error" and reply["error"]["code"] == "command.replay", reply
    assert serving_version(agent) is None

    # The last accepted counter survives a restart (SIGKILL: no graceful shutdown to save anything).
    boot0 = [st["boot"] for st in w.payloads("status") if st.get("state") == "online"][-1]
    agent.kill()
    agent.start()
    wait_until(lambda: any(st.get("state") == "online" and st.get("boot") != boot0
                           for st in w.payloads("status")), 10, what="status after restart")
    rolled_back = s.sign("deploy", bundles["1.0.0"], cmd_id="rolled-back", counter=base + 5)
    equal = s.sign("deploy", bundles["1.0.0"], cmd_id="equal-counter", counter=base + 10)
    for cmd in (rolled_back, equal):
        reply = w.wait_reply(_publish(w, cmd))
        assert reply["status"] == "error" and reply["error"]["code"] == "command.replay", reply
    time.sleep(1.0)
    for cid in ("old-deploy", "rolled-back", "equal-counter"):
        assert not _executed(agent, w, cid), cid
    assert serving_version(agent) is None
    assert not list((agent.data_dir / "store").iterdir())

    fresh = s.sign("deploy", bundles["1.0.0"], cmd_id="fresh", counter=base + 11)
    assert w.wait_reply(_publish(w, fresh))["status"] == "ok"
    assert serving_version(agent) == "1.0.0"
    assert agent.terminate() == 0


def test_controller_signs_commands_that_a_default_agent_executes(tmp_path: Path, mosquitto, signing_key) -> None:
    from cryptography.hazmat.primitives import serialization
    from edgefleet.fleet.controller import Controller, ControllerConfig

    pub = tmp_path / "trusted.pub"
    pub.write_bytes(signing_key.public.to_pem())
    key = tmp_path / "fleet.key"
    key.write_bytes(signing_key.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    agent = make_agent(tmp_path, mosquitto.url, pub, interval=5.0)
    w = Watcher(mosquitto, agent.device, channels=("status", "events", "reply", "cmd"))
    agent.start()
    ctl = Controller(ControllerConfig(broker=mosquitto.url, db=str(tmp_path / "fleet.db"), fleet="testfleet",
                                      http_port=0, bundles_dir=tmp_path / "bundles", trust=[pub], signing_key=key,
                                      client_id=f"ctl-{agent.device}"))
    ctl.start()
    try:
        for i in range(3):
            cmd = protocol.command("describe", cmd_id=f"ctl-{i}")
            ctl._publish(agent.device, cmd)
            reply = w.wait_reply(cmd.id)
            assert reply["status"] == "ok", reply
        sent = [protocol.Command.from_json(m.payload) for m in w.messages.get("cmd", [])]
        counters = [c.counter for c in sent]
        assert counters == sorted(counters)
    finally:
        ctl.stop()
        w.close()
        assert agent.terminate() == 0
