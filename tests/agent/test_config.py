"""Agent config: TOML + flag overrides, refused with the key and the reason; CLI help; the light-import rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from edgefleet.agent.config import load_config
from edgefleet.sdk.errors import ConfigError


@pytest.fixture
def pubkey(tmp_path: Path, signing_key) -> Path:
    p = tmp_path / "fleet.pub"
    p.write_bytes(signing_key.public.to_pem())
    return p


def _write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(body)
    return p


BASE = """
[agent]
device = "dev-1"
fleet = "lab"
data_dir = "data"
trusted_keys = ["fleet.pub"]
"""


def test_config_loads_defaults_and_resolves_paths_relative_to_file(tmp_path: Path, pubkey: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.device == "dev-1" and cfg.fleet == "lab"
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.trusted_keys == (pubkey,)
    assert cfg.telemetry_interval_s == 10.0
    assert (cfg.receipts, cfg.resend_after_s) == ("auto", 10.0)
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.tls) == ("127.0.0.1", 1883, False)
    assert cfg.api.address == ("127.0.0.1", 8000)


def test_config_flags_override_file_values(tmp_path: Path, pubkey: Path) -> None:
    cfg = load_config(_write(tmp_path, BASE + '[mqtt]\nurl = "mqtt://a:1"\n'),
                      {"mqtt.url": "mqtts://broker.example:8884", "telemetry.interval_s": 2.5, "agent.device": "dev-2"})
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.tls) == ("broker.example", 8884, True)
    assert cfg.telemetry_interval_s == 2.5
    assert cfg.device == "dev-2"


@pytest.mark.parametrize(("extra", "key", "reason"), [
    ('[mqtt]\nkeepalive_s = 0\n', "mqtt.keepalive_s", "must be in 1..65535"),
    ('[mqtt]\nurl = "http://x"\n', "mqtt.url", "scheme must be mqtt"),
    ('[mqtt]\nkeepalive = 5\n', "mqtt.keepalive", "unknown key"),
    ('[telemetry]\ninterval_s = "fast"\n', "telemetry.interval_s", "must be a number"),
    ('[telemetry]\nreceipts = "always"\n', "telemetry.receipts", "must be one of auto, on, off"),
    ('[telemetry]\nresend_after_s = 0\n', "telemetry.resend_after_s", "must be in"),
    ('[api]\nlisten = "localhost"\n', "api.listen", "must be host:port"),
    ('[nope]\nx = 1\n', "[nope]", "unknown section"),
])
def test_config_refuses_bad_value_naming_the_key(tmp_path: Path, pubkey: Path, extra: str, key: str,
                                                 reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, BASE + extra))
    assert key in str(err.value) and reason in str(err.value)
    assert str(tmp_path / "agent.toml") in str(err.value)


def test_config_tags_are_ids_used_by_fleet_selectors(tmp_path: Path, pubkey: Path) -> None:
    body = BASE.replace('fleet = "lab"', 'fleet = "lab"\ntags = ["line-3", "north"]')
    assert load_config(_write(tmp_path, body)).tags == ("line-3", "north")
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, BASE.replace('fleet = "lab"', 'fleet = "lab"\ntags = ["a/b"]')))
    assert "agent.tags" in str(err.value)


def test_config_refuses_missing_device_and_bad_id(tmp_path: Path, pubkey: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent\.device: is required"):
        load_config(_write(tmp_path, BASE.replace('device = "dev-1"\n', "")))
    with pytest.raises(ConfigError, match=r"agent\.fleet"):
        load_config(_write(tmp_path, BASE.replace('fleet = "lab"', 'fleet = "a/b"')))


def test_config_refuses_invalid_toml_and_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(tmp_path, "[agent\n"))
    with pytest.raises(ConfigError, match=r"agent\.trusted_keys: .*does not exist"):
        load_config(_write(tmp_path, BASE))


def test_cli_run_reports_config_error_in_one_line_with_exit_1(tmp_path: Path, pubkey: Path) -> None:
    from edgefleet.sdk.cli import cli

    cfg = _write(tmp_path, BASE + "[mqtt]\nkeepalive_s = -1\n")
    result = CliRunner().invoke(cli, ["agent", "run", "--config", str(cfg)])
    assert result.exit_code == 1
    assert "mqtt.keepalive_s" in result.output and result.output.startswith("Error:")


@pytest.mark.parametrize("args", [["agent", "--help"], ["agent", "run", "--help"],
                                  ["agent", "install-service", "--help"]])
def test_cli_help(args: list[str]) -> None:
    from edgefleet.sdk.cli import cli

    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0
    assert "Usage:" in result.output


def test_install_service_writes_hardened_unit(tmp_path: Path, pubkey: Path) -> None:
    from edgefleet.sdk.cli import cli

    cfg = _write(tmp_path, BASE)
    out = tmp_path / "edgefleet-agent.service"
    result = CliRunner().invoke(cli, ["agent", "install-service", "--config", str(cfg), "--output", str(out)])
    assert result.exit_code == 0, result.output
    unit = out.read_text()
    assert f"agent run --config {cfg}" in unit
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", f"ReadWritePaths={tmp_path / 'data'}",
                 "KillSignal=SIGTERM", "Restart=always", "PrivateDevices=yes"):
        assert line in unit


def test_agent_import_and_help_stay_light() -> None:
    code = ("import sys, edgefleet.agent, edgefleet.agent.cli, edgefleet.agent.daemon\n"
            "from click.testing import CliRunner\nfrom edgefleet.sdk.cli import cli\n"
            "assert CliRunner().invoke(cli, ['agent', '--help']).exit_code == 0\n"
            "heavy = [m for m in ('onnx', 'onnxruntime', 'torch', 'coremltools', 'onnxruntime.quantization') "
            "if m in sys.modules]\nprint(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_config_from_flags_only(tmp_path: Path, pubkey: Path) -> None:
    cfg = load_config(None, {"agent.device": "d", "agent.fleet": "f", "agent.data_dir": str(tmp_path / "x"),
                             "agent.trusted_keys": (str(pubkey),), "api.listen": ""})
    assert cfg.api.address is None and cfg.data_dir == tmp_path / "x"


def test_reconnect_backoff_grows_to_the_cap_with_jitter() -> None:
    import random

    from edgefleet.agent.mqtt import backoff_delay

    rng = random.Random(1)
    delays = [[backoff_delay(n, 0.5, 8.0, rng) for _ in range(200)] for n in range(8)]
    for n, ds in enumerate(delays):
        cap = min(8.0, 0.5 * 2**n)
        assert all(cap / 2 <= d <= cap for d in ds)
        assert max(ds) - min(ds) > cap / 4  # jittered, not lock-step
    assert max(delays[7]) <= 8.0
