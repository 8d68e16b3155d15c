"""The controller's HTTP API: request bodies and responses (docs/api.md), and the rows the store returns.

The store hands these to the HTTP layer, which encodes them as they are; the CLI (``edgefleet deploy``,
``deployments``) decodes responses with the same classes. ``sdk/schemas/api-*.json`` are generated from them.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from msgspec import Meta, field

from ..errors import ProtocolError
from . import _limits as L
from ._model import Model
from .messages import (
    Boot,
    CommandKind,
    Count,
    Description,
    Digest,
    FreeForm,
    Id,
    Interval,
    Kind,
    Label,
    Level,
    Ms,
    Name,
    OutputWindow,
    ProcessStats,
    Providers,
    Reply,
    Seq,
    Sha256,
    Sketch,
    Text,
    Timestamp,
    Total,
)

__all__ = [
    "DEPLOYMENT_STATES",
    "DEPLOY_STATES",
    "RUNNING_STATES",
    "TERMINAL_STATES",
    "ApiError",
    "ApiTokenInfo",
    "ApiTokenList",
    "BundleInfo",
    "BundleUploaded",
    "CanaryVerdict",
    "CaptureList",
    "CaptureRow",
    "CaptureStored",
    "CommandRequest",
    "CommandStatus",
    "Deployment",
    "DeploymentDecision",
    "DeploymentList",
    "DeploymentRequest",
    "DeploymentTarget",
    "DeviceList",
    "DeviceRow",
    "EventList",
    "EventRow",
    "IngestCounters",
    "ModelSummary",
    "Rejected",
    "RollbackRequest",
    "RollbackSent",
    "RolloutPolicy",
    "TelemetryWindow",
    "VariantList",
    "VariantPick",
    "VersionList",
    "VersionStats",
    "WindowList",
]

Seconds = Annotated[float, Meta(ge=0.0, le=L.MAX_TS)]
Pct = Annotated[float, Meta(ge=0.0, le=100.0)]

# Per-device deployment states, in the order a healthy install goes through them (a target never moves backwards).
DEPLOY_STATES = ("pending", "downloading", "verifying", "self-test", "active", "failed", "rolled-back", "skipped")
TERMINAL_STATES = frozenset({"active", "failed", "rolled-back", "skipped"})
TargetState = Literal["pending", "downloading", "verifying", "self-test", "active", "failed", "rolled-back", "skipped"]
# Deployment states; in RUNNING_STATES some controller drives the rollout and holds its lease.
DEPLOYMENT_STATES = ("canary", "observing", "rolling-out", "completed", "completed-with-failures", "halted", "failed",
                     "rolled-back")
RUNNING_STATES = ("canary", "observing", "rolling-out")
DeploymentState = Literal["canary", "observing", "rolling-out", "completed", "completed-with-failures", "halted",
                          "failed", "rolled-back"]


# -- devices and telemetry ------------------------------------------------------------------------------------------

class ModelSummary(Model, frozen=True, kw_only=True, omit_defaults=False):
    """A device's latest window of one model: percentiles from its sketch, requests per second."""

    name: Name
    version: Name
    count: Count
    errors: Count
    p50: Ms | None
    p95: Ms | None
    p99: Ms | None
    throughput: Annotated[float, Meta(ge=0.0)]
    providers: Providers
    variant: Annotated[Label, Meta(description="the variant pinned on the device (multi-variant bundles)")] | \
        None = None


class DeviceRow(Model, frozen=True, kw_only=True):
    """One device: retained status, latest telemetry summary. ``description`` and ``status_ts`` only with
    ``?full=1`` and for ``GET /api/devices/{id}``."""

    _what: ClassVar[str] = "device"

    device: Id
    state: Literal["online", "offline", "unknown"]
    boot: Boot
    profile: Label
    tags: list[Id]
    last_seen: Seconds
    models: list[ModelSummary]
    telemetry_ts: Seconds
    process: ProcessStats
    updated: Seconds
    status_ts: Seconds | None = None
    description: Description | None = None


