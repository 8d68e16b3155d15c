"""Long-running commands stop cleanly on SIGHUP and SIGTERM as on Ctrl-C: ``fleet serve``, ``agent run``, and
``fleet simulate`` exit 0, free their ports and leave nothing behind.

(``edgefleet demo`` under SIGTERM, with every process it started: tests/demo/test_demo.py. The README's walkthrough
stops its controller and agents with a plain ``kill``: tests/test_readme.py.)
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_until

EDGEFLEET = Path(sys.executable).with_name("edgefleet")

pytestmark = [pytest.mark.mosquitto]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen([str(EDGEFLEET), *argv], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes], sig: int, log: Path) -> None:
    proc.send_signal(sig)
    try:
        rc = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        pytest.fail(f"{proc.args[1:3]} did not stop within 60 s of {signal.Signals(sig).name}:\n"
                    f"{log.read_text()[-2000:]}")
    assert rc == 0, f"exit {rc} after {signal.Signals(sig).name}:\n{log.read_text()[-2000:]}"


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=["SIGHUP", "SIGTERM"])
def test_fleet_serve_and_agent_stop_cleanly_on(sig: int, mosquitto, tmp_path: Path) -> None:
    from edgefleet.sdk.keys import generate_keypair

    key = tmp_path / "fleet.key"
    generate_keypair(key)
    pub = key.with_suffix(".pub")
    port = free_port()
    ctl_log, agent_log = tmp_path / "controller.log", tmp_path / "agent.log"
    ctl = _start(["fleet", "serve", "--mqtt-url", mosquitto.url, "--fleet", "sig", "--store",
                  str(tmp_path / "fleet.db"), "--http", f"127.0.0.1:{port}", "--bundles", str(tmp_path / "b"),
                  "--trust", str(pub), "--key", str(key)], ctl_log)
    agent = _start(["agent", "run", "--device", "d1", "--fleet", "sig", "--broker", mosquitto.url, "--data-dir",
                    str(tmp_path / "d1"), "--trust", str(pub), "--profile", "x86-cpu", "--api", "127.0.0.1:0"],
                   agent_log)
    try:
        wait_until(lambda: _listening(port) or ctl.poll() is not None, 60, what="the controller's port")
        assert ctl.poll() is None, ctl_log.read_text()[-2000:]
        runtime = tmp_path / "d1" / "state" / "runtime.json"
        wait_until(lambda: runtime.exists() or agent.poll() is not None, 60, what="the agent's runtime.json")
        assert agent.poll() is None, agent_log.read_text()[-2000:]
        api_port = int(json.loads(runtime.read_text())["api"].rpartition(":")[2])
        _stop(agent, sig, agent_log)
        assert not _listening(api_port)
        assert not runtime.exists()  # the agent removes it on a clean stop
        _stop(ctl, sig, ctl_log)
        assert not _listening(port)
        # a daemon's normal start is information, not a warning
        assert "INFO edgefleet.fleet.controller: controller" in ctl_log.read_text()
        assert "WARNING edgefleet.fleet.controller" not in ctl_log.read_text()
    finally:
        for p in (agent, ctl):
            if p.poll() is None:
                p.kill()
                p.wait(5)


def test_fleet_simulate_stops_cleanly_on_sigterm(mosquitto, tmp_path: Path) -> None:
    log = tmp_path / "sim.log"
    sim = _start(["fleet", "simulate", "--mqtt-url", mosquitto.url, "--fleet", "sig", "--devices", "3"], log)
    try:
        wait_until(lambda: "simulating 3 devices" in log.read_text() or sim.poll() is not None, 60,
                   what="the simulator's start line")
        _stop(sim, signal.SIGTERM, log)
        assert "published" in log.read_text()  # its cleanup ran: it reports what it sent after stopping
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait(5)


def test_fleet_serve_on_a_busy_port_says_so_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run([str(EDGEFLEET), "fleet", "serve", "--http", f"127.0.0.1:{port}", "--store",
                              str(tmp_path / "f.db"), "--bundles", str(tmp_path / "b"), "--mqtt-url",
                              "mqtt://127.0.0.1:1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"cannot serve HTTP on 127.0.0.1:{port}" in errors[0], res.stderr
    assert "Traceback" not in res.stderr and "Task was destroyed" not in res.stderr, res.stderr
