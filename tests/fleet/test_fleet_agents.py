"""With real agents (``edgefleet agent run`` subprocesses): they appear with live latency, and a canary rollout of a
deliberately slowed bundle halts and rolls back by itself."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from _fleet_util import Agent, infer_load, wait_until
from click.testing import CliRunner
from edgefleet.sdk.cli import cli

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """SQLite only here: real agents exercise the device side; the controller tests cover both backends."""
    return str(tmp_path / "fleet.db")

EDGEFLEET = Path(sys.executable).with_name("edgefleet")


def make_slow_mlp(path: Path, layers: int = 24, width: int = 512) -> Path:
    """Same inputs and outputs as the test MLP, but ``layers`` extra width x width MatMuls: a slow model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array((rng.standard_normal((16, width)) * 0.1).astype(np.float32), "w_in"),
             numpy_helper.from_array((rng.standard_normal((width, 4)) * 0.1).astype(np.float32), "w_out")]
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h0"])]
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
                                             f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "w_out"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_real_agents_report_latency_and_a_slowed_canary_is_rolled_back(controller_factory, mosquitto, fleet_id,
                                                                       trust_file, mlp_model, make_bundle,
                                                                       tmp_path) -> None:
    ctl = controller_factory()
    agents = [Agent(tmp_path, f"agent-{i}", mosquitto.url, fleet_id, trust_file) for i in range(2)]
    stop = threading.Event()
    try:
        wait_until(lambda: sum(d.state == "online" and d.profile == "x86-cpu"
                               for d in ctl.store.devices(fleet_id)) == 2, 60, what="2 agents online (x86-cpu)")
        fast = make_bundle(mlp_model, version="1.0.0", filename="fast.efb")
        res = CliRunner().invoke(cli, ["deploy", str(fast), "--to", "all", "--controller", ctl.url, "--json", "--wait"])
        assert res.exit_code == 0, res.output
        first = json.loads(res.output)
        assert first["state"] == "completed" and first["progress"] == {"active": 2}, first

        load = threading.Thread(target=infer_load, args=([a.api for a in agents], stop, 120.0), daemon=True)
        load.start()

        def reporting() -> bool:
            devs = ctl.store.devices(fleet_id)
            return all(any(m.version == "1.0.0" and m.count > 0 and m.p95 for m in d.models)
                       for d in devs) and len(devs) == 2
        wait_until(reporting, 30, what="both agents reporting latency of 1.0.0")
        with urllib.request.urlopen(f"{ctl.url}/api/devices") as r:
            devs = json.loads(r.read())["devices"]
        assert {d["device"] for d in devs} == {"agent-0", "agent-1"}
        assert all(d["models"][0]["providers"] == ["CPUExecutionProvider"] for d in devs)
        time.sleep(1.5)  # baseline windows on 1.0.0

        slow = make_bundle(make_slow_mlp(tmp_path / "slow.onnx"), version="2.0.0", filename="slow.efb")
        res = CliRunner().invoke(cli, ["deploy", str(slow), "--to", "profile:x86-cpu", "--canary", "50%",
                                       "--observe", "2", "--min-samples", "50", "--controller", ctl.url, "--json",
                                       "--wait"])
        assert res.exit_code == 3, res.output  # halted
        dep = json.loads(res.output)
        assert dep["state"] == "halted", dep
        assert "regressed over the +20% limit" in dep["message"], dep["message"]
        (canary,) = [t for t in dep["targets"] if t["phase"] == "canary"]
        (other,) = [t for t in dep["targets"] if t["phase"] == "rest"]
        assert other["state"] == "skipped" and other["cmd_id"] == ""  # the rest never received the slow bundle
        wait_until(lambda: {t.device: t.state for t in ctl.store.deployment(dep["id"]).targets}
                   [canary["device"]] == "rolled-back", 60, what="the canary rolled back")

        def runs(version: str) -> bool:
            d = ctl.store.device(fleet_id, canary["device"])
            return d is not None and d.description is not None and any(
                m.version == version for m in d.description.models)
        wait_until(lambda: runs("1.0.0"), 30, what="the canary's status showing 1.0.0 again")
    finally:
        stop.set()
        for a in agents:
            a.stop()


