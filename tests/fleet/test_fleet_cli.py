"""``--help`` of every fleet command, ``fleet top`` against a real broker, the simulate command, CLI errors."""

from __future__ import annotations

import io
import json
import time

import pytest
from click.testing import CliRunner
from edgefleet.fleet.simulate import Simulator, make_devices
from edgefleet.fleet.top import FleetView, run_top
from edgefleet.sdk.cli import cli
from rich.console import Console

HELP = {
    ("fleet",): "serve",
    ("fleet", "serve"): "--share-group",
    ("fleet", "top"): "straight from MQTT",
    ("fleet", "simulate"): "--devices",
    ("deploy",): "--max-p95-regression",
    ("deployments",): "show",
    ("deployments", "list"): "--controller",
    ("deployments", "show"): "DEP_ID",
    ("rollback",): "--device",
}


@pytest.mark.parametrize("args", sorted(HELP), ids=lambda a: "-".join(a))
def test_help_of_every_fleet_command(args: tuple[str, ...]) -> None:
    res = CliRunner().invoke(cli, [*args, "--help"])
    assert res.exit_code == 0, res.output
    assert HELP[args] in res.output


def test_deploy_cli_reports_an_unreachable_controller_in_one_line(tmp_path) -> None:
    bundle = tmp_path / "b.efb"
    bundle.write_bytes(b"x")
    res = CliRunner().invoke(cli, ["deploy", str(bundle), "--to", "all", "--controller", "http://127.0.0.1:9"])
    assert res.exit_code == 1
    assert res.output.startswith("Error: cannot reach the controller at http://127.0.0.1:9")
    res = CliRunner().invoke(cli, ["deploy", str(bundle), "--to", "all", "--max-p95-regression", "lots"])
    assert res.exit_code == 2 and "must be a fraction like 0.2 or a percentage like 20%" in res.output


@pytest.mark.mosquitto
def test_fleet_top_shows_the_simulated_fleet_from_mqtt(mosquitto, fleet_id) -> None:
    sim = Simulator(mosquitto.url, fleet_id, make_devices(3, prefix="top", profiles=["nvidia-gpu"]), interval_s=0.1,
                    client_prefix=f"{fleet_id}-sim")
    sim.start()
    try:
        sim.run_telemetry(duration_s=3.0)
        out = io.StringIO()
        view = run_top(mosquitto.url, fleet_id, duration_s=1.5, console=Console(file=out, width=200))
    finally:
        sim.stop()
    text = out.getvalue()
    for dev in ("top-0000", "top-0001", "top-0002"):
        assert dev in text
    assert "nvidia-gpu" in text and "CUDA" in text and "detector" in text
    assert "3 devices, 3 online" in text
    assert view.rejected == 0 and view.messages >= 6
    (sk,) = view.versions.values()
    assert sk.count > 0 and 0.5 < sk.quantile(0.5) < 5.0  # a simulated NVIDIA GPU: ~1.2 ms median


def test_fleet_view_counts_bad_payloads_without_raising() -> None:
    view = FleetView("f")
    view.apply("edgefleet/v1/f/d1/telemetry", b"{broken")
    view.apply("not/a/topic", b"{}")
    view.apply("edgefleet/v1/f/d1/status", b'{"v":1,"device":"d1","state":"online","description":{"profile":"p"}}')
    assert view.rejected == 2 and view.rows["d1"].profile == "p"


@pytest.mark.mosquitto
def test_simulate_command_publishes_the_requested_records(mosquitto, fleet_id) -> None:
    seen = FleetView(fleet_id)
    from edgefleet.fleet.top import watch

    client = watch(mosquitto.url, fleet_id, seen)
    try:
        res = CliRunner().invoke(cli, ["fleet", "simulate", "--broker", mosquitto.url, "--fleet", fleet_id,
                                       "--devices", "4", "--interval", "0.2", "--duration", "1", "--profiles",
                                       "raspberry-pi-5"])
    finally:
        client.stop()
    assert res.exit_code == 0, res.output
    assert "published" in res.output
    assert len(seen.rows) == 4 and all(r.profile == "raspberry-pi-5" for r in seen.rows.values())
    assert all(r.state == "offline" for r in seen.rows.values())  # a clean stop publishes offline
    bad = CliRunner().invoke(cli, ["fleet", "simulate", "--profiles", "toaster"])
    assert bad.exit_code == 2 and "unknown profile 'toaster'" in bad.output


