"""Fuzzing with hypothesis: every parser that reads what another party wrote, and the agent's HTTP inference API.

Inputs are mutations of valid messages (a field replaced by any JSON value, removed, or added; several at once),
random JSON, raw bytes and pathological nesting. Property: the parser returns, or raises a clean ``EdgefleetError``
(for HTTP: a 4xx with a JSON ``error``, never a 5xx or a dropped connection). 200 examples each by default,
10,000 with ``pytest --long``.
"""

from __future__ import annotations

import copy
import http.client
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgefleet.sdk.errors import BundleError, ConfigError, EdgefleetError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CI_EXAMPLES, LONG_EXAMPLES = 200, 10_000

# -- strategies -----------------------------------------------------------------------------------------------------

_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**300, max_value=10**320),
    st.floats(allow_nan=False, allow_infinity=False), st.floats(min_value=-1e308, max_value=1e308),
    st.text(max_size=20), st.text(min_size=250, max_size=400),
    st.sampled_from(["", "v", "1", "-1", "0x10", "../x", "a/b", "+", "#", "\x00", "é" * 70, "x" * 300, "a/" * 200,
                     "~nosuchuser/x", "mqtt://[::1", "mqtt://[zz]:1", "mqtts://h:0", "http://x", "127.0.0.1:99999"]),
)
json_values = st.recursive(_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c,
                                                                                          max_size=4), max_leaves=10)


def _slots(obj: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) in a JSON tree, the root included as (None, None)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((obj, k))
            _slots(v, out)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append((obj, i))
            _slots(v, out)
    return out


@st.composite
def mutated(draw: st.DrawFn, valid: Any, max_mutations: int = 4) -> Any:
    """``valid`` with 0..max_mutations random edits: replace a value, delete a key/item, add a key, change type."""
    obj = copy.deepcopy(valid)
    for _ in range(draw(st.integers(0, max_mutations))):
        slots = _slots(obj, [])
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "wrap"]))
        if op == "replace":
            container[key] = draw(json_values)
        elif op == "delete":
            del container[key]
        elif op == "add" and isinstance(container, dict):
            container[draw(st.text(max_size=12))] = draw(json_values)
        elif op == "wrap":
            container[key] = [container[key]] if draw(st.booleans()) else {"x": container[key]}
    return obj


def nested(depth_max: int = 200_000) -> st.SearchStrategy[bytes]:
    """Pathological nesting (a RecursionError in a parser is an uncaught crash)."""
    return st.integers(1, depth_max).flatmap(lambda n: st.sampled_from([
        b"[" * n + b"]" * n, b'{"v":1,"a":' + b"[" * n + b"]" * n + b"}", b'{"a":' * n + b"1" + b"}" * n]))


def payloads(valid: dict[str, Any]) -> st.SearchStrategy[bytes | str]:
    """Bytes a subscriber might receive on a topic that carries messages like ``valid``."""
    return st.one_of(
        mutated(valid).map(lambda o: json.dumps(o).encode()),
        mutated(valid).map(json.dumps),
        json_values.map(lambda o: json.dumps(o).encode()),
        st.binary(max_size=200),
        nested(),
        mutated(valid).map(lambda o: json.dumps(o).encode().replace(b"1", b"NaN", 1)),
    )


def run(long_run: bool, figures: Any, name: str, strategy: st.SearchStrategy[Any], check: Callable[[Any], None],
        examples: int | None = None) -> None:
    """Run ``check`` on ``examples`` drawn inputs and record how many ran and how long it took."""
    n = examples or (LONG_EXAMPLES if long_run else CI_EXAMPLES)
    count = 0

    @settings(max_examples=n, deadline=None, database=None, derandomize=not long_run,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                     HealthCheck.large_base_example])
    @given(strategy)
    def fuzz(x: Any) -> None:
        nonlocal count
        count += 1
        check(x)

    t0 = time.perf_counter()
    fuzz()
    figures.add("fuzz", name, {"examples": count, "seconds": round(time.perf_counter() - t0, 2),
                               "mode": "long" if long_run else "ci"})


def _clean(fn: Callable[[Any], Any], errors: type[BaseException] | tuple[type[BaseException], ...] = EdgefleetError,
           ) -> Callable[[Any], None]:
    def check(x: Any) -> None:
        try:
            fn(x)
        except errors:
            pass
    return check


# -- MQTT payloads --------------------------------------------------------------------------------------------------

def _sketch() -> dict[str, Any]:
    from edgefleet.sdk.sketch import DDSketch

    sk = DDSketch()
    for v in (0.0, 0.4, 1.2, 3.3, 25.0):
        sk.add(v)
    return sk.to_dict()


