"""REST API, /metrics and bundle downloads of a running controller, over real HTTP, with simulated devices."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from _fleet_util import wait_until
from edgefleet.fleet.simulate import Simulator, make_devices
from edgefleet.sdk.sketch import DDSketch

pytestmark = pytest.mark.mosquitto


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, Any]:
    """POST with the test controller's admin token (conftest sets $EDGEFLEET_TOKEN)."""
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": content_type, "Authorization": f"Bearer {os.environ['EDGEFLEET_TOKEN']}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def running(controller_factory, mosquitto, fleet_id):
    """A controller and 4 simulated devices that have each sent 5 telemetry records."""
    ctl = controller_factory()
    sim = Simulator(mosquitto.url, fleet_id, make_devices(4, prefix="h", profiles=["x86-cpu", "jetson-orin"]),
                    interval_s=0.05, client_prefix=f"{fleet_id}-sim")
    sim.start()
    sim.run_telemetry(rounds=5).join(10)
    sim.flush()
    wait_until(lambda: ctl.store.counts(fleet_id)["telemetry"] == 20, what="20 telemetry rows")
    yield ctl, sim
    sim.stop()


def test_api_devices_lists_every_device_with_latest_window(running) -> None:
    ctl, _ = running
    status, body, _ = get(f"{ctl.url}/api/devices")
    assert status == 200
    data = json.loads(body)
    devs = {d["device"]: d for d in data["devices"]}
    assert sorted(devs) == ["h-0000", "h-0001", "h-0002", "h-0003"]
    assert "description" not in devs["h-0000"]  # the list is compact; ?full=1 adds the status descriptions
    status, body, _ = get(f"{ctl.url}/api/devices?full=1")
    full = {d["device"]: d for d in json.loads(body)["devices"]}
    assert full["h-0001"]["description"]["models"][0]["version"] == "1.0.0"
    assert devs["h-0001"]["profile"] == "jetson-orin" and devs["h-0001"]["state"] == "online"
    m = devs["h-0001"]["models"][0]
    assert m["name"] == "detector" and m["version"] == "1.0.0"
    assert m["providers"] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert 0 < m["p50"] <= m["p95"] <= m["p99"]
    # A Jetson is simulated ~3.6x faster than an x86 CPU: the table must show that difference.
    assert devs["h-0000"]["models"][0]["p50"] > 2 * m["p50"]


def test_api_telemetry_returns_the_time_range_and_rejects_bad_parameters(running) -> None:
    ctl, _ = running
    status, body, _ = get(f"{ctl.url}/api/devices/h-0002/telemetry?since=0")
    assert status == 200
    windows = json.loads(body)["windows"]
    assert len(windows) == 5 and all(w["device"] == "h-0002" for w in windows)
    assert [w["ts"] for w in windows] == sorted(w["ts"] for w in windows)
    cut = windows[2]["ts"]
    status, body, _ = get(f"{ctl.url}/api/telemetry?device=h-0002&since={cut}")
    assert [w["ts"] for w in json.loads(body)["windows"]] == [w["ts"] for w in windows[2:]]
    status, body, _ = get(f"{ctl.url}/api/telemetry?since=yesterday")
    assert status == 400 and json.loads(body)["error"] == "query parameter since must be a number, got 'yesterday'"
    status, body, _ = get(f"{ctl.url}/api/telemetry?since=100&until=50")
    assert status == 400 and "before" in json.loads(body)["error"]
    status, body, _ = get(f"{ctl.url}/api/devices/nope")
    assert status == 404 and "nope" in json.loads(body)["error"]


def test_api_versions_percentiles_come_from_merged_sketches(running, fleet_id) -> None:
    ctl, _ = running
    status, body, _ = get(f"{ctl.url}/api/versions?window=3600")
    assert status == 200
    (v,) = json.loads(body)["versions"]
    windows = ctl.store.windows(fleet_id, with_sketch=True)
    merged = DDSketch.merged(DDSketch.from_wire(w.sketch) for w in windows if w.sketch is not None)
    assert v["count"] == merged.count == sum(w.count for w in windows)
    assert v["p95"] == pytest.approx(merged.quantile(0.95))
    # ... and not the mean of per-device p95s, which differs for a mixed x86/Jetson fleet.
    assert v["p95"] != pytest.approx(sum(w.p95 or 0.0 for w in windows) / len(windows), rel=0.01)


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\})? '
                     r'(NaN|[+-]?Inf|[-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)$')


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A strict reader of the text exposition format: every sample belongs to a family declared by # TYPE."""
    types: dict[str, str] = {}
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("gauge", "counter", "summary", "histogram", "untyped"), line
            assert name not in types, f"family {name} declared twice"
            types[name] = kind
            continue
        if line.startswith("#"):
            assert line.startswith("# HELP "), line
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a valid sample line: {line!r}"
        name = m.group(1)
        family = name if name in types else re.sub(r"_(count|sum|total)$", "", name)
        assert family in types or name in types, f"sample {name} has no # TYPE"
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        samples.setdefault(name, []).append((labels, float(m.group(3))))
    return samples


