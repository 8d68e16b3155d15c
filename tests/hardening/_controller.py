"""A real controller for the hardening tests: ``edgefleet fleet serve`` as a subprocess, and a raw HTTP client.

The controller runs as its own process so what is measured is what an operator runs: its startup checks and exit
codes, its resident memory under size attacks (sampled with psutil), its HTTP server on real sockets.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from tests.helpers import free_port, stop_process

__all__ = ["ControllerProc", "RssSampler", "edgefleet", "free_port", "request"]


def edgefleet(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``edgefleet`` CLI of this venv."""
    return subprocess.run([str(Path(sys.executable).parent / "edgefleet"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


class ControllerProc:
    """``edgefleet fleet serve`` with its own db, bundles dir and port; ``start()`` waits until HTTP answers."""

    def __init__(self, workdir: Path, broker_url: str, *, fleet: str = "sec", trust: Path | None = None,
                 key: Path | None = None, host: str = "127.0.0.1", extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.fleet = fleet
        self.host = host
        self.port = free_port()
        self.db = workdir / "fleet.db"
        self.scheme = "https" if "--tls-cert" in extra else "http"
        self.argv = [str(Path(sys.executable).parent / "edgefleet"), "fleet", "serve", "--broker", broker_url,
                     "--fleet", fleet, "--db", str(self.db), "--http", f"{host}:{self.port}",
                     "--bundles", str(workdir / "bundles"), "--client-id", f"ctl-{fleet}-{self.port}", *extra]
        if trust is not None:
            self.argv += ["--trust", str(trust)]
        if key is not None:
            self.argv += ["--key", str(key)]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "controller.log"

    @property
    def url(self) -> str:
        h = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"{self.scheme}://{h}:{self.port}"

    def start(self, timeout: float = 30) -> ControllerProc:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            # The port is bound before MQTT connects; serve_forever logs this line once both are up.
            if f":{self.port}\n" in self.log.read_text(errors="replace") and ", http " in self.log.read_text():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"controller not ready within {timeout} s: {self.log.read_text()[-2000:]}")

    def token(self, scope: str, *, name: str = "test", fleet: str | None = None, expires: str = "never") -> str:
        r = edgefleet("fleet", "token", "create", "--scope", scope, "--name", name, "--db", str(self.db),
                      "--fleet", fleet or self.fleet, "--expires", expires)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def rss(self) -> int:
        assert self.proc is not None
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def stop(self) -> None:
        stop_process(self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def request(ctl: ControllerProc | str, method: str, path: str, body: bytes | None = None, *,
            token: str | None = None, headers: dict[str, str] | None = None, timeout: float = 30,
            ssl_context: ssl.SSLContext | None = None, host: str | None = None) -> tuple[int, Any]:
    """One HTTP request; returns (status, parsed JSON body or the raw bytes)."""
    base = ctl.url if isinstance(ctl, ControllerProc) else ctl
    scheme, _, rest = base.partition("://")
    hostport = rest.split("/", 1)[0]
    h, _, p = hostport.rpartition(":")
    conn: http.client.HTTPConnection
    if scheme == "https":
        conn = http.client.HTTPSConnection(host or h, int(p), timeout=timeout, context=ssl_context)
    else:
        conn = http.client.HTTPConnection(host or h, int(p), timeout=timeout)
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    if body is not None and "Content-Type" not in hdrs:
        hdrs["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw


class RssSampler:
    """Samples a process's resident memory every ``period_s`` in a thread; ``peak`` in bytes."""

    def __init__(self, pid: int, period_s: float = 0.05) -> None:
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self.start_rss = self.peak
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> int:
        self._stop.set()
        self._t.join(2)
        return self.peak
