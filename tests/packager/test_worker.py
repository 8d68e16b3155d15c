"""The target's runtime from another environment: packaging for intel-openvino-cpu from .venv runs every candidate,
the timing and the bundle's self-test in a worker process of .venv-openvino, over the worker protocol; with no such
runtime reachable the bundle is labelled unmeasured and takes the conservative precision."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from edgefleet.packager import PackageOptions, package
from edgefleet.packager.worker import REQUESTS, Hello, Load, discovered_pythons, parse_request
from edgefleet.sdk.bundle import META_CPU_FALLBACK, META_MEASURED_ON, META_MEASUREMENT, verify_bundle
from edgefleet.sdk.cli import cli
from edgefleet.sdk.timing import TimingPolicy

OV = "OpenVINOExecutionProvider"
QUICK = TimingPolicy(min_rounds=3, max_rounds=9, budget_s=5.0)


def _ov_python() -> Path:
    found = discovered_pythons("openvino")
    if not found:
        pytest.skip("no .venv-openvino next to the project (make setup-openvino)")
    return found[0]


def _local_has_ov() -> bool:
    import onnxruntime as ort

    return OV in ort.get_available_providers()


def test_protocol_requests_round_trip_and_refuse_unknown_ops_and_fields():
    req = Load("k", "/m.onnx", [{"name": "CPUExecutionProvider", "options": {}}], {}, [], [], "/c")
    assert parse_request(json.loads(json.dumps(req.to_dict()))) == req
    assert parse_request(Hello().to_dict()) == Hello()
    with pytest.raises(ValueError, match="unknown op"):
        parse_request({"op": "exec", "v": 1})
    with pytest.raises(ValueError, match="unknown field"):
        parse_request({"op": "hello", "v": 1, "cmd": "rm -rf /"})
    with pytest.raises(ValueError, match="not a protocol v1 request"):
        parse_request({"op": "hello", "v": 2})
    assert set(REQUESTS) == {"hello", "load", "run", "time", "selftest", "unload", "shutdown"}


def test_package_openvino_from_the_cpu_venv_measures_in_the_openvino_worker(convnet, photos, signing_key, trusted,
                                                                           tmp_path):
    if _local_has_ov():
        pytest.skip("this venv has the OpenVINO EP itself; the worker path is tested from .venv")
    py = _ov_python()
    [res] = package(convnet, ["intel-openvino-cpu"], key=signing_key, out_dir=tmp_path, calibration=photos[:8],
                    validation=photos[8:], options=PackageOptions(timing=QUICK))
    rep = res.report
    assert rep["measurement"] == "measured" and rep["measured_here"] is True
    assert rep["runtime"]["info"]["local"] is False and rep["runtime"]["info"]["python"].startswith(str(py.parent))
    assert rep["runtime"]["info"]["flavour"] == "openvino"
    for c in rep["candidates"]:
        assert "worker" in c["accuracy_on"] and c["speed"] is not None, c
    assert rep["selftest_here"]["ok"]  # the bundle's own self-test, run in the OpenVINO worker before writing it
    m = verify_bundle(res.path, trusted).manifest
    assert m.metadata[META_MEASUREMENT] == "measured" and "onnxruntime-openvino" in m.metadata[META_MEASURED_ON]
    if m.providers[0].name == OV:
        assert m.metadata[META_CPU_FALLBACK] == "0.0000"
    tol = next(iter(m.validation.tolerances.values()))  # type: ignore[union-attr]
    assert tol.kind and "onnxruntime-openvino" in tol.kind  # tolerances from the runtime that will check them


def test_package_openvino_same_precision_and_config_from_either_venv(convnet, photos, signing_key, trusted,
                                                                     tmp_path):
    """From .venv (worker) and from .venv-openvino (in process), the same inputs give the same bundle config.
    --no-measure keeps the choice free of timing noise; accuracy and tolerances still come from OpenVINO both times."""
    if _local_has_ov():
        pytest.skip("run from .venv: the comparison needs the worker on one side")
    py = _ov_python()
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "calib.npz", image=np.stack([s["image"] for s in photos[:8]]))
    np.savez(data / "val.npz", image=np.stack([s["image"] for s in photos[8:]]))
    key = tmp_path / "k.key"
    from edgefleet.sdk.keys import generate_keypair

    generate_keypair(key)
    args = [str(convnet), "-t", "intel-openvino-cpu", "--precision", "int8", "--no-measure", "--calibration",
            str(data / "calib.npz"), "--validation", str(data / "val.npz"), "--key", str(key), "--json"]
    here = CliRunner().invoke(cli, ["package", *args, "-o", str(tmp_path / "a")])
    assert here.exit_code == 0, here.output
    there = subprocess.run([str(py), "-m", "edgefleet.sdk.cli", "package", *args, "-o", str(tmp_path / "b")],
                           capture_output=True, text=True, timeout=600)
    assert there.returncode == 0, there.stderr[-2000:]
    [a], [b] = json.loads(here.stdout), json.loads(there.stdout)
    assert a["report"]["runtime"]["info"]["local"] is False and b["report"]["runtime"]["info"]["local"] is True
    for r in (a, b):
        assert r["report"]["measurement"] == "measured"
    from edgefleet.sdk.keys import TrustedKeys

    keys = TrustedKeys.from_paths([key.with_suffix(".pub")])
    ma, mb = verify_bundle(a["bundle"], keys).manifest, verify_bundle(b["bundle"], keys).manifest
    assert (ma.precision, ma.metadata["candidate"]) == (mb.precision, mb.metadata["candidate"]) == ("int8",
                                                                                                      "int8-static")
    assert ma.providers == mb.providers and ma.session == mb.session
    ta, tb = ma.validation.tolerances, mb.validation.tolerances  # type: ignore[union-attr]
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].min_cosine == tb[k].min_cosine
        assert ta[k].max_abs == pytest.approx(tb[k].max_abs, rel=0.5)


def test_package_openvino_without_a_reachable_runtime_is_unmeasured_and_conservative(convnet, photos, signing_key,
                                                                                    trusted, tmp_path, monkeypatch):
    if _local_has_ov():
        pytest.skip("this venv has the OpenVINO EP: nothing to be unmeasured about")
    monkeypatch.delenv("EDGEFLEET_RUNTIME_PYTHON", raising=False)
    [res] = package(convnet, ["intel-openvino-cpu"], key=signing_key, out_dir=tmp_path, calibration=photos[:8],
                    validation=photos[8:], options=PackageOptions(discover_runtimes=False, variants=False))
    m = verify_bundle(res.path, trusted).manifest
    assert m.metadata[META_MEASUREMENT] == "unmeasured" and res.report["measurement"] == "unmeasured"
    assert m.precision == "fp32"  # never an untimed INT8 nor an unverifiable bf16/f16 hint
    assert json.loads(dict(m.providers[0].options)["load_config"])["CPU"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert {c["name"] for c in res.report["candidates"]} == {"fp32"}
    assert res.report["selftest_here"] is None


def test_cli_says_in_one_line_when_a_target_is_unmeasured(convnet, photos, tmp_path, monkeypatch):
    if _local_has_ov():
        pytest.skip("this venv has the OpenVINO EP")
    from edgefleet.sdk.keys import generate_keypair

    generate_keypair(tmp_path / "k.key")
    np.savez(tmp_path / "v.npz", image=np.stack([s["image"] for s in photos[8:]]))
    monkeypatch.setenv("EDGEFLEET_RUNTIME_PYTHON", sys.executable)  # a runtime without OpenVINO: probed, refused
    result = CliRunner().invoke(cli, ["package", str(convnet), "-t", "apple-silicon", "--validation",
                                      str(tmp_path / "v.npz"), "--key", str(tmp_path / "k.key"), "-o",
                                      str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if "UNMEASURED" in ln]
    assert len(lines) == 1 and lines[0].startswith("apple-silicon: UNMEASURED: CoreMLExecutionProvider is not")
