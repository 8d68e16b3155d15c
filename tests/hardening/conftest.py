"""Hardening fixtures: the --long switch, a figures recorder (JSON for docs/reliability.md), tree snapshots."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def long_run(request: pytest.FixtureRequest) -> bool:
    """True under ``pytest --long`` (full counts)."""
    return bool(request.config.getoption("--long"))


class Figures:
    """Measured figures of a run, written as JSON to $EDGEFLEET_HARDENING_REPORT (a directory) when set."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def add(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value

    def write(self) -> None:
        out = os.environ.get("EDGEFLEET_HARDENING_REPORT")
        if not out or not self.data:
            return
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        for section, values in self.data.items():
            (d / f"{section}.json").write_text(json.dumps({"recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime()),
                                                            "values": values}, indent=1, sort_keys=True))


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    f = Figures()
    yield f
    f.write()
