"""Output drift on the controller: each device's output statistic against the bundle's reference, and a canary's
against its own previous version.

Agents send, in every telemetry window, a sketch of a per-model output statistic (``sdk/outputs.py``: top-1
confidence, top detection score or output norm); the bundle's manifest records the statistic's distribution over
the validation data. **The distance** is :func:`edgefleet.sdk.outputs.quantile_distance` between the 19 quantiles
(5%..95%) of the two distributions: the mean absolute quantile difference divided by the reference's 5%-95% range
(a discretised Wasserstein-1 distance, scale-free). **The noise** of a distance measured on ``n`` values is
estimated by splitting the device's windows into two halves (in time) and measuring the distance between them: a
device drifts when its distance exceeds the threshold **plus** that split-half distance, with at least
``min_values`` values; fewer values: cannot judge, no event.

:class:`DriftMonitor` runs in the controller every ``drift_interval_s``: for every (model, version) the controller
holds a bundle of (its reference), each device's windows of the last ``drift_window_s`` are judged against the
reference and, when at least :data:`MIN_FLEET` other devices run the version with enough values, against theirs
merged (the fleet); a device that drifts gets a ``drift`` event (level warning, stored with the device's other events,
``data.against`` saying which comparison, once per device, version and comparison until it comes back within the
threshold). :func:`canary_drift` is the canary rule (``fleet/canary.py``).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.sdk.outputs import QUANTILES, quantile_distance, reference_from_metadata
from edgefleet.sdk.protocol import Event, OutputWindow, TelemetryWindow
from edgefleet.sdk.sketch import DDSketch

__all__ = ["DRIFT_BOOT", "MIN_FLEET", "DriftFinding", "DriftMonitor", "canary_drift", "judge_device",
           "merged_quantiles"]

log = logging.getLogger("edgefleet.fleet.drift")
MIN_FLEET = 3
"""Other devices on a version (each with enough values) needed to judge a device against the fleet."""
DRIFT_BOOT = "controller.drift"
"""The boot of drift events (the controller records them; an agent's event claiming it is not stored as one)."""


def merged_quantiles(outputs: Iterable[OutputWindow | None]) -> tuple[list[float], int] | None:
    """The 19 quantiles of merged output sketches and how many values they hold (None: no values)."""
    sk = DDSketch()
    for o in outputs:
        if o is not None and o.sketch.count:
            sk.merge(DDSketch.from_wire(o.sketch))
    if sk.count == 0:
        return None
    return [float(sk.quantile(q) or 0.0) for q in QUANTILES], sk.count


@dataclass(frozen=True)
class DriftFinding:
    """One device's output distribution against a reference: the distance, its noise and the verdict."""

    device: str
    name: str
    version: str
    stat: str
    distance: float | None
    noise: float | None
    values: int
    drifted: bool
    reason: str
    against: str = "reference"  # "reference" (the bundle's validation data) or "fleet" (the version's other devices)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (event data)."""
        return {"device": self.device, "name": self.name, "version": self.version, "stat": self.stat,
                "against": self.against,
                "distance": None if self.distance is None else round(self.distance, 4),
                "noise": None if self.noise is None else round(self.noise, 4), "values": self.values,
                "drifted": self.drifted, "reason": self.reason}


def _split_half(windows: Sequence[TelemetryWindow]) -> float | None:
    """The distance between the first and the second half of the windows (in time): the noise a distance on
    this many values shows with no drift at all."""
    ws = sorted((w for w in windows if w.output is not None), key=lambda w: w.ts)
    if len(ws) < 4:
        return None
    a = merged_quantiles(w.output for w in ws[:len(ws) // 2])
    b = merged_quantiles(w.output for w in ws[len(ws) // 2:])
    if a is None or b is None:
        return None
    return quantile_distance(a[0], b[0])


def judge_device(device: str, name: str, version: str, windows: Sequence[TelemetryWindow],
                 reference: Sequence[float], *, threshold: float, min_values: int,
                 against: str = "reference") -> DriftFinding:
    """One device's windows of one version against ``reference`` (19 quantiles)."""
    stat = next((w.output.stat for w in windows if w.output is not None), "")
    got = merged_quantiles(w.output for w in windows)
    if got is None:
        return DriftFinding(device, name, version, stat, None, None, 0, False, "no output statistics", against)
    q, n = got
    d = quantile_distance(reference, q)
    if n < min_values:
        return DriftFinding(device, name, version, stat, d, None, n, False,
                            f"cannot judge: {n} values, at least {min_values} needed", against)
    noise = _split_half(windows) or 0.0
    drifted = d > threshold + noise
    what = "the reference" if against == "reference" else "the rest of the fleet on this version"
    reason = (f"{stat} distribution {d:.3f} from {what} (threshold {threshold:g} + noise {noise:.3f}, "
              f"{n} values): " + ("drifted" if drifted else "within"))
    return DriftFinding(device, name, version, stat, d, noise, n, drifted, reason, against)


def canary_drift(before: Mapping[str, Sequence[TelemetryWindow]], after: Mapping[str, Sequence[TelemetryWindow]],
                 *, threshold: float, min_values: int) -> tuple[bool | None, float | None, str]:
    """The canary rule: per canary device, its output distribution on the new version against its own on the
    previous version (the baseline), the median over devices judged. Returns (departed, median distance, why):
    departed is None when no device has ``min_values`` values on both sides (cannot judge: the latency and error
    rules decide alone), True when the median distance exceeds ``threshold`` plus the median split-half noise of
    the new version's windows."""
    dists, noises, judged = [], [], []
    for dev, ws in after.items():
        base = merged_quantiles(w.output for w in before.get(dev, ()))
        new = merged_quantiles(w.output for w in ws)
        if base is None or new is None or base[1] < min_values or new[1] < min_values:
            continue
        dists.append(quantile_distance(base[0], new[0]))
        noises.append(_split_half(ws) or 0.0)
        judged.append(dev)
    if not dists:
        return None, None, f"output drift not judged: no canary has {min_values} output values on both versions"
    d, noise = statistics.median(dists), statistics.median(noises)
    departed = d > threshold + noise
    why = (f"output distribution {d:.3f} from the previous version's (median of {len(judged)} canaries; threshold "
           f"{threshold:g} + noise {noise:.3f})")
    return departed, d, why


@dataclass
class DriftMonitor:
    """Judges every device's output statistic against its bundle's reference; emits ``drift`` events."""

    store: Any
    fleet: str
    bundles_dir: Path
    trusted: Any
    threshold: float = 0.25
    min_values: int = 200
    window_s: float = 900.0
    emit: Callable[[list[Event]], None] | None = None
    _refs: dict[str, tuple[str, str, list[float]] | None] = field(default_factory=dict)
    _drifted: set[tuple[str, str, str, str]] = field(default_factory=set)

    def references(self) -> dict[tuple[str, str], list[float]]:
        """(model, version) -> reference quantiles of every bundle the controller holds that records one."""
        from edgefleet.sdk.bundle import read_manifest
        from edgefleet.sdk.errors import BundleError

        out: dict[tuple[str, str], list[float]] = {}
        for p in sorted(self.bundles_dir.glob("*.efb")):
            if p.name not in self._refs:
                try:
                    m = read_manifest(p, self.trusted).manifest
                    ref = reference_from_metadata(m.metadata)
                    self._refs[p.name] = (m.name, m.version, ref[0]) if ref is not None else None
                except BundleError as exc:
                    log.warning("bundle %s not read for drift: %s", p.name, exc)
                    self._refs[p.name] = None
            entry = self._refs[p.name]
            if entry is not None:
                out[(entry[0], entry[1])] = entry[2]
        return out

    def check(self, now: float) -> list[DriftFinding]:
        """Judge every device of every version with a reference over the last ``window_s``; emit events for the
        devices that drifted (once until they come back within the threshold)."""
        findings: list[DriftFinding] = []
        events: list[Event] = []
        for (name, version), ref in self.references().items():
            rows = self.store.windows(self.fleet, None, now - self.window_s, now + 60.0, name, version,
                                      limit=100_000, with_sketch=True)
            by_dev: dict[str, list[TelemetryWindow]] = {}
            for w in rows:
                if w.output is not None:
                    by_dev.setdefault(w.device, []).append(w)
            merged = {dev: merged_quantiles(w.output for w in ws) for dev, ws in by_dev.items()}
            for dev, ws in sorted(by_dev.items()):
                checks = [judge_device(dev, name, version, ws, ref, threshold=self.threshold,
                                       min_values=self.min_values)]
                # against the fleet: the other devices on this version, when at least MIN_FLEET of them have enough
                # values (a device whose outputs depart from its peers', e.g. a camera knocked out of alignment)
                others = [dv for dv, m in merged.items() if dv != dev and m is not None and m[1] >= self.min_values]
                if len(others) >= MIN_FLEET:
                    rest = merged_quantiles(w.output for dv in others for w in by_dev[dv])
                    if rest is not None:
                        checks.append(judge_device(dev, name, version, ws, rest[0], threshold=self.threshold,
                                                   min_values=self.min_values, against="fleet"))
                for f in checks:
                    findings.append(f)
                    key = (dev, name, version, f.against)
                    if f.drifted and key not in self._drifted:
                        self._drifted.add(key)
                        events.append(Event(device=dev, boot=DRIFT_BOOT, seq=int(now * 1e6) + len(events),
                                            kind="drift", level="warning", ts=now,
                                            message=f"{name} {version}: {f.reason}", data=f.to_dict()))
                    elif not f.drifted and f.distance is not None and f.values >= self.min_values:
                        self._drifted.discard(key)
        if events and self.emit is not None:
            self.emit(events)
        return findings
