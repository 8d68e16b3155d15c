"""Protocol model bench: what decoding and validating one telemetry record costs on the controller's ingest path.

Three ways to do the same job — parse JSON bytes into a validated record (types, ranges, the sketch's consistency):

* ``dict (v0)``: ``json.loads`` + the hand-written checks the protocol had before the typed model (a copy of the old
  ``parse_telemetry`` and ``DDSketch.from_dict`` is kept below, for this comparison only);
* ``dataclass``: ``json.loads`` + frozen dataclasses whose ``__post_init__`` checks types and ranges in Python (the
  python-tuf style, written here for telemetry only);
* ``msgspec``: :meth:`edgefleet.sdk.protocol.Telemetry.from_json` — what ingest uses.

Each is timed on two realistic records (a real agent's record, with every optional field, and the simulator's
smaller one) in interleaved rounds (the machine is shared and noisy), and reported as the median per message and
as ratios against ``dict (v0)``. Run: ``.venv/bin/python bench/protocol.py``; writes bench/results/protocol.md.
"""

from __future__ import annotations

import json
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.sdk.protocol import Telemetry
from edgefleet.sdk.sketch import DDSketch

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


# -- the records ----------------------------------------------------------------------------------------------------

def _sketch(rng: random.Random, n: int, median: float) -> DDSketch:
    sk = DDSketch()
    for _ in range(n):
        sk.add(rng.lognormvariate(0.0, 0.25) * median)
    return sk


def agent_record(rng: random.Random) -> bytes:
    """What ``edgefleet agent run`` publishes for one model (every optional field the agent fills)."""
    sk = _sketch(rng, 812, 3.1)
    pct = [sk.quantile(q) for q in (0.5, 0.95, 0.99)]
    model = {"name": "magika", "version": "1.0.0", "digest": "ab" * 32, "target": "x86-cpu", "count": sk.count,
             "errors": 0, "window_s": 10.002, "throughput": 81.2, "p50_ms": pct[0], "p95_ms": pct[1],
             "p99_ms": pct[2], "mean_ms": sk.mean, "sketch": sk.to_dict(), "providers": ["CPUExecutionProvider"],
             "fallback": False, "cold_start": {"session_ms": 41.0, "first_run_ms": 6.5},
             "total": {"count": 123456, "errors": 3}}
    rec = {"v": 1, "device": "pi-17", "boot": "3f1c" * 8, "seq": 4711, "ts": time.time(), "interval_s": 10.0,
           "models": [model], "process": {"cpu_percent": 23.5, "rss_bytes": 81234944, "threads": 12},
           "system": {"mem_available_bytes": 5 << 30, "mem_total_bytes": 8 << 30, "temperature_c": 51.2,
                      "load1": 0.7, "spool": 0, "dropped_total": 0, "unconfirmed": 3, "resent_total": 0},
           "dropped": 0}
    return json.dumps(rec, separators=(",", ":")).encode()


def simulator_record(rng: random.Random) -> bytes:
    """What ``edgefleet fleet simulate`` (and so bench/fleet.py) publishes."""
    sk = _sketch(rng, 50, 9.0)
    rec = {"v": 1, "device": "sim-0001", "boot": "b1234abcd1796000000", "seq": 17, "ts": time.time(),
           "interval_s": 1.0, "models": [{"name": "detector", "version": "1.0.0", "count": sk.count, "errors": 0,
                                          "providers": ["CPUExecutionProvider"], "sketch": sk.to_dict()}],
           "process": {"cpu_percent": 12.5, "rss_bytes": 180 << 20}, "system": {}, "dropped": 0}
    return json.dumps(rec, separators=(",", ":")).encode()


# -- dict (v0): the parser before the typed model, kept for this comparison -----------------------------------------

class _Bad(ValueError):
    pass


