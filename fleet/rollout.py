"""Deployments: which device gets which bundle, staged with canaries, halted and rolled back by itself.

This module is the deployment state machine, and it talks to storage only through the :class:`Store` interface:

* **Per-device target states** move on agents' events and replies, inside the store's write transaction, by the
  rules here (:func:`target_moves`, :func:`advances`)::

      pending → downloading → verifying → self-test → active | failed (reason) | rolled-back;  skipped: no bundle

  A target never moves backwards (a late progress event after the reply changes nothing) and only a rollback leaves
  a terminal state.
* **Deployment states**: ``canary → observing → rolling-out → completed | completed-with-failures | halted``,
  ``failed`` (a controller error), ``rolled-back`` (an operator's rollback). A rollout thread in one controller
  drives each running deployment and holds a lease on it in the store; another controller resumes it when the
  lease expires (every step is idempotent).
* **Canary verdict** (``--canary N%``): the first ``ceil(N% of the devices that get a bundle)`` devices install
  first; their telemetry on the new version is merged into one latency sketch per bundle and compared with the same
  devices' sketch on the previous version before the deployment (or, if they have none, the rest of the fleet's on
  the previous version meanwhile). p95 regressing by more than ``max_p95_regression`` or the error rate rising by
  more than ``max_error_increase`` halts the deployment and rolls the canaries back; otherwise the rest install.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from edgefleet.sdk.errors import InputError
from edgefleet.sdk.protocol import (
    DEPLOY_STATES,
    TERMINAL_STATES,
    BundleInfo,
    CanaryVerdict,
    Command,
    Deployment,
    DeploymentDecision,
    DeploymentTarget,
    DeviceRow,
    Event,
    Reply,
    RolloutPolicy,
    TelemetryWindow,
    check_id,
    command,
)
from edgefleet.sdk.sketch import DDSketch

from .bundles import BundleLibrary, bundle_filename
from .store.base import Store

__all__ = ["Deployer", "Selector", "TargetMove", "advances", "compare", "target_moves"]

log = logging.getLogger(__name__)

# (device, command) -> sent, and tracked until answered or expired (fleet/commands.py resends a lost one).
Publish = Callable[[str, Command], object]
_RANK = {s: i for i, s in enumerate(DEPLOY_STATES)}


# -- per-device target states ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetMove:
    """A change the store applies to the targets whose ``column`` (``cmd_id`` or ``rollback_cmd_id``) is ``cmd_id``:
    move to ``state`` (if :func:`advances` allows) with ``reason``, or, with ``state`` None, only set ``reason``."""

    column: Literal["cmd_id", "rollback_cmd_id"]
    cmd_id: str
    state: str | None
    reason: str


def advances(current: str, proposed: str) -> bool:
    """Whether a target in state ``current`` moves to ``proposed``: never backwards, never out of a terminal state
    except by a rollback."""
    if proposed == current or proposed not in _RANK:
        return False
    if current in TERMINAL_STATES and proposed != "rolled-back":
        return False
    return _RANK[proposed] > _RANK[current]


def _reported_state(ev: Event) -> str | None:
    """The target state an event reports: ``data.state`` (progress), else the outcome of a deploy/rollback event."""
    st = ev.state
    if st is not None and st in _RANK:
        return st
    if ev.kind == "deploy":
        return "failed" if ev.level == "error" else "active"
    if ev.kind == "rollback":
        return "failed" if ev.level == "error" else "rolled-back"
    return None


def target_moves(msg: Event | Reply) -> list[TargetMove]:
    """The target changes an agent's event or reply implies (none when it is about no command)."""
    if isinstance(msg, Reply):
        if msg.status == "ok":
            return [TargetMove("cmd_id", msg.id, "active", ""),
                    TargetMove("rollback_cmd_id", msg.id, "rolled-back", "rolled back")]
        err = msg.error
        text = f"{err.code}: {err.message}".strip(": ") if err is not None else "error"
        return [TargetMove("cmd_id", msg.id, "failed", text),
                TargetMove("rollback_cmd_id", msg.id, None, f"rollback failed: {text}")]
    cmd_id = msg.command
    state = _reported_state(msg)
    if cmd_id is None or state is None:
        return []
    failed = msg.level == "error"
    if failed:
        state = "failed"
    reason = msg.message if failed or state in ("failed", "rolled-back") else ""
    moves = [TargetMove("cmd_id", cmd_id, state, reason)]
    if state == "rolled-back":
        moves.append(TargetMove("rollback_cmd_id", cmd_id, state, reason))
    elif failed:
        moves.append(TargetMove("rollback_cmd_id", cmd_id, None, f"rollback failed: {reason}"))
    return moves


