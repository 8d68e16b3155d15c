"""Sampled input capture end to end, on real parts: a real agent (``edgefleet agent run``, ``[capture]`` in its
config) serving requests on its local API keeps a sample of them, uploads them to a real controller over HTTP with a
capture-only token, the controller checks and keeps them, ``fleet captures export`` writes them in the layout
``package --calibration`` reads, and the packager calibrates static INT8 on them."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from _fleet_util import Agent, wait_until
from click.testing import CliRunner
from edgefleet.fleet.auth import issue_token
from edgefleet.sdk.cli import cli
from edgefleet.sdk.keys import generate_keypair

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return str(tmp_path / "fleet.db")


def _load(api: str, stop: threading.Event, n: int) -> None:
    rng = np.random.default_rng(7)
    for _ in range(n):
        if stop.is_set():
            return
        x = rng.standard_normal(16).astype(np.float32)
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                       "data": [float(v) for v in x]}]}).encode()
        req = urllib.request.Request(f"http://{api}/v2/models/testmodel/infer", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=5).read()
        except OSError:
            time.sleep(0.05)


def test_captured_inputs_round_trip_into_package_calibration(controller_factory, mosquitto, fleet_id, trust_file,
                                                             mlp_model, make_bundle, tmp_path) -> None:
    ctl = controller_factory()
    token = issue_token(ctl.store, "device cap-0", "capture", fleet=fleet_id).token
    (tmp_path / "cap.token").write_text(token + "\n")
    (tmp_path / "agent.toml").write_text(
        "[capture]\nmodels = [\"testmodel\"]\nrate = 0.5\nmax_bytes = 200000\nupload_interval_s = 0.2\n"
        f"upload_url = \"{ctl.url}\"\ntoken_file = \"{tmp_path / 'cap.token'}\"\n")
    agent = Agent(tmp_path, "cap-0", mosquitto.url, fleet_id, trust_file,
                  extra=("--config", str(tmp_path / "agent.toml")))
    stop = threading.Event()
    try:
        wait_until(lambda: getattr(ctl.store.device(fleet_id, "cap-0"), "state", None) == "online", 60,
                   what="agent online")
        res = CliRunner().invoke(cli, ["deploy", str(make_bundle(mlp_model)), "--to", "all", "--controller", ctl.url,
                                       "--json", "--wait"])
        assert res.exit_code == 0, res.output
        _load(agent.api, stop, 200)

        def held() -> int:
            with urllib.request.urlopen(f"{ctl.url}/api/captures?model=testmodel") as r:
                rows = json.loads(r.read())["captures"]
            return sum(c["samples"] for c in rows if c["device"] == "cap-0" and c["version"] == "1.0.0")
        # rate 0.5 of 200 requests: between 60 and 140 with overwhelming probability; all of them arrive
        wait_until(lambda: held() >= 60 and not list((agent.data / "captures").glob("*/*/*.npz")), 60,
                   what="the samples uploaded and the device's ring emptied")
        n = held()
        assert 60 <= n <= 140, n
        out = tmp_path / "calib.npz"
        res = CliRunner().invoke(cli, ["fleet", "captures", "export", "testmodel", "-o", str(out), "--controller",
                                       ctl.url])
        assert res.exit_code == 0, res.output
        calib = np.load(out, allow_pickle=False)
        assert calib.files == ["x"] and calib["x"].shape == (n, 1, 16) and calib["x"].dtype == np.float32
        # the next model is calibrated on field data: static INT8 from the exported file
        from edgefleet.packager import package

        key = generate_keypair(tmp_path / "k.key")
        [built] = package(mlp_model, ["x86-cpu"], key=key, out_dir=tmp_path / "pkg", calibration=out,
                          precision="int8", budget=["cosine=0.9", "top1=0.5"], variants=False)
        assert built.manifest.precision == "int8"
        assert built.report["data"]["calibration_samples"] == n
    finally:
        stop.set()
        agent.stop()


def test_capture_uploads_are_checked_and_a_capture_token_can_do_nothing_else(controller_factory, fleet_id,
                                                                            tmp_path) -> None:
    ctl = controller_factory()
    token = issue_token(ctl.store, "device", "capture", fleet=fleet_id).token

    def post(path: str, data: bytes, tok: str = token) -> int:
        req = urllib.request.Request(f"{ctl.url}{path}", data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream",
                                              "Authorization": f"Bearer {tok}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    buf = io.BytesIO()
    np.savez(buf, **{"in/x": np.ones((1, 16), np.float32)})
    good = buf.getvalue()
    assert post("/api/captures/m/1.0.0?device=d1&id=s1", good) == 201
    assert post("/api/captures/m/1.0.0?device=d1&id=s1", good) == 200  # resent: kept once
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    pickled = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(pickled, "w") as zf:
        zf.writestr("in/x.npy", obj.getvalue())
    assert post("/api/captures/m/1.0.0?device=d1&id=s2", pickled.getvalue()) == 400  # no pickles
    assert post("/api/captures/m/1.0.0?device=d1&id=s3", b"not a zip") == 400
    assert post("/api/captures/m/1.0.0?device=../x&id=s4", good) == 400
    assert post("/api/bundles", b"x") == 403  # the capture scope uploads samples, nothing else
    rows = json.loads(urllib.request.urlopen(f"{ctl.url}/api/captures").read())["captures"]
    assert [(r["model"], r["device"], r["samples"]) for r in rows] == [("m", "d1", 1)]


def test_controller_capture_store_keeps_at_most_its_cap_oldest_out(tmp_path: Path) -> None:
    from edgefleet.fleet.captures import CaptureStore

    buf = io.BytesIO()
    np.savez(buf, **{"in/x": np.ones((1, 16), np.float32)})
    one = len(buf.getvalue())
    store = CaptureStore(tmp_path / "caps", max_bytes=5 * one)
    for i in range(12):
        assert store.add("f", "m", "1", "d", f"s{i:02d}", buf.getvalue())
        time.sleep(0.01)  # distinct mtimes: "oldest" is well defined
    left = sorted(p.stem for p in (tmp_path / "caps").rglob("*.npz"))
    assert left == [f"s{i:02d}" for i in range(7, 12)] and store.evicted == 7
    data, n = store.export("f", "m")
    assert n == 5 and np.load(io.BytesIO(data))["x"].shape == (5, 1, 16)
