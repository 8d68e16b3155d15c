"""Deployments: which device gets which bundle, staged with canaries, halted and rolled back by itself.

A deployment is planned against what the store knows (every device's retained status: profile and tags), then
driven by a rollout thread in the controller that created it. The thread only sends commands and reads the store;
per-device state moves as agents' events and replies arrive, on whichever controller ingests them (store.py):

    pending → downloading → verifying → self-test → active | failed (reason) | rolled-back;  skipped: no bundle

Rollout policy (``--canary N%``): the first ``ceil(N% of the devices that get a bundle)`` devices install first. When
all canaries are active, their telemetry on the new version is merged into one latency sketch per bundle and compared
with the same devices' sketch on the previous version before the deployment (or, if they have none, the rest of the
fleet's on the previous version meanwhile). p95 regressing by more than ``max_p95_regression`` or the error rate rising
by more than ``max_error_increase`` halts the deployment and rolls the canaries back; otherwise the rest install.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgefleet.sdk.bundle import VerifiedManifest, verify_bundle
from edgefleet.sdk.errors import BundleError, InputError
from edgefleet.sdk.keys import TrustedKeys
from edgefleet.sdk.protocol import check_id, command
from edgefleet.sdk.sketch import DDSketch

from .store import TERMINAL_STATES, Store

__all__ = ["BundleLibrary", "Decision", "Deployer", "RolloutPolicy", "Selector", "compare"]

log = logging.getLogger(__name__)
# A device that connected again this long ago and still has not reported progress on its deploy did not get it.
RESEND_GRACE_S = 5.0

Publish = Callable[[str, dict[str, Any]], None]  # (device, command) -> sent


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
                    raise InputError(f"selector {term!r}: use a device id, tag:NAME, profile:NAME or all")
                if term != "all":
                    check_id("selector value", value if value else term)
                terms.append(term)
        if not terms:
            raise InputError("empty selector: give --to with device ids, tag:NAME, profile:NAME or all")
        return cls(tuple(terms))

    def matches(self, dev: Mapping[str, Any]) -> bool:
        """True when a device row (from the store) is selected."""
        for term in self.terms:
            kind, _, value = term.partition(":")
            if term == "all":
                return True
            if not value and dev["device"] == term:
                return True
            if (kind == "device" and dev["device"] == value) or (kind == "profile" and dev["profile"] == value):
                return True
            if kind == "tag" and value in (dev.get("tags") or []):
                return True
        return False

    def __str__(self) -> str:
        return ",".join(self.terms)


# -- bundles --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoredBundle:
    """A verified bundle in the controller's bundle directory, served at ``/bundles/<sha256>.efb``."""

    sha256: str
    size: int
    name: str
    version: str
    target: str
    key_id: str

    @property
    def filename(self) -> str:
        """The file name it is stored and served under."""
        return f"{self.sha256}.efb"


