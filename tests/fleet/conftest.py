"""Fleet test fixtures: controllers on free ports against the module's real Mosquitto, a raw MQTT publisher."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from edgefleet.fleet.controller import Controller, ControllerConfig
from edgefleet.sdk.transport import MqttOptions, MqttTransport

_fleet_ids = itertools.count()


@pytest.fixture
def fleet_id() -> str:
    """A fleet id unique within the test session, so tests sharing a broker never see each other's devices."""
    return f"t{next(_fleet_ids)}-{int(time.time() * 1000) % 10**8}"


ControllerFactory = Callable[..., Controller]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where this test's controllers keep their store: a SQLite file, then a fresh database on the session's real
    PostgreSQL server (every controller test runs on both backends; a module may override this fixture)."""
    if request.param == "sqlite":
        return str(tmp_path / "fleet.db")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def controller_factory(mosquitto, tmp_path: Path, fleet_id: str, trust_file: Path, key_file: Path,
                       store_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ControllerFactory]:
    """Start controllers (HTTP on a free port) for this test's fleet, sharing this test's store; all are stopped at
    the end. Each gets an admin API token in ``.token``, also set as $EDGEFLEET_TOKEN for the CLI (tests/hardening
    tests the auth)."""
    from edgefleet.fleet.auth import issue_token

    started: list[Controller] = []

    def factory(name: str = "ctl", **kw: Any) -> Controller:
        cfg = ControllerConfig(broker=mosquitto.url, db=str(kw.pop("db", store_url)), fleet=fleet_id,
                               http_port=0, bundles_dir=tmp_path / f"bundles-{name}", trust=[trust_file],
                               client_id=f"{fleet_id}-{name}", **{"signing_key": key_file, **kw})
        c = Controller(cfg)
        c.start()
        started.append(c)
        c.token = issue_token(c.store, f"test {name}", "admin").token  # type: ignore[attr-defined]
        monkeypatch.setenv("EDGEFLEET_TOKEN", c.token)  # type: ignore[attr-defined]
        return c

    yield factory
    for c in started:
        c.stop()


class Publisher:
    """A plain MQTT 5 client (the sdk transport, clean session) that publishes raw payloads at QoS 1 and waits until
    the broker has them."""

    def __init__(self, url: str, client_id: str) -> None:
        self.transport = MqttTransport(MqttOptions.parse(url), client_id, clean_start=True, session_expiry_s=0,
                                       max_inflight=500).start()
        self.transport.wait_ready(10)
        self._infos: list[Any] = []

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.transport.publish(topic, payload, retain=retain)
        assert info is not None, "paho refused the message"
        self._infos.append(info)

    def flush(self, timeout_s: float = 30.0) -> None:
        for info in self._infos:
            info.wait_for_publish(timeout_s)
        self._infos.clear()

    def close(self) -> None:
        self.flush()
        self.transport.stop()


@pytest.fixture
def publisher(mosquitto, fleet_id: str) -> Iterator[Publisher]:
    """A raw publisher connected to the test broker."""
    p = Publisher(mosquitto.url, f"{fleet_id}-pub")
    yield p
    p.close()


class StaticServer:
    """A plain static HTTP server (``python -m http.server``, real sockets): object storage or a CDN as the agent
    sees one. ``requests()`` lists the paths it served (its access log)."""

    def __init__(self, root: Path, log: Path) -> None:
        import socket
        import subprocess
        import sys

        from _fleet_util import free_port, wait_until

        self.root = root
        self.port = free_port()
        self._log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                                      "--directory", str(root)], stdout=self._log, stderr=subprocess.STDOUT)

        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                return False
        wait_until(up, 15, what="the static HTTP server")

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def requests(self) -> list[tuple[str, int]]:
        """``(path, status)`` of every GET served so far."""
        import re

        out = []
        for m in re.finditer(rb'"GET (\S+) HTTP/1\.[01]" (\d{3})', self._log_path.read_bytes()):
            out.append((m.group(1).decode(), int(m.group(2))))
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()


@pytest.fixture
def static_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StaticServer]:
    """A plain static HTTP server over an empty directory (``server.root``)."""
    root = tmp_path_factory.mktemp("static")
    server = StaticServer(root, root.parent / f"{root.name}.log")
    yield server
    server.stop()
