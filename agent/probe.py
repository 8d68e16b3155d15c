"""Describe this machine (CPU, RAM, markers, ONNX Runtime and its providers) and detect its profile in a child process.

Importing ONNX Runtime costs ~30 MB of RSS for the life of a process. An agent with no model installed has no other
use for it, so the facts the birth message needs are gathered by a short-lived ``python -m edgefleet.agent.probe``
and the agent itself imports ONNX Runtime only when it opens a model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgefleet.sdk.errors import ConfigError

__all__ = ["probe_host"]


def _probe(profiles_dirs: Sequence[str]) -> dict[str, Any]:
    from edgefleet.devices.detect import detect, read_host
    from edgefleet.devices.profile import load_profiles

    host = read_host()
    found = detect(load_profiles(profiles_dirs), host)
    return {"host": host.to_dict(), "profile": found.profile.name if found.profile else None,
            "reasons": found.reasons, "rejected": dict(found.rejected)}


def probe_host(profiles_dirs: Sequence[Path] = (), timeout_s: float = 120.0) -> dict[str, Any]:
    """Host facts and the detected profile, from a child process (see the module docstring)."""
    cmd = [sys.executable, "-m", "edgefleet.agent.probe", *map(str, profiles_dirs)]
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=timeout_s, check=True)
        facts: dict[str, Any] = json.loads(out.stdout)
        return facts
    except subprocess.CalledProcessError as exc:
        tail = exc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"cannot describe this machine (is ONNX Runtime installed?): {tail[0]}") from exc
    except (subprocess.TimeoutExpired, OSError, ValueError) as exc:
        raise ConfigError(f"cannot describe this machine: {exc}") from exc


if __name__ == "__main__":  # pragma: no cover - run by probe_host in a child process
    try:
        print(json.dumps(_probe(sys.argv[1:])))
    except Exception as exc:  # noqa: BLE001 - reported to the parent on stderr
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
