"""Helpers shared by the fleet tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest


def wait_until(pred: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy; fail the test naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        val = pred()
        if val:
            return val
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what} (last value {val!r})")
        time.sleep(0.05)


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
