"""Agent test fixtures: HTTP bundle servers and agent subprocesses against the module's real Mosquitto."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from _agent_util import AgentProc, BundleServer, write_config


@pytest.fixture
def bundle_server(tmp_path: Path):
    servers: list[BundleServer] = []

    def make(**kw: Any) -> BundleServer:
        s = BundleServer(tmp_path, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def agent_factory(tmp_path: Path, mosquitto, signing_key):
    """Make agent subprocesses with their own config and data dir; all are killed at the end."""
    procs: list[AgentProc] = []
    pub = tmp_path / "keys"
    pub.mkdir(exist_ok=True)
    (pub / "fleet.pub").write_bytes(signing_key.public.to_pem())

    def make(device: str | None = None, env: dict[str, str] | None = None, start: bool = True, **kw: Any) -> AgentProc:
        device = device or f"dev-{uuid.uuid4().hex[:8]}"
        data_dir = tmp_path / f"data-{device}"
        cfg = write_config(tmp_path / f"{device}.toml", device=device, broker_url=mosquitto.url, data_dir=data_dir,
                           trusted=pub / "fleet.pub", **kw)
        a = AgentProc(cfg, data_dir, env)
        a.device = device  # type: ignore[attr-defined]
        procs.append(a)
        if start:
            a.start()
        return a

    yield make
    for a in procs:
        if a.proc is not None and a.proc.poll() is None:
            a.kill()


