"""Every tritonclient HTTP call that applies to a device, against a real agent process (``edgefleet agent run``)
serving a real signed bundle deployed over a real Mosquitto, with a real ONNX Runtime session. The calls that do
not apply (shared memory, trace) are checked to fail with the agent's clear reason."""

from __future__ import annotations

import asyncio
import http.client
import json

import numpy as np
import pytest
from _agent_util import Watcher, sha_size

X = np.random.default_rng(11).standard_normal((3, 16)).astype(np.float32)


def _deploy(w: Watcher, bundle) -> dict:
    sha, size = sha_size(bundle)
    reply = w.wait_reply(w.send("deploy", {"url": bundle.as_uri(), "sha256": sha, "size": size}), timeout=120)
    assert reply["status"] == "ok", reply
    return reply["result"]


@pytest.fixture
def agent_with_model(agent_factory, mosquitto, make_bundle, mlp_model):
    agent = agent_factory(start=False)
    w = Watcher(mosquitto, agent.device)
    agent.start()
    w.wait_for("status", lambda s: s["state"] == "online")
    _deploy(w, make_bundle(mlp_model, version="1.0.0", filename="v1.efb"))
    yield agent, w
    w.close()
    assert agent.terminate() == 0


def test_every_tritonclient_http_call(agent_with_model, make_bundle, mlp_model) -> None:
    import onnxruntime as ort
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    agent, w = agent_with_model
    expected = ort.InferenceSession(str(mlp_model), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    client = httpclient.InferenceServerClient(url=agent.api)

    # health and metadata
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "edgefleet-agent"
    assert {"binary_tensor_data", "model_configuration", "model_repository", "statistics",
            "logging"} <= set(meta["extensions"])
    assert client.is_model_ready("testmodel") and client.is_model_ready("testmodel", "1.0.0")
    assert not client.is_model_ready("testmodel", "9.9.9") and not client.is_model_ready("nope")
    assert client.get_model_metadata("testmodel", "1.0.0")["outputs"] == [
        {"name": "probs", "datatype": "FP32", "shape": [-1, 4]}]
    cfg = client.get_model_config("testmodel")
    assert cfg["input"][0]["dims"] == [-1, 16] and cfg["platform"] == "onnxruntime_onnx"

    # inference: binary and JSON both ways, compressed both ways, classification, async
    inp = httpclient.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    calls = 0
    for binary in (True, False):
        for alg in (None, "gzip", "deflate"):
            inp.set_data_from_numpy(X, binary_data=binary)
            res = client.infer("testmodel", [inp], model_version="1.0.0", request_id=f"r{calls}",
                               outputs=[httpclient.InferRequestedOutput("probs", binary_data=binary)],
                               request_compression_algorithm=alg, response_compression_algorithm=alg)
            calls += 1
            assert res.get_response()["id"] == f"r{calls - 1}"
            np.testing.assert_allclose(res.as_numpy("probs"), expected, rtol=1e-5, atol=1e-6)
    top = client.infer("testmodel", [inp], outputs=[httpclient.InferRequestedOutput("probs", class_count=1)])
    calls += 1
    assert [int(v.decode().split(":")[1]) for v in top.as_numpy("probs").ravel()] == expected.argmax(1).tolist()
    pending = [client.async_infer("testmodel", [inp]) for _ in range(4)]
    for p in pending:
        np.testing.assert_allclose(p.get_result().as_numpy("probs"), expected, rtol=1e-5, atol=1e-6)
    calls += 4
    # the client's own body builder and response parser, with the transport in between done by hand
    body, json_size = client.generate_request_body([inp], outputs=[httpclient.InferRequestedOutput("probs")],
                                                   request_id="raw")
    conn = http.client.HTTPConnection(*agent.api.split(":"), timeout=10)
    conn.request("POST", "/v2/models/testmodel/infer", body,
                 {"Inference-Header-Content-Length": str(json_size)} if json_size else {})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    parsed = client.parse_response_body(raw, header_length=int(resp.getheader("Inference-Header-Content-Length")))
    np.testing.assert_allclose(parsed.as_numpy("probs"), expected, rtol=1e-5, atol=1e-6)
    assert parsed.get_response()["id"] == "raw"
    calls += 1

    # statistics (all models, one model, one version)
    stats = client.get_inference_statistics("testmodel", "1.0.0")["model_stats"][0]
    assert stats["inference_count"] == calls and stats["inference_stats"]["success"]["count"] == calls
    assert client.get_inference_statistics()["model_stats"][0]["name"] == "testmodel"

    # keep-alive after errors: one client, its pooled connection, through refusals and back
    for bad in (lambda: client.infer("nope", [inp]),
                lambda: client.infer("testmodel", [inp], outputs=[httpclient.InferRequestedOutput("zz")]),
                lambda: client.get_model_config("nope")):
        with pytest.raises(InferenceServerException):
            bad()
        np.testing.assert_allclose(client.infer("testmodel", [inp]).as_numpy("probs"), expected, rtol=1e-5,
                                   atol=1e-6)

    # model repository: index, unload, load, and a deployment that adds a previous bundle
    assert client.get_model_repository_index() == [{"name": "testmodel", "version": "1.0.0", "state": "READY",
                                                    "reason": ""}]
    client.unload_model("testmodel", unload_dependents=True)
    assert not client.is_model_ready("testmodel")
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("testmodel", [inp])
    assert client.get_model_repository_index()[0]["reason"] == "unloaded"
    client.load_model("testmodel")
    assert client.is_model_ready("testmodel")
    _deploy(w, make_bundle(mlp_model, version="2.0.0", filename="v2.efb"))
    assert client.get_model_repository_index() == [
        {"name": "testmodel", "version": "2.0.0", "state": "READY", "reason": ""},
        {"name": "testmodel", "version": "1.0.0", "state": "UNAVAILABLE",
         "reason": "previous bundle, kept for rollback"}]
    assert client.infer("testmodel", [inp]).get_response()["model_version"] == "2.0.0"
    with pytest.raises(InferenceServerException, match="not installed"):
        client.load_model("other")

    # logging extension
    assert client.get_log_settings()["log_info"] is True  # the agent runs at log_level = "info"
    assert client.update_log_settings({"log_info": False})["log_info"] is False
    assert client.update_log_settings({"log_info": True})["log_info"] is True

    # what a device does not offer, refused with the reason
    for call, needle in [(lambda: client.get_trace_settings(), "trace extension is not supported"),
                         (lambda: client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
                          "trace extension"),
                         (lambda: client.get_trace_settings("testmodel"), "trace extension"),
                         (lambda: client.get_system_shared_memory_status(), "shared-memory"),
                         (lambda: client.register_system_shared_memory("r", "/k", 64), "shared-memory"),
                         (lambda: client.unregister_system_shared_memory(), "shared-memory"),
                         (lambda: client.get_cuda_shared_memory_status(), "CUDA shared-memory"),
                         (lambda: client.unregister_cuda_shared_memory("r"), "CUDA shared-memory")]:
        with pytest.raises(InferenceServerException, match=needle):
            call()
    assert client.is_server_live()
    client.close()


def test_tritonclient_aio_client(agent_with_model, mlp_model) -> None:
    """tritonclient's asyncio client (aiohttp: another HTTP stack) against the same agent."""
    import onnxruntime as ort
    import tritonclient.http as httpclient
    import tritonclient.http.aio as aioclient

    agent, _ = agent_with_model
    expected = ort.InferenceSession(str(mlp_model), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]

    async def main() -> list:
        client = aioclient.InferenceServerClient(url=agent.api)
        try:
            assert await client.is_server_ready() and await client.is_model_ready("testmodel")
            assert (await client.get_model_metadata("testmodel"))["name"] == "testmodel"
            assert (await client.get_model_config("testmodel"))["max_batch_size"] == 0
            inp = httpclient.InferInput("x", list(X.shape), "FP32")
            inp.set_data_from_numpy(X)
            results = await asyncio.gather(*[client.infer("testmodel", [inp], request_compression_algorithm=alg,
                                                          response_compression_algorithm=alg)
                                             for alg in (None, "gzip", "deflate", None)])
            stats = await client.get_inference_statistics("testmodel")
            assert stats["model_stats"][0]["inference_count"] == 4
            assert len(await client.get_model_repository_index()) == 1
            return [r.as_numpy("probs") for r in results]
        finally:
            await client.close()

    for got in asyncio.run(main()):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_metrics_pass_promtool_on_a_live_agent(agent_with_model) -> None:
    import shutil
    import subprocess
    import urllib.request

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make system-deps installs Debian's prometheus package)")
    import tritonclient.http as httpclient

    agent, w = agent_with_model
    client = httpclient.InferenceServerClient(url=agent.api)
    inp = httpclient.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    for _ in range(5):
        client.infer("testmodel", [inp])
    with pytest.raises(Exception):  # noqa: B017 - any client error: the point is the failure counter
        client.infer("testmodel", [httpclient.InferInput("y", [1], "FP32")])
    client.close()
    text = urllib.request.urlopen(f"http://{agent.api}/metrics", timeout=10).read()
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == b"" and proc.stderr == b"", (proc.stdout, proc.stderr)
    lines = text.decode().splitlines()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if not line.startswith("#")}
    m = '{model="testmodel",version="1.0.0"}'
    assert samples[f"edgefleet_inference_request_success_total{m}"] == 5
    assert samples['edgefleet_inference_request_failure_total{model="testmodel",version="1.0.0",reason="REJECTED"}'
                   ] == 1
    assert samples['edgefleet_inference_request_duration_seconds_bucket{model="testmodel",version="1.0.0",le="+Inf"}'
                   ] == 5
    assert samples[f"edgefleet_inference_compute_infer_duration_seconds_total{m}"] > 0
    assert samples[f"edgefleet_model_ready{m}"] == 1
    assert samples["edgefleet_mqtt_connected"] == 1
    assert samples["process_resident_memory_bytes"] > 10e6
    assert f'edgefleet_agent_info{{version="0.1.0",device="{agent.device}"}}' in samples
    families = {line.split()[2] for line in lines if line.startswith("# TYPE")}
    helped = {line.split()[2] for line in lines if line.startswith("# HELP")}
    assert families == helped and len(families) >= 25
    # the series of a model that is no longer installed go with it (no stale series)
    reply = w.wait_reply(w.send("remove", {"name": "testmodel"}))
    assert reply["status"] == "ok", reply
    text = urllib.request.urlopen(f"http://{agent.api}/metrics", timeout=10).read().decode()
    assert 'model="testmodel"' not in text
    assert json.loads(urllib.request.urlopen(f"http://{agent.api}/v2/models/stats").read()) == {"model_stats": []}
