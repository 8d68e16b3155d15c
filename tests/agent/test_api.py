"""The local Open Inference Protocol API over real sockets: tritonclient (a client nobody here wrote), raw HTTP for the
framing (keep-alive after every error, chunked, 100-continue, pipelining, compression), Triton's extensions, and
hostile requests that must get a 4xx, never a 5xx."""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import socket
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from _agent_util import http_json
from _api_models import strings_model
from _api_util import ServedApi, infer_body, read_response, request

X = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)


@pytest.fixture
def api(tmp_path: Path, signing_key, trusted, mlp_model):
    s = ServedApi(tmp_path, signing_key, trusted, [(mlp_model, {"version": "1.2.0"})], max_body_bytes=1 << 20,
                  max_inflight_bytes=4 << 20)
    yield s
    s.close()


def _expected(api: ServedApi, x: np.ndarray = X) -> np.ndarray:
    return api.model().session.run(["probs"], {"x": x})[0]


def test_tritonclient_infer_binary_and_json_match_bare_session(api: ServedApi) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=api.address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("testmodel")
    meta = client.get_model_metadata("testmodel")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert meta["versions"] == ["1.2.0"]
    expected = _expected(api)
    for binary in (True, False):
        inp = httpclient.InferInput("x", list(X.shape), "FP32")
        inp.set_data_from_numpy(X, binary_data=binary)
        out = httpclient.InferRequestedOutput("probs", binary_data=binary)
        res = client.infer("testmodel", [inp], outputs=[out], request_id="r1")
        assert res.get_response()["id"] == "r1"
        np.testing.assert_allclose(res.as_numpy("probs"), expected, rtol=1e-5, atol=1e-6)
    res = client.infer("testmodel", [inp])  # no outputs listed: tritonclient asks for all, binary
    np.testing.assert_allclose(res.as_numpy("probs"), expected, rtol=1e-5, atol=1e-6)
    assert api.model().recorder.total_count == 3
    client.close()


def test_binary_response_is_octet_stream_with_header_length(api: ServedApi) -> None:
    conn = api.conn()
    status, headers, body = request(conn, "POST", "/v2/models/testmodel/infer", infer_body(X, binary_out=True))
    assert status == 200
    assert headers["content-type"] == "application/octet-stream"
    n = int(headers["inference-header-content-length"])
    head = json.loads(body[:n])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == len(body) - n == 5 * 4 * 4
    np.testing.assert_allclose(np.frombuffer(body[n:], "<f4").reshape(5, 4), _expected(api), rtol=1e-5, atol=1e-6)
    status, headers, body = request(conn, "POST", "/v2/models/testmodel/infer", infer_body(X))
    assert status == 200 and headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in headers


def test_json_infer_with_nested_data_and_version_path(api: ServedApi) -> None:
    body = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [[0.5] * 16]}]}
    status, resp = http_json("POST", api.url("/v2/models/testmodel/versions/1.2.0/infer"), json.dumps(body).encode())
    assert status == 200
    assert resp["model_version"] == "1.2.0" and resp["outputs"][0]["shape"] == [1, 4]
    assert abs(sum(resp["outputs"][0]["data"]) - 1.0) < 1e-5


