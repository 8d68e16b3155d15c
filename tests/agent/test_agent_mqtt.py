"""The agent as a real process against a real Mosquitto: birth and Last Will, deploy → self-test → serve → telemetry,
refusals that keep the old bundle serving, commands queued while offline executed once, SIGTERM."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
from _agent_util import Watcher, http_json, sha_size, wait_until
from edgefleet.sdk import protocol
from edgefleet.sdk.keys import generate_keypair
from edgefleet.sdk.runtime import ort_info
from edgefleet.sdk.testing import build_test_bundle
from edgefleet.sdk.validation import save_validation


def _infer(api: str, n: int = 1) -> dict:
    body = json.dumps({"inputs": [{"name": "x", "shape": [n, 16], "datatype": "FP32", "data": [0.25] * (16 * n)}]})
    status, resp = http_json("POST", f"http://{api}/v2/models/testmodel/infer", body.encode())
    assert status == 200, resp
    return resp


def _deploy(w: Watcher, bundle, url: str | None = None, **kw) -> str:
    sha, size = sha_size(bundle)
    return w.send("deploy", {"url": url or bundle.as_uri(), "sha256": sha, "size": size}, **kw)


def test_birth_describes_device_and_last_will_marks_offline_after_kill9(agent_factory, mosquitto) -> None:
    keepalive = 2
    agent = agent_factory(keepalive=keepalive, start=False)
    w = Watcher(mosquitto, agent.device)
    agent.start()
    birth = w.wait_for("status", lambda s: s["state"] == "online")
    protocol.Status.from_json(json.dumps(birth))
    d = birth["description"]
    assert d["profile"] == "x86-cpu"
    ort = ort_info()  # the agent runs on the same ONNX Runtime as this test process
    assert d["ort"] == {"version": ort.version, "flavour": ort.flavour, "providers": list(ort.providers)}
    assert d["cpu"]["cores"] >= 1 and d["ram_bytes"] > 0 and d["agent_version"]
    assert d["models"] == [] and d["api"] == agent.api
    # retained: a controller connecting later still sees it
    late = Watcher(mosquitto, agent.device, channels=("status",))
    msg = wait_until(lambda: late.messages["status"], 5, what="retained status")[0]
    assert msg.retain and json.loads(msg.payload)["state"] == "online"
    late.close()

    killed = time.monotonic()
    agent.kill()
    off = w.wait_for("status", lambda s: s["state"] == "offline", timeout=1.5 * keepalive + 1.0)
    assert off["reason"] == "connection lost" and off["boot"] == birth["boot"]
    assert time.monotonic() - killed <= 1.5 * keepalive + 1.0
    w.close()


def test_last_will_fires_on_keepalive_when_agent_hangs_with_socket_open(agent_factory, mosquitto) -> None:
    keepalive = 2
    agent = agent_factory(keepalive=keepalive, start=False)
    w = Watcher(mosquitto, agent.device)
    agent.start()
    birth = w.wait_for("status", lambda s: s["state"] == "online")
    assert agent.proc is not None
    # SIGSTOP: the TCP connection stays open, so only the broker's keepalive timeout (1.5x) can notice.
    agent.proc.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        # 1.5x keepalive is the spec; Mosquitto 2.0 counts whole seconds, checks about once a second and runs late
        # on a loaded machine (measured 4-7 s here): the bound is generous, the lower bound below is the point.
        off = w.wait_for("status", lambda s: s["state"] == "offline", timeout=1.5 * keepalive + 6.0)
        elapsed = time.monotonic() - stopped
    finally:
        agent.proc.send_signal(signal.SIGCONT)
        agent.kill()
    assert off["reason"] == "connection lost" and off["boot"] == birth["boot"]
    assert elapsed >= keepalive  # it really was the keepalive, not a closed socket
    w.close()


def test_deploy_selftest_serve_and_telemetry_counts_then_sigterm(agent_factory, mosquitto, make_bundle, mlp_model,
                                                                  bundle_server) -> None:
    agent = agent_factory(interval=0.3, start=False, tags=("line-3", "canary"))
    w = Watcher(mosquitto, agent.device)
    agent.start()
    birth = w.wait_for("status", lambda s: s["state"] == "online")
    assert birth["description"]["tags"] == ["line-3", "canary"]
    bundle = make_bundle(mlp_model, version="1.0.0", filename="m.efb")
    server = bundle_server()
    cid = _deploy(w, bundle, server.url("m.efb"), correlation=b"corr-1")
    reply = w.wait_reply(cid)
    protocol.Reply.from_json(json.dumps(reply))
    assert reply["status"] == "ok", reply
    res = reply["result"]
    assert res["version"] == "1.0.0" and res["providers"] == ["CPUExecutionProvider"]
    assert res["selftest"]["ok"] and res["selftest"]["samples"] == 2
    assert set(res["timings_ms"]) == {"download", "verify", "compatibility", "extract", "session", "selftest",
                                      "activate"}
    raw = next(m for m in w.messages["reply"] if json.loads(m.payload)["id"] == cid)
    assert raw.properties.CorrelationData == b"corr-1"
    ev = w.wait_for("events", lambda e: e["kind"] == "deploy")
    protocol.Event.from_json(json.dumps(ev))
    assert ev["level"] == "info" and ev["data"]["command"] == cid and ev["data"]["version"] == "1.0.0"
    progress = [e["data"]["state"] for e in w.payloads("events")
                if e["kind"] == "deploy.progress" and e["data"]["command"] == cid]
    assert progress == ["downloading", "verifying", "self-test"]
    w.wait_for("status", lambda s: [m["version"] for m in s["description"]["models"]] == ["1.0.0"]
               if s["state"] == "online" else False)

    n = 25
    for _ in range(n):
        _infer(agent.api)
    bad = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "INT64", "data": [0] * 16}]}).encode()
    assert http_json("POST", f"http://{agent.api}/v2/models/testmodel/infer", bad)[0] == 400

    def counted() -> int:
        recs = [protocol.Telemetry.from_json(json.dumps(t)) for t in w.payloads("telemetry")]
        return sum(m.count for r in recs for m in r.models if m.name == "testmodel")

    wait_until(lambda: counted() == n, 10, what=f"{n} inferences counted in telemetry")
    recs = w.payloads("telemetry")
    busy = [m for r in recs for m in r["models"] if m["count"]]
    assert all(m["providers"] == ["CPUExecutionProvider"] and m["p50_ms"] > 0 and m["errors"] == 0 for m in busy)
    assert all(m["p50_ms"] <= m["p95_ms"] <= m["p99_ms"] for m in busy)
    assert busy[-1]["cold_start"]["session_ms"] > 0 and busy[-1]["total"]["count"] == n
    seqs = [r["seq"] for r in recs]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert {r["boot"] for r in recs} == {reply_boot := recs[0]["boot"]} and reply_boot
    assert all(r["process"]["rss_bytes"] > 0 for r in recs)

    assert agent.terminate() == 0
    off = w.wait_for("status", lambda s: s["state"] == "offline")
    assert off["reason"] == "shutdown"
    w.close()


def test_refused_deploys_name_the_step_and_old_bundle_keeps_serving(agent_factory, mosquitto, make_bundle, mlp_model,
                                                                    tmp_path) -> None:
    agent = agent_factory(start=False)
    w = Watcher(mosquitto, agent.device)
    agent.start()
    good = w.wait_reply(_deploy(w, make_bundle(mlp_model, version="1.0.0", filename="good.efb")))
    assert good["status"] == "ok"

    other_key = generate_keypair(tmp_path / "other.key")
    unsigned = build_test_bundle(mlp_model, tmp_path / "evil.efb", other_key, version="6.6.6")
    rng = np.random.default_rng(0)
    save_validation(tmp_path / "wrong.npz", [({"x": rng.standard_normal((1, 16)).astype(np.float32)},
                                              {"probs": np.full((1, 4), 0.9, np.float32)}) for _ in range(2)])
    failing = make_bundle(mlp_model, version="2.0.0", filename="failing.efb",
                          extra_files={"validation.npz": tmp_path / "wrong.npz"})
    other_target = make_bundle(mlp_model, version="3.0.0", target="jetson-orin", filename="jetson.efb")
    cases = {"verify": (unsigned, "bundle.signature"), "selftest": (failing, "selftest"),
             "compatibility": (other_target, "bundle.compat")}
    for step, (bundle, code) in cases.items():
        reply = w.wait_reply(_deploy(w, bundle))
        assert reply["status"] == "error", reply
        assert reply["error"]["step"] == step and reply["error"]["code"] == code, reply
        assert reply["error"]["message"]
        assert _infer(agent.api)["model_version"] == "1.0.0"
    fails = [e for e in w.payloads("events") if e["kind"] == "deploy" and e["level"] == "error"]
    assert sorted(e["data"]["step"] for e in fails) == sorted(cases)
    # nothing left behind: one bundle in the store
    assert len([p for p in (agent.data_dir / "store").iterdir()]) == 1
    w.close()


def test_commands_sent_while_offline_run_once_after_reconnect(agent_factory, mosquitto, make_bundle,
                                                              mlp_model) -> None:
    agent = agent_factory(interval=1.0, start=False)
    w = Watcher(mosquitto, agent.device)
    agent.start()
    w.wait_for("status", lambda s: s["state"] == "online")
    assert agent.terminate() == 0
    w.wait_for("status", lambda s: s["state"] == "offline")

    bundle = make_bundle(mlp_model, version="4.0.0")
    deploy_id = _deploy(w, bundle, cmd_id="deploy-offline-1")
    _deploy(w, bundle, cmd_id="deploy-offline-1")  # the same id again: must not run twice
    conf_id = w.send("configure", {"telemetry_interval_s": 0.2})
    desc_id = w.send("describe")
    w.send_raw(b'{"v": 1, "id": "broken-1", "kind": "explode", "args": {}}')

    agent.start()
    assert w.wait_reply(deploy_id)["status"] == "ok"
    assert w.wait_reply(conf_id)["result"] == {"telemetry_interval_s": 0.2}
    desc = w.wait_reply(desc_id)["result"]
    assert desc["profile"] == "x86-cpu"
    broken = w.wait_reply("broken-1")
    assert broken["status"] == "error" and broken["error"]["step"] == "parse"
    assert "explode" in broken["error"]["message"]
    w.wait_for("telemetry", lambda t: t["interval_s"] == 0.2)
    assert _infer(agent.api)["model_version"] == "4.0.0"

    # the same id while online, and after a restart: still no second execution or reply
    _deploy(w, bundle, cmd_id="deploy-offline-1")
    assert agent.terminate() == 0
    agent.start()
    w.wait_for("status", lambda s: s["state"] == "online" and s["boot"] != desc["boot"])
    time.sleep(1.0)
    for cid in (deploy_id, conf_id, desc_id, "broken-1"):
        assert len(w.replies(cid)) == 1, (cid, w.replies(cid))
    assert len([e for e in w.payloads("events") if e["kind"] == "deploy"]) == 1
    # the configured interval survived the restart
    assert w.payloads("telemetry")[-1]["interval_s"] == 0.2
    w.close()


def test_benchmark_rollback_remove_configure_and_expiry_over_mqtt(agent_factory, mosquitto, make_bundle,
                                                                  mlp_model) -> None:
    agent = agent_factory(start=False)
    w = Watcher(mosquitto, agent.device)
    agent.start()
    for v in ("1.0.0", "2.0.0"):
        assert w.wait_reply(_deploy(w, make_bundle(mlp_model, version=v, filename=f"{v}.efb")))["status"] == "ok"
    bench = w.wait_reply(w.send("benchmark", {"runs": 20}))
    assert bench["status"] == "ok", bench
    b = bench["result"]
    assert b["runs"] == 20 and b["version"] == "2.0.0" and 0 < b["p50_ms"] <= b["p99_ms"]
    assert b["providers"] == ["CPUExecutionProvider"]

    back = w.wait_reply(w.send("rollback", {"name": "testmodel"}))
    assert back["status"] == "ok" and back["result"]["version"] == "1.0.0" and back["result"]["selftest"]["ok"]
    assert _infer(agent.api)["model_version"] == "1.0.0"

    gone = w.wait_reply(w.send("remove", {"name": "testmodel"}))
    assert gone["status"] == "ok"
    assert http_json("GET", f"http://{agent.api}/v2/models/testmodel")[0] == 404
    w.wait_for("status", lambda s: s["state"] == "online" and s["description"]["models"] == []
               and s["ts"] > gone["ts"] - 1)
    assert not [p for p in (agent.data_dir / "store").iterdir()]

    again = w.wait_reply(w.send("rollback", {"name": "testmodel"}))
    assert again["error"]["step"] == "rollback" and again["error"]["code"] == "not_found"
    bad_conf = w.wait_reply(w.send("configure", {"telemetry_interval_s": 1.0, "colour": "red"}))
    assert bad_conf["error"]["step"] == "configure" and "colour" in bad_conf["error"]["message"]
    fresh = protocol.command("describe", cmd_id="old-1")
    expired = protocol.Command(id=fresh.id, kind=fresh.kind, args=fresh.args, ts=fresh.ts, expires=time.time() - 60)
    w.send_raw(expired.to_json())
    reply = w.wait_reply("old-1")
    assert reply["error"]["code"] == "command.expired" and reply["error"]["step"] == "receive"
    w.close()


def test_mqtt5_response_topic_gets_a_copy_with_correlation_data(agent_factory, mosquitto) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    agent = agent_factory(start=False)
    w = Watcher(mosquitto, agent.device)
    got: list = []
    w.client.message_callback_add(f"ctl/responses/{agent.device}", lambda c, u, m: got.append(m))
    w.client.subscribe(f"ctl/responses/{agent.device}", qos=1)
    agent.start()
    w.wait_for("status", lambda s: s["state"] == "online")
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = f"ctl/responses/{agent.device}"
    props.CorrelationData = b"\x00\x01req-7"
    cmd = protocol.command("describe", cmd_id="rr-1")
    w.client.publish(protocol.topic("testfleet", agent.device, "cmd"), cmd.to_json(), qos=1,
                     properties=props).wait_for_publish(10)
    on_channel = w.wait_reply("rr-1")
    wait_until(lambda: got, 10, what="reply on the response topic")
    time.sleep(0.3)
    assert len(got) == 1 and len(w.replies("rr-1")) == 1
    assert json.loads(got[0].payload) == on_channel
    assert got[0].properties.CorrelationData == b"\x00\x01req-7"
    w.close()


def test_profile_auto_uses_device_detection(agent_factory, mosquitto) -> None:
    from edgefleet.devices.detect import detect
    from edgefleet.devices.profile import load_profiles

    expected = detect(load_profiles())
    assert expected.profile is not None
    agent = agent_factory(profile="auto", start=False)
    w = Watcher(mosquitto, agent.device, channels=("status",))
    agent.start()
    d = w.wait_for("status", lambda s: s["state"] == "online")["description"]
    assert d["profile"] == expected.profile.name
    assert d["profile_reasons"] == expected.reasons
    assert d["accept_targets"][0] == expected.profile.name
    w.close()