class DeviceList(Model, frozen=True, kw_only=True, omit_defaults=False):
    """``GET /api/devices``: ``total`` counts every matching device, ``devices`` holds the first ``limit``."""

    fleet: Id
    now: Seconds
    total: Total
    devices: list[DeviceRow]


class TelemetryWindow(Model, frozen=True, kw_only=True):
    """One model window of one telemetry record (``sketch`` only where asked for)."""

    device: Id
    boot: Boot
    seq: Seq
    ts: Timestamp
    name: Name
    version: Name
    count: Count
    errors: Count
    interval_s: Interval
    p50: Ms | None
    p95: Ms | None
    p99: Ms | None
    providers: Providers
    sketch: Sketch | None = None
    output: OutputWindow | None = None


class WindowList(Model, frozen=True, kw_only=True, omit_defaults=False):
    """``GET /api/telemetry``, ``GET /api/devices/{id}/telemetry``: the newest ``limit`` windows, oldest first."""

    since: Seconds
    until: Seconds | None
    windows: list[TelemetryWindow]


class VersionStats(Model, frozen=True, kw_only=True, omit_defaults=False):
    """Fleet-wide figures of one (model, version) from merged sketches (never averaged percentiles)."""

    name: Name
    version: Name
    count: Total
    errors: Total
    p50: Ms | None
    p95: Ms | None
    p99: Ms | None
    mean: Ms | None


class VersionList(Model, frozen=True, kw_only=True, omit_defaults=False):
    """``GET /api/versions``."""

    window_s: Seconds
    versions: list[VersionStats]


class CaptureStored(Model, frozen=True, kw_only=True, omit_defaults=False):
    """``POST /api/captures/<model>/<version>``: the sample is kept (``stored`` false: it was already)."""

    stored: bool


class CaptureRow(Model, frozen=True, kw_only=True, omit_defaults=False):
    """Captured samples held for one model version from one device (controller clock)."""

    model: Name
    version: Name
    device: Id
    samples: Total
    bytes: Total
    first: Seconds
    last: Seconds


class CaptureList(Model, frozen=True, kw_only=True, omit_defaults=False):
    """``GET /api/captures[?model=]``."""

    captures: list[CaptureRow]
    evicted: Annotated[Total, Meta(description="samples the retention cap removed since the controller started")]


class VariantPick(Model, frozen=True, kw_only=True, omit_defaults=False):
    """How many devices of one class (profile) pinned one variant of one multi-variant bundle."""

    name: Name
    version: Name
    digest: Digest
    profile: Label
    variant: Label
    devices: Total
    examples: Annotated[list[Id], Meta(max_length=10, description="up to 10 of those devices, sorted")]


class VariantList(Model, frozen=True, kw_only=True, omit_defaults=False):
    """``GET /api/variants``: which variant won where (from the devices' status descriptions), most devices first."""

    variants: list[VariantPick]


class EventRow(Model, frozen=True, kw_only=True, omit_defaults=False):
    """A stored event: the device's event plus when the controller received it."""

    device: Id
    boot: Boot
    seq: Seq
    ts: Timestamp
    received: Seconds
    kind: Kind
    level: Level
    message: Text
    data: FreeForm


class EventList(Model, frozen=True, kw_only=True, omit_defaults=False):
    """``GET /api/events``: oldest first."""

    events: list[EventRow]


class Rejected(Model, frozen=True, kw_only=True, omit_defaults=False):
    """Payloads dropped on one channel for one reason."""

    channel: Label
    reason: Label
    count: Total


class IngestCounters(Model, frozen=True, kw_only=True, omit_defaults=False):
    """``GET /api/ingest``: this controller's ingest counters and the store's row counts."""

    client_id: Id
    connected: bool
    backlog: Total
    received: dict[str, Total]
    stored: dict[str, Total]
    duplicates: dict[str, Total]
    rejected: list[Rejected]
    rejected_total: Total
    batches: Total
    receipts: Total
    write_errors: Total
    store: dict[str, Total]