@pytest.mark.parametrize(("method", "path", "body", "status", "needle"), [
    ("POST", "/v2/models/nope/infer", b"{}", 404, "unknown model 'nope'"),
    ("POST", "/v2/models/testmodel/versions/9/infer", b"{}", 404, "version '9'"),
    ("POST", "/v2/models/testmodel/infer", b"{not json", 400, "not valid JSON"),
    ("POST", "/v2/models/testmodel/infer", b"", 400, "not valid JSON"),
    ("POST", "/v2/models/testmodel/infer", b"[1]", 400, "JSON object"),
    ("POST", "/v2/models/testmodel/infer", b'{"inputs": []}', 400, "non-empty 'inputs'"),
    ("POST", "/v2/models/testmodel/infer", json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP64",
                                                                  "data": [0.0] * 16}]}).encode(), 400, "expects FP32"),
    ("POST", "/v2/models/testmodel/infer", json.dumps({"inputs": [{"name": "x", "shape": [1, 15], "datatype": "FP32",
                                                                  "data": [0.0] * 15}]}).encode(), 400, "dim 1 is 15"),
    ("POST", "/v2/models/testmodel/infer", json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                                                  "data": [0.0] * 3}]}).encode(), 400,
     "3 values given"),
    ("POST", "/v2/models/testmodel/infer", json.dumps({"inputs": [{"name": "y", "shape": [1], "datatype": "FP32",
                                                                  "data": [0.0]}]}).encode(), 400, "unknown input 'y'"),
    ("POST", "/v2/models/testmodel/infer", json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                                                  "data": ["a"] * 16}]}).encode(), 400,
     "not a list of FP32"),
    ("POST", "/v2/models/testmodel/infer", json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                                                  "data": [0.0] * 16}],
                                                      "outputs": [{"name": "zz"}]}).encode(), 400,
     "unknown output 'zz'"),
    ("POST", "/v2/models/testmodel/infer", json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                                                  "data": [0.0] * 16, "parameters": {
                                                                      "shared_memory_region": "r"}}]}).encode(), 400,
     "shared memory is not supported"),
    ("POST", "/v2/models/testmodel/infer", json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                                                  "data": [0.0] * 16}],
                                                      "parameters": {"sequence_id": 7}}).encode(), 400,
     "not a sequence model"),
    ("POST", "/v2/health/live", b"{}", 405, "use GET"),
    ("GET", "/v2/models/testmodel/infer", None, 405, "use POST"),
    ("DELETE", "/v2/models/testmodel", None, 405, "method DELETE"),
    ("POST", "/v3/x", b"{}", 404, "Open Inference Protocol"),
    ("GET", "/v2/models/testmodel/nothing", None, 404, "no route"),
    ("GET", "/v2/trace/setting", None, 400, "trace extension is not supported"),
    ("POST", "/v2/systemsharedmemory/region/r/register", b'{"key": "/k", "byte_size": 4}', 400,
     "system shared-memory extension is not supported"),
    ("GET", "/v2/cudasharedmemory/status", None, 400, "CUDA shared-memory"),
    ("PUT", "/v2/models/testmodel/infer", b"{}", 405, "method PUT"),
])
def test_bad_requests_get_4xx_with_json_error(api: ServedApi, method: str, path: str, body: bytes | None, status: int,
                                              needle: str) -> None:
    got, resp = http_json(method, api.url(path), body, {"Content-Type": "application/json"})
    assert got == status, resp
    assert needle in resp["error"]
    assert api.model().recorder.total_errors == 0


def test_keepalive_survives_every_error_path(api: ServedApi) -> None:
    """One connection through every kind of refusal; each answer leaves it usable and the next request parses."""
    conn = api.conn()
    status, _, _ = request(conn, "GET", "/v2/health/live")
    assert status == 200
    sock = conn.sock
    good = infer_body(X)
    bad_binary = json.dumps({"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32",
                                         "parameters": {"binary_data_size": 64}}]}).encode()
    steps = [
        ("POST", "/v2/models/nope/infer", good, {}, 404),             # unknown model: the body is not read, drained
        ("POST", "/v2/health/live", good, {}, 405),                    # wrong method with a body
        ("PUT", "/v2/models/testmodel/infer", good, {}, 405),
        ("GET", "/v2/models/testmodel/nothing", None, {}, 404),
        ("POST", "/v2/models/testmodel/infer", b"{oops", {}, 400),
        ("POST", "/v2/models/testmodel/infer", bad_binary + b"\0" * 10,
         {"Inference-Header-Content-Length": str(len(bad_binary))}, 400),
        ("POST", "/v2/models/testmodel/infer", good, {"Inference-Header-Content-Length": "x"}, 400),
        ("POST", "/v2/models/testmodel/infer", good, {"Content-Encoding": "br"}, 415),
        ("POST", "/v2/repository/models/nope/load", b"{}", {}, 400),
        ("GET", "/v2/trace/setting", None, {}, 400),
        ("HEAD", "/v2/models/testmodel", None, {}, 200),
        ("POST", "/v2/models/testmodel/infer", good, {}, 200),
    ]
    for method, path, body, headers, want in steps:
        status, got_headers, payload = request(conn, method, path, body, headers)
        assert status == want, (method, path, status, payload[:200])
        assert got_headers.get("connection") != "close", (method, path)
        assert conn.sock is sock, f"{method} {path}: the connection was not kept"
        if status >= 400:
            assert json.loads(payload)["error"]
    conn.close()


