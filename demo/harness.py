"""``edgefleet demo``: the whole story on one machine — package a real model, deploy it to local agents, watch it.

Every part is real: a Mosquitto broker, the controller with its dashboard, three agents as separate processes (CPU EP
with an FP32 bundle, CPU EP with an INT8 bundle, and the OpenVINO EP from the OpenVINO venv when it exists), the
packager run as a user would run it, and inference load through each agent's Open Inference Protocol endpoint using
features of real files. Every process the demo starts is stopped on Ctrl-C or at the end of ``--duration``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from edgefleet.sdk._signals import ignore_stop_signals, interrupt_on_stop_signals
from edgefleet.sdk.errors import ConfigError, EdgefleetError
from edgefleet.sdk.providers import provider_label

__all__ = ["demo", "run_demo"]

_FLEET = "demo"
_MODEL_NAME = "magika"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes] | None, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.3):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise EdgefleetError(
                    f"{what} exited with code {proc.returncode} before listening on port {port}") from None
            time.sleep(0.1)
    raise EdgefleetError(f"{what} did not listen on port {port} within {timeout:.0f} s")


class _Processes:
    """Child processes started by the demo, each in its own process group, with logs under ``logs/``."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        logdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.logdir / f"{name}.log", "ab") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop_all(self, timeout: float = 10.0) -> list[str]:
        """Stop children newest first (agents, then controller, then broker), so agents can still publish offline.

        Each gets SIGTERM and ``timeout`` seconds to exit cleanly, then SIGKILL; returns the names that needed it.
        """
        killed = []
        for name, p in reversed(self.procs):
            # the group, not only the process: whatever a child started goes too (its group was new and its own)
            if _kill_group(p, timeout):
                killed.append(name)
        return killed


def _start_broker(procs: _Processes, workdir: Path, say: Any) -> str:
    """Mosquitto when installed, else an embedded amqtt broker in a child process; returns the broker URL."""
    port = _free_port()
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe:
        conf = workdir / "mosquitto.conf"
        (workdir / "mosquitto").mkdir(exist_ok=True)
        # As root, Mosquitto would drop to its own user and could not write persistence into our work dir.
        user = "user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""
        conf.write_text(f"listener {port} 127.0.0.1\n{user}allow_anonymous true\npersistence true\n"
                        f"persistence_location {workdir / 'mosquitto'}/\nmax_queued_messages 100000\n")
        proc = procs.start("mosquitto", [exe, "-c", str(conf)])
        _wait_port(port, proc, "mosquitto")
        say(f"broker     Mosquitto ({exe}) on mqtt://127.0.0.1:{port}")
        return f"mqtt://127.0.0.1:{port}"
    try:
        import amqtt  # noqa: F401
    except ImportError:
        raise ConfigError("no MQTT broker: install Mosquitto (apt-get install mosquitto) or amqtt "
                          "(pip install amqtt) and run the demo again") from None
    code = (
        "import asyncio\nfrom amqtt.broker import Broker\n"
        f"cfg={{'listeners':{{'default':{{'type':'tcp','bind':'127.0.0.1:{port}'}}}},'auth':{{'allow-anonymous':True}}}}\n"
        "async def main():\n    b=Broker(cfg)\n    await b.start()\n    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    proc = procs.start("amqtt", [sys.executable, "-c", code])
    _wait_port(port, proc, "amqtt broker")
    say(f"broker     embedded amqtt (Mosquitto is not installed) on mqtt://127.0.0.1:{port}")
    return f"mqtt://127.0.0.1:{port}"


def _magika_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("magika")
    if spec is None or not spec.origin:
        raise ConfigError("the demo's model ships in the PyPI package 'magika': pip install --no-deps magika")
    found = sorted(Path(spec.origin).parent.glob("models/*/model.onnx"))
    if not found:
        raise ConfigError(f"no ONNX model found in the magika package at {Path(spec.origin).parent}")
    return found[-1]


def _data_sets(workdir: Path) -> tuple[Path, Path, list[Any]]:
    """Calibration and validation sets (.npz keyed by input name) and load inputs, from real files."""
    import numpy as np

    from ._magika_inputs import magika_features, sample_files

    feats = [magika_features(p.read_bytes()) for p in sample_files(limit=360)]
    if len(feats) < 60:
        raise ConfigError(f"found only {len(feats)} sample files for the demo's inputs")
    arr = np.stack(feats)
    calib, valid, load = arr[0::3][:96], arr[1::3][:64], arr[2::3]
    cpath, vpath = workdir / "calibration.npz", workdir / "validation.npz"
    # Samples on axis 0, each with the model's batch dim of 1.
    np.savez(cpath, bytes=calib[:, None, :])
    np.savez(vpath, bytes=valid[:, None, :])
    return cpath, vpath, [row.tolist() for row in load]


@dataclass
class _Agent:
    name: str
    target: str
    precision: str
    python_bin: Path
    api_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    sent: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)


