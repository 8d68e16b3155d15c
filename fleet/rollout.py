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
* **Canaries** (``--canary N%``): per target, at least ``min_canary_devices`` devices drawn at random with a
  recorded seed install first (:mod:`.canary`); the controller looks at their telemetry at 1, 1.5, 2, 2.5 and 3
  times ``observe_s`` and halts (rolling the canaries back, or removing a first version) as soon as a regression is
  shown, proceeds once the confidence interval of the p95 ratio lies within the limit, and halts as "cannot judge"
  when the last look still cannot tell. No target is left ``pending``: a halted deployment marks the devices it
  never sent to ``skipped``.
"""

from __future__ import annotations

import logging
import random
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

from . import canary as _canary
from .bundles import BundleLibrary, bundle_filename
from .store.base import Store

__all__ = ["Deployer", "Selector", "TargetMove", "advances", "target_moves"]

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
        if not profiles & set(by_target):
            raise InputError(f"no selected device has the target of any bundle (bundles for "
                             f"{', '.join(sorted(by_target))}; selected profiles: "
                             f"{', '.join(sorted(p or '?' for p in profiles))})")
        # A bundle whose target no selected device has stays in the deployment (the targets show it got no device):
        # one release, one bundle per target, deployed to whatever part of the fleet is selected.
        if policy.seed is None:
            policy = msgspec.structs.replace(policy, seed=random.SystemRandom().randrange(2**62))
        by_profile: dict[str, list[str]] = {}
        for d in selected:
            if d.profile in by_target:
                by_profile.setdefault(d.profile, []).append(d.device)
        canaries = _canary.choose_canaries(by_profile, policy.canary_pct, policy.min_canary_devices,
                                           policy.seed or 0)
        n_canary = len(canaries)
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
            log.info("resuming the rollout of deployment %s (state %s) from another controller", dep_id,
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
    def _send_deploy(self, dep_id: str, t: DeploymentTarget, split: Mapping[str, float] | None = None) -> None:
        b = self._bundles.get(t.sha256)
        if b is None:  # a rollout resumed from another controller: verify its bundle once here
            b = self._bundles[t.sha256] = self.library.get(t.sha256)
        url = self._urls.get(dep_id, {}).get(b.sha256) or f"{self.public_url}/bundles/{bundle_filename(b.sha256)}"
        cmd = command("deploy", {"url": url, "sha256": b.sha256, "size": b.size, **(split or {})})
        # The command id is stored before publishing, so a fast reply always finds its target; and only while this
        # controller holds the rollout's lease (fenced), so no device ever gets two deploys of one target. A deploy
        # the broker lost is sent again by the controller's Commander, like every other command.
        self._fenced_target(dep_id, t.device, cmd_id=cmd.id)
        self.publish(t.device, cmd)

    def _send_rollback(self, dep_id: str, t: DeploymentTarget, *, fenced: bool = False) -> None:
        """Undo a target: ``rollback`` to the version it ran before, or ``remove`` a first version (it ran none)."""
        # The model name tells an agent serving several models which one to roll back.
        if t.previous_version:
            cmd = command("rollback", {"name": t.name} if t.name else {})
        else:
            cmd = command("remove", {"name": t.name})
        if fenced:  # the rollout halting its canaries: only while it holds the lease
            self._fenced_target(dep_id, t.device, rollback_cmd_id=cmd.id)
        else:  # an operator's rollback
            self.store.update_target(dep_id, t.device, rollback_cmd_id=cmd.id)
        self.publish(t.device, cmd)

    def _skip_unsent(self, dep_id: str, why: str, *, fenced: bool) -> int:
        """Mark every target that never got its deploy command ``skipped``: a stopped rollout leaves none pending."""
        dep = self.store.deployment(dep_id)
        n = 0
        for t in (dep.targets or []) if dep is not None else []:
            if t.state == "pending" and not t.cmd_id:
                if fenced:
                    self._fenced_target(dep_id, t.device, state="skipped", reason=why)
                else:
                    self.store.update_target(dep_id, t.device, state="skipped", reason=why)
                n += 1
        return n

    def _fenced_target(self, dep_id: str, device: str, **fields: Any) -> None:
        if not self.store.update_target(dep_id, device, owner=self.owner, **fields):
            raise _LeaseLost(dep_id)

    def _fenced_deployment(self, dep_id: str, **kw: Any) -> None:
        if not self.store.update_deployment(dep_id, owner=self.owner, **kw):
            raise _LeaseLost(dep_id)

    def rollback(self, dep_id: str, devices: Sequence[str] | None = None) -> list[str]:
        """Send rollback commands to a deployment's active devices (all, or those listed); returns who got one.

        A device the deployment gave its first version of the model (no previous version) gets ``remove``: rolling
        back means running what it ran before, which was nothing.

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
                self._send_rollback(dep_id, t)
                sent.append(t.device)
        if wanted is None:
            self._skip_unsent(dep_id, "not sent: the deployment was rolled back", fenced=False)
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
        split: dict[str, float] = {}
        dep = self.store.deployment(dep_id)
        policy = dep.decision.policy if dep is not None else None
        if phase == "canary" and policy is not None and policy.canary_split > 0:
            # Canaries keep their previous version on a share of the requests while judged, and a while after (the
            # last look comes at most LOOKS[-1] x observe after the last canary is active): fleet/canary.py
            split = {"split_pct": policy.canary_split,
                     "split_s": _canary.LOOKS[-1] * policy.observe_s + min(timeout_s, 120.0)}
        for t in self._targets(dep_id, phase):
            if t.state == "pending" and not t.cmd_id:
                self._send_deploy(dep_id, t, split if t.previous_version else None)
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
        """Record the verdict, undo the active canaries, skip the devices never sent to, then mark it halted.

        In that order, so a controller that dies half-way leaves a running deployment whose stored verdict says
        halt: the one that resumes it rolls back the canaries still without a rollback command, each once. A canary
        that got the first version of a model (none before) has it removed."""
        self._fenced_deployment(dep_id, message=why, decision=decision)
        rolled = 0
        for t in canaries:
            if t.state == "active" and not t.rollback_cmd_id:
                self._send_rollback(dep_id, t, fenced=True)
                rolled += 1
        skipped = self._skip_unsent(dep_id, "not sent: the deployment halted", fenced=True)
        self._fenced_deployment(dep_id, state="halted")
        log.warning("deployment %s halted: %s; undoing %d canaries, %d devices not sent to", dep_id, why, rolled,
                    skipped)

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
        """Judge each bundle's canaries at the looks of :mod:`.canary` until every bundle has a verdict (or one halts).

        Between looks the latest state (requests so far and needed, time, the last look's interval) is written to
        ``decision.observing`` every couple of seconds, so ``deploy --wait`` and the dashboard can show it.
        """
        groups: dict[str, list[DeploymentTarget]] = {}
        for t in canaries:
            groups.setdefault(t.sha256, []).append(t)
        rest = self._targets(dep_id, "rest")
        # Observation starts when the last canary became active (store time: a resuming controller continues it).
        start = max((t.activated for t in canaries), default=0.0) or time.time()
        looks = [m * policy.observe_s for m in _canary.LOOKS]
        seed = policy.seed or 0
        decided: dict[str, CanaryVerdict] = {}
        latest: dict[str, CanaryVerdict] = {}
        next_look = sum(1 for x in looks if time.time() - start >= x + 5.0)  # resumed: looks long past are gone
        next_progress = 0.0
        while not self._stop.is_set():
            elapsed = time.time() - start
            look = next_look < len(looks) and elapsed >= looks[next_look]
            if look or time.monotonic() >= next_progress:
                final = look and next_look == len(looks) - 1
                for sha, ts in groups.items():
                    if sha in decided:
                        continue
                    v = self._judge(dep, ts, [t for t in rest if t.sha256 == sha], policy, start, elapsed,
                                    final=final, full=look, seed=seed + next_look, last=latest.get(sha))
                    latest[sha] = v
                    if look and v.outcome != "observing":
                        decided[sha] = v
                if look:
                    next_look += 1
                if any(v.outcome in ("halt", "cannot-judge") for v in decided.values()) or \
                        len(decided) == len(groups):
                    break
                self._fenced_deployment(dep_id, decision=DeploymentDecision(
                    policy=dep.decision.policy, observing=[latest[s] for s in groups if s in latest]))
                next_progress = time.monotonic() + 2.0
            self._pause(dep_id)
        out = []
        for sha, ts in groups.items():
            if sha in decided:
                out.append(decided[sha])
            else:  # another bundle's canaries halted the deployment first
                last = latest.get(sha)
                out.append(CanaryVerdict(bundle=_label(ts[0]), proceed=False, outcome="cannot-judge",
                                         reason="not judged: another bundle's canaries halted the deployment",
                                         canary_count=last.canary_count if last is not None else 0))
        return out

    def _judge(self, dep: Deployment, canaries: Sequence[DeploymentTarget], controls: Sequence[DeploymentTarget],
               policy: RolloutPolicy, start: float, elapsed: float, *, final: bool, full: bool, seed: int,
               last: CanaryVerdict | None = None) -> CanaryVerdict:
        """One bundle's verdict from the store's windows; ``full`` False gives a progress note without statistics
        (counts only), as between looks."""
        created = dep.created
        first = not any(t.previous_version for t in canaries)

        def windows(t: DeploymentTarget, version: str, since: float, until: float = float("inf")
                    ) -> list[TelemetryWindow]:
            return self.store.windows(self.fleet, t.device, since=since, until=until, name=t.name, version=version,
                                      with_sketch=full)

        def since_activation(t: DeploymentTarget, version: str) -> list[TelemetryWindow]:
            # The window the install ran in is not judged, nor the first one after it (a new session warms up). The
            # previous version's windows since then come from its share of a traffic split.
            ws = [w for w in windows(t, version, created) if w.ts - w.interval_s >= (t.activated or created)]
            return ws[1:]

        cans = [_canary.DeviceWindows(
            t.device, windows(t, t.previous_version, created - policy.baseline_s, created)
            if t.previous_version else [], since_activation(t, t.version),
            since_activation(t, t.previous_version) if t.previous_version and policy.canary_split > 0 else [])
            for t in canaries]
        ctls = [_canary.DeviceWindows(
            t.device, windows(t, t.previous_version, created - policy.baseline_s, created),
            windows(t, t.previous_version, start)) for t in controls if t.previous_version and not t.cmd_id]
        if not full:
            n = sum(w.count for u in cans for w in u.after)
            need = last.needed_count if last is not None and last.needed_count else _canary.requests_needed(policy)
            nxt = next((m * policy.observe_s for m in _canary.LOOKS if m * policy.observe_s > elapsed),
                       _canary.LOOKS[-1] * policy.observe_s)
            keep = {} if last is None else {k: getattr(last, k) for k in (
                "p95_ratio", "ratio_low", "ratio_high", "devices", "controls", "baseline_p95", "canary_p95")}
            return CanaryVerdict(bundle=_label(canaries[0]), proceed=False, outcome="observing",
                                 reason=(last.reason.split(" (next look")[0] if last is not None
                                         else "waiting for canary telemetry") + f" (next look at {nxt:.0f} s)",
                                 canary_count=n, needed_count=need,
                                 elapsed_s=round(elapsed, 1), max_s=_canary.LOOKS[-1] * policy.observe_s,
                                 confidence=_canary.CONFIDENCE, **keep)
        return _canary.judge(_label(canaries[0]), cans, ctls, policy, elapsed_s=elapsed, final=final, first=first,
                             seed=seed)


def _label(t: DeploymentTarget) -> str:
    return f"{t.name} {t.version} ({t.profile})"
