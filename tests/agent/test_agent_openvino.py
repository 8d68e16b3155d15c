"""The OpenVINO flavour: an agent on onnxruntime-openvino installs a bundle whose providers are OpenVINO → CPU,
compiles it (cache in the data dir) at install, and serves inference through OpenVINO.

Runs in .venv-openvino: ``.venv-openvino/bin/pytest -m openvino tests/agent``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _agent_util import Watcher, http_json, sha_size, wait_until
from edgefleet.sdk import protocol
from edgefleet.sdk.bundle import ProviderConfig, SessionConfig, Tolerance

pytestmark = pytest.mark.openvino


def test_openvino_agent_installs_compiles_and_serves_through_openvino(agent_factory, mosquitto, make_bundle,
                                                                      mlp_model) -> None:
    import onnxruntime as ort
    import tritonclient.http as httpclient

    agent = agent_factory(profile="intel-openvino-cpu", interval=0.3, start=False)
    w = Watcher(mosquitto, agent.device)
    agent.start()
    birth = w.wait_for("status", lambda s: s["state"] == "online")["description"]
    assert birth["ort"]["flavour"] == "openvino"
    assert "OpenVINOExecutionProvider" in birth["ort"]["providers"]

    openvino = ProviderConfig("OpenVINOExecutionProvider", {"device_type": "CPU", "cache_dir": "{cache_dir}/openvino"})
    bundle = make_bundle(
        mlp_model, target="intel-openvino-cpu", providers=(openvino, ProviderConfig("CPUExecutionProvider")),
        session=SessionConfig(graph_optimization_level="basic"),
        tolerance=Tolerance(max_abs=1e-3, min_cosine=0.999),
    )
    sha, size = sha_size(bundle)
    reply = w.wait_reply(w.send("deploy", {"url": bundle.as_uri(), "sha256": sha, "size": size}), timeout=60)
    assert reply["status"] == "ok", reply
    res = reply["result"]
    assert res["providers"][0] == "OpenVINOExecutionProvider"
    assert res["selftest"]["ok"]
    cache = agent.data_dir / "cache" / res["digest"] / "openvino"
    assert cache.is_dir() and any(cache.rglob("*")), "OpenVINO compiled the model into the data dir at install"

    x = np.random.default_rng(5).standard_normal((3, 16)).astype(np.float32)
    expected = ort.InferenceSession(str(mlp_model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    client = httpclient.InferenceServerClient(url=agent.api)
    inp = httpclient.InferInput("x", [3, 16], "FP32")
    inp.set_data_from_numpy(x)
    got = client.infer("testmodel", [inp]).as_numpy("probs")
    np.testing.assert_allclose(got, expected, atol=1e-3)
    status, meta = http_json("GET", f"http://{agent.api}/v2/models/testmodel")
    assert status == 200 and meta["parameters"]["providers"][0] == "OpenVINOExecutionProvider"

    def served() -> list[protocol.ModelWindow]:
        recs = [protocol.Telemetry.from_json(json.dumps(t)) for t in w.payloads("telemetry")]
        return [m for r in recs for m in r.models if m.count]

    entries = wait_until(served, 10, what="telemetry with the inference")
    assert entries[0].providers[0] == "OpenVINOExecutionProvider" and entries[0].count == 1
    assert agent.terminate() == 0
    w.close()