# -- bundles and deployments ----------------------------------------------------------------------------------------

HttpUrl = Annotated[str, Meta(max_length=L.MAX_URL, pattern=r"^https?://[^\s]+$",
                              description="an http:// or https:// URL")]


class BundleInfo(Model, frozen=True, kw_only=True, omit_defaults=False):
    """A verified bundle the controller serves at ``/bundles/<sha256>.efb``; in a deployment, ``url`` is where its
    devices fetch it instead (object storage, a CDN, any HTTP server holding the same bytes: the agent checks size,
    sha256 and signature, so that server need not be trusted)."""

    sha256: Sha256
    size: Annotated[int, Meta(ge=1, le=L.MAX_BYTES)]
    name: Name
    version: Name
    target: Name
    key_id: Label
    url: Annotated[str, Meta(max_length=L.MAX_URL, pattern=r"^(https?://[^\s]+)?$",
                             description="where devices fetch it; empty: the controller's /bundles")] = ""


class BundleUploaded(BundleInfo, frozen=True, kw_only=True):
    """``POST /api/bundles``: the bundle as stored, and where agents fetch it."""

    url: Annotated[str, Meta(max_length=L.MAX_URL)]


class RolloutPolicy(Model, frozen=True, kw_only=True, omit_defaults=False):
    """How a deployment is staged and when it halts itself (docs/fleet.md, "Staged rollout")."""

    _what: ClassVar[str] = "policy"

    canary_pct: Annotated[Pct, Meta(description="percent of the devices that install first")] = 0.0
    max_p95_regression: Annotated[float, Meta(ge=0.0, le=1e6, description="halt if canary p95 rises by more "
                                                                           "(0.2 = 20%)")] = 0.20
    max_error_increase: Annotated[float, Meta(ge=0.0, le=1.0, description="halt if the error rate rises by more "
                                                                          "(0.01 = 1 point)")] = 0.01
    observe_s: Annotated[float, Meta(gt=0.0, le=30 * 86400.0)] = 60.0
    min_samples: Annotated[int, Meta(ge=1, le=L.MAX_COUNT)] = 200
    baseline_s: Annotated[float, Meta(gt=0.0, le=30 * 86400.0)] = 900.0
    install_timeout_s: Annotated[float, Meta(gt=0.0, le=30 * 86400.0)] = 900.0
    min_canary_devices: Annotated[int, Meta(ge=1, le=1000, description="canaries per target at least (fewer only "
                                                                       "when the target has no more devices)")] = 3
    seed: Annotated[int, Meta(ge=0, le=L.INT64_MAX, description="seeds the canary choice; the controller draws and "
                                                                "records one when the request has none")] | None = None
    canary_split: Annotated[Pct, Meta(description="percent of each canary's requests its previous version keeps "
                                          "serving while the canary is judged (0: none)")] = 50.0
    max_output_drift: Annotated[float, Meta(ge=0.0, le=100.0, description="halt if the canaries' output "
                                                                          "distribution departs from the previous "
                                                                          "version's by more (quantile distance, "
                                                                          "fleet/drift.py); 0: not judged")] = 0.25


Outcome = Literal["observing", "proceed", "halt", "cannot-judge"]


