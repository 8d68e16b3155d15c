"""SIGTERM and SIGHUP stop a long-running command the way Ctrl-C does.

A command that starts processes or holds connections cleans up in ``finally`` blocks; Python runs those on Ctrl-C
(KeyboardInterrupt) but not when SIGTERM (``kill``, systemd, a test harness) or SIGHUP (a closed terminal or SSH
session) ends it with the default action. Within :func:`interrupt_on_stop_signals` both raise KeyboardInterrupt in
the main thread instead, so the same cleanup runs; :func:`ignore_stop_signals` keeps a cleanup that has begun from
being cut short by a second signal.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["STOP_SIGNALS", "ignore_stop_signals", "interrupt_on_stop_signals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def _handlers(signals: tuple[signal.Signals, ...], handler: Any) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def interrupt_on_stop_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise KeyboardInterrupt (as SIGINT does)."""
    with _handlers(STOP_SIGNALS, _raise_interrupt):
        yield


@contextmanager
def ignore_stop_signals() -> Iterator[None]:
    """Within the block, SIGINT, SIGTERM and SIGHUP are ignored: a bounded cleanup finishes."""
    with _handlers((signal.SIGINT, *STOP_SIGNALS), signal.SIG_IGN):
        yield
