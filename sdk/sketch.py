"""Mergeable latency sketches (DDSketch): quantiles within 1% relative error that merge exactly across devices.

Fleet-wide percentiles must come from merged sketches, never from averaged percentiles: the mean of two devices'
p95 is not the p95 of their union. A sketch maps a positive value ``x`` to bucket ``ceil(log_gamma(x))`` with
``gamma = (1 + alpha) / (1 - alpha)``; every value in a bucket is within ``alpha`` of the bucket's representative,
so any quantile is within ``alpha`` relative error. Merging adds bucket counts, which is exact and associative.

This module is the only sketch arithmetic in edgefleet: the agent records (:class:`LatencyRecorder`), the wire form
is :class:`edgefleet.sdk.protocol.Sketch`, and the fleet merges (:class:`SketchSum`, :meth:`DDSketch.merge`) and
reads percentiles (:func:`quantiles`) with it. Merged counts saturate at 2^63 - 1, so no sum of stored sketches can
overflow a 64-bit column (docs/mqtt-protocol.md, "Limits").
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from .protocol import Sketch
from .protocol._limits import INT64_MAX, MAX_BINS, MIN_SKETCH_VALUE

__all__ = ["DDSketch", "LatencyRecorder", "LatencySnapshot", "SketchSum", "quantiles", "saturating_add"]

_MIN_VALUE = MIN_SKETCH_VALUE  # values below (in the sketch's unit, ms) count in the zero bucket
_MAX_BINS = MAX_BINS


def saturating_add(a: int, b: int) -> int:
    """``a + b`` for counts, capped at the largest 64-bit integer (what storage holds)."""
    return min(a + b, INT64_MAX)


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
            self._bins[k] = saturating_add(self._bins.get(k, 0), c)
        self.count = saturating_add(self.count, other.count)
        self.zero = saturating_add(self.zero, other.zero)
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
        """Dense JSON form (:class:`edgefleet.sdk.protocol.Sketch`): bucket counts from ``offset``."""
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

    def to_wire(self) -> Sketch:
        """The validated wire form (raises ProtocolError for a sketch telemetry may not carry, e.g. > 2^40 values)."""
        return Sketch.from_dict(self.to_dict())

    @classmethod
    def from_wire(cls, s: Sketch | Mapping[str, Any]) -> DDSketch:
        """A sketch from its wire form, already validated (:class:`Sketch`), or a dense dict this process wrote
        (a stored merge: not re-validated, its counts may exceed one window's limit)."""
        get = s.__getitem__ if isinstance(s, Mapping) else s.__getattribute__
        sk = cls(float(get("alpha")))
        offset = int(get("offset"))
        for i, c in enumerate(get("counts")):
            if c:
                sk._bins[offset + i] = int(c)
        sk.count = int(get("count"))
        sk.zero = int(get("zero"))
        sk.sum = float(get("sum"))
        if sk.count:
            sk.min = float(get("min"))
            sk.max = float(get("max"))
        return sk

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DDSketch:
        """Parse an untrusted dense dict, rejecting anything inconsistent with a ProtocolError naming the field."""
        return cls.from_wire(Sketch.from_dict(d))

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


def quantiles(sketch: Sketch | Mapping[str, Any], qs: Sequence[float] = (0.5, 0.95, 0.99)) -> list[float | None]:
    """Quantiles (ascending ``qs``) of a sketch in its dense form: one cumulative sum of the buckets (in C) and a
    binary search per quantile.

    Same rule as :meth:`DDSketch.quantile` (tests check they agree) without building the sketch and sorting its
    buckets once per quantile: ingest computes three quantiles for every model window it stores.
    """
    if isinstance(sketch, Mapping):
        alpha, count, zero, lo_, hi_, offset, counts = (sketch["alpha"], sketch["count"], sketch["zero"],
                                                        sketch["min"], sketch["max"], sketch["offset"],
                                                        sketch["counts"])
    else:
        alpha, count, zero, lo_, hi_, offset, counts = (sketch.alpha, sketch.count, sketch.zero, sketch.min,
                                                        sketch.max, sketch.offset, sketch.counts)
    if not count:
        return [None] * len(qs)
    gamma_ln = math.log((1.0 + alpha) / (1.0 - alpha))
    gamma = math.exp(gamma_ln)
    lo, hi = float(lo_), float(hi_)
    cum = list(accumulate(counts, initial=zero))  # cum[j + 1]: values up to and including bucket offset + j
    out: list[float | None] = []
    for q in qs:
        rank = q * (count - 1)
        i = bisect_right(cum, rank)  # the first bucket whose cumulative count exceeds the rank
        if i == 0:
            out.append(max(lo, 0.0))
        elif i == len(cum):
            out.append(hi)
        else:
            out.append(min(max(2.0 * math.exp((offset + i - 1) * gamma_ln) / (gamma + 1.0), lo), hi))
    return out


class SketchSum:
    """Adds sketches in their dense form without building :class:`DDSketch` objects (the store's per-minute
    merges); every count saturates at 2^63 - 1, so a sum a 64-bit column holds is what it produces."""

    __slots__ = ("alpha", "count", "counts", "lo", "max", "min", "sum", "zero")

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.lo = 0
        self.counts: Any = None  # numpy int64 array, imported when the first buckets arrive (the agent never does)
        self.zero = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, d: Sketch | Mapping[str, Any]) -> None:
        """Add one sketch (validated wire form, or a dense dict written by :meth:`to_dict`)."""
        import numpy as np

        get = d.__getitem__ if isinstance(d, Mapping) else d.__getattribute__
        if get("alpha") != self.alpha:
            raise ValueError(f"cannot merge sketches with alpha {self.alpha} and {get('alpha')}")
        c = get("counts")
        if len(c):
            off = int(get("offset"))
            add = np.asarray(c, dtype=np.int64)
            if self.counts is None:
                self.lo, self.counts = off, add.copy()
            else:
                lo, top = min(self.lo, off), max(self.lo + len(self.counts), off + len(c))
                if lo != self.lo or top != self.lo + len(self.counts):
                    grown = np.zeros(top - lo, np.int64)
                    grown[self.lo - lo:self.lo - lo + len(self.counts)] = self.counts
                    self.lo, self.counts = lo, grown
                part = self.counts[off - self.lo:off - self.lo + len(c)]
                # Saturating add: both sides are >= 0, so adding min(add, MAX - part) cannot overflow.
                part += np.minimum(add, INT64_MAX - part)
        self.zero = saturating_add(self.zero, int(get("zero")))
        self.count = saturating_add(self.count, int(get("count")))
        self.sum += float(get("sum"))
        if get("count"):
            self.min = min(self.min, float(get("min")))
            self.max = max(self.max, float(get("max")))

    def add_many(self, sketches: Sequence[Sketch]) -> None:
        """Add validated wire sketches at once: their buckets are summed in one numpy pass (exact: each bucket of a
        wire sketch holds at most 2^40, so a batch of up to 2^22 of them cannot overflow 64 bits), then added to this
        sum with saturation. Same result as :meth:`add` one by one, at a fraction of the cost for a batch."""
        import numpy as np

        for start in range(0, len(sketches), 1 << 22):
            part = sketches[start:start + (1 << 22)]
            offsets: list[int] = []
            lengths: list[int] = []
            flat: list[int] = []
            zero = count = 0
            total = 0.0
            lo_v, hi_v = math.inf, -math.inf
            for sk in part:
                if sk.alpha != self.alpha:
                    raise ValueError(f"cannot merge sketches with alpha {self.alpha} and {sk.alpha}")
                if sk.counts:
                    offsets.append(sk.offset)
                    lengths.append(len(sk.counts))
                    flat.extend(sk.counts)
                zero += sk.zero
                count += sk.count
                total += sk.sum
                if sk.count:
                    lo_v = min(lo_v, float(sk.min))  # type: ignore[arg-type]  # a non-empty sketch has min and max
                    hi_v = max(hi_v, float(sk.max))  # type: ignore[arg-type]
            counts: Any = []
            lo = 0
            if flat:
                lo = min(offsets)
                top = max(o + n for o, n in zip(offsets, lengths, strict=True))
                n = np.asarray(lengths)
                starts = np.repeat(np.asarray(offsets) - lo - (np.cumsum(n) - n), n)
                counts = np.zeros(top - lo, np.int64)
                np.add.at(counts, starts + np.arange(len(flat)), np.asarray(flat, np.int64))
            self.add({"alpha": self.alpha, "count": min(count, INT64_MAX), "zero": min(zero, INT64_MAX),
                      "sum": total, "min": lo_v if count else None, "max": hi_v if count else None, "offset": lo,
                      "counts": counts})

    def to_dict(self) -> dict[str, Any]:
        """The merged sketch in dense form (the lowest buckets folded beyond 4096, as DDSketch does)."""
        import numpy as np

        counts = self.counts if self.counts is not None else np.zeros(0, np.int64)
        lo = self.lo
        if len(counts) > _MAX_BINS:
            excess = len(counts) - _MAX_BINS
            folded = min(int(counts[:excess].sum(dtype=object)), INT64_MAX)
            counts = counts[excess:].copy()
            counts[0] = saturating_add(int(counts[0]), folded)
            lo += excess
        return {"alpha": self.alpha, "count": self.count, "zero": self.zero, "sum": self.sum,
                "min": self.min if self.count else None, "max": self.max if self.count else None,
                "offset": lo if len(counts) else 0, "counts": counts.tolist()}

    def to_ddsketch(self) -> DDSketch:
        """The merged sketch as a :class:`DDSketch`."""
        return DDSketch.from_wire(self.to_dict())


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
