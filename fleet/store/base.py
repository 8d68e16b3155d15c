"""The store interface: everything the controller, the HTTP API and the rollout engine need from storage.

A backend is one module beside this one (``sqlite.py`` today, ``postgres.py`` next) implementing :class:`Store`;
nothing else in the controller knows which one runs. What every backend guarantees:

* **One transaction per method, idempotent writes.** Telemetry and events are keyed by ``(fleet, device, boot,
  seq)``, replies by command id: a redelivered message is stored once (``WriteResult`` counts only new rows), and
  derived views (``devices.summary``, per-minute merged sketches per model version) change only for new rows.
* **No process state.** Several controllers may share one store (leases decide who drives a rollout).
* **Typed rows.** Reads return the classes of :mod:`edgefleet.sdk.protocol` (``DeviceRow``, ``TelemetryWindow``,
  ``EventRow``, ``Deployment`` ...), which the HTTP API encodes as they are.
* **Arithmetic that cannot overflow.** Counts in a window are at most 2^40 (the protocol refuses more); sums kept in
  the store saturate at 2^63 - 1 (:class:`edgefleet.sdk.sketch.SketchSum`, :func:`~edgefleet.sdk.sketch.saturating_add`)
  and all-time totals are computed as floating-point sums, so no accepted record can make another unstorable.
* **Leases on the store's clock.** A running rollout is driven by the controller holding its lease; lease times
  are the store's own clock (PostgreSQL's ``clock_timestamp()``, the SQLite host's clock), never the callers', so
  controllers on hosts with skewed clocks cannot both believe they hold one. Fenced writes (``owner=``) make a
  controller that lost its lease unable to change the deployment.
* **Deployment targets move in the write transaction** of the event or reply that moves them, by the rules of
  :mod:`edgefleet.fleet.rollout` (``target_state_from_event``, ``target_state_from_reply``, ``advances``).
* **Commands are tracked until answered** (:mod:`edgefleet.fleet.commands`): every command a controller sends is
  kept with its expiry, and one whose device came back online after it was last sent, without replying, is due
  again; ``claim_resend`` lets exactly one controller of a group send it.
* **API tokens are stored hashed** (:mod:`edgefleet.fleet.auth`): the store never holds a usable token.
* **Liveness changes are recorded once.** A status write that changes a device's state (its birth, its Last Will, a
  graceful ``offline``) stores a ``device.online`` / ``device.offline`` event in the same transaction;
  :meth:`Store.mark_silent` turns devices that went quiet offline (one controller of a group wins each device), and
  fresh telemetry from a device marked offline by silence brings it back online, each with its event. These events
  carry the boot :data:`LIVENESS_BOOT` (no agent boot has it: it is not random) and the controller's clock.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgefleet.sdk.protocol import (
    Command,
    Deployment,
    DeploymentDecision,
    DeploymentTarget,
    DeviceRow,
    Event,
    EventRow,
    Reply,
    Status,
    Telemetry,
    TelemetryWindow,
)
from edgefleet.sdk.sketch import DDSketch

__all__ = ["CONTROLLER_BOOTS", "LIVENESS_BOOT", "TARGET_FIELDS", "ApiToken", "Batch", "Store", "TrackedCommand",
           "VersionSketch", "VersionTotal", "WriteResult", "liveness_event"]

# The boot of the events the controller records itself (device.online / device.offline): agents' boots are random.
LIVENESS_BOOT = "controller"
# Every boot only a controller writes events under (liveness, output drift): an agent's event claiming one is ignored.
CONTROLLER_BOOTS = frozenset({LIVENESS_BOOT, "controller.drift"})


def liveness_event(device: str, online: bool, reason: str, now: float, *, boot: str = "",
                   quiet_s: float | None = None) -> Event:
    """The event a store records when a device goes online or offline. ``reason``: ``status`` (a retained status:
    the agent's birth, its Last Will or a graceful shutdown), ``silence`` (no status or telemetry for too long) or
    ``telemetry`` (telemetry again from a device marked offline by silence)."""
    if online:
        message = "online" + (" (telemetry again after silence)" if reason == "telemetry" else "")
    elif reason == "silence":
        message = f"offline: nothing heard for {quiet_s:.0f} s" if quiet_s is not None else "offline: silent"
    else:
        message = "offline (Last Will or shutdown status)"
    data: dict[str, Any] = {"reason": reason, "boot": boot}
    if quiet_s is not None:
        data["quiet_s"] = round(quiet_s, 3)
    return Event(device=device, boot=LIVENESS_BOOT, seq=int(now * 1e6), kind="device.online" if online
                 else "device.offline", level="info" if online else "warning", message=message, ts=now, data=data)


# What update_target may change (the rest of a target is fixed when the deployment is planned).
TARGET_FIELDS = frozenset({"state", "reason", "cmd_id", "rollback_cmd_id", "activated", "previous_version"})


@dataclass
class Batch:
    """Validated messages to write in one transaction (the ingest writer fills one per flush)."""

    fleet: str
    received: float = field(default_factory=time.time)
    statuses: list[Status] = field(default_factory=list)
    telemetry: list[Telemetry] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)
    # Events the controller itself raises (output drift, fleet/drift.py: boot CONTROLLER_BOOTS): stored as they are,
    # while an agent's event claiming one of those boots is ignored like one claiming the liveness boot.
    controller_events: list[Event] = field(default_factory=list)

    def __len__(self) -> int:
        return (len(self.statuses) + len(self.telemetry) + len(self.events) + len(self.replies)
                + len(self.controller_events))


@dataclass(frozen=True)
class WriteResult:
    """How many rows of a batch were new (the rest were replays, de-duplicated)."""

    telemetry: int = 0
    events: int = 0
    replies: int = 0
    statuses: int = 0


@dataclass(frozen=True)
class VersionSketch:
    """Fleet-wide merged sketch of one (model, version) over a time range."""

    name: str
    version: str
    count: int
    errors: int
    sketch: DDSketch


@dataclass(frozen=True)
class VersionTotal:
    """All stored requests of one (model, version): counts as floats where they are sums (they cannot overflow)."""

    name: str
    version: str
    count: float
    errors: float
    sum_ms: float


@dataclass(frozen=True)
class TrackedCommand:
    """A command a controller sent and keeps sending (after a device reconnects) until it is answered or expires."""

    device: str
    command: Command  # as built, unsigned: each send signs it again (new counter and nonce, same expiry)
    created: float
    expires: float
    sent: float  # when it last went out (controller clock)
    sends: int
    replied: bool = False


@dataclass(frozen=True)
class ApiToken:
    """An API token as stored: everything but the secret, of which only a hash is kept."""

    id: str  # the public part of the token: how it is found
    name: str
    scope: str  # read | deploy | admin
    fleet: str  # the fleet it works for, or "*"
    created: float
    expires: float  # 0: never
    secret_hash: str = field(default="", repr=False)


class Store(ABC):
    """What the controller needs from storage; see the module docstring for what every backend guarantees."""

    # -- ingest ------------------------------------------------------------------------------------------------------
    @abstractmethod
    def write(self, batch: Batch) -> WriteResult:
        """Write a batch in one transaction; replays of stored messages are ignored."""

    # -- reads -------------------------------------------------------------------------------------------------------
    @abstractmethod
    def devices(self, fleet: str, changed_since: float = 0.0, full: bool = True) -> list[DeviceRow]:
        """Every known device sorted by id (those changed after ``changed_since``, controller clock);
        ``full=False`` leaves out the status description (the bulk of a row)."""

    @abstractmethod
    def devices_json(self, fleet: str, changed_since: float = 0.0, limit: int | None = None) -> tuple[int, str]:
        """``(matching, JSON array text)`` of the compact rows of ``devices(full=False)`` (the first ``limit`` by id),
        built by the database itself: the dashboard loads 10,000 at once."""

    @abstractmethod
    def device(self, fleet: str, device: str) -> DeviceRow | None:
        """One device with its description, or None."""

    @abstractmethod
    def windows(self, fleet: str, device: str | None = None, since: float = 0.0, until: float = math.inf,
                name: str | None = None, version: str | None = None, limit: int = 10_000,
                with_sketch: bool = False) -> list[TelemetryWindow]:
        """The newest ``limit`` telemetry windows (one per model per record) in a device-time range, oldest first."""

    @abstractmethod
    def version_stats(self, fleet: str, since: float, until: float = math.inf) -> list[VersionSketch]:
        """Per (model, version): merged sketch, count and errors over whole minutes overlapping the range."""

    @abstractmethod
    def version_totals(self, fleet: str) -> list[VersionTotal]:
        """Per (model, version), over all stored time: requests, errors and latency sum in ms (for /metrics)."""

    # -- liveness ----------------------------------------------------------------------------------------------------
    @abstractmethod
    def mark_silent(self, fleet: str, before: float, now: float) -> list[str]:
        """Mark offline every ``online`` device last heard from (status or telemetry, controller clock) before
        ``before``, recording a ``device.offline`` event (reason ``silence``) for each, in one transaction; returns
        their ids. Of several controllers calling it at once, exactly one marks each device."""

    @abstractmethod
    def counts(self, fleet: str) -> dict[str, int]:
        """Row counts: telemetry, windows, events, replies, devices."""

    @abstractmethod
    def events(self, fleet: str, device: str | None = None, since: float = 0.0, limit: int = 500) -> list[EventRow]:
        """The newest events received after ``since`` (controller clock), returned oldest first."""

    @abstractmethod
    def reply(self, cmd_id: str) -> Reply | None:
        """The stored reply to a command, or None."""

    # -- maintenance -------------------------------------------------------------------------------------------------
    @abstractmethod
    def prune(self, fleet: str, before: float, chunk: int = 5000) -> dict[str, int]:
        """Delete time series older than ``before`` in small transactions (retention); devices and deployments
        stay. Returns rows deleted per table."""

    @abstractmethod
    def schema_version(self) -> int:
        """The highest applied migration of this backend."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    # -- commands ----------------------------------------------------------------------------------------------------
    @abstractmethod
    def add_command(self, fleet: str, device: str, cmd: Command, sent: float) -> None:
        """Track a command just sent (``cmd.expires`` must be set); a second add of the same id changes nothing."""

    @abstractmethod
    def commands_due(self, fleet: str, now: float, grace_s: float, limit: int = 500) -> list[TrackedCommand]:
        """Unanswered, unexpired commands whose device is online with a status received after the command last
        went out, and more than ``grace_s`` before ``now`` (what the broker queued has had time to arrive)."""

    @abstractmethod
    def claim_resend(self, cmd_id: str, last_sent: float, now: float) -> bool:
        """Mark a command sent again at ``now``, unless another controller did since ``last_sent``."""

    @abstractmethod
    def tracked_command(self, cmd_id: str) -> TrackedCommand | None:
        """One tracked command (``replied`` filled in), or None."""

    # -- API tokens --------------------------------------------------------------------------------------------------
    @abstractmethod
    def add_token(self, token: ApiToken) -> None:
        """Store a new token (its ``secret_hash``, never the secret)."""

    @abstractmethod
    def token(self, token_id: str) -> ApiToken | None:
        """A token by its public id, with its hash, or None."""

    @abstractmethod
    def tokens(self) -> list[ApiToken]:
        """Every token, oldest first, without hashes."""

    @abstractmethod
    def revoke_token(self, token_id: str) -> bool:
        """Delete a token; False when there was none."""

    # -- deployments -------------------------------------------------------------------------------------------------
    @abstractmethod
    def create_deployment(self, deployment: Deployment, targets: Iterable[DeploymentTarget], *,
                          lease_s: float = 0.0) -> None:
        """Store a new deployment and its per-device targets in one transaction; with ``lease_s`` > 0 its ``owner``
        holds the rollout's lease for that long from now (the store's clock; ``deployment.lease_until`` is ignored)."""

    @abstractmethod
    def update_deployment(self, dep_id: str, *, state: str | None = None,
                          decision: DeploymentDecision | None = None, message: str | None = None,
                          owner: str | None = None) -> bool:
        """Change a deployment's state, decision or message; returns whether it changed.

        With ``owner``, a *fenced* write: it happens only while ``owner`` holds an unexpired lease on a running
        deployment, so a controller that lost its rollout (stalled past its lease, or an operator rolled it back)
        changes nothing. Without, it always applies (an operator's rollback)."""

    @abstractmethod
    def update_target(self, dep_id: str, device: str, *, owner: str | None = None, **fields: Any) -> bool:
        """Change one target's :data:`TARGET_FIELDS` (anything else is a ValueError); returns whether it changed.
        ``owner`` fences the write as in :meth:`update_deployment`."""

    @abstractmethod
    def renew_lease(self, dep_id: str, owner: str, lease_s: float) -> bool:
        """Extend ``owner``'s lease on a running rollout to ``lease_s`` from now (store clock; <= 0 releases it at
        once); False when another controller took it over or the deployment no longer runs."""

    @abstractmethod
    def claim_deployments(self, fleet: str, owner: str, lease_s: float) -> list[str]:
        """Atomically take over running rollouts whose lease has expired (store clock), each with a lease of
        ``lease_s``; returns their ids. Two controllers claiming at once never both get one."""

    @abstractmethod
    def deployments(self, fleet: str, limit: int = 100) -> list[Deployment]:
        """Deployments, newest first, each with ``progress`` (targets per state), without targets."""

    @abstractmethod
    def deployment(self, dep_id: str) -> Deployment | None:
        """One deployment with its targets and progress, or None."""


def check_target_fields(fields: Sequence[str]) -> None:
    """Refuse target fields update_target may not change."""
    bad = set(fields) - TARGET_FIELDS
    if bad:
        raise ValueError(f"unknown target field(s) {sorted(bad)}")