def test_deploy_queued_for_an_offline_device_survives_a_broker_that_lost_its_state(
        controller_factory, mosquitto, fleet_id, trust_file, mlp_model, make_bundle, tmp_path) -> None:
    """The broker queues a command for an offline device in its session; a broker that loses its state (SIGKILL
    before its next autosave, a replaced node, a lost disk) loses the command with it. The controller sends the
    deploy again (same id) once the device is back online without having started it, and the rollout completes."""
    ctl = controller_factory()
    agent = Agent(tmp_path, "restart-0", mosquitto.url, fleet_id, trust_file)
    try:
        wait_until(lambda: getattr(ctl.store.device(fleet_id, "restart-0"), "state", None) == "online", 60,
                   what="agent online")
        agent.stop()
        wait_until(lambda: getattr(ctl.store.device(fleet_id, "restart-0"), "state", None) == "offline", 30,
                   what="agent offline")
        bundle = make_bundle(mlp_model, version="1.0.0", filename="queued.efb")
        res = CliRunner().invoke(cli, ["deploy", str(bundle), "--to", "all", "--controller", ctl.url, "--json"])
        assert res.exit_code == 0, res.output
        dep_id = json.loads(res.output)["id"]
        wait_until(lambda: ctl.store.deployment(dep_id).targets[0].cmd_id, 30, what="deploy command sent")
        time.sleep(0.5)  # the broker has queued it in the offline device's session ...
        mosquitto.kill()  # ... and loses it: killed, and its persistence gone with the disk
        (mosquitto.workdir / "data" / "mosquitto.db").unlink(missing_ok=True)
        mosquitto.start()
        wait_until(lambda: ctl.ingest.connected, 30, what="controller reconnected")
        agent = Agent(tmp_path, "restart-0", mosquitto.url, fleet_id, trust_file)
        wait_until(lambda: ctl.store.deployment(dep_id).state == "completed", 90, what="deployment completed")
        (target,) = ctl.store.deployment(dep_id).targets
        assert target.state == "active"
        assert ctl.commander.resent >= 1  # it did take the resend: the restarted broker had lost the command
    finally:
        agent.stop()


def test_a_real_agent_installs_a_bundle_from_a_plain_static_http_server(controller_factory, mosquitto, fleet_id,
                                                                        trust_file, mlp_model, make_bundle,
                                                                        static_server, tmp_path) -> None:
    """The agent fetches from the URL the deployment names (a static server that knows nothing of edgefleet) and
    verifies the signature itself; the controller's /bundles serves nothing."""
    import shutil

    ctl = controller_factory()
    agent = Agent(tmp_path, "agent-cdn", mosquitto.url, fleet_id, trust_file)
    try:
        wait_until(lambda: getattr(ctl.store.device(fleet_id, "agent-cdn"), "state", None) == "online", 60,
                   what="agent online")
        bundle = make_bundle(mlp_model, version="1.1.0", filename="cdn.efb")
        shutil.copy(bundle, static_server.root / "testmodel-1.1.0-x86-cpu.efb")
        url = static_server.url("testmodel-1.1.0-x86-cpu.efb")
        res = CliRunner().invoke(cli, ["deploy", str(bundle), "--url", url, "--to", "all", "--controller", ctl.url,
                                       "--json", "--wait", "--wait-timeout", "90"])
        assert res.exit_code == 0, res.output
        dep = json.loads(res.output)
        assert dep["state"] == "completed" and dep["progress"] == {"active": 1}, dep
        assert static_server.requests() == [("/testmodel-1.1.0-x86-cpu.efb", 200)]
        with urllib.request.urlopen(f"http://{agent.api}/v2/models/testmodel", timeout=10) as r:
            assert json.loads(r.read())["versions"] == ["1.1.0"]
    finally:
        agent.stop()