def _valid_messages() -> dict[str, dict[str, Any]]:
    from edgefleet.sdk import protocol

    model = {"name": "m", "version": "1.0", "count": 5, "errors": 0, "providers": ["CPUExecutionProvider"],
             "sketch": _sketch(), "p50_ms": 1.0}
    msgs: dict[str, protocol.Message] = {
        "status": protocol.Status(device="dev-1", state="online", boot="b", description={"profile": "x86-cpu"}),
        "telemetry": protocol.Telemetry(device="dev-1", boot="b", seq=7, models=[model], interval_s=10.0,
                                        process={"rss_bytes": 1}),
        "event": protocol.Event(device="dev-1", boot="b", seq=3, kind="install", message="ok", data={"k": 1}),
        "command": protocol.command("deploy", {"url": "https://x/b.efb", "sha256": "a" * 64, "size": 10},
                                    ttl_s=60),
        "reply": protocol.Reply.failed("c1", "dev-1", "bundle.signature", "no", "verify"),
        "receipt": protocol.receipts("dev-1", telemetry={"b": [1, 2, 3, 9]}, events={"b": [4]},
                                    replies=["c1"])[0],
    }
    return {k: m.to_dict() for k, m in msgs.items()}


@pytest.mark.parametrize("kind", ["status", "telemetry", "event", "command", "reply", "receipt"])
def test_fuzz_protocol_parsers_raise_only_protocol_errors(kind: str, long_run: bool, figures: Any,
                                                          tmp_path: Path) -> None:
    from edgefleet.agent.db import Database
    from edgefleet.agent.spool import Spool
    from edgefleet.sdk import protocol

    cls = {"status": protocol.Status, "telemetry": protocol.Telemetry, "event": protocol.Event,
           "command": protocol.Command, "reply": protocol.Reply, "receipt": protocol.Receipt}[kind]
    valid = _valid_messages()[kind]
    assert cls.from_json(json.dumps(valid))  # the seed itself parses
    spool = Spool(Database(tmp_path / "agent.db")) if kind == "receipt" else None

    def check(data: bytes | str) -> None:
        try:
            msg = cls.from_json(data)
        except EdgefleetError:
            return
        # An accepted message goes back to the wire unchanged in meaning: the writer's validation takes it too.
        again = cls.from_json(msg.to_json())
        assert again == msg
        if isinstance(msg, protocol.Telemetry):  # what the fleet does with accepted telemetry
            from edgefleet.sdk.sketch import DDSketch, SketchSum, quantiles

            merged = DDSketch.merged(DDSketch.from_wire(m.sketch) for m in msg.models)
            merged.quantile(0.99)
            total = SketchSum(protocol.SKETCH_ALPHA)
            for m in msg.models:
                quantiles(m.sketch)
                total.add(m.sketch)
            total.to_ddsketch().quantile(0.5)
        if spool is not None:  # what the agent does with an accepted receipt
            spool.confirm(msg.to_dict())

    run(long_run, figures, f"protocol.{cls.__name__}.from_json", payloads(valid), check)


def test_fuzz_sketch_from_dict_raises_only_protocol_errors(long_run: bool, figures: Any) -> None:
    from edgefleet.sdk.sketch import DDSketch

    valid = _sketch()
    assert DDSketch.from_dict(valid).count == 5

    def check(d: Any) -> None:
        try:
            sk = DDSketch.from_dict(d)
        except EdgefleetError:
            return
        # an accepted sketch is usable: quantiles, merging and its JSON form must not blow up
        for q in (0.0, 0.5, 0.99, 1.0):
            sk.quantile(q)
        DDSketch.merged([sk, sk], alpha=sk.alpha).quantile(0.95)
        assert DDSketch.from_dict(sk.to_dict()).count == sk.count

    run(long_run, figures, "DDSketch.from_dict", st.one_of(mutated(valid), json_values), check)


# -- bundle manifests -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def valid_manifest(tmp_path_factory: pytest.TempPathFactory, signing_key: Any, mlp_model: Path) -> dict[str, Any]:
    from edgefleet.sdk.bundle import read_manifest
    from edgefleet.sdk.keys import TrustedKeys
    from edgefleet.sdk.testing import build_test_bundle

    b = build_test_bundle(mlp_model, tmp_path_factory.mktemp("fz") / "b.efb", signing_key)
    return read_manifest(b, TrustedKeys([signing_key.public])).manifest.to_dict()


def test_fuzz_manifest_from_dict_raises_only_bundle_errors(valid_manifest: dict[str, Any], long_run: bool,
                                                           figures: Any) -> None:
    from edgefleet.sdk.bundle import Manifest

    assert Manifest.from_dict(valid_manifest).name == "testmodel"
    run(long_run, figures, "Manifest.from_dict", st.one_of(mutated(valid_manifest, 6), json_values),
        _clean(Manifest.from_dict, BundleError))