def _req(obj: Mapping[str, Any], key: str, types: Any, what: str) -> Any:
    if key not in obj:
        raise _Bad(f"{what}: missing field {key!r}")
    val = obj[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(val, allowed) or (isinstance(val, bool) and bool not in allowed):
        raise _Bad(f"{what}: field {key!r} has type {type(val).__name__}")
    return val


def _num(obj: Mapping[str, Any], key: str, what: str) -> float:
    val = _req(obj, key, (int, float), what)
    if not val >= 0:
        raise _Bad(f"{what}: {key} < 0")
    return float(val)


def _int(obj: Mapping[str, Any], key: str, what: str) -> int:
    val = _req(obj, key, int, what)
    if val < 0:
        raise _Bad(f"{what}: {key} < 0")
    return int(val)


def _v0_sketch(d: Mapping[str, Any]) -> DDSketch:
    sk = DDSketch(float(d["alpha"]))
    counts, offset, zero = d["counts"], d["offset"], d["zero"]
    if not isinstance(counts, list) or not isinstance(offset, int) or len(counts) > 4096:
        raise _Bad("counts")
    if not isinstance(zero, int) or isinstance(zero, bool) or zero < 0:
        raise _Bad("zero")
    total = zero
    for i, c in enumerate(counts):
        if not isinstance(c, int) or isinstance(c, bool) or c < 0:
            raise _Bad("bucket")
        if c:
            sk._bins[offset + i] = c
            total += c
    if sk._bins and max(-min(sk._bins), max(sk._bins)) * sk._gamma_ln > 700.0:
        raise _Bad("keys")
    if isinstance(d["count"], bool) or total != d["count"]:
        raise _Bad("count")
    sk.count, sk.zero, sk.sum = total, zero, float(d["sum"])
    if not math.isfinite(sk.sum) or sk.sum < 0:
        raise _Bad("sum")
    if total:
        sk.min, sk.max = float(d["min"]), float(d["max"])
        if not (0.0 <= sk.min <= sk.max < math.inf):
            raise _Bad("min/max")
    return sk


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_v0(data: bytes) -> dict[str, Any]:
    """The old ``protocol.parse_telemetry``."""
    obj = json.loads(data, parse_constant=_reject_constant)
    if not isinstance(obj, dict) or obj.get("v") != 1:
        raise _Bad("v")
    what = "telemetry"
    _req(obj, "device", str, what)
    _req(obj, "boot", str, what)
    _int(obj, "seq", what)
    _num(obj, "ts", what)
    _num(obj, "interval_s", what)
    if "dropped" in obj:
        _int(obj, "dropped", what)
    for i, m in enumerate(_req(obj, "models", list, what)):
        w = f"telemetry.models[{i}]"
        if not isinstance(m, dict):
            raise _Bad(w)
        _req(m, "name", str, w)
        _req(m, "version", str, w)
        _int(m, "count", w)
        _int(m, "errors", w)
        if not all(isinstance(p, str) for p in _req(m, "providers", list, w)):
            raise _Bad(w)
        sk = _v0_sketch(_req(m, "sketch", dict, w))
        if sk.alpha != 0.01 or sk.count != m["count"]:
            raise _Bad(w)
    for key in ("process", "system"):
        if key in obj and not isinstance(obj[key], dict):
            raise _Bad(key)
    return obj


# -- dataclass: the same checks as the typed model, in Python --------------------------------------------------------

def _i(v: Any, lo: int, hi: int, what: str) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _Bad(f"{what}: {v!r}")
    return v


def _f(v: Any, lo: float, hi: float, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise _Bad(f"{what}: {v!r}")
    return float(v)


def _s(v: Any, hi: int, what: str) -> str:
    if not isinstance(v, str) or len(v) > hi:
        raise _Bad(what)
    return v


@dataclass(frozen=True)
class DcSketch:
    alpha: float
    count: int
    zero: int
    sum: float
    min: float | None
    max: float | None
    offset: int
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.alpha != 0.01:
            raise _Bad("alpha")
        _i(self.count, 0, 2**40, "count")
        _i(self.zero, 0, 2**40, "zero")
        _f(self.sum, 0.0, 2**40 * 1e9, "sum")
        _i(self.offset, -700, 1100, "offset")
        if len(self.counts) > 4096:
            raise _Bad("counts")
        total = self.zero
        for c in self.counts:
            total += _i(c, 0, 2**40, "counts[]")
        if total != self.count:
            raise _Bad("total")
        if self.count and (self.min is None or self.max is None or not 0 <= self.min <= self.max <= 1e9):
            raise _Bad("min/max")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DcSketch:
        return cls(d["alpha"], d["count"], d["zero"], d["sum"], d["min"], d["max"], d["offset"], tuple(d["counts"]))


@dataclass(frozen=True)
class DcWindow:
    name: str
    version: str
    count: int
    errors: int
    providers: tuple[str, ...]
    sketch: DcSketch

    def __post_init__(self) -> None:
        _s(self.name, 128, "name")
        _s(self.version, 128, "version")
        _i(self.count, 0, 2**40, "count")
        _i(self.errors, 0, 2**40, "errors")
        for p in self.providers:
            _s(p, 128, "providers[]")
        if self.sketch.count != self.count:
            raise _Bad("sketch count")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DcWindow:
        return cls(d["name"], d["version"], d["count"], d["errors"], tuple(d["providers"]),
                   DcSketch.from_dict(d["sketch"]))


@dataclass(frozen=True)
class DcTelemetry:
    device: str
    boot: str
    seq: int
    ts: float
    interval_s: float
    dropped: int
    models: tuple[DcWindow, ...]
    process: dict[str, Any]
    system: dict[str, Any]

    def __post_init__(self) -> None:
        _s(self.device, 64, "device")
        _s(self.boot, 64, "boot")
        _i(self.seq, 0, 2**63 - 1, "seq")
        _f(self.ts, 0.0, 4.1e9, "ts")
        _f(self.interval_s, 0.0, 86400.0, "interval_s")
        _i(self.dropped, 0, 2**63 - 1, "dropped")

    @classmethod
    def from_json(cls, data: bytes) -> DcTelemetry:
        d = json.loads(data, parse_constant=_reject_constant)
        if d.get("v") != 1:
            raise _Bad("v")
        return cls(d["device"], d["boot"], d["seq"], d["ts"], d["interval_s"], d.get("dropped", 0),
                   tuple(DcWindow.from_dict(m) for m in d["models"]), d.get("process", {}), d.get("system", {}))


# -- timing ---------------------------------------------------------------------------------------------------------

def _time(fn: Callable[[bytes], Any], payloads: list[bytes]) -> float:
    t0 = time.perf_counter()
    for p in payloads:
        fn(p)
    return (time.perf_counter() - t0) / len(payloads) * 1e6


def main() -> None:
    rng = random.Random(1)
    ways: dict[str, Callable[[bytes], Any]] = {"dict (v0)": parse_v0, "dataclass": DcTelemetry.from_json,
                                               "msgspec": Telemetry.from_json}
    records = {"agent": [agent_record(rng) for _ in range(50)], "simulator": [simulator_record(rng) for _ in range(50)]}
    for recs in records.values():  # each way accepts every record (so each does the whole job)
        for p in recs:
            for fn in ways.values():
                fn(p)
    rounds, per_round = 31, 2000
    times: dict[tuple[str, str], list[float]] = {}
    ratios: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for rec, recs in records.items():
            batch = [recs[i % len(recs)] for i in range(per_round)]
            order = list(ways)
            rng.shuffle(order)  # interleaved, in a new order every round
            got = {name: _time(ways[name], batch) for name in order}
            for name, us in got.items():
                times.setdefault((rec, name), []).append(us)
                ratios.setdefault((rec, name), []).append(us / got["dict (v0)"])
    lines = [
        "# Protocol model bench", "",
        f"`.venv/bin/python bench/protocol.py` on {platform.machine()}, Python {platform.python_version()}, "
        f"{sys.platform}; {rounds} interleaved rounds of {per_round} decodes per record and way, in a random order "
        "each round. Median µs per message (decode + validate types, ranges and the sketch) and the median of the "
        "per-round ratios to `dict (v0)` (the parser before the typed model). Figures are from a shared, noisy "
        "machine: read the ratios.", "",
        "| record | bytes | way | µs / message | ratio to dict (v0) |", "|---|---:|---|---:|---:|",
    ]
    out: dict[str, Any] = {"rounds": rounds, "per_round": per_round, "results": []}
    for rec, recs in records.items():
        size = round(statistics.mean(len(p) for p in recs))
        for name in ways:
            med = statistics.median(times[(rec, name)])
            ratio = statistics.median(ratios[(rec, name)])
            lines.append(f"| {rec} | {size} | {name} | {med:.1f} | {ratio:.2f} |")
            out["results"].append({"record": rec, "bytes": size, "way": name, "us": round(med, 2),
                                   "ratio": round(ratio, 3)})
    lines += ["", "`agent`: a record as `edgefleet agent run` publishes it for one model (812 requests in the window, "
              "every optional field); `simulator`: the smaller record `edgefleet fleet simulate` and "
              "bench/fleet.py publish (50 requests)."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "protocol.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "protocol.json").write_text(json.dumps(out, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
