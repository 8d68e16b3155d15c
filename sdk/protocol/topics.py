"""Topics and ids: ``edgefleet/v1/<fleet>/<device>/<channel>``.

Ids match ``[A-Za-z0-9_.-]{1,64}``, so an id can never be an MQTT wildcard (``+``, ``#``) or add a topic level
(``/``), and a device id can never widen what an ACL grants.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ProtocolError
from . import _limits as L

__all__ = ["CHANNELS", "ROOT", "Topic", "check_id", "parse_topic", "subscription", "topic"]

ROOT = f"edgefleet/v{L.VERSION}"
CHANNELS = ("status", "telemetry", "events", "cmd", "reply", "receipt")
_ID_RE = re.compile(L.ID_PATTERN)


def check_id(what: str, value: object) -> str:
    """Return ``value`` if it is a valid fleet/device/command id, else raise ProtocolError naming ``what``."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ProtocolError(f"{what} must match [A-Za-z0-9_.-]{{1,64}}, got {str(value)[:80]!r}")
    return value


def topic(fleet: str, device: str, channel: str) -> str:
    """The topic of one device's channel."""
    if channel not in CHANNELS:
        raise ProtocolError(f"unknown channel {channel!r}; channels are {', '.join(CHANNELS)}")
    return f"{ROOT}/{check_id('fleet', fleet)}/{check_id('device', device)}/{channel}"


def subscription(fleet: str, channel: str, share_group: str | None = None) -> str:
    """Topic filter for one channel of every device in a fleet, optionally as an MQTT 5 shared subscription."""
    if channel not in CHANNELS:
        raise ProtocolError(f"unknown channel {channel!r}; channels are {', '.join(CHANNELS)}")
    f = f"{ROOT}/{check_id('fleet', fleet)}/+/{channel}"
    return f"$share/{check_id('share group', share_group)}/{f}" if share_group else f


@dataclass(frozen=True)
class Topic:
    """A parsed topic."""

    fleet: str
    device: str
    channel: str


def parse_topic(name: str) -> Topic:
    """Split a topic into fleet, device and channel, validating each."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != ROOT:
        raise ProtocolError(f"topic {name[:200]!r} is not {ROOT}/<fleet>/<device>/<channel>")
    if parts[4] not in CHANNELS:
        raise ProtocolError(f"topic {name[:200]!r} has unknown channel {parts[4][:40]!r}")
    return Topic(check_id("fleet", parts[2]), check_id("device", parts[3]), parts[4])
