"""One transport, one set of options: the agent, the controller and ``fleet top`` connect to a TLS-only Mosquitto
that requires client certificates, each given the same ``--mqtt-url --ca-file --cert-file --key-file`` (or the same
``[mqtt]`` config section)."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest
from _fleet_util import EDGEFLEET, Agent, wait_until
from click.testing import CliRunner
from edgefleet.sdk.cli import cli

from tests.helpers import free_port

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


def _flags(broker) -> tuple[str, ...]:
    t = broker.tls
    return ("--mqtt-url", broker.url, "--ca-file", str(t["ca"]), "--cert-file", str(t["client_cert"]),
            "--key-file", str(t["client_key"]))


def test_agent_controller_and_top_connect_to_a_tls_only_broker_with_client_certificates(
        tls_mosquitto, fleet_id, trust_file, key_file, tmp_path: Path) -> None:
    port = free_port()
    log = open(tmp_path / "controller.log", "ab")
    ctl = subprocess.Popen([str(EDGEFLEET), "fleet", "serve", *_flags(tls_mosquitto), "--fleet", fleet_id,
                            "--db", str(tmp_path / "fleet.db"), "--http", f"127.0.0.1:{port}",
                            "--bundles", str(tmp_path / "bundles"), "--trust", str(trust_file), "--key",
                            str(key_file), "--client-id", f"{fleet_id}-ctl"], stdout=log, stderr=subprocess.STDOUT)
    agent = Agent(tmp_path, "tls-0", tls_mosquitto.url, fleet_id, trust_file, extra=_flags(tls_mosquitto)[2:])
    try:
        def online() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/devices/tls-0", timeout=2) as r:
                    return json.loads(r.read())["state"] == "online"
            except OSError:
                assert ctl.poll() is None, (tmp_path / "controller.log").read_text()[-3000:]
                return False
        wait_until(online, 60, what="the agent online at the controller, both over mTLS")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/ingest", timeout=5) as r:
            assert json.loads(r.read())["connected"] is True

        # fleet top, with the same flags ...
        wide = {"COLUMNS": "200"}  # rich sizes the table to the terminal
        res = CliRunner().invoke(cli, ["fleet", "top", *_flags(tls_mosquitto), "--fleet", fleet_id, "--duration",
                                       "2"], catch_exceptions=False, env=wide)
        assert res.exit_code == 0, res.output
        assert "tls-0" in res.output and "1 devices, 1 online" in res.output
        # ... or the same [mqtt] section the agent's config file has.
        t = tls_mosquitto.tls
        section = tmp_path / "mqtt.toml"
        section.write_text(f'[mqtt]\nurl = "{tls_mosquitto.url}"\nca_file = "{t["ca"]}"\n'
                           f'cert_file = "{t["client_cert"]}"\nkey_file = "{t["client_key"]}"\n')
        res = CliRunner().invoke(cli, ["fleet", "top", "--mqtt-config", str(section), "--fleet", fleet_id,
                                       "--duration", "1"], catch_exceptions=False, env=wide)
        assert res.exit_code == 0 and "tls-0" in res.output, res.output

        # Without a client certificate the broker refuses: one clear line, exit code 1.
        res = CliRunner().invoke(cli, ["fleet", "top", "--mqtt-url", tls_mosquitto.url, "--ca-file", str(t["ca"]),
                                       "--fleet", fleet_id, "--duration", "1"])
        assert res.exit_code == 1 and res.output.startswith("Error: could not connect to the MQTT broker at "
                                                            f"mqtts://localhost:{tls_mosquitto.port}"), res.output
        # A plain mqtt:// client finds no listener that speaks it.
        res = CliRunner().invoke(cli, ["fleet", "top", "--mqtt-url", f"mqtt://127.0.0.1:{tls_mosquitto.port}",
                                       "--fleet", fleet_id, "--duration", "1"])
        assert res.exit_code == 1 and "could not connect" in res.output, res.output
    finally:
        agent.stop()
        ctl.terminate()
        ctl.wait(30)
        log.close()


def test_connection_options_are_refused_with_one_line_naming_the_key(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["fleet", "top", "--mqtt-url", "mqtt://127.0.0.1:1", "--ca-file",
                                   str(tmp_path / "none.pem")])
    assert res.exit_code == 1 and res.output.startswith("Error: <flags>: mqtt.ca_file: file ") and \
        res.output.endswith("does not exist\n"), res.output
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    res = CliRunner().invoke(cli, ["fleet", "top", "--mqtt-url", "mqtt://127.0.0.1:1", "--ca-file", str(ca)])
    assert "mqtt.url: ca_file/cert_file/key_file are set but the URL is not mqtts://" in res.output
    res = CliRunner().invoke(cli, ["fleet", "serve", "--mqtt-url", "http://x"])
    assert res.exit_code == 1 and "mqtt.url: scheme must be mqtt:// or mqtts://" in res.output
    pw = tmp_path / "pw"
    pw.write_text("s3cret\nignored\n")
    from edgefleet.sdk.transport import MqttOptions

    opts = MqttOptions.parse("mqtts://u@broker.example", password_file=str(pw))
    assert (opts.host, opts.port, opts.tls, opts.username, opts.password) == ("broker.example", 8883, True, "u",
                                                                             "s3cret")
    assert "s3cret" not in repr(opts)
