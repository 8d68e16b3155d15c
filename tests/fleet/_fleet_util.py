"""Helpers shared by the fleet tests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, stop_process, wait_until

__all__ = ["EDGEFLEET", "Agent", "ControllerProc", "free_port", "infer_load", "wait_until"]

EDGEFLEET = Path(sys.executable).with_name("edgefleet")


class Agent:
    """One real agent process with its own data directory."""

    def __init__(self, tmp: Path, device: str, broker: str, fleet: str, trust: Path,
                 extra: tuple[str, ...] = ()) -> None:
        self.device = device
        self.data = tmp / device
        self.data.mkdir(exist_ok=True)  # a second Agent on the same dir is the device restarting
        self.log = open(tmp / f"{device}.log", "ab")
        self.proc = subprocess.Popen(
            [str(EDGEFLEET), "agent", "run", "--device", device, "--fleet", fleet, "--broker", broker,
             "--data-dir", str(self.data), "--trust", str(trust), "--profile", "x86-cpu",
             "--telemetry-interval", "0.3", "--api", "127.0.0.1:0", "--log-level", "warning", *extra],
            stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def api(self) -> str:
        runtime = self.data / "state" / "runtime.json"
        wait_until(lambda: runtime.exists() or self.proc.poll() is not None, 30, what=f"{self.device} runtime.json")
        if self.proc.poll() is not None:
            pytest.fail(f"agent {self.device} exited: {(self.log.name and Path(self.log.name).read_text()[-3000:])}")
        return json.loads(runtime.read_text())["api"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


def infer_load(apis: list[str], stop: threading.Event, deadline_s: float) -> None:
    """Inference requests to every agent's local API until stopped (bounded in time)."""
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16],
                                   "data": [0.1 * i for i in range(16)]}]}).encode()
    end = time.monotonic() + deadline_s
    while not stop.is_set() and time.monotonic() < end:
        for api in apis:
            req = urllib.request.Request(f"http://{api}/v2/models/testmodel/infer", data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(req, timeout=5).read()
            except OSError:
                time.sleep(0.05)  # the model is being swapped (deploy/rollback): try again


class ControllerProc:
    """``edgefleet fleet serve`` as its own process (SIGKILL-able), on a free HTTP port, with its log in ``tmp``."""

    def __init__(self, tmp: Path, name: str, *, broker: str, store: str, fleet: str, trust: Path,
                 key: Path | None = None, extra: tuple[str, ...] = (), bundles: Path | None = None) -> None:
        import os

        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = f"{fleet}-{name}"
        self.log_path = tmp / f"ctl-{name}.log"
        self.argv = [str(EDGEFLEET), "fleet", "serve", "--broker", broker, "--store", store, "--fleet", fleet,
                     "--http", f"127.0.0.1:{self.port}", "--bundles", str(bundles or tmp / f"bundles-{name}"),
                     "--trust", str(trust), "--client-id", self.client_id, *(("--key", str(key)) if key else ()),
                     *extra]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start (again: same client id, so it resumes its MQTT session)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def up(self) -> bool:
        """Subscribed to the broker and answering HTTP."""
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"controller {self.name} exited: {self.log_path.read_text()[-3000:]}")
        try:
            return bool(self.get("/api/ingest")["connected"])
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no flush, no lease release, no goodbye to the broker."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)
