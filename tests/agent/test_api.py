"""The local Open Inference Protocol API: tritonclient (a client nobody here wrote) against it; bad requests → 4xx."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path

import numpy as np
import pytest
from _agent_util import http_json
from edgefleet.agent.api import ApiServer
from edgefleet.agent.registry import Registry
from edgefleet.sdk.bundle import extract_bundle
from edgefleet.sdk.runtime import Model


@pytest.fixture
def served(tmp_path: Path, make_bundle, mlp_model, trusted):
    bundle = make_bundle(mlp_model, version="1.2.0")
    vm = extract_bundle(bundle, trusted, tmp_path / "store" / "b")
    model = Model.open(tmp_path / "store" / "b", trusted, cache_dir=tmp_path / "cache")
    registry = Registry()
    registry.put(vm.manifest.name, model)
    registry.ready.set()
    server = ApiServer("127.0.0.1", 0, registry, max_body=1 << 20)
    server.start()
    yield server, model
    server.stop(2)


def _url(server: ApiServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def test_tritonclient_infer_binary_and_json_match_bare_session(served) -> None:
    import tritonclient.http as httpclient

    server, model = served
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("testmodel")
    meta = client.get_model_metadata("testmodel")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert meta["versions"] == ["1.2.0"]
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    expected = model.session.run(["probs"], {"x": x})[0]
    for binary in (True, False):
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("probs", binary_data=binary)
        res = client.infer("testmodel", [inp], outputs=[out], request_id="r1")
        got = res.as_numpy("probs")
        assert got.shape == (5, 4)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # no outputs listed: tritonclient asks for all outputs in binary
    res = client.infer("testmodel", [inp])
    np.testing.assert_allclose(res.as_numpy("probs"), expected, rtol=1e-5, atol=1e-6)
    assert model.recorder.total_count == 3
    client.close()


def test_json_infer_with_nested_data_and_version_path(served) -> None:
    server, _ = served
    body = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [[0.5] * 16]}]}
    status, resp = http_json("POST", _url(server, "/v2/models/testmodel/versions/1.2.0/infer"),
                             json.dumps(body).encode())
    assert status == 200
    assert resp["model_version"] == "1.2.0" and resp["outputs"][0]["shape"] == [1, 4]
    assert abs(sum(resp["outputs"][0]["data"]) - 1.0) < 1e-5


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("/v2/models/nope/infer", b"{}", 404, "unknown model 'nope'"),
    ("/v2/models/testmodel/versions/9/infer", b"{}", 404, "version '9'"),
    ("/v2/models/testmodel/infer", b"{not json", 400, "not valid JSON"),
    ("/v2/models/testmodel/infer", b"[1]", 400, "JSON object"),
    ("/v2/models/testmodel/infer", b'{"inputs": []}', 400, "non-empty 'inputs'"),
    ("/v2/models/testmodel/infer", json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP64",
                                                           "data": [0.0] * 16}]}).encode(), 400, "expects FP32"),
    ("/v2/models/testmodel/infer", json.dumps({"inputs": [{"name": "x", "shape": [1, 15], "datatype": "FP32",
                                                           "data": [0.0] * 15}]}).encode(), 400, "dim 1 is 15"),
    ("/v2/models/testmodel/infer", json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                                           "data": [0.0] * 3}]}).encode(), 400, "3 values given"),
    ("/v2/models/testmodel/infer", json.dumps({"inputs": [{"name": "y", "shape": [1], "datatype": "FP32",
                                                           "data": [0.0]}]}).encode(), 400, "unknown input 'y'"),
    ("/v2/models/testmodel/infer", json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                                           "data": ["a"] * 16}]}).encode(), 400, "not a list of FP32"),
    ("/v2/models/testmodel/infer", json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                                           "data": [0.0] * 16}],
                                               "outputs": [{"name": "zz"}]}).encode(), 400, "unknown output 'zz'"),
    ("/v2/health/live", b"{}", 405, "no POST route"),
    ("/v3/x", b"{}", 404, "Open Inference Protocol"),
])
def test_bad_requests_get_4xx_with_json_error(served, path: str, body: bytes, status: int, needle: str) -> None:
    server, model = served
    got, resp = http_json("POST", _url(server, path), body, {"Content-Type": "application/json"})
    assert got == status
    assert needle in resp["error"]
    assert model.recorder.total_errors == 0


def test_binary_sizes_must_match(served) -> None:
    server, _ = served
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 64}}]}).encode()
    body = head + b"\x00" * 10
    status, resp = http_json("POST", _url(server, "/v2/models/testmodel/infer"), body,
                             {"Inference-Header-Content-Length": str(len(head))})
    assert status == 400 and "binary_data_size 64" in resp["error"]


def test_oversized_body_is_413_without_reading_it(served) -> None:
    server, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.putrequest("POST", "/v2/models/testmodel/infer")
    conn.putheader("Content-Length", str(10 << 20))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413
    assert "over the 1048576-byte limit" in json.loads(resp.read())["error"]


def test_missing_length_is_411_and_unknown_get_is_404(served) -> None:
    server, _ = served
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"POST /v2/models/testmodel/infer HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(1024).startswith(b"HTTP/1.1 411")
    status, resp = http_json("GET", _url(server, "/v2/models/testmodel/nothing"))
    assert status == 404 and "no route" in resp["error"]
    status, resp = http_json("GET", _url(server, "/v2"))
    assert status == 200 and "binary_tensor_data" in resp["extensions"]
    status, _ = http_json("DELETE", _url(server, "/v2/models/testmodel"))
    assert status == 405


def test_stop_finishes_inflight_requests_and_closes_idle_keepalive(served) -> None:
    import threading
    import time

    server, model = served
    # A slow model run: wrap session.run so the request is in flight when stop() is called.
    orig = model.session.run
    started = threading.Event()

    class Slow:
        def run(self, *a, **kw):
            started.set()
            time.sleep(0.5)
            return orig(*a, **kw)

        def __getattr__(self, name):
            return getattr(model.session, name)

    model.session, real = Slow(), model.session
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    idle.request("GET", "/v2/health/live")
    assert idle.getresponse().read()
    result: dict = {}

    def call() -> None:
        result["r"] = http_json("POST", _url(server, "/v2/models/testmodel/infer"), json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}]}).encode())

    t = threading.Thread(target=call)
    t.start()
    assert started.wait(5)
    assert server.stop(5) is True
    t.join(5)
    model.session = real
    assert result["r"][0] == 200


def test_hostile_bodies_never_get_a_5xx(served) -> None:
    """Random and structurally wrong requests: every answer is a 4xx with a JSON error, or a 200."""
    import random

    server, model = served
    rng = random.Random(42)
    values: list = [None, True, -1, 0, 2**70, 1.5, float("nan"), "x", "FP32", [], {}, [1, 16], [[1]], {"a": 1},
                    [-1, 16], [1, 10**12], ["1", "16"], [0.5] * 16]
    keys = ["name", "shape", "datatype", "data", "parameters"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    statuses = set()
    for i in range(300):
        kind = i % 3
        if kind == 0:
            body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
            headers = {}
        else:
            item = {k: rng.choice(values) for k in keys if rng.random() < 0.8}
            if rng.random() < 0.5:
                item.update({"name": "x", "datatype": "FP32"})
            req = {"inputs": [item] if rng.random() < 0.9 else rng.choice(values)}
            if rng.random() < 0.3:
                req["outputs"] = rng.choice(values)
            if rng.random() < 0.3:
                req["parameters"] = rng.choice(values)
            body = json.dumps(req).encode()
            headers = {}
            if kind == 2:
                headers["Inference-Header-Content-Length"] = str(rng.randint(0, len(body) + 5))
                body += bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 80)))
        conn.request("POST", "/v2/models/testmodel/infer", body, headers)
        resp = conn.getresponse()
        payload = resp.read()
        statuses.add(resp.status)
        assert resp.status == 200 or 400 <= resp.status < 500, (resp.status, body[:200], payload[:200])
        if resp.status != 200:
            assert json.loads(payload)["error"]
        if resp.getheader("Connection") == "close":
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    assert 400 in statuses
    assert model.recorder.total_errors == 0
    for method in ("HEAD", "OPTIONS"):
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        c.request(method, "/v2")
        assert c.getresponse().status == 405


def test_api_answers_408_to_a_client_that_stalls_mid_body(served, monkeypatch) -> None:
    """A client that promises a body and stops sending gets 408 after the read timeout, and the thread is freed."""
    from edgefleet.agent import api as api_mod

    monkeypatch.setattr(api_mod._Handler, "timeout", 0.5)
    server, _ = served
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /v2/models/testmodel/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"in")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data[:80]
    status, _ = http_json("GET", _url(server, "/v2/health/ready"))
    assert status == 200