def test_fleet_modules_import_only_the_sdk_and_no_onnx() -> None:
    import subprocess
    import sys

    code = ("import sys\n"
            "import edgefleet.fleet.cli, edgefleet.fleet.controller, edgefleet.fleet.top, edgefleet.fleet.simulate\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime')\n"
            "       or (m.startswith('edgefleet.') and not m.startswith(('edgefleet.sdk', 'edgefleet.fleet')))]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.mosquitto
def test_fleet_top_not_on_a_terminal_prints_a_plain_full_width_table_and_json(mosquitto, fleet_id) -> None:
    """Piped: one plain table (no box drawing, no 80-column cut: a 49-character device id stays whole); --json the
    same data; a device silent past --offline-after is shown offline without figures."""
    long_id = "a-long-device-name-that-overflows-80-columns"
    devs = make_devices(2, prefix="plain") + make_devices(1, prefix=long_id)
    sim = Simulator(mosquitto.url, fleet_id, devs, interval_s=0.1, client_prefix=f"{fleet_id}-sim")
    sim.start()
    try:
        sim.publish_round()
        sim.flush()
        out = io.StringIO()
        run_top(mosquitto.url, fleet_id, duration_s=1.0, console=Console(file=out, width=80))
        text = out.getvalue()
        assert f"{long_id}-0000" in text and "│" not in text and "━" not in text
        assert max(len(line) for line in text.splitlines()) > 80
        header = next(line for line in text.splitlines() if line.startswith("device"))
        assert header.split() == ["device", "state", "profile", "serving", "model", "p50", "ms", "p95", "ms", "p99",
                                  "ms", "req/s", "errors", "seen"]
        # --json through the real command line; statuses are retained, telemetry is not: silence past
        # --offline-after (0.5 s here, no telemetry during top's 2 s) shows the devices offline, without figures.
        res = CliRunner().invoke(cli, ["fleet", "top", "--broker", mosquitto.url, "--fleet", fleet_id, "--json",
                                       "--duration", "2", "--offline-after", "0.5"])
        assert res.exit_code == 0, res.output
        snap = json.loads(res.output)
        assert snap["counts"] == {"devices": 3, "online": 0, "offline": 3, "unknown": 0}
        assert all(d["models"] == [] for d in snap["devices"])
        res = CliRunner().invoke(cli, ["fleet", "top", "--broker", mosquitto.url, "--fleet", fleet_id, "--json",
                                       "--duration", "1.5", "--offline-after", "30"])
        snap = json.loads(res.output)
        assert {d["device"]: d["state"] for d in snap["devices"]} == {d.device: "online" for d in devs}
    finally:
        sim.stop()


def test_fleet_view_marks_a_silent_device_offline_and_hides_its_figures() -> None:
    view = FleetView("f", offline_after_s=0.2)
    view.apply("edgefleet/v1/f/d1/status", b'{"v":1,"device":"d1","state":"online","boot":"b"}')
    view.apply("edgefleet/v1/f/d2/status", b'{"v":1,"device":"d2","state":"offline","boot":"b"}')
    snap = view.snapshot()
    assert [(d["device"], d["state"]) for d in snap["devices"]] == [("d1", "online"), ("d2", "offline")]
    time.sleep(0.3)
    assert [d["state"] for d in view.snapshot()["devices"]] == ["offline", "offline"]
    assert "0 online, 2 offline" in view.title(view.snapshot())


def test_fleet_errors_are_one_line_with_a_nonzero_exit_and_v_shows_the_traceback(tmp_path) -> None:
    """As a user runs them (real processes): a busy HTTP port and an unreachable broker end with one ``Error:``
    line (no per-retry warnings, no asyncio noise) and exit code 2 (a busy port is a usage error, as for the agent)
    or 1; -v adds the traceback."""
    import socket
    import subprocess

    from _fleet_util import EDGEFLEET

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    dead_broker = "mqtt://127.0.0.1:1"  # nothing listens on port 1: connection refused at once
    try:
        r = subprocess.run([str(EDGEFLEET), "fleet", "serve", "--broker", dead_broker, "--http", f"127.0.0.1:{port}",
                            "--store", str(tmp_path / "f.db"), "--bundles", str(tmp_path / "b")],
                           capture_output=True, text=True, timeout=120)
    finally:
        busy.close()
    errors = [ln for ln in r.stderr.splitlines() if not ln.startswith(("edgefleet controller ", "warning: "))]
    assert r.returncode == 2 and len(errors) == 1 and errors[0].startswith(f"Error: cannot serve HTTP on 127.0.0.1:"
                                                                            f"{port}: "), r.stderr
    r = subprocess.run([str(EDGEFLEET), "fleet", "top", "--broker", dead_broker, "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.splitlines() == [
        f"Error: could not connect to the MQTT broker at {dead_broker} within 10 s"], r.stderr
    r = subprocess.run([str(EDGEFLEET), "-v", "fleet", "top", "--broker", dead_broker], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr and "TransportError" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("Error: could not connect")


def run_in_pty(cmd: list[str], timeout_s: float = 120.0) -> tuple[int, str]:
    """Run a command with stdout and stderr on a real pseudo-terminal (140 columns); its exit code and what it
    printed, without colours and cursor movements."""
    import os
    import pty
    import re
    import subprocess
    import threading

    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave,
                            env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "140"})
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
        os.close(master)
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))


