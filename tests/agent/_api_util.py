"""The local API in this process, as the agent wires it: real store, installer (real signed bundles, real ORT
sessions), repository, and the HTTP server on a loopback port. Requests go over real sockets."""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgefleet.agent.api import ApiServer
from edgefleet.agent.config import ApiConfig
from edgefleet.agent.installer import Installer, bundle_file
from edgefleet.agent.registry import Registry
from edgefleet.agent.repository import Repository
from edgefleet.agent.store import Store
from edgefleet.sdk.bundle import extract_bundle
from edgefleet.sdk.runtime import Model
from edgefleet.sdk.testing import build_test_bundle


class ServedApi:
    """An ApiServer over an installed store; ``events`` collects what it reports (recycles, hangs)."""

    def __init__(self, root: Path, key: Any, trusted: Any, bundles: list[tuple[Path, dict[str, Any]]],
                 install: bool = True, **config: Any) -> None:
        self.store = Store(root / "data")
        self.registry = Registry()
        self.installer = Installer(self.store, self.registry, trusted, targets=("x86-cpu",))
        for i, (model, kw) in enumerate(bundles):
            bundle = build_test_bundle(model, root / f"bundle{i}.efb", key, **kw)
            if install:
                sha, size = bundle_file(bundle)
                self.installer.install(bundle.as_uri(), sha, size)
            else:  # served without the installer's warm-up and self-test (which need a numeric validation set)
                extract_bundle(bundle, trusted, root / f"extracted{i}")
                m = Model.open(root / f"extracted{i}", trusted)
                self.registry.put(m.name, m)
        self.registry.ready.set()
        self.repository = Repository(self.store, self.installer, self.registry)
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        cfg = replace(ApiConfig(listen="127.0.0.1:0"), **config)
        self.server = ApiServer("127.0.0.1", 0, self.registry, config=cfg, repository=self.repository,
                                on_event=lambda kind, msg, data: self.events.append((kind, msg, dict(data))),
                                device="test-device")
        self.server.start()
        self.port = self.server.port
        self.address = f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.address}{path}"

    def model(self, name: str = "testmodel") -> Any:
        return self.registry.get(name)

    def conn(self, timeout: float = 10) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def close(self) -> None:
        self.server.stop(2)
        self.store.close()


def request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a kept connection; (status, headers with lower-case names, body)."""
    conn.request(method, path, body, headers or {})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def infer_body(x: Any, name: str = "x", datatype: str = "FP32", binary_out: bool = False) -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype,
                                   "data": x.ravel().tolist()}],
                       "parameters": {"binary_data_output": binary_out}}).encode()


def read_response(sock: socket.socket, timeout: float = 10, one: bool = False) -> bytes:
    """Everything the server sends until it closes (or ``timeout``); with ``one``, until one whole response."""
    sock.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if one and b"\r\n\r\n" in out:
            head, _, rest = out.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(rest) >= length:
                return out
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        out += chunk
    return out