# -- selectors ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Selector:
    """Which devices a deployment is for: ``all``, device ids, ``tag:x`` or ``profile:x`` (a union of terms)."""

    terms: tuple[str, ...]

    @classmethod
    def parse(cls, specs: Iterable[str]) -> Selector:
        """Parse ``--to`` values; each may hold comma-separated terms."""
        terms: list[str] = []
        for spec in specs:
            for raw in str(spec).split(","):
                term = raw.strip()
                if not term:
                    continue
                kind, _, value = term.partition(":")
                if term != "all" and value and kind not in ("tag", "profile", "device"):
                    raise InputError(f"selector {term[:80]!r}: use a device id, tag:NAME, profile:NAME or all")
                if term != "all":
                    check_id("selector value", value if value else term)
                terms.append(term)
        if not terms:
            raise InputError("empty selector: give --to with device ids, tag:NAME, profile:NAME or all")
        return cls(tuple(terms))

    def matches(self, dev: DeviceRow) -> bool:
        """True when a device row (from the store) is selected."""
        for term in self.terms:
            kind, _, value = term.partition(":")
            if term == "all":
                return True
            if not value and dev.device == term:
                return True
            if (kind == "device" and dev.device == value) or (kind == "profile" and dev.profile == value):
                return True
            if kind == "tag" and value in dev.tags:
                return True
        return False

    def __str__(self) -> str:
        return ",".join(self.terms)


# -- policy and verdict ---------------------------------------------------------------------------------------------

def _stats(windows: Sequence[TelemetryWindow]) -> tuple[DDSketch, int, int]:
    sk = DDSketch.merged(DDSketch.from_wire(w.sketch) for w in windows if w.sketch is not None)
    return sk, sk.count, sum(w.errors for w in windows)


def compare(bundle: str, baseline: Sequence[TelemetryWindow], canary: Sequence[TelemetryWindow],
            policy: RolloutPolicy) -> CanaryVerdict:
    """Compare merged sketches and error rates of baseline and canary windows under ``policy``."""
    c_sk, c_n, c_err = _stats(canary)
    c_p95 = c_sk.quantile(0.95)
    c_rate = c_err / (c_n + c_err) if c_n + c_err else 0.0
    if not baseline:
        return CanaryVerdict(bundle=bundle, proceed=True, reason="no telemetry on the previous version to compare "
                             "with: proceeding", canary_p95=c_p95, canary_error_rate=c_rate, canary_count=c_n)
    b_sk, b_n, b_err = _stats(baseline)
    b_p95 = b_sk.quantile(0.95)
    b_rate = b_err / (b_n + b_err) if b_n + b_err else 0.0

    def verdict(proceed: bool, reason: str) -> CanaryVerdict:
        return CanaryVerdict(bundle=bundle, proceed=proceed, reason=reason, baseline_p95=b_p95, canary_p95=c_p95,
                             baseline_error_rate=b_rate, canary_error_rate=c_rate, baseline_count=b_n,
                             canary_count=c_n)

    if b_p95 is not None and c_p95 is not None and c_p95 > b_p95 * (1.0 + policy.max_p95_regression):
        return verdict(False, f"p95 regressed {c_p95 / b_p95 - 1:+.0%} ({b_p95:.2f} → {c_p95:.2f} ms), "
                              f"over the {policy.max_p95_regression:.0%} limit")
    if c_rate > b_rate + policy.max_error_increase:
        return verdict(False, f"error rate rose from {b_rate:.2%} to {c_rate:.2%}, over the "
                              f"+{policy.max_error_increase:.2%} limit")
    return verdict(True, f"p95 {b_p95 or 0:.2f} → {c_p95 or 0:.2f} ms, errors {b_rate:.2%} → {c_rate:.2%}: "
                         "within limits")


# -- the deployer ---------------------------------------------------------------------------------------------------

class _LeaseLost(Exception):
    """This controller no longer drives the rollout: another one took over, or an operator stopped it."""


