"""The one data model of everything that crosses a process boundary: MQTT payloads and the controller's HTTP API.

Agents, controllers, ``fleet top`` and the simulator build every message with these classes and parse every message
with them; ``sdk/schemas/*.json`` (the published contract) are generated from them, and docs/mqtt-protocol.md is
checked against both. See docs/mqtt-protocol.md.

| channel   | publisher  | QoS | retained | payload        |
|-----------|------------|-----|----------|----------------|
| status    | agent      | 1   | yes      | :class:`Status`    (birth; Last Will ``offline``) |
| telemetry | agent      | 1   | no       | :class:`Telemetry` |
| events    | agent      | 1   | no       | :class:`Event`     |
| cmd       | controller | 1   | no       | :class:`Command`   |
| reply     | agent      | 1   | no       | :class:`Reply`     |
| receipt   | controller | 1   | no       | :class:`Receipt`   |

Compatibility (v1): readers ignore fields they do not know; within a major version writers only add optional
fields; a reader refuses another ``v``. ``Model.from_json`` / ``from_dict`` validate types and ranges and raise
:class:`ProtocolError` with one line naming the field; ``to_json`` / ``to_dict`` give the wire form back.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import ProtocolError
from . import _limits
from ._limits import (
    INT64_MAX,
    MAX_COUNT,
    MAX_FUTURE_SKEW_S,
    MAX_PAYLOAD,
    MAX_RECEIPT_RANGES,
    SKETCH_ALPHA,
)
from ._model import Message, Model
from .messages import (
    COMMAND_ARGS,
    COMMAND_KINDS,
    EVENT_LEVELS,
    BenchmarkArgs,
    ColdStart,
    Command,
    ConfigureArgs,
    CpuInfo,
    DeployArgs,
    DescribeArgs,
    Description,
    Event,
    JournalStats,
    ModelTotals,
    ModelWindow,
    OrtInfo,
    OutboxKinds,
    OutputWindow,
    ProcessStats,
    Receipt,
    RemoveArgs,
    Reply,
    ReplyError,
    RollbackArgs,
    ServedModel,
    Signature,
    Sketch,
    Status,
    StorageStats,
    SystemStats,
    Telemetry,
    command,
    receipts,
    seq_ranges,
)
from .signing import check_expiry, check_target, sign_command, signed_part, verify_command
from .topics import CHANNELS, ROOT, Topic, check_id, parse_topic, subscription, topic

if TYPE_CHECKING:
    from .api import (
        DEPLOY_STATES,
        DEPLOYMENT_STATES,
        RUNNING_STATES,
        TERMINAL_STATES,
        ApiError,
        ApiTokenInfo,
        ApiTokenList,
        BundleInfo,
        BundleUploaded,
        CanaryVerdict,
        CaptureList,
        CaptureRow,
        CaptureStored,
        CommandRequest,
        CommandStatus,
        Deployment,
        DeploymentDecision,
        DeploymentList,
        DeploymentRequest,
        DeploymentTarget,
        DeviceList,
        DeviceRow,
        EventList,
        EventRow,
        IngestCounters,
        ModelSummary,
        Rejected,
        RollbackRequest,
        RollbackSent,
        RolloutPolicy,
        TelemetryWindow,
        VariantList,
        VariantPick,
        VersionList,
        VersionStats,
        WindowList,
    )

# The controller's HTTP bodies load on first use: an agent never needs them (it starts faster and smaller).
_API_NAMES = frozenset({
    "DEPLOY_STATES", "DEPLOYMENT_STATES", "RUNNING_STATES", "TERMINAL_STATES", "ApiError", "ApiTokenInfo",
    "ApiTokenList", "BundleInfo", "BundleUploaded", "CanaryVerdict", "CaptureList", "CaptureRow", "CaptureStored",
    "CommandRequest", "CommandStatus",
    "Deployment", "DeploymentDecision", "DeploymentList", "DeploymentRequest", "DeploymentTarget", "DeviceList",
    "DeviceRow", "EventList", "EventRow", "IngestCounters", "ModelSummary", "Rejected", "RollbackRequest",
    "RollbackSent", "RolloutPolicy", "TelemetryWindow", "VariantList", "VariantPick", "VersionList", "VersionStats",
    "WindowList",
})


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CHANNELS",
    "CHANNEL_TYPES",
    "COMMAND_ARGS",
    "COMMAND_KINDS",
    "DEPLOYMENT_STATES",
    "DEPLOY_STATES",
    "EVENT_LEVELS",
    "INT64_MAX",
    "MAX_COUNT",
    "MAX_FUTURE_SKEW_S",
    "MAX_PAYLOAD",
    "MAX_RECEIPT_RANGES",
    "PROTOCOL_VERSION",
    "ROOT",
    "RUNNING_STATES",
    "SKETCH_ALPHA",
    "TERMINAL_STATES",
    "ApiError",
    "ApiTokenInfo",
    "ApiTokenList",
    "BenchmarkArgs",
    "BundleInfo",
    "BundleUploaded",
    "CanaryVerdict",
    "CaptureList",
    "CaptureRow",
    "CaptureStored",
    "ColdStart",
    "Command",
    "CommandRequest",
    "CommandStatus",
    "ConfigureArgs",
    "CpuInfo",
    "DeployArgs",
    "Deployment",
    "DeploymentDecision",
    "DeploymentList",
    "DeploymentRequest",
    "DeploymentTarget",
    "DescribeArgs",
    "Description",
    "DeviceList",
    "DeviceRow",
    "Event",
    "EventList",
    "EventRow",
    "IngestCounters",
    "JournalStats",
    "Message",
    "Model",
    "ModelSummary",
    "ModelTotals",
    "ModelWindow",
    "OrtInfo",
    "OutboxKinds",
    "OutputWindow",
    "ProcessStats",
    "ProtocolError",
    "Receipt",
    "Rejected",
    "RemoveArgs",
    "Reply",
    "ReplyError",
    "RollbackArgs",
    "RollbackRequest",
    "RollbackSent",
    "RolloutPolicy",
    "ServedModel",
    "Signature",
    "Sketch",
    "Status",
    "StorageStats",
    "SystemStats",
    "Telemetry",
    "TelemetryWindow",
    "Topic",
    "VariantList",
    "VariantPick",
    "VersionList",
    "VersionStats",
    "WindowList",
    "check_clock",
    "check_expiry",
    "check_id",
    "check_target",
    "command",
    "decode",
    "limits",
    "parse_topic",
    "receipts",
    "seq_ranges",
    "sign_command",
    "signed_part",
    "subscription",
    "topic",
    "verify_command",
]

PROTOCOL_VERSION = _limits.VERSION
limits = _limits
"""Every limit of the protocol with its reason (``edgefleet.sdk.protocol._limits``)."""

CHANNEL_TYPES: dict[str, type[Message]] = {
    "status": Status, "telemetry": Telemetry, "events": Event, "cmd": Command, "reply": Reply, "receipt": Receipt,
}
"""The payload class of each channel."""


def decode(channel: str, payload: bytes | bytearray | memoryview | str) -> Any:
    """Parse a payload of ``channel`` into its class (:data:`CHANNEL_TYPES`), or raise ProtocolError."""
    cls = CHANNEL_TYPES.get(channel)
    if cls is None:
        raise ProtocolError(f"unknown channel {channel!r}; channels are {', '.join(CHANNELS)}")
    return cls.from_json(payload)


def check_clock(ts: float, now: float, what: str, max_future_s: float = MAX_FUTURE_SKEW_S) -> None:
    """Refuse a device timestamp more than ``max_future_s`` ahead of the receiver's clock ``now``.

    Where it matters (the controller, for statuses and telemetry): a status from the future would win over every
    later status of the real device, a telemetry window from the future would never age out of retention. The past
    is not limited (an outbox keeps records for as long as the broker is away).
    """
    if ts > now + max_future_s:
        raise ProtocolError(f"{what}.ts: {ts - now:.0f} s ahead of this controller's clock "
                            f"(more than the {max_future_s:g} s allowed)")
