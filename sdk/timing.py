"""Robust latency comparison on a noisy machine: interleaved rounds, per-round ratios, a stated confidence.

On a shared host a neighbour can slow one configuration by several times for a few seconds; timing candidates one
after another then measures the neighbour, not the candidate. So every candidate runs in **every round**, in a
rotating order, and each round yields a *ratio* of the candidate's time to a reference's time measured moments
apart: the noise that slows both cancels. The decision rests on the **median of the per-round ratios** with a
distribution-free confidence interval for that median (order statistics of the binomial); rounds go on until every
interval is narrow enough or a time budget runs out, and a caller told "cannot judge" takes the safe choice.

Used by the packager (build host, in the target's runtime) and meant for the agent (choosing among verified variants
on the device): it imports only the standard library, never numpy, onnx or onnxruntime.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Comparison", "RatioEstimate", "TimingPolicy", "TimingResult", "compare", "interleaved_rounds",
           "median_ci"]


@dataclass(frozen=True)
class TimingPolicy:
    """How long and how carefully to time: at least ``min_rounds``, at most ``max_rounds`` or ``budget_s`` seconds;
    stop early once every ratio's confidence interval is within ``target_halfwidth`` (relative) of its median."""

    min_rounds: int = 7
    max_rounds: int = 41
    budget_s: float = 30.0
    min_call_s: float = 0.01
    max_calls: int = 50
    warmup: int = 2
    target_halfwidth: float = 0.02
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if not 3 <= self.min_rounds <= self.max_rounds:
            raise ValueError(f"need 3 <= min_rounds <= max_rounds, got {self.min_rounds}, {self.max_rounds}")
        if self.budget_s <= 0 or self.min_call_s < 0 or self.max_calls < 1 or self.warmup < 0:
            raise ValueError("budget_s must be > 0, min_call_s >= 0, max_calls >= 1, warmup >= 0")
        if not 0 < self.target_halfwidth < 1 or not 0.5 <= self.confidence < 1:
            raise ValueError(f"target_halfwidth must be in (0, 1) and confidence in [0.5, 1), got "
                             f"{self.target_halfwidth}, {self.confidence}")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TimingPolicy:
        """Parse the JSON form (unknown keys are errors)."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown timing policy key(s) {sorted(unknown)}")
        return cls(**dict(d))


def _z(confidence: float) -> float:
    # two-sided normal quantile; a rational approximation is plenty for choosing order statistics
    p = 1 - (1 - confidence) / 2
    t = math.sqrt(-2.0 * math.log(1 - p))
    return t - (2.515517 + 0.802853 * t + 0.010328 * t * t) / (1 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t**3)


def median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Median and a distribution-free confidence interval for it (order statistics, normal approximation of the
    binomial): no assumption about the shape of the noise, which on a shared host is anything but normal."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    med = statistics.median(xs)
    if n < 3:
        return med, xs[0], xs[-1]
    j = max(1, round(n / 2 - _z(confidence) * math.sqrt(n) / 2))  # 1-based rank of the lower bound
    return med, xs[j - 1], xs[n - j]


@dataclass(frozen=True)
class RatioEstimate:
    """One candidate against the reference: median per-round time ratio (< 1: faster) and its confidence interval."""

    name: str
    ratio: float
    low: float
    high: float
    rounds: int
    median_ms: float
    min_ms: float

    @property
    def speedup(self) -> float:
        """Reference time / candidate time (> 1: faster than the reference)."""
        return 1.0 / self.ratio if self.ratio > 0 else math.inf

    @property
    def halfwidth(self) -> float:
        """Half the confidence interval, relative to the median ratio."""
        return (self.high - self.low) / 2 / self.ratio if self.ratio > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """JSON form (rounded for reading)."""
        return {"name": self.name, "ratio": round(self.ratio, 4), "ci": [round(self.low, 4), round(self.high, 4)],
                "speedup": round(self.speedup, 3), "rounds": self.rounds, "median_ms": round(self.median_ms, 4),
                "min_ms": round(self.min_ms, 4)}


@dataclass(frozen=True)
class Comparison:
    """``a`` against ``b`` from the same rounds: median of per-round time ratios a/b with its interval."""

    a: str
    b: str
    ratio: float
    low: float
    high: float

    def faster(self, margin: float = 0.0) -> bool:
        """True when ``a`` is faster than ``b`` by more than ``margin`` with the stated confidence."""
        return self.high < 1.0 - margin

    def slower(self, margin: float = 0.0) -> bool:
        """True when ``a`` is slower than ``b`` by more than ``margin`` with the stated confidence."""
        return self.low > 1.0 + margin


@dataclass
class TimingResult:
    """Every round's per-call time (ms) per runner, and what the rounds concluded."""

    reference: str
    policy: TimingPolicy
    times_ms: dict[str, list[float]]
    calls: dict[str, int]
    seconds: float
    stopped: str = ""
    estimates: dict[str, RatioEstimate] = field(default_factory=dict)

    def compare(self, a: str, b: str) -> Comparison:
        """Pairwise comparison of two runners timed in the same rounds."""
        return compare(self.times_ms[a], self.times_ms[b], a, b, self.policy.confidence)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the estimates; raw round times are kept for the report's tail only)."""
        return {"reference": self.reference, "policy": self.policy.to_dict(), "calls": dict(self.calls),
                "seconds": round(self.seconds, 2), "stopped": self.stopped,
                "rounds": len(next(iter(self.times_ms.values()), [])),
                "estimates": {k: v.to_dict() for k, v in self.estimates.items()},
                "times_ms": {k: [round(t, 4) for t in v] for k, v in self.times_ms.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TimingResult:
        """Parse the JSON form (as a worker process sends it)."""
        policy = TimingPolicy.from_dict(d["policy"])
        res = cls(str(d["reference"]), policy, {str(k): [float(x) for x in v] for k, v in d["times_ms"].items()},
                  {str(k): int(v) for k, v in d["calls"].items()}, float(d["seconds"]), str(d.get("stopped", "")))
        res.estimates = _estimates(res.times_ms, res.reference, policy.confidence)
        return res


def compare(a_ms: Sequence[float], b_ms: Sequence[float], a: str = "a", b: str = "b",
            confidence: float = 0.95) -> Comparison:
    """Median of per-round ratios a/b and its interval (rounds must align: the same round index, same moment)."""
    if len(a_ms) != len(b_ms) or not a_ms:
        raise ValueError(f"need the same non-zero number of rounds, got {len(a_ms)} and {len(b_ms)}")
    ratios = [x / y for x, y in zip(a_ms, b_ms, strict=True) if y > 0]
    med, lo, hi = median_ci(ratios, confidence)
    return Comparison(a, b, med, lo, hi)


def _estimates(times: Mapping[str, Sequence[float]], reference: str,
               confidence: float) -> dict[str, RatioEstimate]:
    out = {}
    for name, ts in times.items():
        c = compare(ts, times[reference], name, reference, confidence)
        out[name] = RatioEstimate(name, c.ratio, c.low, c.high, len(ts), statistics.median(ts), min(ts))
    return out


def interleaved_rounds(runners: Mapping[str, Callable[[], object]], reference: str,
                       policy: TimingPolicy = TimingPolicy(),
                       clock: Callable[[], float] = time.perf_counter) -> TimingResult:
    """Time every runner in every round (rotating order), until each ratio to ``reference`` is known well enough.

    A runner is a zero-argument callable doing one inference. Each round runs each runner ``calls[name]`` times
    back to back (enough for ``min_call_s``) and records the mean per call. Stops after ``max_rounds``, after
    ``budget_s`` (once ``min_rounds`` are done), or when every confidence interval's half-width is within
    ``target_halfwidth`` of its median. ``stopped`` says which.
    """
    if reference not in runners:
        raise ValueError(f"reference {reference!r} is not among the runners {sorted(runners)}")
    names = list(runners)
    start = clock()
    calls: dict[str, int] = {}
    for name in names:
        fn = runners[name]
        for _ in range(policy.warmup):
            fn()
        t0 = clock()
        fn()
        one = max(clock() - t0, 1e-6)
        calls[name] = max(1, min(policy.max_calls, math.ceil(policy.min_call_s / one)))
    times: dict[str, list[float]] = {n: [] for n in names}
    stopped = "max_rounds"
    for r in range(policy.max_rounds):
        k = r % len(names)
        order = names[k:] + names[:k]  # rotate, so no runner always follows the same neighbour
        for name in order:
            fn, n = runners[name], calls[name]
            t0 = clock()
            for _ in range(n):
                fn()
            times[name].append((clock() - t0) * 1000.0 / n)
        done = r + 1
        if done < policy.min_rounds:
            continue
        if clock() - start > policy.budget_s:
            stopped = "budget"
            break
        est = _estimates(times, reference, policy.confidence)
        if all(e.halfwidth <= policy.target_halfwidth for k2, e in est.items() if k2 != reference):
            stopped = "converged"
            break
    res = TimingResult(reference, policy, times, calls, clock() - start, stopped)
    res.estimates = _estimates(times, reference, policy.confidence)
    return res
