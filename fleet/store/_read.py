"""Reading stored values that this version may not accept: what every backend's reads share.

A row written by an older or broken controller, or by hand — out of today's ranges, not even JSON — must never make
a read fail (issue 18: one record made /metrics and /api/devices answer 500): the backend leaves it out of a list,
or shows the part it cannot read as empty, and logs that once per kind of value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import msgspec
from edgefleet.sdk.errors import ProtocolError

__all__ = ["UNREADABLE", "or_default", "unreadable"]

log = logging.getLogger("edgefleet.fleet.store")

UNREADABLE = (ProtocolError, msgspec.DecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError,
              OverflowError)
"""What decoding a stored value this version does not accept can raise."""

_warned: set[str] = set()
T = TypeVar("T")


def unreadable(what: str, exc: BaseException) -> None:
    """Log a stored value this version cannot read, once per kind of value."""
    if what not in _warned and len(_warned) < 1000:
        _warned.add(what)
        log.warning("a stored %s cannot be read by this version and is left out (%s); further ones are not logged",
                    what, str(exc)[:300])


def or_default(default: T, what: str, fn: Callable[[], T]) -> T:
    """``fn()``, or ``default`` when the stored value it reads is unreadable."""
    try:
        return fn()
    except UNREADABLE as exc:
        unreadable(what, exc)
        return default
