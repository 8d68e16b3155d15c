"""Output drift with real agents (``edgefleet agent run`` subprocesses), real ORT sessions and a real Mosquitto: a
device whose inputs shift raises a ``drift`` event against the bundle's reference distribution, and a canary whose
output distribution departs from the previous version's is halted and rolled back although its latency is fine."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from _fleet_util import Agent, wait_until
from click.testing import CliRunner
from edgefleet.sdk.cli import cli
from edgefleet.sdk.testing import build_test_bundle, output_reference_metadata

from tests.conftest import make_mlp

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """SQLite only: the device side and the rules are what this tests; the store tests cover both backends."""
    return str(tmp_path / "fleet.db")


def _samples(n: int, scale: float = 1.0, seed: int = 0) -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32) * scale
    return [{"x": x[i:i + 1]} for i in range(n)]


def random_load(apis: list[str], stop: threading.Event, deadline_s: float, scale: float = 1.0) -> None:
    """Inference requests with random N(0, scale^2) inputs to every agent until stopped (bounded in time)."""
    rng = np.random.default_rng(42)
    end = time.monotonic() + deadline_s
    while not stop.is_set() and time.monotonic() < end:
        for api in apis:
            x = (rng.standard_normal(16) * scale).astype(np.float32)
            body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                           "data": [float(v) for v in x]}]}).encode()
            req = urllib.request.Request(f"http://{api}/v2/models/testmodel/infer", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=5).read()
            except OSError:
                time.sleep(0.05)  # the model is being swapped (deploy/rollback): try again


def sharpened_mlp(src: Path, path: Path, factor: float = 4.0) -> Path:
    """The same classifier with its last layer's weights multiplied: the same speed, far more confident outputs."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    for i, init in enumerate(m.graph.initializer):
        if init.name == "w2":
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, "w2"))
    onnx.save(m, str(path))
    return path


def _bundle(model: Path, version: str, tmp_path: Path, signing_key) -> Path:
    meta = output_reference_metadata(model, "top1", "probs", _samples(64))
    return build_test_bundle(model, tmp_path / f"{version}.efb", signing_key, version=version, metadata=meta)


def test_shifted_inputs_raise_a_drift_event_against_the_bundle_reference(controller_factory, mosquitto, fleet_id,
                                                                         trust_file, signing_key,
                                                                         tmp_path) -> None:
    ctl = controller_factory(drift_interval_s=0.5, drift_min_values=100, drift_window_s=120.0)
    agents = [Agent(tmp_path, f"drift-{i}", mosquitto.url, fleet_id, trust_file) for i in range(2)]
    stops = [threading.Event(), threading.Event()]
    try:
        wait_until(lambda: sum(d.state == "online" for d in ctl.store.devices(fleet_id)) == 2, 60,
                   what="2 agents online")
        bundle = _bundle(make_mlp(tmp_path / "mlp.onnx"), "1.0.0", tmp_path, signing_key)
        res = CliRunner().invoke(cli, ["deploy", str(bundle), "--to", "all", "--controller", ctl.url, "--json",
                                       "--wait"])
        assert res.exit_code == 0, res.output
        # drift-0 sees inputs like the validation data; drift-1 inputs eight times larger (a sensor gone wrong)
        for a, stop, scale in zip(agents, stops, (1.0, 8.0), strict=True):
            threading.Thread(target=random_load, args=([a.api], stop, 120.0, scale), daemon=True).start()

        def drift_events() -> list:
            return [e for e in ctl.store.events(fleet_id, None, 0.0, 500) if e.kind == "drift"]
        wait_until(drift_events, 90, what="a drift event")
        time.sleep(2.0)  # more checks on more data: the in-range device must still not drift
        evs = drift_events()
        assert {e.device for e in evs} == {"drift-1"}, [e.message for e in evs]
        (ev,) = evs  # once, not at every check
        assert ev.level == "warning" and ev.data["stat"] == "top1" and ev.data["version"] == "1.0.0"
        assert ev.data["distance"] > 0.25 + ev.data["noise"] and ev.data["values"] >= 100
        ok = [f for f in ctl.drift.check(time.time()) if f.device == "drift-0"]
        assert ok and not ok[0].drifted and ok[0].values >= 100, ok
    finally:
        for s in stops:
            s.set()
        for a in agents:
            a.stop()


def test_a_canary_whose_outputs_depart_is_rolled_back_although_its_latency_is_fine(
        controller_factory, mosquitto, fleet_id, trust_file, signing_key, tmp_path) -> None:
    from test_fleet_webhooks import Receiver

    rx = Receiver().start()
    ctl = controller_factory(drift_interval_s=0, webhook_url=rx.url, webhook_rules=("canary",))
    agents = [Agent(tmp_path, f"can-{i}", mosquitto.url, fleet_id, trust_file) for i in range(2)]
    stop = threading.Event()
    try:
        wait_until(lambda: sum(d.state == "online" for d in ctl.store.devices(fleet_id)) == 2, 60,
                   what="2 agents online")
        base = make_mlp(tmp_path / "mlp.onnx")
        res = CliRunner().invoke(cli, ["deploy", str(_bundle(base, "1.0.0", tmp_path, signing_key)), "--to", "all",
                                       "--controller", ctl.url, "--json", "--wait"])
        assert res.exit_code == 0, res.output
        threading.Thread(target=random_load, args=([a.api for a in agents], stop, 180.0), daemon=True).start()

        def reporting() -> bool:
            devs = ctl.store.devices(fleet_id)
            return len(devs) == 2 and all(any(m.version == "1.0.0" and m.count > 0 for m in d.models)
                                          for d in devs)
        wait_until(reporting, 30, what="both agents serving 1.0.0")
        time.sleep(3.0)  # baseline windows on 1.0.0
        sharp = _bundle(sharpened_mlp(base, tmp_path / "sharp.onnx"), "2.0.0", tmp_path, signing_key)
        res = CliRunner().invoke(cli, ["deploy", str(sharp), "--to", "all", "--canary", "50%", "--observe", "2",
                                       "--min-samples", "50", "--max-p95-regression", "1000%", "--controller",
                                       ctl.url, "--json", "--wait"])
        assert res.exit_code == 3, res.output  # halted
        dep = json.loads(res.output)
        assert dep["state"] == "halted", dep
        assert "outputs departed from the previous version's" in dep["message"], dep["message"]
        (canary,) = [t for t in dep["targets"] if t["phase"] == "canary"]
        wait_until(lambda: {t.device: t.state for t in ctl.store.deployment(dep["id"]).targets}
                   [canary["device"]] == "rolled-back", 60, what="the canary rolled back")
        with urllib.request.urlopen(f"{ctl.url}/api/deployments/{dep['id']}") as r:
            (verdict,) = json.loads(r.read())["decision"]["canary"]
        assert verdict["outcome"] == "halt" and verdict["output_drift"] > 0.25, verdict
        # the operator's webhook heard of it, once
        wait_until(lambda: rx.bodies, 30, what="the canary webhook")
        (hook,) = rx.bodies
        assert hook["rule"] == "canary" and hook["deployment"]["id"] == dep["id"] and "outputs departed" in hook["text"]
    finally:
        stop.set()
        rx.stop()
        for a in agents:
            a.stop()