class CanaryVerdict(Model, frozen=True, kw_only=True, omit_defaults=False):
    """The canary verdict for one bundle, with the numbers it rests on."""

    bundle: Text
    proceed: bool
    reason: Text
    baseline_p95: Ms | None = None
    canary_p95: Ms | None = None
    baseline_error_rate: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    canary_error_rate: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    baseline_count: Total = 0
    canary_count: Total = 0
    outcome: Annotated[Outcome, Meta(description="observing (a look without a decision yet), proceed, halt (a "
                                                 "regression shown), cannot-judge (not enough data: halted)")] | \
        None = None
    p95_ratio: Annotated[float, Meta(ge=0.0, le=1e9, description="canary p95 / baseline p95, per device, "
                                                                  "median over devices")] | None = None
    ratio_low: Annotated[float, Meta(ge=0.0, le=1e9)] | None = None
    ratio_high: Annotated[float, Meta(ge=0.0, le=1e9)] | None = None
    confidence: Annotated[float, Meta(ge=0.0, le=1.0, description="of [ratio_low, ratio_high], over all looks")] = 0.0
    devices: Annotated[int, Meta(ge=0, le=L.INT64_MAX, description="canary devices judged")] = 0
    controls: Annotated[int, Meta(ge=0, le=L.INT64_MAX, description="devices on the previous version meanwhile "
                                                                   "that corrected for common drift")] = 0
    excluded: Annotated[list[Text], Meta(max_length=L.MAX_LIST, description="devices left out, with why (the "
                                                                          "first 512)")] = []
    needed_count: Annotated[Total, Meta(description="canary requests needed before a look")] = 0
    elapsed_s: Seconds = 0.0
    max_s: Seconds = 0.0
    output_drift: Annotated[float, Meta(ge=0.0, le=1e9, description="canaries' output distribution against the "
                                                                     "previous version's (quantile distance, median "
                                                                     "over devices)")] | None = None


class DeploymentDecision(Model, frozen=True, kw_only=True):
    """The policy a deployment runs under and, once judged, the canary verdicts."""

    policy: RolloutPolicy = field(default_factory=RolloutPolicy)
    canary: list[CanaryVerdict] | None = None
    observing: Annotated[list[CanaryVerdict] | None, Meta(description="while observing: the latest look per "
                                                                      "bundle")] = None


class DeploymentTarget(Model, frozen=True, kw_only=True, omit_defaults=False):
    """One device of a deployment: which bundle, which phase, where its install stands."""

    device: Id
    profile: Label
    phase: Literal["canary", "rest", "none"]
    state: TargetState
    name: Label = ""
    version: Label = ""
    sha256: Annotated[str, Meta(pattern=r"^([0-9a-f]{64})?$")] = ""
    previous_version: Label = ""
    reason: Text = ""
    cmd_id: Annotated[str, Meta(pattern=r"^([A-Za-z0-9_.-]{1,64})?$")] = ""
    rollback_cmd_id: Annotated[str, Meta(pattern=r"^([A-Za-z0-9_.-]{1,64})?$")] = ""
    activated: Seconds = 0.0
    updated: Seconds = 0.0


class Deployment(Model, frozen=True, kw_only=True):
    """A deployment; ``targets`` only in ``GET /api/deployments/{id}``."""

    _what: ClassVar[str] = "deployment"

    id: Id
    fleet: Id
    state: DeploymentState
    selector: list[Text]
    canary_pct: Pct
    max_p95_regression: Annotated[float, Meta(ge=0.0)]
    max_error_increase: Annotated[float, Meta(ge=0.0, le=1.0)]
    bundles: list[BundleInfo]
    decision: DeploymentDecision
    created: Seconds
    updated: Seconds = 0.0
    message: Text = ""
    owner: Label = ""
    lease_until: Seconds = 0.0
    progress: dict[str, Total] = {}
    targets: list[DeploymentTarget] | None = None


class DeploymentList(Model, frozen=True, kw_only=True, omit_defaults=False):
    """``GET /api/deployments``: newest first."""

    deployments: list[Deployment]


