"""Real agent subprocesses for the hardening tests: tests/agent/_agent_util.py's helpers, loaded by path."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

_AGENT_TESTS = str(Path(__file__).resolve().parents[1] / "agent")
if _AGENT_TESTS not in sys.path:
    sys.path.insert(0, _AGENT_TESTS)

from _agent_util import (  # noqa: E402
    FLEET,
    AgentProc,
    BundleServer,
    Watcher,
    http_json,
    sha_size,
    wait_until,
    write_config,
)

__all__ = ["FLEET", "AgentProc", "BundleServer", "Watcher", "http_json", "make_agent", "serving_version", "sha_size",
           "wait_until"]


def make_agent(tmp: Path, broker_url: str, trusted_pub: Path, *, device: str | None = None, require_signed: bool = True,
               extra: str = "", spool_max_records: int | None = None, telemetry: str = "", **kw: Any) -> AgentProc:
    """An agent subprocess (not started) with its own config and data dir under ``tmp``; ``telemetry``: more lines
    for its [telemetry] section."""
    device = device or f"dev-{uuid.uuid4().hex[:8]}"
    data_dir = tmp / f"data-{device}"
    cfg = write_config(tmp / f"{device}.toml", device=device, broker_url=broker_url, data_dir=data_dir,
                       trusted=trusted_pub, require_signed=require_signed, extra=extra, **kw)
    if spool_max_records is not None:
        telemetry += f"\nspool_max_records = {spool_max_records}"
    if telemetry:
        cfg.write_text(cfg.read_text().replace("[telemetry]\n", f"[telemetry]\n{telemetry.strip()}\n"))
    a = AgentProc(cfg, data_dir)
    a.device = device  # type: ignore[attr-defined]
    return a


def serving_version(agent: AgentProc, model: str = "testmodel") -> str | None:
    """The version the agent's local API serves for ``model`` (None: not serving)."""
    status, meta = http_json("GET", f"http://{agent.api}/v2/models/{model}")
    return meta["versions"][0] if status == 200 else None
