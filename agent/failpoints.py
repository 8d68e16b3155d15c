"""Crash-test hooks: SIGKILL the agent at a named step of install, rollback or the command journal.

``$EDGEFLEET_AGENT_FAILPOINT`` names one point; it is read once, when this module is imported, so an agent started
without it pays one comparison with ``None`` per point and nothing else. Tests start an agent with a point set, make
it reach that step, and check what a restart finds (tests/agent/test_agent_crash.py, tests/hardening/).

Points (:data:`FAILPOINTS`): the install steps (``after-download`` ... ``after-activate``), each write, fsync and
rename of the pointer file, for install (``activate:``) and rollback (``rollback:``), and the journal commits.
"""

from __future__ import annotations

import logging
import os
import signal

__all__ = ["FAILPOINTS", "failpoint"]

log = logging.getLogger("edgefleet.agent.failpoints")

_POINTER_STEPS = ("tmp-open", "tmp-write", "tmp-fsync", "rename", "dir-fsync")
FAILPOINTS: tuple[str, ...] = (
    "journal:received", "journal:started",
    "after-download", "before-extract", "after-extract", "after-selftest",
    *(f"activate:{s}" for s in _POINTER_STEPS), "after-activate",
    "rollback:after-selftest", *(f"rollback:{s}" for s in _POINTER_STEPS), "rollback:after-pointer",
    "journal:replied",
)
"""Every instrumented point, in the order an install (then a rollback) reaches them."""

_ACTIVE: str | None = os.environ.get("EDGEFLEET_AGENT_FAILPOINT") or None


def failpoint(name: str) -> None:
    """SIGKILL this process when ``name`` is the point $EDGEFLEET_AGENT_FAILPOINT named at start-up."""
    if _ACTIVE is not None and _ACTIVE == name:
        log.warning("failpoint reached: killing the agent", extra={"failpoint": name})
        os.kill(os.getpid(), signal.SIGKILL)