class DeploymentRequest(Model, frozen=True, kw_only=True):
    """``POST /api/deployments``: bundle ids (uploaded first) and a selector; the rest has defaults."""

    _what: ClassVar[str] = "request"

    bundles: Annotated[list[Sha256], Meta(min_length=1, max_length=64)]
    urls: Annotated[dict[Sha256, HttpUrl], Meta(max_length=64, description="per bundle (sha256): where devices fetch "
                                                "it instead of the controller (object storage, a CDN ...)")] = {}
    to: Annotated[list[Annotated[str, Meta(max_length=L.MAX_TEXT)]], Meta(min_length=1, max_length=L.MAX_LIST)] | \
        Annotated[str, Meta(max_length=L.MAX_TEXT)]
    canary: Pct = 0.0
    max_p95_regression: Annotated[float, Meta(ge=0.0, le=1e6)] = 0.20
    max_error_increase: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.01
    observe_s: Annotated[float, Meta(gt=0.0, le=30 * 86400.0)] = 60.0
    min_samples: Annotated[int, Meta(ge=1, le=L.MAX_COUNT)] = 200
    baseline_s: Annotated[float, Meta(gt=0.0, le=30 * 86400.0)] = 900.0
    install_timeout_s: Annotated[float, Meta(gt=0.0, le=30 * 86400.0)] = 900.0
    min_canary_devices: Annotated[int, Meta(ge=1, le=1000)] = 3
    seed: Annotated[int, Meta(ge=0, le=L.INT64_MAX)] | None = None
    max_output_drift: Annotated[float, Meta(ge=0.0, le=100.0)] = 0.25
    split: Pct = 50.0

    def policy(self) -> RolloutPolicy:
        """The rollout policy this request asks for."""
        return RolloutPolicy(canary_pct=self.canary, max_p95_regression=self.max_p95_regression,
                             max_error_increase=self.max_error_increase, observe_s=self.observe_s,
                             min_samples=self.min_samples, baseline_s=self.baseline_s,
                             install_timeout_s=self.install_timeout_s, min_canary_devices=self.min_canary_devices,
                             seed=self.seed, max_output_drift=self.max_output_drift, canary_split=self.split)

    def selectors(self) -> list[str]:
        """``to`` as a list."""
        return [self.to] if isinstance(self.to, str) else list(self.to)

    def _check(self) -> None:
        unknown = sorted(set(self.urls) - set(self.bundles))
        if unknown:
            raise ProtocolError(f"urls names bundle {unknown[0][:12]}… that the deployment does not deploy")


class RollbackRequest(Model, frozen=True, kw_only=True):
    """``POST /api/deployments/{id}/rollback``: every active device, or only ``devices``."""

    _what: ClassVar[str] = "request"

    devices: Annotated[list[Id], Meta(max_length=100_000)] | None = None


class RollbackSent(Model, frozen=True, kw_only=True, omit_defaults=False):
    """Who got a rollback command."""

    deployment: Id
    rollback_sent: list[Id]


class ApiError(Model, frozen=True, kw_only=True, omit_defaults=False):
    """Every 4xx/5xx body: one line saying what was wrong."""

    error: Text



# -- commands and tokens --------------------------------------------------------------------------------------------

class CommandRequest(Model, frozen=True, kw_only=True):
    """``POST /api/devices/{id}/commands``: one command for one device (``deploy`` goes through deployments)."""

    _what: ClassVar[str] = "request"

    kind: Literal["rollback", "remove", "benchmark", "describe", "configure"]
    args: FreeForm = {}


class CommandStatus(Model, frozen=True, kw_only=True, omit_defaults=False):
    """A command the controller sent, is resending until answered or expired, and its reply once there is one."""

    id: Id
    device: Id
    kind: CommandKind
    args: FreeForm
    created: Seconds
    expires: Seconds
    sent: Seconds
    sends: Annotated[int, Meta(ge=0, le=L.INT64_MAX)]
    state: Literal["pending", "replied", "expired"]
    reply: Reply | None = None


class ApiTokenInfo(Model, frozen=True, kw_only=True, omit_defaults=False):
    """An API token without its secret (``GET /api/tokens``)."""

    id: Annotated[str, Meta(pattern=r"^[0-9a-f]{12}$")]
    name: Annotated[str, Meta(max_length=L.MAX_NAME)]
    scope: Literal["read", "capture", "deploy", "admin"]
    fleet: Annotated[str, Meta(max_length=64)]
    created: Seconds
    expires: Seconds


class ApiTokenList(Model, frozen=True, kw_only=True, omit_defaults=False):
    """``GET /api/tokens`` (admin)."""

    tokens: list[ApiTokenInfo]