def _active_version(dev: DeviceRow, name: str) -> str:
    """The version of model ``name`` a device runs: from its description, else from its latest telemetry."""
    for b in dev.description.models if dev.description is not None else []:
        if b.name == name:
            return b.version
    for m in dev.models:
        if m.name == name:
            return m.version
    return ""


class Deployer:
    """Plans deployments, sends commands and runs each rollout in a thread of this controller."""

    def __init__(self, store: Store, fleet: str, library: BundleLibrary, publish: Publish, public_url: str,
                 *, owner: str = "controller", lease_s: float = 30.0, poll_s: float = 0.5,
                 bundle_base_url: str = "") -> None:
        if not lease_s > 2 * poll_s:
            raise InputError(f"lease_s must be more than twice poll_s ({poll_s:g} s), got {lease_s:g}")
        self.owner = owner
        self.lease_s = lease_s
        self.store = store
        self.fleet = fleet
        self.library = library
        self.publish = publish
        self.public_url = public_url.rstrip("/")
        # Where devices fetch bundles when a deployment names no URL of its own: a mirror of the bundle directory
        # (object storage, a CDN) holding <sha256>.efb; empty: this controller's /bundles.
        self.bundle_base_url = bundle_base_url
        self._urls: dict[str, dict[str, str]] = {}  # deployment -> sha256 -> URL devices fetch it from
        self.poll_s = poll_s
        self._threads: dict[str, threading.Thread] = {}
        self._stop = threading.Event()
        self._bundles: dict[str, BundleInfo] = {}  # verified once per deployment, not once per device

    def create(self, bundle_ids: Sequence[str], selector: Selector, policy: RolloutPolicy,
               *, start: bool = True, urls: Mapping[str, str] | None = None) -> Deployment:
        """Plan and store a deployment, refusing anything that cannot be right; then start its rollout.

        ``urls`` (sha256 -> http(s) URL) names where devices fetch a bundle instead of this controller; the bundle
        itself must still be uploaded here first, since the plan (target, version) and the command's sha256 and
        size come from the copy this controller verified. The controller never fetches those URLs.
        """
        if not bundle_ids:
            raise InputError("give at least one bundle")
        urls = dict(urls or {})
        unknown = sorted(set(urls) - set(bundle_ids))
        if unknown:
            raise InputError(f"a URL is given for bundle {unknown[0][:12]}…, which this deployment does not deploy")
        for u in urls.values():
            if not u.startswith(("http://", "https://")):
                raise InputError(f"bundle URLs must be http:// or https://, got {u[:80]!r}")
        bundles = [self.library.get(b) for b in dict.fromkeys(bundle_ids)]
        base = self.bundle_base_url.rstrip("/")
        bundles = [msgspec.structs.replace(b, url=urls.get(b.sha256) or (
            f"{base}/{bundle_filename(b.sha256)}" if base else "")) for b in bundles]
        self._bundles.update((b.sha256, b) for b in bundles)
        by_target: dict[str, BundleInfo] = {}
        for b in bundles:
            if b.target in by_target:
                raise InputError(f"two bundles for target {b.target!r}: {by_target[b.target].name} "
                                 f"{by_target[b.target].version} and {b.name} {b.version}")
            by_target[b.target] = b
        known = self.store.devices(self.fleet)
        selected = [d for d in known if selector.matches(d)]
        if not selected:
            raise InputError(f"selector {selector} matches no device ({len(known)} known in fleet {self.fleet!r})")
        profiles = {d.profile for d in selected}
        for b in bundles:
            if b.target not in profiles:
                raise InputError(f"bundle {b.name} {b.version} is for target {b.target!r}, but no selected device has "
                                 f"that profile (selected profiles: {', '.join(sorted(p or '?' for p in profiles))})")
        getting = [d for d in selected if d.profile in by_target]
        n_canary = 0
        if 0 < policy.canary_pct < 100:
            n_canary = min(len(getting), max(1, math.ceil(len(getting) * policy.canary_pct / 100.0)))
        canaries = {d.device for d in getting[:n_canary]}
        dep_id = time.strftime("d%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:6]
        targets = []
        for d in selected:
            chosen = by_target.get(d.profile)
            if chosen is None:
                targets.append(DeploymentTarget(device=d.device, profile=d.profile, phase="none", state="skipped",
                                                reason=f"no bundle for profile {d.profile or '(unknown)'}"))
                continue
            targets.append(DeploymentTarget(device=d.device, profile=d.profile, name=chosen.name,
                                            version=chosen.version, sha256=chosen.sha256,
                                            previous_version=_active_version(d, chosen.name),
                                            phase="canary" if d.device in canaries else "rest", state="pending"))
        now = time.time()
        deployment = Deployment(id=dep_id, fleet=self.fleet, created=now, updated=now,
                                state="canary" if n_canary else "rolling-out", selector=list(selector.terms),
                                canary_pct=policy.canary_pct, max_p95_regression=policy.max_p95_regression,
                                max_error_increase=policy.max_error_increase, bundles=bundles,
                                decision=DeploymentDecision(policy=policy), owner=self.owner)
        self.store.create_deployment(deployment, targets, lease_s=self.lease_s)
        if start:
            self._start(dep_id, policy)
        dep = self.store.deployment(dep_id)
        if dep is None:  # pragma: no cover - just written
            raise InputError(f"deployment {dep_id} vanished")
        return dep

    def _start(self, dep_id: str, policy: RolloutPolicy) -> None:
        t = threading.Thread(target=self._run, args=(dep_id, policy), name=f"rollout-{dep_id}", daemon=True)
        self._threads[dep_id] = t
        t.start()

    def adopt(self) -> list[str]:
        """Resume rollouts whose controller stopped or died (lease expired); returns the deployment ids taken."""
        if self._stop.is_set():
            return []
        ids = self.store.claim_deployments(self.fleet, self.owner, self.lease_s)
        for dep_id in ids:
            dep = self.store.deployment(dep_id)
            policy = dep.decision.policy if dep is not None else RolloutPolicy()
            log.warning("resuming the rollout of deployment %s (state %s) from another controller", dep_id,
                        dep.state if dep is not None else "?")
            self._start(dep_id, policy)
        return ids

    def stop(self) -> None:
        """Stop rollout threads; their deployments keep their state and are released for another controller."""
        self._stop.set()
        for t in self._threads.values():
            t.join(10)

    def wait(self, dep_id: str, timeout_s: float) -> None:
        """Wait for a rollout thread to finish (tests, CLI)."""
        t = self._threads.get(dep_id)
        if t is not None:
            t.join(timeout_s)

    # commands ------------------------------------------------------------------------------------------------------
    def _send_deploy(self, dep_id: str, t: DeploymentTarget) -> None:
        b = self._bundles.get(t.sha256)
        if b is None:  # a rollout resumed from another controller: verify its bundle once here
            b = self._bundles[t.sha256] = self.library.get(t.sha256)
        url = self._urls.get(dep_id, {}).get(b.sha256) or f"{self.public_url}/bundles/{bundle_filename(b.sha256)}"
        cmd = command("deploy", {"url": url, "sha256": b.sha256, "size": b.size})
        # The command id is stored before publishing, so a fast reply always finds its target; and only while this
        # controller holds the rollout's lease (fenced), so no device ever gets two deploys of one target. A deploy
        # the broker lost is sent again by the controller's Commander, like every other command.
        self._fenced_target(dep_id, t.device, cmd_id=cmd.id)
        self.publish(t.device, cmd)

    def _send_rollback(self, dep_id: str, device: str, name: str, *, fenced: bool = False) -> None:
        # The model name tells an agent serving several models which one to roll back.
        cmd = command("rollback", {"name": name} if name else {})
        if fenced:  # the rollout halting its canaries: only while it holds the lease
            self._fenced_target(dep_id, device, rollback_cmd_id=cmd.id)
        else:  # an operator's rollback
            self.store.update_target(dep_id, device, rollback_cmd_id=cmd.id)
        self.publish(device, cmd)

    def _fenced_target(self, dep_id: str, device: str, **fields: Any) -> None:
        if not self.store.update_target(dep_id, device, owner=self.owner, **fields):
            raise _LeaseLost(dep_id)

    def _fenced_deployment(self, dep_id: str, **kw: Any) -> None:
        if not self.store.update_deployment(dep_id, owner=self.owner, **kw):
            raise _LeaseLost(dep_id)

    def rollback(self, dep_id: str, devices: Sequence[str] | None = None) -> list[str]:
        """Send rollback commands to a deployment's active devices (all, or those listed); returns who got one.

        Rolling back a whole deployment first moves it out of the running states, which stops its rollout (the
        driving controller's next lease renewal fails), so no further device gets the bundle. A device that was
        still installing at that moment ends active: roll it back once it is (``--device``).
        """
        dep = self.store.deployment(dep_id)
        if dep is None or dep.fleet != self.fleet:
            raise InputError(f"no deployment {dep_id[:64]!r}")
        wanted = set(devices) if devices else None
        if wanted is None:
            self.store.update_deployment(dep_id, state="rolled-back", message="rollback requested")
            dep = self.store.deployment(dep_id) or dep
        sent = []
        for t in dep.targets or []:
            if t.state == "active" and (wanted is None or t.device in wanted):
                self._send_rollback(dep_id, t.device, t.name)
                sent.append(t.device)
        if wanted and not sent:
            raise InputError(f"none of {sorted(wanted)[:10]} is active in deployment {dep_id}")
        if wanted is None:
            self.store.update_deployment(dep_id, message=f"rollback sent to {len(sent)} devices")
        return sent

    # the rollout ---------------------------------------------------------------------------------------------------
    def _targets(self, dep_id: str, phase: str) -> list[DeploymentTarget]:
        dep = self.store.deployment(dep_id)
        return [t for t in (dep.targets or [] if dep is not None else []) if t.phase == phase]

    def _install(self, dep_id: str, phase: str, timeout_s: float) -> list[DeploymentTarget]:
        """Send deploy commands to one phase and wait until every target there is in a terminal state."""
        for t in self._targets(dep_id, phase):
            if t.state == "pending" and not t.cmd_id:
                self._send_deploy(dep_id, t)
        deadline = time.monotonic() + timeout_s
        while not self._stop.is_set():
            ts = self._targets(dep_id, phase)
            if all(t.state in TERMINAL_STATES for t in ts):
                return ts
            if time.monotonic() > deadline:
                for t in ts:
                    if t.state not in TERMINAL_STATES:
                        self._fenced_target(dep_id, t.device, state="failed",
                                            reason=f"no result within {timeout_s:g} s (last state {t.state})")
                return self._targets(dep_id, phase)
            self._pause(dep_id)
        return self._targets(dep_id, phase)

    def _halt(self, dep_id: str, canaries: Sequence[DeploymentTarget], why: str,
              decision: DeploymentDecision) -> None:
        """Record the verdict, roll back the active canaries, then mark the deployment halted.

        In that order, so a controller that dies half-way leaves a running deployment whose stored verdict says
        halt: the one that resumes it rolls back the canaries still without a rollback command, each once."""
        self._fenced_deployment(dep_id, message=why, decision=decision)
        rolled = 0
        for t in canaries:
            if t.state == "active" and not t.rollback_cmd_id:
                self._send_rollback(dep_id, t.device, t.name, fenced=True)
                rolled += 1
        self._fenced_deployment(dep_id, state="halted")
        log.warning("deployment %s halted: %s; rolling back %d canaries", dep_id, why, rolled)

    def _pause(self, dep_id: str) -> None:
        """Wait one poll period and renew this controller's lease on the rollout."""
        self._stop.wait(self.poll_s)
        if not self._stop.is_set() and not self.store.renew_lease(dep_id, self.owner, self.lease_s):
            raise _LeaseLost(dep_id)

    def _run(self, dep_id: str, policy: RolloutPolicy) -> None:
        try:
            self._rollout(dep_id, policy)
        except _LeaseLost:
            log.warning("deployment %s: no longer driven here (taken over by another controller, or rolled back)",
                        dep_id)
        except Exception as exc:
            log.exception("deployment %s failed", dep_id)
            self.store.update_deployment(dep_id, state="failed", message=f"controller error: {exc}"[:4000],
                                         owner=self.owner)
        finally:
            self._urls.pop(dep_id, None)
            if self._stop.is_set():
                # Stopping mid-rollout: release the lease so another controller resumes it at once.
                self.store.renew_lease(dep_id, self.owner, 0.0)

    def _rollout(self, dep_id: str, policy: RolloutPolicy) -> None:
        dep = self.store.deployment(dep_id)
        if dep is None:
            return
        # The URLs the deployment was planned with, whichever controller planned it.
        self._urls[dep_id] = {b.sha256: b.url for b in dep.bundles if b.url}
        decision = dep.decision
        canaries = self._targets(dep_id, "canary")
        judged = decision.canary or []
        if canaries and any(not v.proceed for v in judged):
            # Resumed after a controller judged the canaries bad and died halting: finish halting.
            self._halt(dep_id, canaries, dep.message or "; ".join(f"{v.bundle}: {v.reason}" for v in judged
                                                                  if not v.proceed)[:4000], decision)
            return
        # Resumed after the canaries passed: go straight to the rest (every step below is idempotent: commands go
        # only to targets that have none yet).
        if canaries and dep.state != "rolling-out":
            canaries = self._install(dep_id, "canary", policy.install_timeout_s)
            if self._stop.is_set():
                return
            failed = [t for t in canaries if t.state != "active"]
            if failed:
                why = f"{len(failed)} of {len(canaries)} canaries did not become active: " + "; ".join(
                    f"{t.device}: {t.reason or t.state}" for t in failed[:5])
                self._halt(dep_id, canaries, why[:4000], decision)
                return
            self._fenced_deployment(dep_id, state="observing", message="canaries active; comparing latency")
            verdicts = self._observe(dep_id, dep, canaries, policy)
            if self._stop.is_set():
                return
            decision = DeploymentDecision(policy=decision.policy, canary=verdicts)
            bad = [v for v in verdicts if not v.proceed]
            if bad:
                self._halt(dep_id, canaries, "; ".join(f"{v.bundle}: {v.reason}" for v in bad)[:4000], decision)
                return
            self._fenced_deployment(dep_id, state="rolling-out", decision=decision,
                                    message="; ".join(f"{v.bundle}: {v.reason}" for v in verdicts)[:4000])
        if self._stop.is_set():
            return
        rest = self._install(dep_id, "rest", policy.install_timeout_s)
        if self._stop.is_set():
            return
        failed = [t for t in rest if t.state != "active"]
        final = "completed" if not failed else "completed-with-failures"
        self._fenced_deployment(dep_id, state=final, decision=decision,
                                message=f"{len(rest) + len(canaries) - len(failed)} active, {len(failed)} failed")

    def _observe(self, dep_id: str, dep: Deployment, canaries: Sequence[DeploymentTarget],
                 policy: RolloutPolicy) -> list[CanaryVerdict]:
        """Wait for enough canary telemetry on the new version, then compare per bundle."""
        created = dep.created
        groups: dict[str, list[DeploymentTarget]] = {}
        for t in canaries:
            groups.setdefault(t.sha256, []).append(t)
        start = time.monotonic()
        while True:
            new: dict[str, list[TelemetryWindow]] = {}
            for sha, ts in groups.items():
                new[sha] = [w for t in ts for w in self.store.windows(
                    self.fleet, t.device, since=created, name=t.name, version=t.version, with_sketch=True)]
            enough = all(sum(w.count for w in ws) >= policy.min_samples for ws in new.values())
            elapsed = time.monotonic() - start
            if (enough and elapsed >= policy.observe_s) or elapsed >= 3 * policy.observe_s or self._stop.is_set():
                break
            self._pause(dep_id)
        verdicts = []
        canary_ids = {t.device for t in canaries}
        for sha, ts in groups.items():
            label = f"{ts[0].name} {ts[0].version} ({ts[0].profile})"
            if sum(w.count for w in new[sha]) < policy.min_samples:
                verdicts.append(CanaryVerdict(bundle=label, proceed=False,
                                              reason=f"fewer than {policy.min_samples} canary requests on the new "
                                                     f"version after {3 * policy.observe_s:g} s: cannot judge"))
                continue
            baseline = [w for t in ts if t.previous_version for w in self.store.windows(
                self.fleet, t.device, since=created - policy.baseline_s, until=created, name=t.name,
                version=t.previous_version, with_sketch=True)]
            if not baseline:
                prev = {t.previous_version for t in ts if t.previous_version}
                baseline = [w for v in prev for w in self.store.windows(
                    self.fleet, since=created, name=ts[0].name, version=v, with_sketch=True)
                    if w.device not in canary_ids]
            verdicts.append(compare(label, baseline, new[sha], policy))
        return verdicts