def test_metrics_is_prometheus_text_with_device_gauges_and_version_summaries(running) -> None:
    ctl, _ = running
    status, body, headers = get(f"{ctl.url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    m = parse_prometheus(body.decode())
    online = {lbl["device"]: v for lbl, v in m["edgefleet_device_up"]}
    assert online == {"h-0000": 1.0, "h-0001": 1.0, "h-0002": 1.0, "h-0003": 1.0}
    p95 = [v for lbl, v in m["edgefleet_device_latency_seconds"]
           if lbl["device"] == "h-0000" and lbl["quantile"] == "0.95"]
    assert len(p95) == 1 and p95[0] > 0
    quantiles = {lbl["quantile"]: v for lbl, v in m["edgefleet_model_latency_seconds"] if lbl["version"] == "1.0.0"}
    assert set(quantiles) == {"0.5", "0.9", "0.95", "0.99"}
    assert quantiles["0.5"] <= quantiles["0.95"] <= quantiles["0.99"]
    (count,) = [v for lbl, v in m["edgefleet_model_latency_seconds_count"] if lbl["version"] == "1.0.0"]
    assert count == sum(w.count for w in ctl.store.windows(ctl.config.fleet))
    assert [v for lbl, v in m["edgefleet_ingest_stored_total"] if lbl["channel"] == "telemetry"] == [20.0]
    assert all(not math.isnan(v) for _, v in m["edgefleet_device_throughput_requests_per_second"])
    assert {lbl["device"]: v for lbl, v in m["edgefleet_device_process_resident_memory_bytes"]}["h-0003"] == \
        180 * 2**20


def test_bundle_upload_verifies_and_download_supports_range(running, mlp_model, make_bundle) -> None:
    ctl, _ = running
    path = make_bundle(mlp_model, version="2.0.0")
    data = path.read_bytes()
    status, up = post(f"{ctl.url}/api/bundles", data, "application/octet-stream")
    assert status == 201, up
    assert up["sha256"] == hashlib.sha256(data).hexdigest() and up["size"] == len(data)
    assert (up["name"], up["version"], up["target"]) == ("testmodel", "2.0.0", "x86-cpu")
    status, whole, _ = get(f"{ctl.url}{up['url']}")
    assert status == 200 and whole == data
    status, part, headers = get(f"{ctl.url}{up['url']}", {"Range": "bytes=1000-1999"})
    assert status == 206 and part == data[1000:2000]
    assert headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    status, _, _ = get(f"{ctl.url}/bundles/{'0' * 64}.efb")
    assert status == 404


def test_bundle_upload_refuses_tampered_and_untrusted_bundles(running, mlp_model, make_bundle, tmp_path) -> None:
    ctl, _ = running
    from edgefleet.sdk.keys import generate_keypair
    from edgefleet.sdk.testing import build_test_bundle

    good = make_bundle(mlp_model).read_bytes()
    model = mlp_model.read_bytes()
    at = good.index(model[200:264]) + 10  # a byte inside the model file's data, not a tar header
    tampered = good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1:]
    status, body = post(f"{ctl.url}/api/bundles", tampered, "application/octet-stream")
    assert status == 422 and body["error"].startswith("uploaded bundle: member 'model/model.onnx' sha256"), body
    other = build_test_bundle(mlp_model, tmp_path / "other.efb", generate_keypair(tmp_path / "other.key"))
    status, body = post(f"{ctl.url}/api/bundles", other.read_bytes(), "application/octet-stream")
    assert status == 422, body
    assert body["error"].startswith("uploaded bundle: signed by untrusted key(s)"), body
    assert not list(ctl.library.root.glob("*.efb")), "nothing unverified is kept"


def test_sse_stream_sends_changed_devices(running, fleet_id) -> None:
    ctl, sim = running
    req = urllib.request.Request(f"{ctl.url}/api/stream")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        sim.publish_round()
        deadline = time.monotonic() + 10
        seen: set[str] = set()
        event = ""
        while time.monotonic() < deadline and len(seen) < 4:
            line = r.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "devices":
                seen |= {d["device"] for d in json.loads(line[6:])["devices"]}
    assert seen == {"h-0000", "h-0001", "h-0002", "h-0003"}


def test_large_device_lists_are_gzipped_for_clients_that_accept_it(running, fleet_id) -> None:
    import gzip

    from edgefleet.fleet.store import Batch
    from edgefleet.sdk.protocol import Status

    ctl, _ = running
    tags = [f"t{j:063d}" for j in range(4)]
    ctl.store.write(Batch(fleet_id, statuses=[Status(device=f"bulk-{i:04d}", state="online", boot="b",
                                                     description={"profile": "x86-cpu", "tags": tags})
                                              for i in range(400)]))
    status_code, body, headers = get(f"{ctl.url}/api/devices", {"Accept-Encoding": "gzip"})
    assert status_code == 200 and headers["Content-Encoding"] == "gzip"
    devices = json.loads(gzip.decompress(body))["devices"]
    assert len(devices) == 404
    status_code, plain, headers = get(f"{ctl.url}/api/devices")
    assert "Content-Encoding" not in headers and len(json.loads(plain)["devices"]) == 404
    assert len(body) * 5 < len(plain)
