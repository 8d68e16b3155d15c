"""What every backend derives from new telemetry records, computed once in Python: the rows of ``windows``, each
device's latest summary, and the per-(model, version, minute) sums of counts and sketches. The backends only write
these (one place for the rules, whatever the SQL dialect)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from edgefleet.sdk.protocol import ModelSummary, Sketch, Telemetry
from edgefleet.sdk.protocol._model import prevalidated
from edgefleet.sdk.sketch import SketchSum, quantiles, saturating_add

__all__ = ["Derived", "MinuteAcc", "derive", "json_text", "merge_minute"]

_enc = msgspec.json.Encoder()
_any_dec = msgspec.json.Decoder()


def json_text(obj: Any) -> str:
    """Compact JSON text of a protocol object or plain value (what the stores keep in their JSON columns)."""
    return _enc.encode(obj).decode()


@dataclass
class MinuteAcc:
    """Requests, errors and sketches of one (model, version, minute) within a batch."""

    count: int = 0
    errors: int = 0
    sketches: list[Sketch] = field(default_factory=list)


@dataclass
class Derived:
    """The derived rows of a batch's new telemetry records."""

    # (device, boot, seq, ts, name, version, count, errors, interval_s, p50, p95, p99, providers JSON, sketch JSON,
    #  output statistic JSON or None)
    windows: list[tuple[Any, ...]]
    # device -> (device ts of its newest record, summary JSON, process JSON)
    latest: dict[str, tuple[float, str, str]]
    minutes: dict[tuple[str, str, int], MinuteAcc]


def derive(records: Iterable[Telemetry]) -> Derived:
    """Windows, device summaries and per-minute sums of new (never stored before) telemetry records."""
    windows: list[tuple[Any, ...]] = []
    latest: dict[str, tuple[float, list[ModelSummary], Telemetry]] = {}
    encoded: dict[tuple[str, ...], str] = {}  # provider lists repeat across a fleet: encode each once
    minutes: dict[tuple[str, str, int], MinuteAcc] = {}
    with prevalidated():  # summaries are built from validated windows: no need to validate them again
        for t in records:
            dev, ts, interval = t.device, t.ts, t.interval_s
            summary = []
            for m in t.models:
                sk = m.sketch
                p50, p95, p99 = quantiles(sk)
                pkey = tuple(m.providers)
                providers_json = encoded.get(pkey)
                if providers_json is None:
                    providers_json = encoded[pkey] = json_text(m.providers)
                windows.append((dev, t.boot, t.seq, ts, m.name, m.version, m.count, m.errors, interval,
                                p50, p95, p99, providers_json, json_text(sk),
                                None if m.output is None else json_text(m.output)))
                summary.append(ModelSummary(name=m.name, version=m.version, count=m.count, errors=m.errors,
                                            p50=p50, p95=p95, p99=p99, throughput=m.count / interval,
                                            providers=m.providers, variant=m.variant))
                acc = minutes.get((m.name, m.version, int(ts // 60)))
                if acc is None:
                    acc = minutes[(m.name, m.version, int(ts // 60))] = MinuteAcc()
                acc.count = saturating_add(acc.count, m.count)
                acc.errors = saturating_add(acc.errors, m.errors)
                acc.sketches.append(sk)
            if dev not in latest or ts >= latest[dev][0]:
                latest[dev] = (ts, summary, t)
    # Encoded once per device per batch, not once per record.
    return Derived(windows=windows,
                   latest={d: (ts, json_text(s), json_text(t.process)) for d, (ts, s, t) in latest.items()},
                   minutes=minutes)


def merge_minute(acc: MinuteAcc, stored: tuple[int, int, str] | None) -> tuple[int, int, float, str]:
    """``(count, errors, sum_ms, sketch JSON)`` of a minute: the batch's sums plus what the store already holds
    (``(count, errors, sketch JSON)`` or None); every count saturates at 2^63 - 1."""
    total = SketchSum(acc.sketches[0].alpha)
    total.add_many(acc.sketches)
    count, errors = acc.count, acc.errors
    if stored is not None:
        total.add(_any_dec.decode(stored[2]))
        count = saturating_add(count, stored[0])
        errors = saturating_add(errors, stored[1])
    return count, errors, total.sum, json_text(total.to_dict())