def _edgefleet(bin_dir: Path) -> list[str]:
    exe = bin_dir / "edgefleet"
    return [str(exe)] if exe.exists() else [str(bin_dir / "python"), "-m", "edgefleet.sdk.cli"]


def _run(argv: Sequence[str], what: str, say: Any, env: dict[str, str] | None = None) -> str:
    """Run one command to its end in its own process group; an interrupt stops the whole group (e.g. the
    packager's worker processes), not only the command."""
    say(f"$ {' '.join(Path(a).name if i == 0 else a for i, a in enumerate(argv))}")
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        out, err = proc.communicate()
    except BaseException:
        with ignore_stop_signals():
            _kill_group(proc)
        raise
    if proc.returncode != 0:
        tail = (err or out).strip().splitlines()[-5:]
        raise EdgefleetError(f"{what} failed (exit {proc.returncode}): {' | '.join(tail)}")
    return out


def _kill_group(proc: subprocess.Popen[Any], timeout: float = 10.0) -> bool:
    """SIGTERM to the process group, SIGKILL after ``timeout`` s; True when SIGKILL was needed."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
        return False
    except ProcessLookupError:
        return False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
        return True


def _http_json(url: str, body: Any | None = None, timeout: float = 10.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def _drive_load(agent: _Agent, rows: list[Any], rate: float, stop: threading.Event) -> None:
    """Steady inference through the agent's KServe v2 endpoint, one request every 1/rate s (open loop, no bursts)."""
    url = f"http://127.0.0.1:{agent.api_port}/v2/models/{_MODEL_NAME}/infer"
    period = 1.0 / rate
    nxt = time.monotonic()
    i = 0
    while not stop.is_set():
        row = rows[i % len(rows)]
        i += 1
        body = {"inputs": [{"name": "bytes", "shape": [1, len(row)], "datatype": "INT32", "data": row}]}
        t0 = time.perf_counter()
        try:
            _http_json(url, body, timeout=5.0)
            agent.latencies.append((time.perf_counter() - t0) * 1000.0)
            del agent.latencies[:-2000]
        except (urllib.error.URLError, OSError, ValueError):
            agent.errors += 1
        agent.sent += 1
        nxt += period
        stop.wait(max(0.0, nxt - time.monotonic()))


def _fleet_rows(controller: str) -> list[dict[str, Any]]:
    try:
        data = _http_json(f"{controller}/api/devices", timeout=3.0)
    except (urllib.error.URLError, OSError, ValueError):
        return []
    rows: list[dict[str, Any]] = data.get("devices", data) if isinstance(data, dict) else data
    return rows


def _print_table(say: Any, controller: str, agents: Sequence[_Agent]) -> None:
    """One line per agent from the controller's view (what the agents reported over MQTT), plus the client's p50."""
    rows = {r.get("device"): r for r in _fleet_rows(controller) if isinstance(r, dict)}
    say(f"{'device':<14} {'state':<8} {'provider serving':<18} {'bundle':<24} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'req/s':>6} {'errors':>6} {'client p50':>10}")
    for a in agents:
        r = rows.get(a.name, {})
        m: dict[str, Any] = next((m for m in r.get("models") or [] if m.get("name") == _MODEL_NAME), {})
        prov = ",".join(provider_label(p) for p in (m.get("providers") or [])) or "-"
        bundle = f"{m.get('version', '-')} {r.get('profile', '')}".strip()
        lat = sorted(a.latencies[-200:])
        client = f"{lat[len(lat) // 2]:.2f}" if lat else "-"
        say(f"{a.name:<14} {r.get('state', '-'):<8} {prov:<18} {bundle[:24]:<24} {_fmt(m.get('p50')):>7} "
            f"{_fmt(m.get('p95')):>7} {m.get('throughput') or 0:>6.1f} {m.get('errors', 0):>6} {client:>10}")


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else "-"


