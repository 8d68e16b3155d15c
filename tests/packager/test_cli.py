"""`edgefleet package`: help, a real run with --json, and bad input as one `Error:` line with a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from edgefleet.sdk.cli import cli


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    from edgefleet.sdk.keys import generate_keypair

    generate_keypair(tmp_path / "fleet.key")
    return tmp_path / "fleet.key"


@pytest.fixture
def calib_npz(tmp_path: Path, photos: list) -> Path:
    p = tmp_path / "calib.npz"
    np.savez(p, image=np.stack([s["image"] for s in photos[:8]]))
    return p


def test_package_help_lists_the_options() -> None:
    result = CliRunner().invoke(cli, ["package", "--help"])
    assert result.exit_code == 0
    for opt in ("--target", "--precision", "--calibration", "--validation", "--accuracy-budget", "--key", "--json",
                "--model-type", "--out"):
        assert opt in result.output


@pytest.mark.parametrize("target", ["x86-cpu-vnni", "jetson-orin"])  # jetson: entropy calibration, which prints
def test_package_cli_json_report_and_bundle(target, convnet, calib_npz, key_file, trusted, tmp_path) -> None:
    from edgefleet.sdk.bundle import verify_bundle
    from edgefleet.sdk.keys import TrustedKeys

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["package", str(convnet), "-t", target, "--calibration", str(calib_npz),
                                      "--key", str(key_file), "-o", str(out), "--json", "--no-measure",
                                      "--precision", "int8"])
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.stdout)  # stdout is the JSON and nothing else
    assert entry["target"] == target and Path(entry["bundle"]).is_file()
    assert entry["report"]["chosen"]["name"] in {c["name"] for c in entry["report"]["candidates"]}
    vm = verify_bundle(entry["bundle"], TrustedKeys.from_paths([key_file.with_suffix(".pub")]))
    assert vm.manifest.precision == entry["report"]["chosen"]["precision"]


def test_package_cli_prints_the_choice_and_why(convnet, calib_npz, photos, key_file, tmp_path) -> None:
    val = tmp_path / "val.npz"
    np.savez(val, image=np.stack([s["image"] for s in photos[8:]]))
    result = CliRunner().invoke(cli, ["package", str(convnet), "-t", "nvidia-gpu", "--calibration", str(calib_npz),
                                      "--validation", str(val), "--key", str(key_file), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "nvidia-gpu: convnet-1.0.0-nvidia-gpu.efb  precision=fp16" in result.stdout
    assert "why: first within budget in the planned order" in result.stdout
    assert "UNMEASURED" in result.stderr and "TensorrtExecutionProvider is not in this ONNX Runtime" in result.stdout


@pytest.mark.parametrize("case, message", [
    ("not_onnx", "not an ONNX model"),
    ("truncated", "not an ONNX model"),
    ("unknown_target", "unknown target 'toaster'"),
    ("int8_no_calibration", "needs calibration data"),
    ("bad_budget", "unknown metric 'speed'"),
    ("opset_99", "opset 99 is not supported"),
    ("calibration_dtype", "dtype float64, model expects float32"),
    ("external_data_outside", "outside the model folder"),
])
def test_package_cli_bad_input_is_one_error_line(case, message, convnet, key_file, tmp_path) -> None:
    model, args = convnet, ["-t", "x86-cpu-vnni"]
    if case == "not_onnx":
        model = tmp_path / "x.onnx"
        model.write_text("hello")
    elif case == "truncated":
        model = tmp_path / "t.onnx"
        model.write_bytes(convnet.read_bytes()[:1000])
    elif case == "unknown_target":
        args = ["-t", "toaster"]
    elif case == "int8_no_calibration":
        args += ["--precision", "int8"]
    elif case == "bad_budget":
        args += ["--accuracy-budget", "speed=2"]
    elif case == "opset_99":
        m = onnx.load(str(convnet))
        m.opset_import[0].version = 99
        model = tmp_path / "future.onnx"
        onnx.save(m, str(model))
    elif case == "calibration_dtype":
        np.savez(tmp_path / "c64.npz", image=np.zeros((8, 1, 3, 64, 64), np.float64))
        args += ["--calibration", str(tmp_path / "c64.npz")]
    elif case == "external_data_outside":
        m = onnx.load(str(convnet))
        folder = tmp_path / "model"
        folder.mkdir()
        onnx.save(m, str(folder / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
        (folder / "w.bin").rename(tmp_path / "w.bin")
        m2 = onnx.load(str(folder / "m.onnx"), load_external_data=False)
        for t in m2.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = "../w.bin"
        onnx.save(m2, str(folder / "m.onnx"))
        model = folder / "m.onnx"
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["package", str(model), *args, "--key", str(key_file), "-o", str(out)])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert not out.exists() or list(out.iterdir()) == []


def test_package_cli_without_key_is_an_error(convnet, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("EDGEFLEET_SIGNING_KEY", raising=False)
    result = CliRunner().invoke(cli, ["package", str(convnet), "-t", "x86-cpu", "-o", str(tmp_path)])
    assert result.exit_code == 1
    assert "Error: no signing key: pass --key KEY" in result.stderr