def test_tritonclient_keeps_working_on_one_connection_after_errors(api: ServedApi) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    before = api.server.http.accepted
    client = httpclient.InferenceServerClient(url=api.address)
    inp = httpclient.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    for call, status in [(lambda: client.infer("nope", [inp]), "404"),
                         (lambda: client.infer("testmodel", [inp], outputs=[httpclient.InferRequestedOutput("zz")]),
                          "400"),
                         (lambda: client.get_model_metadata("nope"), "404"),
                         (lambda: client.get_trace_settings(), "400")]:
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == status
        res = client.infer("testmodel", [inp])  # the same pooled connection, never parsed from leftovers
        np.testing.assert_allclose(res.as_numpy("probs"), _expected(api), rtol=1e-5, atol=1e-6)
    assert api.server.http.accepted - before == 1
    client.close()


def test_oversized_body_is_413_without_reading_it_and_closes(api: ServedApi) -> None:
    conn = api.conn()
    conn.putrequest("POST", "/v2/models/testmodel/infer")
    conn.putheader("Content-Length", str(10 << 20))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and resp.getheader("Connection") == "close"
    assert "over the 1048576-byte limit" in json.loads(resp.read())["error"]


def test_chunked_body_is_streamed_with_the_cap(api: ServedApi) -> None:
    def chunked(body: bytes, size: int = 4096) -> bytes:
        out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                       for i in range(0, len(body), size))
        return out + b"0\r\n\r\n"

    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        body = infer_body(X)
        s.sendall(b"POST /v2/models/testmodel/infer HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + chunked(body))
        s.sendall(b"POST /v2/models/testmodel/infer HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + chunked(b"[" * (2 << 20)))
        data = read_response(s)
    first, _, rest = data.partition(b"HTTP/1.1 413")
    assert first.startswith(b"HTTP/1.1 200 OK") and b'"model_name":"testmodel"' in first
    assert b"over the 1048576-byte limit" in rest and b"Connection: close" in rest


def test_both_content_length_and_chunked_is_refused(api: ServedApi) -> None:
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        s.sendall(b"POST /v2/models/testmodel/infer HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        data = read_response(s)
    assert data.startswith(b"HTTP/1.1 400") and b"both Content-Length and Transfer-Encoding" in data


def test_expect_100_continue_and_pipelining(api: ServedApi) -> None:
    body = infer_body(X)
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        s.sendall(b"POST /v2/models/testmodel/infer HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))
        assert s.recv(1024).startswith(b"HTTP/1.1 100")
        s.sendall(body)
        # then three requests in one write; the last one asks to close
        get = b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\n\r\n"
        s.sendall(get + b"POST /v2/models/testmodel/infer HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body) + get.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        data = read_response(s)
    assert data.count(b"HTTP/1.1 200 OK") == 4
    assert data.index(b'{"live":true}') < data.rindex(b'"model_name"') < data.rindex(b'{"live":true}')
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:  # refused before the body is sent
        s.sendall(b"POST /v2/models/testmodel/infer HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n" % (5 << 20))
        assert s.recv(1024).startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
def test_compressed_requests_and_responses(api: ServedApi, encoding: str) -> None:
    body = infer_body(X, binary_out=True)
    if encoding == "gzip":
        packed = gzip.compress(body)
    elif encoding == "deflate":
        packed = zlib.compress(body)
    else:  # some clients send a bare deflate stream for "deflate"
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        packed = c.compress(body) + c.flush()
    name = "deflate" if encoding == "raw-deflate" else encoding
    conn = api.conn()
    status, headers, payload = request(conn, "POST", "/v2/models/testmodel/infer", packed,
                                       {"Content-Encoding": name, "Accept-Encoding": f"{name}, br;q=0.5"})
    assert status == 200, payload[:200]
    assert headers["content-encoding"] == name and headers["content-type"] == "application/octet-stream"
    raw = gzip.decompress(payload) if name == "gzip" else zlib.decompress(payload)
    n = int(headers["inference-header-content-length"])  # the length inside the decompressed body
    np.testing.assert_allclose(np.frombuffer(raw[n:], "<f4").reshape(5, 4), _expected(api), rtol=1e-5, atol=1e-6)
    status, headers, _ = request(conn, "POST", "/v2/models/testmodel/infer", body,
                                 {"Accept-Encoding": "gzip;q=0, identity"})
    assert status == 200 and "content-encoding" not in headers
    status, headers, _ = request(conn, "GET", "/v2", None, {"Accept-Encoding": "gzip"})  # only inference, as Triton
    assert status == 200 and "content-encoding" not in headers
    status, headers, payload = request(conn, "GET", "/metrics", None, {"Accept-Encoding": "gzip"})  # Prometheus
    assert headers["content-encoding"] == "gzip" and b"# TYPE" in gzip.decompress(payload)


def test_tritonclient_compression_both_ways(api: ServedApi) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=api.address)
    inp = httpclient.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    for alg in ("gzip", "deflate"):
        for binary in (True, False):
            res = client.infer("testmodel", [inp], outputs=[httpclient.InferRequestedOutput("probs",
                                                                                           binary_data=binary)],
                               request_compression_algorithm=alg, response_compression_algorithm=alg)
            np.testing.assert_allclose(res.as_numpy("probs"), _expected(api), rtol=1e-5, atol=1e-6)
    client.close()


def test_decompression_bomb_is_413_while_streaming(api: ServedApi) -> None:
    bomb = gzip.compress(b'{"inputs": [' + b" " * (200 << 20) + b"]}", 9)  # 200 MiB of JSON in ~200 KiB
    assert len(bomb) < (1 << 20)
    conn = api.conn()
    status, headers, payload = request(conn, "POST", "/v2/models/testmodel/infer", bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "once decoded" in json.loads(payload)["error"]
    assert headers["connection"] == "close"


def test_bytes_tensors_both_ways(tmp_path: Path, signing_key, trusted) -> None:
    import tritonclient.http as httpclient

    text = np.array(["cat", "dog", "Émile", ""], dtype=object)
    samples = [{"text": np.array(["Cat", "bird"])}]
    # install=False: a validation set cannot hold string outputs yet (numpy object arrays are refused as pickles)
    s = ServedApi(tmp_path, signing_key, trusted, [(strings_model(tmp_path / "s.onnx"),
                                                    {"name": "words", "samples": samples})], install=False)
    try:
        client = httpclient.InferenceServerClient(url=s.address)
        assert client.get_model_metadata("words")["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        for binary in (True, False):
            inp = httpclient.InferInput("text", [4], "BYTES")
            inp.set_data_from_numpy(text, binary_data=binary)
            res = client.infer("words", [inp], outputs=[httpclient.InferRequestedOutput("shout", binary_data=binary),
                                                        httpclient.InferRequestedOutput("label", binary_data=binary)])
            assert [v.decode() if isinstance(v, bytes) else v for v in res.as_numpy("shout")] == \
                ["cat!", "dog!", "Émile!", "!"]
            assert res.as_numpy("label").tolist() == [1, 2, -1, -1]
        status, resp = http_json("POST", s.url("/v2/models/words/infer"), json.dumps(
            {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", 3]}]}).encode())
        assert status == 400 and "must be strings" in resp["error"]
        head = json.dumps({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": 6}}]}).encode()
        status, resp = http_json("POST", s.url("/v2/models/words/infer"), head + b"\x02\0\0\0\xff\xfe",
                                 {"Inference-Header-Content-Length": str(len(head))})
        assert status == 400 and "not UTF-8" in resp["error"]
        client.close()
    finally:
        s.close()


def test_classification_extension(api: ServedApi) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=api.address)
    inp = httpclient.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    res = client.infer("testmodel", [inp], outputs=[httpclient.InferRequestedOutput("probs", class_count=2)])
    got = res.as_numpy("probs")
    expected = _expected(api)
    assert got.shape == (5, 2)
    for row, exp in zip(got, expected, strict=True):
        top = np.argsort(-exp)[:2]
        assert [int(v.decode().split(":")[1]) for v in row] == top.tolist()
        assert float(row[0].decode().split(":")[0]) == pytest.approx(exp[top[0]], abs=1e-5)
    client.close()


def test_model_config_is_derived_from_the_manifest(api: ServedApi) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=api.address)
    cfg = client.get_model_config("testmodel")
    assert cfg == client.get_model_config("testmodel", "1.2.0")
    assert cfg["name"] == "testmodel" and cfg["platform"] == "onnxruntime_onnx" and cfg["backend"] == "onnxruntime"
    assert cfg["max_batch_size"] == 0
    assert cfg["input"][0] == {"name": "x", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": [-1, 16],
                               "is_shape_tensor": False, "allow_ragged_batch": False, "optional": False}
    assert cfg["output"][0]["data_type"] == "TYPE_FP32" and cfg["output"][0]["dims"] == [-1, 4]
    assert cfg["instance_group"][0]["kind"] == "KIND_CPU" and cfg["instance_group"][0]["count"] == 1
    assert cfg["default_model_filename"] == "model.onnx"
    assert cfg["parameters"]["edgefleet.digest"]["string_value"] == api.model().digest
    assert cfg["parameters"]["edgefleet.providers"]["string_value"] == "CPUExecutionProvider"
    client.close()


def test_statistics_as_triton_reports_them(api: ServedApi) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=api.address)
    empty = client.get_inference_statistics("testmodel")["model_stats"][0]
    assert empty["inference_count"] == 0 and empty["inference_stats"]["success"] == {"count": 0, "ns": 0}
    inp = httpclient.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    for _ in range(3):
        client.infer("testmodel", [inp])
    for bad in (b"{", b'{"inputs": 1}'):
        assert http_json("POST", api.url("/v2/models/testmodel/infer"), bad)[0] == 400
    t0 = time.time()
    stats = client.get_inference_statistics("testmodel", "1.2.0")["model_stats"]
    assert client.get_inference_statistics()["model_stats"] == stats
    (st,) = stats
    assert (st["name"], st["version"]) == ("testmodel", "1.2.0")
    assert st["inference_count"] == st["execution_count"] == 3
    assert abs(st["last_inference"] / 1000 - t0) < 10
    s = st["inference_stats"]
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert s[key]["count"] == 3 and s[key]["ns"] > 0, key
    assert s["fail"]["count"] == 2
    parts = sum(s[k]["ns"] for k in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert parts <= s["success"]["ns"]
    assert st["batch_stats"][0]["batch_size"] == 1 and st["batch_stats"][0]["compute_infer"]["count"] == 3
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_inference_statistics("nope")
    with pytest.raises(InferenceServerException, match="no statistics"):
        client.get_inference_statistics("testmodel", "9.9.9")
    client.close()


def test_repository_index_unload_load(api: ServedApi) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url=api.address)
    assert client.get_model_repository_index() == [{"name": "testmodel", "version": "1.2.0", "state": "READY",
                                                    "reason": ""}]
    first = api.model()
    client.unload_model("testmodel")
    assert not client.is_model_ready("testmodel")
    assert client.get_model_repository_index() == [{"name": "testmodel", "version": "1.2.0", "state": "UNAVAILABLE",
                                                    "reason": "unloaded"}]
    status, _ = http_json("POST", api.url("/v2/repository/index"), b'{"ready": true}')
    assert status == 200 and http_json("POST", api.url("/v2/repository/index"), b'{"ready": true}')[1] == []
    inp = httpclient.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("testmodel", [inp])
    client.load_model("testmodel")
    assert client.is_model_ready("testmodel") and api.model() is not first  # a fresh, re-verified session
    client.load_model("testmodel")  # a reload of a served model swaps in another fresh session
    np.testing.assert_allclose(client.infer("testmodel", [inp]).as_numpy("probs"), _expected(api), rtol=1e-5)
    with pytest.raises(InferenceServerException, match="not installed on this device"):
        client.load_model("other")
    with pytest.raises(InferenceServerException, match="only bundles installed through signed deployments"):
        client.load_model("testmodel", config=json.dumps({"max_batch_size": 8}))
    with pytest.raises(InferenceServerException, match="only bundles installed"):
        client.load_model("testmodel", config="{}", files={"file:1/model.onnx": b"\0"})
    client.close()


def test_repository_control_refuses_web_pages_and_needs_the_token_when_set(tmp_path: Path, signing_key, trusted,
                                                                          mlp_model) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-s3cret-s3cret\n")
    s = ServedApi(tmp_path, signing_key, trusted, [(mlp_model, {})], admin_token_file=str(token))
    try:
        url = s.url("/v2/repository/models/testmodel/unload")
        status, resp = http_json("POST", url, b"{}")
        assert status == 401 and "Bearer" in resp["error"]
        status, resp = http_json("POST", url, b"{}", {"Authorization": "Bearer wrong-wrong-wrong"})
        assert status == 401
        status, resp = http_json("POST", url, b"{}", {"Authorization": "Bearer s3cret-s3cret-s3cret",
                                                     "Origin": "http://evil.example"})
        assert status == 403 and "web pages" in resp["error"]
        status, _ = http_json("POST", s.url("/v2/logging"), b'{"log_verbose_level": 1}', {"Content-Type": "text/plain"})
        assert status == 401
        assert s.model() is not None
        status, _ = http_json("POST", url, b"{}", {"Authorization": "Bearer s3cret-s3cret-s3cret"})
        assert status == 200 and s.model() is None
        assert http_json("POST", s.url("/v2/repository/index"), b"")[0] == 200  # reading needs no token
    finally:
        s.close()


def test_logging_extension_sets_the_agent_log_level(api: ServedApi) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    root = logging.getLogger()
    saved = root.level
    client = httpclient.InferenceServerClient(url=api.address)
    try:
        root.setLevel(logging.INFO)
        assert client.get_log_settings() == {"log_file": "", "log_info": True, "log_warnings": True,
                                             "log_errors": True, "log_verbose_level": 0, "log_format": "default"}
        assert client.update_log_settings({"log_verbose_level": 1})["log_verbose_level"] == 1
        assert root.level == logging.DEBUG
        assert client.update_log_settings({"log_verbose_level": 0, "log_info": False})["log_info"] is False
        assert root.level == logging.WARNING
        for bad, needle in [({"log_file": "/etc/passwd"}, "log_file cannot be set"),
                            ({"log_info": True, "log_warnings": False}, "threshold"),
                            ({"log_format": "ISO8601"}, "default' only"), ({"colour": True}, "unknown setting"),
                            ({"log_verbose_level": -1}, ">= 0")]:
            with pytest.raises(InferenceServerException, match=needle):
                client.update_log_settings(bad)
        assert root.level == logging.WARNING
    finally:
        root.setLevel(saved)
        client.close()


def test_stop_finishes_inflight_requests_and_closes_idle_keepalive(api: ServedApi) -> None:
    model = api.model()
    orig = model.session.run
    started = threading.Event()

    class Slow:
        def run(self, *a, **kw):
            started.set()
            time.sleep(0.5)
            return orig(*a, **kw)

        def __getattr__(self, name):
            return getattr(orig.__self__, name)

    model.session = Slow()
    idle = api.conn(5)
    assert request(idle, "GET", "/v2/health/live")[0] == 200
    result: dict = {}

    def call() -> None:
        result["r"] = http_json("POST", api.url("/v2/models/testmodel/infer"), infer_body(X[:1]))

    t = threading.Thread(target=call)
    t.start()
    assert started.wait(5)
    assert api.server.stop(5) is True
    t.join(5)
    assert result["r"][0] == 200
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        request(idle, "GET", "/v2/health/live")


def test_hostile_bodies_never_get_a_5xx(api: ServedApi) -> None:
    """Random and structurally wrong requests: every answer is a 4xx with a JSON error, or a 200."""
    import random

    rng = random.Random(42)
    values: list = [None, True, -1, 0, 2**70, 1.5, float("nan"), "x", "FP32", "BYTES", [], {}, [1, 16], [[1]],
                    {"a": 1}, [-1, 16], [1, 10**12], ["1", "16"], [0.5] * 16, {"binary_data": "yes"},
                    {"classification": 2}, {"classification": -3}]
    keys = ["name", "shape", "datatype", "data", "parameters"]
    conn = api.conn()
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
                req["outputs"] = rng.choice([values, [{"name": "probs", "parameters": rng.choice(values)}]])
            if rng.random() < 0.3:
                req["parameters"] = rng.choice(values)
            body = json.dumps(req).encode()
            headers = {}
            if kind == 2:
                headers["Inference-Header-Content-Length"] = str(rng.randint(0, len(body) + 5))
                body += bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 80)))
        status, got, payload = request(conn, "POST", "/v2/models/testmodel/infer", body, headers)
        statuses.add(status)
        assert status == 200 or 400 <= status < 500, (status, body[:200], payload[:200])
        if status != 200:
            assert json.loads(payload)["error"]
        assert got.get("connection") != "close"
    assert 400 in statuses
    assert api.model().recorder.total_errors == 0


def test_a_client_that_stalls_mid_body_gets_408_and_frees_its_thread(tmp_path: Path, signing_key, trusted,
                                                                    mlp_model) -> None:
    s = ServedApi(tmp_path, signing_key, trusted, [(mlp_model, {})], body_timeout_s=0.5)
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
            sock.sendall(b"POST /v2/models/testmodel/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"in")
            data = read_response(sock, 5)
        assert data.startswith(b"HTTP/1.1 408"), data[:80]
        assert b"api.body_timeout_s" in data
        assert http_json("GET", s.url("/v2/health/ready"))[0] == 200
        assert s.server.rejections["body_timeout"] == 1
    finally:
        s.close()
