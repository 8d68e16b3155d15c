"""A real pretrained model (magika's content-type classifier, shipped in its PyPI package) deployed over MQTT,
self-tested, served through the Open Inference Protocol to tritonclient, and counted in telemetry — on the CPU EP,
and on the OpenVINO EP in .venv-openvino."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _agent_util import Watcher, magika_model, sha_size, wait_until
from edgefleet.sdk import protocol
from edgefleet.sdk.bundle import ProviderConfig, SessionConfig, Tolerance


def _run(agent_factory, mosquitto, make_bundle, profile: str, providers: tuple[ProviderConfig, ...],
         session: SessionConfig) -> dict:
    import onnxruntime as ort
    import tritonclient.http as httpclient

    model = magika_model()
    agent = agent_factory(profile=profile, interval=0.3, start=False)
    w = Watcher(mosquitto, agent.device)
    agent.start()
    w.wait_for("status", lambda s: s["state"] == "online")
    rng = np.random.default_rng(7)
    samples = [{"bytes": rng.integers(0, 256, (1, 2048)).astype(np.int32)} for _ in range(3)]
    bundle = make_bundle(model, name="magika", version="3.3.0", target=profile, providers=providers, session=session,
                         samples=samples, tolerance=Tolerance(max_abs=1e-3, min_cosine=0.999))
    sha, size = sha_size(bundle)
    reply = w.wait_reply(w.send("deploy", {"url": bundle.as_uri(), "sha256": sha, "size": size}), timeout=120)
    assert reply["status"] == "ok", reply
    assert reply["result"]["selftest"]["ok"] and reply["result"]["selftest"]["samples"] == 3

    x = rng.integers(0, 256, (4, 2048)).astype(np.int32)
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"bytes": x})[0]
    client = httpclient.InferenceServerClient(url=agent.api)
    assert client.get_model_metadata("magika")["inputs"][0] == {"name": "bytes", "datatype": "INT32",
                                                                "shape": [-1, 2048]}
    inp = httpclient.InferInput("bytes", list(x.shape), "INT32")
    inp.set_data_from_numpy(x)
    for _ in range(3):
        got = client.infer("magika", [inp]).as_numpy("target_label")
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert (got.argmax(1) == expected.argmax(1)).all()

    def counted() -> int:
        recs = [protocol.Telemetry.from_json(json.dumps(t)) for t in w.payloads("telemetry")]
        return sum(m.count for r in recs for m in r.models if m.name == "magika")

    wait_until(lambda: counted() == 3, 10, what="3 inferences in telemetry")
    assert agent.terminate() == 0
    w.close()
    return reply["result"]


def test_real_model_deployed_and_served_on_cpu(agent_factory, mosquitto, make_bundle) -> None:
    res = _run(agent_factory, mosquitto, make_bundle, "x86-cpu", (ProviderConfig("CPUExecutionProvider"),),
               SessionConfig())
    assert res["providers"] == ["CPUExecutionProvider"]


@pytest.mark.openvino
def test_real_model_deployed_and_served_on_openvino(agent_factory, mosquitto, make_bundle) -> None:
    ov = ProviderConfig("OpenVINOExecutionProvider", {"device_type": "CPU", "cache_dir": "{cache_dir}/openvino"})
    res = _run(agent_factory, mosquitto, make_bundle, "intel-openvino-cpu",
               (ov, ProviderConfig("CPUExecutionProvider")), SessionConfig(graph_optimization_level="basic"))
    assert res["providers"][0] == "OpenVINOExecutionProvider"