@pytest.mark.mosquitto
def test_simulate_on_a_terminal_shows_a_progress_bar_of_its_duration(mosquitto, fleet_id) -> None:
    from _fleet_util import EDGEFLEET

    code, out = run_in_pty([str(EDGEFLEET), "fleet", "simulate", "--broker", mosquitto.url, "--fleet", fleet_id,
                            "--devices", "3", "--interval", "0.2", "--duration", "2"])
    assert code == 0, out
    assert "3 devices" in out and "━" in out and "records" in out and "published" in out


@pytest.mark.mosquitto
def test_deploy_on_a_terminal_shows_upload_and_rollout_progress_bars(controller_factory, mosquitto, fleet_id,
                                                                      mlp_model, make_bundle) -> None:
    """``deploy --wait`` in a real pseudo-terminal: a byte progress bar for the upload and a bar of settled devices
    for the rollout (rich, on stderr); piped, the same command prints plain lines (the other deploy tests)."""
    from _fleet_util import EDGEFLEET

    ctl = controller_factory()
    sim = Simulator(mosquitto.url, fleet_id, make_devices(3, prefix="bar", profiles=["x86-cpu"], model="testmodel"),
                    interval_s=0.2, client_prefix=f"{fleet_id}-sim")
    sim.start()
    try:
        sim.run_telemetry(duration_s=60)
        bundle = make_bundle(mlp_model, version="1.1.0")
        code, out = run_in_pty([str(EDGEFLEET), "deploy", str(bundle), "--to", "all", "--controller", ctl.url,
                                "--wait"])
        assert code == 0, out
    finally:
        sim.stop()
    assert f"upload {bundle.name}" in out and "━" in out  # rich's bar
    assert "rollout" in out and "3/3 devices" in out and "completed" in out, out


def test_fleet_top_table_fits_the_terminal_width_dropping_the_least_needed_columns_first() -> None:
    view = FleetView("f")
    view.apply("edgefleet/v1/f/device-with-a-long-name/status",
               b'{"v":1,"device":"device-with-a-long-name","state":"online","boot":"b",'
               b'"description":{"profile":"intel-openvino-cpu"}}')

    def render(width: int) -> str:
        out = io.StringIO()
        Console(file=out, width=width).print(view.table(width=width))
        return out.getvalue()

    wide, narrow = render(200), render(80)

    def header(text: str) -> list[str]:
        return next(ln for ln in text.splitlines() if ln.strip().startswith("device")).split()

    assert header(wide) == ["device", "state", "profile", "serving", "model", "p50", "ms", "p95", "ms", "p99", "ms",
                            "req/s", "errors", "seen"] and "intel-openvino-cpu" in wide
    cols = header(narrow)
    assert cols[:3] == ["device", "state", "model"] and "p95" in cols and "seen" in cols
    assert not {"serving", "p50", "profile"} & set(cols)
    assert "device-with-a-long-name" in narrow and "online" in narrow  # never cut: the id and its state
    assert max(len(line) for line in narrow.splitlines()) <= 80