def test_fuzz_signed_header_raises_only_bundle_errors(valid_manifest: dict[str, Any], signing_key: Any,
                                                     trusted: Any, long_run: bool, figures: Any) -> None:
    """The reader's header stage with a *valid signature* over fuzzed manifest bytes (so parsing is reached),
    and fuzzed signatures.json over the valid manifest."""
    from edgefleet.sdk.bundle import _verify_header, canonical_json

    raw_valid = canonical_json(valid_manifest)
    good_sig = canonical_json([signing_key.sign(raw_valid)])
    assert _verify_header(raw_valid, good_sig, trusted, "seed").manifest.name == "testmodel"

    def canon(o: Any) -> bytes:
        try:
            return canonical_json(o)
        except (ValueError, RecursionError):
            return json.dumps(o).encode()

    manifests = st.one_of(mutated(valid_manifest, 6).map(canon), st.binary(max_size=300), nested(50_000),
                          mutated(valid_manifest, 3).map(lambda o: json.dumps(o, indent=1).encode()))
    sigs = st.one_of(st.binary(max_size=200), mutated([signing_key.sign(raw_valid)], 3).map(canon))

    def check(x: tuple[int, bytes]) -> None:
        which, data = x
        try:
            if which == 0:
                _verify_header(data, canonical_json([signing_key.sign(data)]), trusted, "fuzz")
            else:
                _verify_header(raw_valid, data, trusted, "fuzz")
        except BundleError:
            pass

    run(long_run, figures, "bundle._verify_header",
        st.one_of(st.tuples(st.just(0), manifests), st.tuples(st.just(1), sigs)), check)


# -- agent config ---------------------------------------------------------------------------------------------------

def test_fuzz_agent_config_raises_only_config_errors(tmp_path: Path, signing_key: Any, long_run: bool,
                                                     figures: Any) -> None:
    from edgefleet.agent.config import parse_config

    (tmp_path / "fleet.pub").write_bytes(signing_key.public.to_pem())
    valid = {"agent": {"device": "dev-1", "fleet": "f1", "data_dir": "data", "trusted_keys": ["fleet.pub"],
                       "accept_targets": ["x86-cpu"], "log_level": "info"},
             "mqtt": {"url": "mqtt://127.0.0.1:1883", "keepalive_s": 30, "username": "u", "password": "p"},
             "telemetry": {"interval_s": 10.0, "spool_max_records": 1000},
             "api": {"listen": "127.0.0.1:0", "max_body_bytes": 4096},
             "install": {"max_bundle_bytes": 1 << 20, "download_timeout_s": 5.0},
             "storage": {"reserve_bytes": 1 << 20, "ballast_bytes": 0, "max_events": 100, "max_replies": 100,
                         "max_held": 100, "journal_max_entries": 1000, "journal_max_pending": 10}}
    assert parse_config(valid, base=tmp_path).device == "dev-1"
    run(long_run, figures, "agent.config.parse_config", st.one_of(mutated(valid, 5), json_values),
        _clean(lambda d: parse_config(d, base=tmp_path), ConfigError))


# -- the agent's HTTP inference endpoint ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, signing_key: Any, mlp_model: Path) -> Iterator[Any]:
    from edgefleet.agent.api import ApiServer
    from edgefleet.agent.registry import Registry
    from edgefleet.sdk.bundle import extract_bundle
    from edgefleet.sdk.keys import TrustedKeys
    from edgefleet.sdk.runtime import Model
    from edgefleet.sdk.testing import build_test_bundle

    d = tmp_path_factory.mktemp("api")
    trusted = TrustedKeys([signing_key.public])
    extract_bundle(build_test_bundle(mlp_model, d / "b.efb", signing_key, version="1.2.0"), trusted, d / "bundle")
    registry = Registry()
    registry.put("testmodel", Model.open(d / "bundle", trusted))
    registry.ready.set()
    server = ApiServer("127.0.0.1", 0, registry, 1 << 20)
    server.start()
    yield server
    server.stop(5)


_VALID_INFER = {"id": "r1", "inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32",
                                        "data": [0.5] * 32}], "outputs": [{"name": "probs"}]}
_PATHS = ["/v2/models/testmodel/infer", "/v2/models/testmodel/versions/1.2.0/infer", "/v2/models/testmodel",
          "/v2/models/testmodel/ready", "/v2", "/v2/health/live", "/v2/health/ready", "/", "/v2/models//infer"]


