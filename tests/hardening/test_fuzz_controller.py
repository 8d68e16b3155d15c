"""Fuzzing a running controller (issue 18): every HTTP endpoint, and every MQTT payload type interleaved with good
records, against a real ``edgefleet fleet serve`` process, a real Mosquitto and real sockets.

Properties:
- HTTP: every request (any route, method, path parameter, query, body, content type, with and without a token)
  answers with a status below 500 and, for 4xx, a JSON body with ``error``; the controller stays up.
- MQTT: hostile payloads (mutated valid messages, random JSON, raw bytes, pathological nesting) on every channel of
  a device, interleaved with good telemetry of other devices: every good record is stored exactly once (0 lost,
  0 twice), and the controller stays up.

200 examples per target by default, 10,000 with ``pytest --long``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from _controller import ControllerProc, request
from hypothesis import strategies as st
from test_fuzz import _valid_messages, json_values, mutated, payloads, run

from tests.helpers import wait_until

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(3600)]  # --long: 10,000 examples each

FLEET = "fz"

ROUTES: list[tuple[str, str]] = [
    ("GET", "/"), ("GET", "/api/devices"), ("GET", "/api/devices/{device}"),
    ("GET", "/api/devices/{device}/telemetry"), ("GET", "/api/telemetry"), ("GET", "/api/versions"),
    ("GET", "/api/events"), ("GET", "/api/ingest"), ("GET", "/api/deployments"), ("POST", "/api/deployments"),
    ("GET", "/api/deployments/{id}"), ("POST", "/api/deployments/{id}/rollback"), ("POST", "/api/bundles"),
    ("POST", "/api/devices/{device}/commands"), ("GET", "/api/commands/{id}"), ("GET", "/api/tokens"),
    ("GET", "/bundles/{name}"), ("GET", "/metrics"),
]
QUERY_KEYS = ["since", "until", "window", "limit", "changed_since", "device", "name", "version", "full", "x"]
VALID_BODIES = [
    {"bundles": ["0" * 64], "to": ["all"], "canary_pct": 10},
    {"kind": "describe", "args": {}},
    {"kind": "configure", "args": {"telemetry_interval_s": 5}},
]


@pytest.fixture(scope="module")
def ctl(mosquitto: Any, signing_key: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from cryptography.hazmat.primitives import serialization

    d = tmp_path_factory.mktemp("fuzzctl")
    (d / "fleet.pub").write_bytes(signing_key.public.to_pem())
    (d / "fleet.key").write_bytes(signing_key.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    c = ControllerProc(d / "ctl", mosquitto.url, fleet=FLEET, trust=d / "fleet.pub", key=d / "fleet.key",
                       extra=("--max-upload", "1MiB"))
    c.start()
    c.admin = c.token("admin", name="fuzz admin")
    yield c
    c.stop()


_segment = st.one_of(st.sampled_from(["dev-1", "d1", "x" * 65, "..", "\x00", "a/b", "ünï", "0" * 64, "-"]),
                     st.text(min_size=1, max_size=30)).map(lambda s: quote(s, safe=""))


@st.composite
def http_requests(draw: st.DrawFn) -> tuple[str, str, bytes | None, dict[str, str], bool]:
    method, path = draw(st.sampled_from(ROUTES))
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["PUT", "DELETE", "PATCH", "POST", "GET"]))
    for name in ("{device}", "{id}", "{name}"):
        if name in path:
            path = path.replace(name, draw(_segment))
    params = draw(st.dictionaries(st.sampled_from(QUERY_KEYS),
                                  st.one_of(st.text(max_size=12), st.integers().map(str),
                                            st.sampled_from(["nan", "inf", "-1", "1e400", "0", "1"])), max_size=3))
    if params:
        path += "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    body: bytes | None = None
    if method == "POST" or draw(st.integers(0, 9)) == 0:
        body = draw(st.one_of(
            st.sampled_from(VALID_BODIES).flatmap(lambda b: mutated(b)).map(lambda o: json.dumps(o).encode()),
            json_values.map(lambda o: json.dumps(o).encode()), st.binary(max_size=300),
            st.integers(1, 50_000).map(lambda n: b"[" * n + b"]" * n)))
    ctype = draw(st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain",
                                  "application/octet-stream", "multipart/form-data; boundary=x", ""]))
    headers = {"Content-Type": ctype} if ctype else {}
    return method, path, body, headers, draw(st.booleans())


def test_fuzz_every_controller_endpoint_answers_json_never_5xx(ctl: Any, long_run: bool, figures: Any) -> None:
    statuses: dict[int, int] = {}

    def check(req: tuple[str, str, bytes | None, dict[str, str], bool]) -> None:
        method, path, body, headers, with_token = req
        status, reply = request(ctl, method, path, body, token=ctl.admin if with_token else None,
                                headers=headers)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, f"{method} {path} -> {status}: {reply!r:.300}"
        if status >= 400:
            assert isinstance(reply, dict) and isinstance(reply.get("error"), str), \
                f"{method} {path} -> {status} without a JSON error: {reply!r:.300}"
        assert ctl.proc.poll() is None, "the controller died"

    run(long_run, figures, "controller_http", http_requests(), check)
    figures.add("fuzz", "controller_http_statuses", dict(sorted(statuses.items())))
    status, devices = request(ctl, "GET", "/api/devices")
    assert status == 200 and isinstance(devices, (list, dict))


def _good_record(device: str, seq: int) -> bytes:
    from edgefleet.sdk.protocol import ModelWindow, Telemetry
    from edgefleet.sdk.sketch import DDSketch

    sk = DDSketch()
    for i in range(5):
        sk.add(2.0 + i * 0.1)
    return Telemetry(device=device, boot="good", seq=seq, interval_s=1.0,
                     models=[ModelWindow(name="m", version="1.0.0", count=5, errors=0,
                                         providers=["CPUExecutionProvider"], sketch=sk.to_wire())]).to_json()


def test_fuzz_mqtt_payloads_interleaved_with_good_records_lose_none(ctl: Any, mosquitto: Any, long_run: bool,
                                                                     figures: Any) -> None:
    from edgefleet.sdk.protocol import topic
    from edgefleet.sdk.transport import MqttOptions, MqttTransport

    pub = MqttTransport(MqttOptions.parse(mosquitto.url), "fuzz-pub", clean_start=True, session_expiry_s=0,
                        max_inflight=500).start()
    pub.wait_ready(10)
    valid = _valid_messages()
    channels = {"status": "status", "telemetry": "telemetry", "event": "events", "reply": "reply"}
    strategy = st.sampled_from(sorted(channels)).flatmap(
        lambda kind: st.tuples(st.just(kind), st.sampled_from(["dev-1", "bad-2"]), payloads(valid[kind])))
    good: list[tuple[str, int]] = []
    infos: list[Any] = []

    def check(x: tuple[str, str, bytes | str]) -> None:
        kind, device, payload = x
        data = payload.encode() if isinstance(payload, str) else payload
        infos.append(pub.publish(topic(FLEET, device, channels[kind]), data))
        dev = f"good-{len(good) % 3}"
        good.append((dev, len(good)))
        infos.append(pub.publish(topic(FLEET, dev, "telemetry"), _good_record(dev, good[-1][1])))

    try:
        run(long_run, figures, "controller_mqtt_interleaved", strategy, check)
        for info in infos:
            info.wait_for_publish(30)
    finally:
        pub.stop()

    def stored() -> list[tuple[str, int, int]]:
        with sqlite3.connect(f"file:{Path(ctl.db)}?mode=ro", uri=True, timeout=10) as db:
            return db.execute("SELECT device, seq, COUNT(*) FROM telemetry WHERE fleet=? AND boot='good' "
                              "GROUP BY device, seq", (FLEET,)).fetchall()

    rows = wait_until(lambda: (r := stored()) and len(r) >= len(good) and r, timeout=120,
                      what=f"{len(good)} good telemetry records stored")
    assert sorted((d, s) for d, s, _ in rows) == sorted(good), "good records lost or foreign rows stored"
    assert all(n == 1 for _, _, n in rows), "a good record stored twice"
    assert ctl.proc.poll() is None, "the controller died"
    figures.add("fuzz", "controller_mqtt_good_records", {"sent": len(good), "stored": len(rows), "lost": 0})
