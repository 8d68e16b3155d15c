"""A fleet on one machine for benches: Mosquitto, a controller process, real agent processes and steady load.

Every process is started in its own session and stopped (SIGTERM, then SIGKILL) by :meth:`Rig.close`; every wait
is bounded. Used by bench/rollout.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

EDGEFLEET = Path(sys.executable).with_name("edgefleet")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(pred: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise SystemExit(f"bench: timed out after {timeout_s:g} s waiting for {what}")


def make_mlp(path: Path, layers: int, width: int = 256, rows: int = 1, seed: int = 0) -> Path:
    """A [1, width] input broadcast to [rows, width], then ``layers`` width x width MatMul+Relu layers: run time grows
    with ``layers`` while a request stays small (the model, not JSON decoding, takes the time)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array([rows, width], np.int64), "shape")]
    nodes = [helper.make_node("Expand", ["x", "shape"], ["xr"])]
    prev = "xr"
    for i in range(layers):
        inits.append(numpy_helper.from_array(
            (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("ReduceSum", [prev], ["y"], keepdims=1))  # every axis: one number
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgefleet-bench")
    model.ir_version = 8
    onnx.save(model, path)
    return path


class Rig:
    """Broker, controller and ``n_agents`` real agents (x86-cpu) with open-loop load on each agent's API."""

    def __init__(self, tmp: Path, n_agents: int, *, rate: float = 20.0, interval_s: float = 1.0,
                 model_name: str = "mlp", width: int = 256, fleet: str = "bench") -> None:
        self.tmp = tmp
        self.fleet = fleet
        self.rate = rate
        self.model_name = model_name
        self.width = width
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stop = threading.Event()
        self.sent = 0
        self.errors = 0
        self.key = tmp / "fleet.key"
        subprocess.run([str(EDGEFLEET), "keys", "generate", str(self.key)], check=True, capture_output=True)
        self.pub = self.key.with_suffix(".pub")
        port = free_port()
        conf = tmp / "mosquitto.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        "max_queued_messages 100000\n")
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self._start("mosquitto", [exe, "-c", str(conf)])
        self.broker = f"mqtt://127.0.0.1:{port}"
        wait(lambda: _connects(port), 10, "mosquitto")
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.db = tmp / "fleet.db"
        self._start("controller", [str(EDGEFLEET), "fleet", "serve", "--broker", self.broker, "--fleet", fleet,
                                   "--store", str(self.db), "--http", f"127.0.0.1:{self.http_port}",
                                   "--bundles", str(tmp / "controller-bundles"), "--trust", str(self.pub),
                                   "--key", str(self.key)])
        wait(lambda: _connects(self.http_port), 60, "controller")
        token_file = tmp / "deploy.token"
        subprocess.run([str(EDGEFLEET), "fleet", "token", "create", "--scope", "deploy", "--name", "bench", "--store",
                        str(self.db), "--out", str(token_file)], check=True, capture_output=True)
        self.token = token_file.read_text().strip()
        self.agents: list[str] = []
        for i in range(n_agents):
            dev = f"a{i}"
            self._start(dev, [str(EDGEFLEET), "agent", "run", "--device", dev, "--fleet", fleet, "--broker",
                              self.broker, "--data-dir", str(tmp / dev), "--trust", str(self.pub), "--profile",
                              "x86-cpu", "--telemetry-interval", str(interval_s), "--api", "127.0.0.1:0",
                              "--log-level", "warning"])
            self.agents.append(dev)
        self.apis = {d: wait(lambda d=d: _api(tmp / d), 60, f"agent {d}") for d in self.agents}
        wait(lambda: len(self.devices()) == n_agents, 60, "agents online")

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.tmp / f"{name}.log", "ab")  # the child keeps its own copy
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True))
        log.close()

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def devices(self) -> list[dict[str, Any]]:
        try:
            return [d for d in self.api("GET", "/api/devices")["devices"] if d["state"] == "online"]
        except (OSError, ValueError):
            return []

    def edgefleet(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(EDGEFLEET), *args], capture_output=True, text=True,
                              env={**os.environ, "EDGEFLEET_CONTROLLER": self.url})

    def start_load(self) -> None:
        for d in self.agents:
            threading.Thread(target=self._load, args=(self.apis[d],), daemon=True).start()

    def _load(self, api: str) -> None:
        rng = np.random.default_rng(abs(hash(api)) % 2**32)
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, self.width],
                                       "data": rng.standard_normal(self.width).round(3).tolist()}]}).encode()
        url = f"http://{api}/v2/models/{self.model_name}/infer"
        period = 1.0 / self.rate
        nxt = time.monotonic()
        while not self._stop.is_set():
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=5).read()
                self.sent += 1
            except (OSError, ValueError):
                self.errors += 1
            nxt = max(nxt + period, time.monotonic() - 1.0)  # open loop; never a burst to catch up
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def windows(self, since: float = 0.0) -> list[tuple[str, float, float, str, int, float | None]]:
        """(device, ts, interval_s, version, count, p95) of every stored telemetry window since ``since``."""
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return [tuple(r) for r in con.execute(  # type: ignore[misc]
                "SELECT device, ts, interval_s, version, count, p95 FROM windows WHERE fleet=? AND ts>=? "
                "ORDER BY ts", (self.fleet, since))]
        finally:
            con.close()

    def close(self) -> None:
        self._stop.set()
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for p in reversed(self.procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False


def _api(data_dir: Path) -> str | None:
    try:
        return str(json.loads((data_dir / "state" / "runtime.json").read_text())["api"])
    except (OSError, ValueError, KeyError):
        return None


def http_error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read()).get("error", ""))
    except ValueError:
        return str(exc)
