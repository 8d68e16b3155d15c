"""Mergeable latency sketches (DDSketch): quantiles within 1% relative error that merge exactly across devices.

Fleet-wide percentiles must come from merged sketches, never from averaged percentiles: the mean of two devices'
p95 is not the p95 of their union. A sketch maps a positive value ``x`` to bucket ``ceil(log_gamma(x))`` with
``gamma = (1 + alpha) / (1 - alpha)``; every value in a bucket is within ``alpha`` of the bucket's representative,
so any quantile is within ``alpha`` relative error. Merging adds bucket counts, which is exact and associative.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError

__all__ = ["DDSketch", "LatencyRecorder", "LatencySnapshot"]

_MIN_VALUE = 1e-6  # values below (in the sketch's unit, ms) count in the zero bucket
_MAX_BINS = 4096


class DDSketch:
    """A DDSketch with relative accuracy ``alpha`` over positive values (latencies in milliseconds)."""

    __slots__ = ("_bins", "_gamma_ln", "alpha", "count", "max", "min", "sum", "zero")

    def __init__(self, alpha: float = 0.01) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.alpha = alpha
        self._gamma_ln = math.log((1.0 + alpha) / (1.0 - alpha))
        self._bins: dict[int, int] = {}
        self.count = 0
        self.zero = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, value: float) -> None:
        """Record one value (negative and NaN values are rejected, tiny ones go to the zero bucket)."""
        if not value >= 0.0:
            raise ValueError(f"sketch values must be >= 0, got {value}")
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        if value < _MIN_VALUE:
            self.zero += 1
            return
        key = math.ceil(math.log(value) / self._gamma_ln)
        bins = self._bins
        bins[key] = bins.get(key, 0) + 1
        if len(bins) > _MAX_BINS:
            self._collapse()

    def _collapse(self) -> None:
        # Fold the lowest buckets together: the high quantiles that matter for latency keep their accuracy.
        keys = sorted(self._bins)
        excess = len(keys) - _MAX_BINS + 1
        folded = sum(self._bins.pop(k) for k in keys[:excess])
        low = keys[excess]
        self._bins[low] = self._bins.get(low, 0) + folded

    def merge(self, other: DDSketch) -> None:
        """Add ``other``'s values into this sketch (exact; both must share alpha)."""
        if other.alpha != self.alpha:
            raise ValueError(f"cannot merge sketches with alpha {self.alpha} and {other.alpha}")
        for k, c in other._bins.items():
            self._bins[k] = self._bins.get(k, 0) + c
        self.count += other.count
        self.zero += other.zero
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        if len(self._bins) > _MAX_BINS:
            self._collapse()

    def quantile(self, q: float) -> float | None:
        """The value at quantile ``q`` in [0, 1], within alpha relative error; None when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        if self.count == 0:
            return None
        rank = q * (self.count - 1)
        seen = self.zero
        if rank < seen:
            return max(self.min, 0.0)
        gamma = math.exp(self._gamma_ln)
        for k in sorted(self._bins):
            seen += self._bins[k]
            if seen > rank:
                value = 2.0 * math.exp(k * self._gamma_ln) / (gamma + 1.0)
                return min(max(value, self.min), self.max)
        return self.max

    @property
    def mean(self) -> float | None:
        """Arithmetic mean of the recorded values."""
        return self.sum / self.count if self.count else None

    def to_dict(self) -> dict[str, Any]:
        """Compact JSON form: dense bucket counts from ``offset``."""
        if self._bins:
            lo, hi = min(self._bins), max(self._bins)
            counts = [self._bins.get(k, 0) for k in range(lo, hi + 1)]
        else:
            lo, counts = 0, []
        return {
            "alpha": self.alpha,
            "count": self.count,
            "zero": self.zero,
            "sum": self.sum,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "offset": lo,
            "counts": counts,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DDSketch:
        """Parse the JSON form, rejecting anything inconsistent with a ProtocolError."""
        try:
            sk = cls(float(d["alpha"]))
            counts = d["counts"]
            offset = d["offset"]
            if not isinstance(counts, list) or not isinstance(offset, int) or len(counts) > _MAX_BINS:
                raise ValueError("counts must be a list of at most 4096 ints and offset an int")
            zero = d["zero"]
            if not isinstance(zero, int) or isinstance(zero, bool) or zero < 0:
                raise ValueError(f"zero count {zero!r} is not a non-negative int")
            total = zero
            for i, c in enumerate(counts):
                if not isinstance(c, int) or isinstance(c, bool) or c < 0:
                    raise ValueError(f"bucket count {c!r} is not a non-negative int")
                if c:
                    sk._bins[offset + i] = c
                    total += c
            if sk._bins and max(-min(sk._bins), max(sk._bins)) * sk._gamma_ln > 700.0:
                # a bucket whose value exp(key * ln gamma) has no float: quantile() would raise OverflowError
                raise ValueError(f"bucket keys {min(sk._bins)}..{max(sk._bins)} are out of range")
            if isinstance(d["count"], bool) or total != d["count"]:
                raise ValueError(f"bucket counts add up to {total}, count says {d['count']}")
            sk.count = total
            sk.zero = zero
            sk.sum = float(d["sum"])
            if not math.isfinite(sk.sum) or sk.sum < 0:
                raise ValueError(f"sum must be a finite number >= 0, got {d['sum']!r}")
            if total:
                sk.min = float(d["min"])
                sk.max = float(d["max"])
                if not (0.0 <= sk.min <= sk.max < math.inf):
                    raise ValueError(f"min {d['min']!r} and max {d['max']!r} are inconsistent")
        except (KeyError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: float() of a 309-digit int
            raise ProtocolError(f"invalid latency sketch: {exc}") from exc
        return sk

    @classmethod
    def merged(cls, sketches: Iterable[DDSketch], alpha: float = 0.01) -> DDSketch:
        """One sketch holding the union of ``sketches``."""
        out = cls(alpha)
        for s in sketches:
            out.merge(s)
        return out


@dataclass(frozen=True)
class LatencySnapshot:
    """What a recorder saw over one telemetry window."""

    count: int
    errors: int
    seconds: float
    sketch: DDSketch

    @property
    def throughput(self) -> float:
        """Requests per second over the window."""
        return self.count / self.seconds if self.seconds > 0 else 0.0

    def percentiles(self) -> dict[str, float | None]:
        """p50/p95/p99/mean in milliseconds."""
        s = self.sketch
        return {"p50": s.quantile(0.5), "p95": s.quantile(0.95), "p99": s.quantile(0.99), "mean": s.mean}


class LatencyRecorder:
    """Thread-safe per-model recorder: each inference adds its latency; telemetry takes and resets a window."""

    __slots__ = ("_alpha", "_errors", "_lock", "_since", "_sketch", "total_count", "total_errors")

    def __init__(self, alpha: float = 0.01, now: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._alpha = alpha
        self._sketch = DDSketch(alpha)
        self._errors = 0
        self._since = now
        self.total_count = 0
        self.total_errors = 0

    def record(self, latency_ms: float) -> None:
        """Record a successful call's latency in milliseconds."""
        with self._lock:
            self._sketch.add(latency_ms)
            self.total_count += 1

    def record_error(self) -> None:
        """Count a failed call."""
        with self._lock:
            self._errors += 1
            self.total_errors += 1

    def take(self, now: float) -> LatencySnapshot:
        """Return the window since the last take and start a new one."""
        with self._lock:
            sk, errors, since = self._sketch, self._errors, self._since
            self._sketch, self._errors, self._since = DDSketch(self._alpha), 0, now
        return LatencySnapshot(count=sk.count, errors=errors, seconds=max(now - since, 0.0), sketch=sk)