class BundleLibrary:
    """Bundles the controller serves, stored by content hash; nothing enters it unverified."""

    def __init__(self, root: str | Path, trusted: TrustedKeys) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.trusted = trusted

    def path(self, sha256: str) -> Path:
        """Local path of a stored bundle (the name is validated: it becomes a file name)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise InputError(f"bundle id must be 64 lowercase hex digits, got {sha256[:70]!r}")
        return self.root / f"{sha256}.efb"

    def add(self, source: str | Path, label: str | None = None) -> StoredBundle:
        """Verify a bundle completely (signature by a trusted key, manifest, sizes, hashes), then store it.

        ``label`` names the bundle in error messages (default: the source path).
        """
        src = Path(source)
        if len(self.trusted) == 0:
            raise BundleError("the controller trusts no signing keys (--trust): it cannot verify any bundle")
        # Copy first, verify the copy: what is verified is exactly what is served (no swap after the check).
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", suffix=".efb", dir=self.root)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                while chunk := inp.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            try:
                vm = verify_bundle(tmp, self.trusted)
            except BundleError as exc:
                # Name what the operator gave us, not the controller's private temporary copy.
                raise type(exc)(str(exc).replace(str(tmp), label or str(src))) from exc
            sha = h.hexdigest()
            os.replace(tmp, self.path(sha))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self._entry(sha, vm)

    def get(self, sha256: str) -> StoredBundle:
        """A stored bundle, re-reading its manifest (signature checked)."""
        p = self.path(sha256)
        if not p.exists():
            raise InputError(f"no bundle {sha256[:12]}… on this controller; upload it first")
        return self._entry(sha256, verify_bundle(p, self.trusted))

    def _entry(self, sha: str, vm: VerifiedManifest) -> StoredBundle:
        m = vm.manifest
        return StoredBundle(sha, self.path(sha).stat().st_size, m.name, m.version, m.target, vm.key_id)


# -- policy and decision --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RolloutPolicy:
    """How a deployment is staged and when it halts itself."""

    canary_pct: float = 0.0
    max_p95_regression: float = 0.20
    max_error_increase: float = 0.01
    observe_s: float = 60.0
    min_samples: int = 200
    baseline_s: float = 900.0
    install_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.canary_pct <= 100.0:
            raise InputError(f"canary must be in 0..100 %, got {self.canary_pct}")
        if not self.max_p95_regression >= 0.0:
            raise InputError(f"max_p95_regression must be >= 0, got {self.max_p95_regression}")
        if not 0.0 <= self.max_error_increase <= 1.0:
            raise InputError(f"max_error_increase must be in 0..1, got {self.max_error_increase}")
        for name in ("observe_s", "baseline_s", "install_timeout_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.min_samples < 1:
            raise InputError(f"min_samples must be >= 1, got {self.min_samples}")


@dataclass(frozen=True)
class Decision:
    """The canary verdict for one bundle, with the numbers it rests on."""

    bundle: str
    proceed: bool
    reason: str
    baseline_p95: float | None = None
    canary_p95: float | None = None
    baseline_error_rate: float | None = None
    canary_error_rate: float | None = None
    baseline_count: int = 0
    canary_count: int = 0


def _stats(windows: Sequence[Mapping[str, Any]]) -> tuple[DDSketch, int, int]:
    sk = DDSketch.merged(DDSketch.from_dict(w["sketch"]) for w in windows)
    return sk, sk.count, sum(int(w["errors"]) for w in windows)


def compare(bundle: str, baseline: Sequence[Mapping[str, Any]], canary: Sequence[Mapping[str, Any]],
            policy: RolloutPolicy) -> Decision:
    """Compare merged sketches and error rates of baseline and canary windows under ``policy``."""
    c_sk, c_n, c_err = _stats(canary)
    c_p95 = c_sk.quantile(0.95)
    c_rate = c_err / (c_n + c_err) if c_n + c_err else 0.0
    if not baseline:
        return Decision(bundle, True, "no telemetry on the previous version to compare with: proceeding",
                        canary_p95=c_p95, canary_error_rate=c_rate, canary_count=c_n)
    b_sk, b_n, b_err = _stats(baseline)
    b_p95 = b_sk.quantile(0.95)
    b_rate = b_err / (b_n + b_err) if b_n + b_err else 0.0
    nums = dict(baseline_p95=b_p95, canary_p95=c_p95, baseline_error_rate=b_rate, canary_error_rate=c_rate,
                baseline_count=b_n, canary_count=c_n)
    if b_p95 is not None and c_p95 is not None and c_p95 > b_p95 * (1.0 + policy.max_p95_regression):
        return Decision(bundle, False, f"p95 regressed {c_p95 / b_p95 - 1:+.0%} ({b_p95:.2f} → {c_p95:.2f} ms), "
                                       f"over the {policy.max_p95_regression:.0%} limit", **nums)
    if c_rate > b_rate + policy.max_error_increase:
        return Decision(bundle, False, f"error rate rose from {b_rate:.2%} to {c_rate:.2%}, over the "
                                       f"+{policy.max_error_increase:.2%} limit", **nums)
    return Decision(bundle, True, f"p95 {b_p95 or 0:.2f} → {c_p95 or 0:.2f} ms, errors {b_rate:.2%} → {c_rate:.2%}: "
                                  "within limits", **nums)


# -- the deployer ---------------------------------------------------------------------------------------------------

class _LeaseLost(Exception):
    """This controller no longer drives the rollout: another one took over, or an operator stopped it."""


def _active_version(dev: Mapping[str, Any], name: str) -> str:
    """The version of model ``name`` a device runs: from its description (agent: ``models``), else telemetry."""
    desc = dev.get("description") or {}
    for b in [*(desc.get("models") or []), *(desc.get("bundles") or [])]:
        if isinstance(b, dict) and b.get("name") == name:
            return str(b.get("version", ""))
    for m in dev.get("models") or []:
        if m.get("name") == name:
            return str(m.get("version", ""))
    return ""


class Deployer:
    """Plans deployments, sends commands and runs each rollout in a thread of this controller."""

    def __init__(self, store: Store, fleet: str, library: BundleLibrary, publish: Publish, public_url: str,
                 *, owner: str = "controller", lease_s: float = 30.0, poll_s: float = 0.5) -> None:
        if not lease_s > 2 * poll_s:
            raise InputError(f"lease_s must be more than twice poll_s ({poll_s:g} s), got {lease_s:g}")
        self.owner = owner
        self.lease_s = lease_s
        self.store = store
        self.fleet = fleet
        self.library = library
        self.publish = publish
        self.public_url = public_url.rstrip("/")
        self.poll_s = poll_s
        self._threads: dict[str, threading.Thread] = {}
        self._stop = threading.Event()
        self._bundles: dict[str, StoredBundle] = {}  # verified once per deployment, not once per device
        self._sent_at: dict[tuple[str, str], float] = {}  # (deployment, device) -> when its deploy went out
        self._resend_check: dict[str, float] = {}  # deployment -> when to look for lost commands next
        self.resent = 0

    def create(self, bundle_ids: Sequence[str], selector: Selector, policy: RolloutPolicy,
               *, start: bool = True) -> dict[str, Any]:
        """Plan and store a deployment, refusing anything that cannot be right; then start its rollout."""
        if not bundle_ids:
            raise InputError("give at least one bundle")
        bundles = [self.library.get(b) for b in dict.fromkeys(bundle_ids)]
        self._bundles.update((b.sha256, b) for b in bundles)
        by_target: dict[str, StoredBundle] = {}
        for b in bundles:
            if b.target in by_target:
                raise InputError(f"two bundles for target {b.target!r}: {by_target[b.target].name} "
                                 f"{by_target[b.target].version} and {b.name} {b.version}")
            by_target[b.target] = b
        known = self.store.devices(self.fleet)
        selected = [d for d in known if selector.matches(d)]
        if not selected:
            raise InputError(f"selector {selector} matches no device ({len(known)} known in fleet {self.fleet!r})")
        profiles = {d["profile"] for d in selected}
        for b in bundles:
            if b.target not in profiles:
                raise InputError(f"bundle {b.name} {b.version} is for target {b.target!r}, but no selected device has "
                                 f"that profile (selected profiles: {', '.join(sorted(p or '?' for p in profiles))})")
        getting = [d for d in selected if d["profile"] in by_target]
        n_canary = 0
        if 0 < policy.canary_pct < 100:
            n_canary = min(len(getting), max(1, math.ceil(len(getting) * policy.canary_pct / 100.0)))
        canaries = {d["device"] for d in getting[:n_canary]}
        dep_id = time.strftime("d%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:6]
        targets = []
        for d in selected:
            chosen = by_target.get(d["profile"])
            if chosen is None:
                targets.append({"device": d["device"], "profile": d["profile"], "phase": "none", "state": "skipped",
                                "reason": f"no bundle for profile {d['profile'] or '(unknown)'}"})
                continue
            targets.append({"device": d["device"], "profile": d["profile"], "name": chosen.name,
                            "version": chosen.version, "sha256": chosen.sha256,
                            "previous_version": _active_version(d, chosen.name),
                            "phase": "canary" if d["device"] in canaries else "rest", "state": "pending"})
        deployment = {"id": dep_id, "fleet": self.fleet, "created": time.time(),
                      "state": "canary" if n_canary else "rolling-out", "selector": list(selector.terms),
                      "canary_pct": policy.canary_pct, "max_p95_regression": policy.max_p95_regression,
                      "max_error_increase": policy.max_error_increase,
                      "bundles": [asdict(b) for b in bundles], "decision": {"policy": asdict(policy)},
                      "owner": self.owner, "lease_until": time.time() + self.lease_s}
        self.store.create_deployment(deployment, targets)
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
        now = time.time()
        ids = self.store.claim_deployments(self.fleet, self.owner, now, now + self.lease_s)
        for dep_id in ids:
            dep = self.store.deployment(dep_id) or {}
            policy = RolloutPolicy(**(dep.get("decision") or {}).get("policy", {}))
            log.warning("resuming the rollout of deployment %s (state %s) from another controller", dep_id,
                        dep.get("state"))
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
    def _send_deploy(self, dep_id: str, t: Mapping[str, Any], cmd_id: str | None = None) -> None:
        b = self._bundles.get(t["sha256"])
        if b is None:  # a rollout resumed from another controller: verify its bundle once here
            b = self._bundles[t["sha256"]] = self.library.get(t["sha256"])
        cmd = command("deploy", {"url": f"{self.public_url}/bundles/{b.filename}", "sha256": b.sha256,
                                 "size": b.size}, cmd_id=cmd_id)
        if cmd_id is None:
            # The command id is stored before publishing, so a fast reply always finds its target.
            self.store.update_target(dep_id, t["device"], cmd_id=cmd["id"])
        self._sent_at[(dep_id, t["device"])] = time.time()
        self.publish(t["device"], cmd)

    def _resend_lost(self, dep_id: str, targets: Sequence[Mapping[str, Any]]) -> None:
        """Send a deploy again, same id, to a device that connected after it went out and has not started on it.

        The broker queues a command for an offline device in its session, but a broker that loses its state (killed
        before its next autosave, a replaced node, a lost disk; Mosquitto 2.0.11 also forgets a session that began
        with clean start) loses the command with it. The agent runs a command id once, so a copy it did get only
        makes it send its progress again.
        """
        now = time.time()
        if now < self._resend_check.get(dep_id, 0.0):
            return  # the rollout polls every poll_s; a lost command is looked for every RESEND_GRACE_S
        self._resend_check[dep_id] = now + RESEND_GRACE_S
        for t in targets:
            if t["state"] != "pending" or not t["cmd_id"]:
                continue
            sent = self._sent_at.setdefault((dep_id, t["device"]), float(t.get("updated") or now))
            if now - sent <= RESEND_GRACE_S:
                continue  # just sent: no device lookup
            dev = self.store.device(self.fleet, t["device"])
            if dev and dev["state"] == "online" and dev["status_ts"] > sent and now - dev["status_ts"] > RESEND_GRACE_S:
                log.warning("deployment %s: %s reconnected without starting command %s; sending it again", dep_id,
                            t["device"], t["cmd_id"])
                self._send_deploy(dep_id, t, cmd_id=t["cmd_id"])
                self.resent += 1

    def _send_rollback(self, dep_id: str, device: str, name: str) -> None:
        # The model name tells an agent serving several models which one to roll back.
        cmd = command("rollback", {"name": name} if name else {})
        self.store.update_target(dep_id, device, rollback_cmd_id=cmd["id"])
        self.publish(device, cmd)

    def rollback(self, dep_id: str, devices: Sequence[str] | None = None) -> list[str]:
        """Send rollback commands to a deployment's active devices (all, or those listed); returns who got one.

        Rolling back a whole deployment first moves it out of the running states, which stops its rollout (the
        driving controller's next lease renewal fails), so no further device gets the bundle. A device that was
        still installing at that moment ends active: roll it back once it is (``--device``).
        """
        dep = self.store.deployment(dep_id)
        if dep is None:
            raise InputError(f"no deployment {dep_id!r}")
        wanted = set(devices) if devices else None
        if wanted is None:
            self.store.update_deployment(dep_id, state="rolled-back", message="rollback requested")
            dep = self.store.deployment(dep_id) or dep
        sent = []
        for t in dep["targets"]:
            if t["state"] == "active" and (wanted is None or t["device"] in wanted):
                self._send_rollback(dep_id, t["device"], t["name"])
                sent.append(t["device"])
        if wanted and not sent:
            raise InputError(f"none of {sorted(wanted)} is active in deployment {dep_id}")
        if wanted is None:
            self.store.update_deployment(dep_id, message=f"rollback sent to {len(sent)} devices")
        return sent

    # the rollout ---------------------------------------------------------------------------------------------------
    def _targets(self, dep_id: str, phase: str) -> list[dict[str, Any]]:
        dep = self.store.deployment(dep_id)
        return [t for t in (dep or {}).get("targets", []) if t["phase"] == phase]

    def _install(self, dep_id: str, phase: str, timeout_s: float) -> list[dict[str, Any]]:
        """Send deploy commands to one phase and wait until every target there is in a terminal state."""
        for t in self._targets(dep_id, phase):
            if t["state"] == "pending" and not t["cmd_id"]:
                self._send_deploy(dep_id, t)
        deadline = time.monotonic() + timeout_s
        while not self._stop.is_set():
            ts = self._targets(dep_id, phase)
            if all(t["state"] in TERMINAL_STATES for t in ts):
                return ts
            self._resend_lost(dep_id, ts)
            if time.monotonic() > deadline:
                for t in ts:
                    if t["state"] not in TERMINAL_STATES:
                        self.store.update_target(dep_id, t["device"], state="failed",
                                                 reason=f"no result within {timeout_s:g} s (last state {t['state']})")
                return self._targets(dep_id, phase)
            self._pause(dep_id)
        return self._targets(dep_id, phase)

    def _halt(self, dep_id: str, canaries: Sequence[Mapping[str, Any]], why: str, decision: dict[str, Any]) -> None:
        self.store.update_deployment(dep_id, state="halted", message=why, decision=decision)
        for t in canaries:
            if t["state"] == "active":
                self._send_rollback(dep_id, t["device"], t["name"])
        log.warning("deployment %s halted: %s; rolling back %d canaries", dep_id, why,
                    sum(1 for t in canaries if t["state"] == "active"))

    def _pause(self, dep_id: str) -> None:
        """Wait one poll period and renew this controller's lease on the rollout."""
        self._stop.wait(self.poll_s)
        if not self._stop.is_set() and not self.store.renew_lease(dep_id, self.owner, time.time() + self.lease_s):
            raise _LeaseLost(dep_id)

    def _run(self, dep_id: str, policy: RolloutPolicy) -> None:
        try:
            self._rollout(dep_id, policy)
        except _LeaseLost:
            log.warning("deployment %s: no longer driven here (taken over by another controller, or rolled back)",
                        dep_id)
        except Exception as exc:
            log.exception("deployment %s failed", dep_id)
            self.store.update_deployment(dep_id, state="failed", message=f"controller error: {exc}")
        finally:
            self._resend_check.pop(dep_id, None)
            for key in [k for k in self._sent_at if k[0] == dep_id]:
                del self._sent_at[key]
            if self._stop.is_set():
                # Stopping mid-rollout: release the lease so another controller resumes it at once.
                self.store.renew_lease(dep_id, self.owner, 0.0)

    def _rollout(self, dep_id: str, policy: RolloutPolicy) -> None:
        dep = self.store.deployment(dep_id) or {}
        decision: dict[str, Any] = dict(dep.get("decision") or {})
        canaries = self._targets(dep_id, "canary")
        # Resumed after the canaries passed: go straight to the rest (every step below is idempotent: commands go
        # only to targets that have none yet).
        if canaries and dep.get("state") != "rolling-out":
            canaries = self._install(dep_id, "canary", policy.install_timeout_s)
            if self._stop.is_set():
                return
            failed = [t for t in canaries if t["state"] != "active"]
            if failed:
                why = f"{len(failed)} of {len(canaries)} canaries did not become active: " + "; ".join(
                    f"{t['device']}: {t['reason'] or t['state']}" for t in failed[:5])
                self._halt(dep_id, canaries, why, decision)
                return
            self.store.update_deployment(dep_id, state="observing", message="canaries active; comparing latency")
            verdicts = self._observe(dep_id, dep, canaries, policy)
            if self._stop.is_set():
                return
            decision["canary"] = [asdict(v) for v in verdicts]
            bad = [v for v in verdicts if not v.proceed]
            if bad:
                self._halt(dep_id, canaries, "; ".join(f"{v.bundle}: {v.reason}" for v in bad), decision)
                return
            self.store.update_deployment(dep_id, state="rolling-out", decision=decision,
                                         message="; ".join(f"{v.bundle}: {v.reason}" for v in verdicts))
        if self._stop.is_set():
            return
        rest = self._install(dep_id, "rest", policy.install_timeout_s)
        if self._stop.is_set():
            return
        failed = [t for t in rest if t["state"] != "active"]
        final = "completed" if not failed else "completed-with-failures"
        self.store.update_deployment(dep_id, state=final, decision=decision,
                                     message=f"{len(rest) + len(canaries) - len(failed)} active, {len(failed)} failed")

    def _observe(self, dep_id: str, dep: Mapping[str, Any], canaries: Sequence[Mapping[str, Any]],
                 policy: RolloutPolicy) -> list[Decision]:
        """Wait for enough canary telemetry on the new version, then compare per bundle."""
        created = float(dep["created"])
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for t in canaries:
            groups.setdefault(t["sha256"], []).append(t)
        start = time.monotonic()
        while True:
            new: dict[str, list[dict[str, Any]]] = {}
            for sha, ts in groups.items():
                new[sha] = [w for t in ts for w in self.store.windows(
                    self.fleet, t["device"], since=created, name=t["name"], version=t["version"], with_sketch=True)]
            enough = all(sum(w["count"] for w in ws) >= policy.min_samples for ws in new.values())
            elapsed = time.monotonic() - start
            if (enough and elapsed >= policy.observe_s) or elapsed >= 3 * policy.observe_s or self._stop.is_set():
                break
            self._pause(dep_id)
        verdicts = []
        for sha, ts in groups.items():
            label = f"{ts[0]['name']} {ts[0]['version']} ({ts[0]['profile']})"
            if sum(w["count"] for w in new[sha]) < policy.min_samples:
                verdicts.append(Decision(label, False, f"fewer than {policy.min_samples} canary requests on the new "
                                                       f"version after {3 * policy.observe_s:g} s: cannot judge"))
                continue
            baseline = [w for t in ts if t["previous_version"] for w in self.store.windows(
                self.fleet, t["device"], since=created - policy.baseline_s, until=created, name=t["name"],
                version=t["previous_version"], with_sketch=True)]
            if not baseline:
                prev = {t["previous_version"] for t in ts if t["previous_version"]}
                baseline = [w for v in prev for w in self.store.windows(
                    self.fleet, since=created, name=ts[0]["name"], version=v, with_sketch=True)
                    if w["device"] not in {t["device"] for t in canaries}]
            verdicts.append(compare(label, baseline, new[sha], policy))
        return verdicts

