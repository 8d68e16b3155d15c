"""The ``edgefleet`` command: ``--help`` of every command in the tree, and real runs of the foundation commands.

The tree is walked from the root group. Components are built in parallel, so an entry whose module does not exist yet
is reported as skipped (with the module's name); a module that exists but fails to import fails its test.
"""

from __future__ import annotations

import importlib
import json
import os
import stat
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from edgefleet.sdk.cli import _COMMANDS, cli


def _missing_module(module: str) -> str | None:
    """The name of the not-yet-written module behind a command, or None when it imports (or fails for real)."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            return exc.name
        raise
    return None


def _walk(cmd: click.Command, path: tuple[str, ...]) -> list[tuple[str, ...]]:
    out = [path]
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd, info_name=path[-1] if path else "edgefleet")
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            assert sub is not None, f"{' '.join(path)} lists {name} but cannot load it"
            out.extend(_walk(sub, (*path, name)))
    return out


def _help_params() -> list:
    params = [pytest.param((), id="edgefleet")]
    root_ctx = click.Context(cli, info_name="edgefleet")
    for name in sorted(_COMMANDS):
        module = _COMMANDS[name][0]
        try:
            missing = _missing_module(module)
        except Exception:  # noqa: BLE001 - a broken module fails its --help test below, not the collection
            params.append(pytest.param((name,), id=name))
            continue
        if missing is not None:
            params.append(pytest.param((name,), id=name, marks=pytest.mark.skip(
                reason=f"'{name}' not built yet: {missing} is not importable")))
            continue
        sub = cli.get_command(root_ctx, name)
        assert sub is not None
        params.extend(pytest.param(p, id=" ".join(p)) for p in _walk(sub, (name,)))
    return params


HELP_PARAMS = _help_params()


def _out(result) -> str:  # click >= 8.2 keeps stderr apart; output is what a terminal shows
    return result.output


@pytest.mark.parametrize("path", HELP_PARAMS)
def test_cli_help_works_for_every_command(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="edgefleet")
    assert result.exit_code == 0, _out(result)
    assert f"Usage: edgefleet {' '.join(path)}".rstrip() in _out(result)
    assert result.exception is None


def test_cli_root_help_lists_every_component_without_importing_it() -> None:
    result = CliRunner().invoke(cli, ["--help"], prog_name="edgefleet")
    assert result.exit_code == 0
    for name in _COMMANDS:
        assert name in result.output


def test_cli_foundation_commands_are_all_in_the_walk() -> None:
    walked = {p.values[0] for p in HELP_PARAMS if not p.marks}
    for path in [("keys", "generate"), ("bundle", "inspect"), ("bundle", "verify"), ("devices", "list"),
                 ("devices", "show"), ("devices", "detect")]:
        assert path in walked


def test_cli_unknown_command_is_usage_error() -> None:
    result = CliRunner().invoke(cli, ["frobnicate"], prog_name="edgefleet")
    assert result.exit_code == 2
    assert "No such command 'frobnicate'" in result.output


# -- real runs ------------------------------------------------------------------------------------------------------

def _invoke(*args: str | Path):
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="edgefleet")


def _assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert fragment in lines[0]
    assert "Traceback" not in result.output


def test_cli_keys_generate_writes_private_0600_and_public_key(tmp_path: Path) -> None:
    result = _invoke("keys", "generate", tmp_path / "k" / "fleet.key")
    assert result.exit_code == 0, result.output
    priv, pub = tmp_path / "k" / "fleet.key", tmp_path / "k" / "fleet.pub"
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    from edgefleet.sdk.keys import load_public_key

    assert f"key id {load_public_key(pub).key_id}" in result.output


def test_cli_keys_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    assert _invoke("keys", "generate", tmp_path / "fleet.key").exit_code == 0
    before = (tmp_path / "fleet.key").read_bytes()
    _assert_one_line_error(_invoke("keys", "generate", tmp_path / "fleet.key"), "refusing to overwrite")
    assert (tmp_path / "fleet.key").read_bytes() == before


@pytest.fixture
def pub(signing_key, tmp_path: Path) -> Path:
    path = tmp_path / "trusted.pub"
    path.write_bytes(signing_key.public.to_pem())
    return path


def test_cli_bundle_inspect_shows_signed_manifest(mlp_model, make_bundle, pub: Path) -> None:
    path = make_bundle(mlp_model, name="mlp", version="2.0.1")
    result = _invoke("bundle", "inspect", path, "--trust", pub)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("mlp 2.0.1  target=x86-cpu  precision=fp32  signed by ")
    assert "input    x: float32 ['batch', 16]" in result.output
    assert "file     model/model.onnx" in result.output
    js = json.loads(_invoke("bundle", "inspect", path, "--trust", pub, "--json").output)
    assert js["manifest"]["name"] == "mlp" and len(js["digest"]) == 64


def test_cli_bundle_verify_with_run_self_tests_on_this_machine(mlp_model, make_bundle, pub: Path) -> None:
    result = _invoke("bundle", "verify", make_bundle(mlp_model), "--trust", pub, "--run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("OK testmodel 1.0.0 (x86-cpu): signature by ") and "3 files" in lines[0]
    assert lines[1] == "self-test OK on CPUExecutionProvider: 2 samples within tolerances"


def test_cli_bundle_verify_tampered_is_one_line_error(mlp_model, make_bundle, pub: Path) -> None:
    path = make_bundle(mlp_model)
    import tarfile

    with tarfile.open(path) as tf:
        member = tf.getmember("validation.npz")
    data = bytearray(path.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF  # inside validation.npz (the tar's padding would not count)
    path.write_bytes(bytes(data))
    _assert_one_line_error(_invoke("bundle", "verify", path, "--trust", pub), "validation.npz")


def test_cli_bundle_verify_untrusted_is_one_line_error(mlp_model, make_bundle, tmp_path: Path) -> None:
    from edgefleet.sdk.keys import generate_keypair

    generate_keypair(tmp_path / "other.key")
    _assert_one_line_error(_invoke("bundle", "verify", make_bundle(mlp_model), "--trust", tmp_path / "other.pub"),
                           "untrusted key")


def test_cli_bundle_verify_run_fails_when_self_test_fails(mlp_model, make_bundle, pub: Path, signing_key,
                                                          tmp_path: Path) -> None:
    from edgefleet.sdk.bundle import extract_bundle, verify_bundle, write_bundle
    from edgefleet.sdk.keys import TrustedKeys
    from edgefleet.sdk.validation import load_validation, save_validation

    trusted = TrustedKeys([signing_key.public])
    src = make_bundle(mlp_model)
    vm = verify_bundle(src, trusted)
    extract_bundle(src, trusted, tmp_path / "x")
    # wrong references (classes reversed), not zero ones: all-zero references are refused as a vacuous self-test
    samples = [(i, {k: np.ascontiguousarray(v[..., ::-1]) for k, v in o.items()})
               for i, o in load_validation(tmp_path / "x" / "validation.npz")]
    save_validation(tmp_path / "validation.npz", samples)
    files = {n: tmp_path / "x" / n for n in vm.manifest.files} | {"validation.npz": tmp_path / "validation.npz"}
    from dataclasses import replace

    bad = tmp_path / "bad.efb"
    write_bundle(bad, replace(vm.manifest, files={}), files, signing_key)
    result = _invoke("bundle", "verify", bad, "--trust", pub, "--run")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1].startswith("Error: self-test failed on CPUExecutionProvider: probs: ")


def test_cli_bundle_verify_without_trust_is_usage_error(mlp_model, make_bundle) -> None:
    result = _invoke("bundle", "verify", make_bundle(mlp_model))
    assert result.exit_code == 2 and "--trust" in result.output


def test_cli_devices_list_shows_every_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFLEET_PROFILES", raising=False)
    result = _invoke("devices", "list")
    assert result.exit_code == 0
    names = {line.split()[0] for line in result.output.splitlines()}
    assert {"x86-cpu", "x86-cpu-vnni", "intel-openvino-cpu", "jetson-orin", "apple-silicon", "raspberry-pi-5"} <= names
    assert "TensorRT > CUDA > CPU" in result.output
    js = json.loads(_invoke("devices", "list", "--json").output)
    assert {p["name"] for p in js} == names


def test_cli_devices_show_gives_choices_and_reasons() -> None:
    result = _invoke("devices", "show", "x86-cpu")
    assert result.exit_code == 0
    assert "reduce_range=True" in result.output and "VPMADDUBSW" in result.output
    js = json.loads(_invoke("devices", "show", "jetson-orin", "--json").output)
    assert js["providers"][0]["name"] == "TensorrtExecutionProvider" and js["arch"] == "aarch64"


def test_cli_devices_show_unknown_is_one_line_error() -> None:
    _assert_one_line_error(_invoke("devices", "show", "toaster"), "unknown target 'toaster'")


def test_cli_devices_show_reads_extra_profile_dir(tmp_path: Path) -> None:
    (tmp_path / "x86-cpu.toml").write_text("name = 'x86-cpu'\n")
    result = _invoke("devices", "show", "x86-cpu", "--profiles", tmp_path)
    _assert_one_line_error(result, str(tmp_path / "x86-cpu.toml"))


def test_cli_devices_detect_json_names_this_machines_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFLEET_PROFILES", raising=False)
    from edgefleet.devices import load_profiles
    from edgefleet.devices.detect import detect

    expected = detect(load_profiles())
    result = _invoke("devices", "detect", "--json")
    assert result.exit_code == 0, result.output
    js = json.loads(result.output)
    assert js["profile"] == (expected.profile.name if expected.profile else None)
    assert js["reasons"] and js["host"]["arch"]
    text = _invoke("devices", "detect").output
    assert text.startswith(f"{js['profile']}: ") and "  because " in text


def test_cli_component_not_installed_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(_COMMANDS, "ghost", ("edgefleet.ghost.cli", "ghost", "A component that is not there."))
    result = _invoke("ghost", "--help")
    assert result.exit_code == 1
    assert "Error: 'ghost' needs a component that is not installed (edgefleet.ghost)" in result.output



def test_cli_bundle_verify_run_cuda_bundle_errors_or_falls_back_when_allowed(mlp_model, make_bundle, pub: Path) -> None:
    from edgefleet.sdk.bundle import ProviderConfig
    from edgefleet.sdk.runtime import ort_info

    if "CUDAExecutionProvider" in ort_info().providers:
        pytest.skip("this machine has CUDA")
    path = make_bundle(mlp_model, target="nvidia-gpu",
                       providers=(ProviderConfig("CUDAExecutionProvider"), ProviderConfig("CPUExecutionProvider")))
    result = _invoke("bundle", "verify", path, "--trust", pub, "--run")
    assert result.exit_code == 1
    assert result.output.splitlines()[-1].startswith("Error: bundle testmodel 1.0.0 (nvidia-gpu) asks for "
                                                     "CUDAExecutionProvider")
    result = _invoke("bundle", "verify", path, "--trust", pub, "--run", "--allow-fallback")
    assert result.exit_code == 0, result.output
    assert "self-test OK on CPUExecutionProvider" in result.output
    assert "fallback: bundle testmodel 1.0.0 (nvidia-gpu) asks for CUDAExecutionProvider" in result.output