@st.composite
def http_requests(draw: st.DrawFn) -> tuple[str, str, dict[str, str], bytes]:
    # weighted towards what reaches the body parser: POST to an infer path with a truthful Content-Length
    method = draw(st.sampled_from(["POST"] * 20 + ["GET", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"]))
    which = draw(st.integers(0, 9))
    if which < 7:
        path = _PATHS[0] if which < 5 else _PATHS[1]
    elif which < 9:
        path = draw(st.sampled_from(_PATHS)) + draw(st.text(alphabet=st.characters(min_codepoint=33,
                                                                                  max_codepoint=126), max_size=30))
    else:
        path = draw(st.sampled_from(["/v2/models/" + "a" * 5000 + "/infer", "/v2/models/testmodel/versions/x/infer",
                                     "/v2/models/%00/infer", "//v2//models//testmodel//infer",
                                     "/v2/../v2/health/live"]))
    kind = draw(st.sampled_from(["json"] * 6 + ["binary"] * 3 + ["bytes", "nested"]))
    headers: dict[str, str] = {}
    if kind == "json":
        body = json.dumps(draw(mutated(_VALID_INFER, 5))).encode()
    elif kind == "binary":
        req = draw(mutated({"inputs": [{"name": "x", "shape": [2, 16], "datatype": "FP32",
                                        "parameters": {"binary_data_size": 128}}],
                            "outputs": [{"name": "probs", "parameters": {"binary_data": True}}]}, 3))
        head = json.dumps(req).encode()
        blob = draw(st.binary(min_size=0, max_size=160))
        body = head + blob
        headers["Inference-Header-Content-Length"] = draw(st.one_of(
            st.just(str(len(head))), st.integers(-5, len(body) + 5).map(str), st.sampled_from(["", "x", "²", "1e3",
                                                                                              " 12", "99999999999"])))
    elif kind == "bytes":
        body = draw(st.binary(max_size=300))
    else:
        body = draw(nested(100_000))
    length = str(len(body))
    if draw(st.integers(0, 9)) == 9:  # hypothesis favours small draws: rare branches sit at the top
        length = draw(st.sampled_from(["", "-1", "abc", "²", str(len(body) + 10), "99999999999999", " 5"]))
    headers["Content-Length"] = length
    if draw(st.integers(0, 19)) == 19:
        headers["Transfer-Encoding"] = "chunked"
    return method, path, headers, body


def _send(port: int, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        # a lying Content-Length larger than the body: send what we have and half-close so the server sees EOF.
        # The server may answer (413, 405 ...) and close before reading it all: its answer is what counts.
        try:
            conn.send(body)
            claimed = headers.get("Content-Length", "").strip()  # the server strips header whitespace too
            if claimed.isascii() and claimed.isdigit() and int(claimed) > len(body):
                conn.sock.shutdown(1)
        except OSError:
            pass
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_fuzz_http_inference_endpoint_answers_4xx_json_never_5xx(api: Any, long_run: bool, figures: Any) -> None:
    status, body = _send(api.port, "POST", _PATHS[0], {"Content-Length": str(len(json.dumps(_VALID_INFER)))},
                         json.dumps(_VALID_INFER).encode())
    assert status == 200 and len(json.loads(body)["outputs"][0]["data"]) == 8
    statuses: dict[int, int] = {}

    def check(req: tuple[str, str, dict[str, str], bytes]) -> None:
        method, path, headers, body = req
        try:
            status, resp = _send(api.port, method, path, headers, body)
        except (http.client.HTTPException, ConnectionError) as exc:
            raise AssertionError(f"no HTTP response to {method} {path[:60]} {headers}: {exc!r}") from exc
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (status, resp[:200], method, path[:80], headers)
        if method != "HEAD" and status >= 400:
            assert "error" in json.loads(resp), resp[:200]
        if status == 200 and method == "POST":
            head = resp
            if "Inference-Header-Content-Length" in headers or b'"binary_data_size"' in resp:
                head = resp[: resp.index(b'"outputs"')] + b'"outputs":[]}' if b'"outputs"' in resp else resp
            assert b"model_name" in head

    run(long_run, figures, "agent HTTP /v2 infer", http_requests(), check,
        examples=(LONG_EXAMPLES if long_run else CI_EXAMPLES))
    figures.add("fuzz", "agent HTTP statuses", {str(k): v for k, v in sorted(statuses.items())})
    # the server is still healthy after the fuzzing
    assert _send(api.port, "GET", "/v2/health/live", {}, b"")[0] == 200
    x = np.ones((1, 16), np.float32).tolist()
    ok = {"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": x}]}
    assert _send(api.port, "POST", _PATHS[0], {"Content-Length": str(len(json.dumps(ok)))},
                 json.dumps(ok).encode())[0] == 200