def run_demo(workdir: Path, *, headless: bool, duration: float | None, http_port: int, rate: float,
             say: Any = click.echo) -> dict[str, Any]:
    """Run the demo until ``duration`` seconds of load have passed (or Ctrl-C); returns a summary."""
    root = Path(sys.prefix)
    venv_bin = Path(sys.executable).parent
    ov_bin = Path.cwd() / ".venv-openvino" / "bin"
    if not (ov_bin / "python").exists():
        ov_bin = root.parent / ".venv-openvino" / "bin"
    workdir = workdir.resolve()
    run_dir = workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    procs = _Processes(run_dir / "logs")
    stop = threading.Event()
    agents: list[_Agent] = [
        _Agent("cpu-fp32", "x86-cpu", "fp32", venv_bin),
        _Agent("cpu-int8", "x86-cpu-vnni", "int8", venv_bin),
    ]
    if (ov_bin / "python").exists():
        agents.append(_Agent("openvino-cpu", "intel-openvino-cpu", "auto", ov_bin))
    else:
        say("note       .venv-openvino not found: running without the OpenVINO agent (make demo sets it up)")
    stack = contextlib.ExitStack()
    stack.enter_context(interrupt_on_stop_signals())  # SIGTERM, SIGHUP: the same cleanup as Ctrl-C
    try:
        from edgefleet.sdk.keys import generate_keypair

        key = workdir / "fleet.key"
        if not key.exists():
            generate_keypair(key)
        broker = _start_broker(procs, run_dir, say)
        model = _magika_model()
        say(f"model      Magika content-type classifier ({model.stat().st_size / 1e6:.1f} MB, from the magika package)")
        calib, valid, load_rows = _data_sets(run_dir)
        bundles_dir = run_dir / "bundles"
        for a in agents:
            _run([*_edgefleet(a.python_bin), "package", str(model), "--target", a.target, "--precision", a.precision,
                  "--calibration", str(calib), "--validation", str(valid), "--name", _MODEL_NAME, "--version", "1.0.0",
                  "--key", str(key), "-o", str(bundles_dir / a.name)], f"packaging for {a.target}", say)
        controller = f"http://127.0.0.1:{http_port}"
        cp = procs.start("controller", [*_edgefleet(venv_bin), "fleet", "serve", "--broker", broker, "--fleet", _FLEET,
                                        "--db", str(run_dir / "fleet.db"), "--http", f"127.0.0.1:{http_port}",
                                        "--bundles", str(bundles_dir), "--trust", str(key.with_suffix(".pub")),
                                        "--key", str(key)])
        _wait_port(http_port, cp, "controller")
        say(f"dashboard  {controller}/")
        for a in agents:
            a.api_port = _free_port()
            cfg = run_dir / f"{a.name}.toml"
            cfg.write_text(
                f'[agent]\ndevice = "{a.name}"\nfleet = "{_FLEET}"\ndata_dir = "{run_dir / a.name}"\n'
                f'trusted_keys = ["{key.with_suffix(".pub")}"]\nprofile = "{a.target}"\n'
                f'[mqtt]\nurl = "{broker}"\nkeepalive_s = 10\n'
                f'[telemetry]\ninterval_s = 2.0\n[api]\nlisten = "127.0.0.1:{a.api_port}"\n'
            )
            a.proc = procs.start(a.name, [*_edgefleet(a.python_bin), "agent", "run", "--config", str(cfg)])
        for a in agents:
            _wait_port(a.api_port, a.proc, f"agent {a.name}")
        bundle_files = sorted(str(p) for p in bundles_dir.rglob("*.efb"))
        # State changes need an API token (stored hashed in the controller's store; reads from localhost do not).
        token_file = run_dir / "deploy.token"
        _run([*_edgefleet(venv_bin), "fleet", "token", "create", "--scope", "deploy", "--name", "demo",
              "--db", str(run_dir / "fleet.db"), "--out", str(token_file)], "API token", say)
        _run([*_edgefleet(venv_bin), "deploy", *bundle_files, "--to", ",".join(a.name for a in agents),
              "--controller", controller, "--token-file", str(token_file), "--wait"], "deploy", say)
        threads = [threading.Thread(target=_drive_load, args=(a, load_rows, rate, stop), daemon=True) for a in agents]
        for t in threads:
            t.start()
        say(f"load       {rate:g} requests/s per agent through the Open Inference Protocol; "
            + ("Ctrl-C to stop" if duration is None else f"for {duration:g} s"))
        if not headless:
            say(f"open       {controller}/ in a browser to watch live latency per device")
        t_end = None if duration is None else time.monotonic() + duration
        while t_end is None or time.monotonic() < t_end:
            stop.wait(5.0 if t_end is None else min(5.0, max(0.0, t_end - time.monotonic())))
            _print_table(say, controller, agents)
        return {"agents": {a.name: {"sent": a.sent, "errors": a.errors} for a in agents}, "controller": controller,
                "db": str(run_dir / "fleet.db")}
    except KeyboardInterrupt as exc:
        say(f"\nstopping   ({exc or 'interrupted'})")
        return {"agents": {a.name: {"sent": a.sent, "errors": a.errors} for a in agents}, "interrupted": True}
    finally:
        stack.close()
        with ignore_stop_signals():  # a second Ctrl-C or SIGTERM must not cut the cleanup short (it is bounded)
            stop.set()
            killed = procs.stop_all()
            say("stopped    every process the demo started"
                + (f" (had to kill {', '.join(killed)})" if killed else ""))


@click.command("demo")
@click.option("--headless", is_flag=True, help="Do not ask to open a browser; for CI and scripts.")
@click.option("--duration", type=click.FloatRange(min=1), default=None,
              help="Seconds of load, then stop (default: until Ctrl-C).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-data"),
              show_default=True, help="Where keys, bundles, logs and the fleet database go.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="Dashboard port.")
@click.option("--rate", type=click.FloatRange(min=0.1, max=500), default=20.0, show_default=True,
              help="Requests per second per agent.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end.")
def demo(headless: bool, duration: float | None, workdir: Path, http_port: int, rate: float, as_json: bool) -> None:
    """Package a real model, run three local agents and a controller, drive load and watch latency live."""
    summary = run_demo(workdir, headless=headless, duration=duration, http_port=http_port, rate=rate)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
