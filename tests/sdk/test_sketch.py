"""DDSketch: quantiles within 1% relative error, exact merges, a JSON form that round-trips and rejects garbage."""

from __future__ import annotations

import itertools
import json
import math
import threading

import numpy as np
import pytest
from edgefleet.sdk.errors import ProtocolError
from edgefleet.sdk.sketch import DDSketch, LatencyRecorder
from hypothesis import given, settings
from hypothesis import strategies as st

QS = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)


def _sketch(values: np.ndarray, alpha: float = 0.01) -> DDSketch:
    sk = DDSketch(alpha)
    for v in values:
        sk.add(float(v))
    return sk


def _lognormal(n: int, seed: int, mean: float = 1.0, sigma: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(mean, sigma, n)


def test_sketch_quantiles_within_one_percent_of_numpy_on_lognormal_latencies() -> None:
    data = _lognormal(50_000, seed=1)
    sk = _sketch(data)
    for q in QS:
        exact = float(np.quantile(data, q, method="lower"))  # the sketch ranks like 'lower': no interpolation
        got = sk.quantile(q)
        assert got is not None
        assert abs(got - exact) <= 0.01 * exact * (1 + 1e-9), (q, got, exact)
    assert sk.count == len(data)
    assert sk.quantile(0.0) == pytest.approx(data.min(), rel=0.01)
    assert sk.quantile(1.0) == pytest.approx(data.max(), rel=0.01)
    assert sk.mean == pytest.approx(float(data.mean()), rel=1e-9)


def test_sketch_quantiles_hold_across_wide_range_of_magnitudes() -> None:
    data = _lognormal(20_000, seed=2, mean=0.0, sigma=4.0)  # ~1e-5 ms to ~1e5 ms
    sk = _sketch(data)
    for q in (0.05, 0.5, 0.95, 0.99):
        exact = float(np.quantile(data, q, method="lower"))
        assert abs(sk.quantile(q) - exact) <= 0.01 * exact * (1 + 1e-9)


def test_sketch_merge_equals_sketch_of_union_bucket_for_bucket() -> None:
    parts = [_lognormal(3000, seed=s, mean=s * 0.3) for s in range(4)]
    merged = DDSketch.merged(_sketch(p) for p in parts)
    union = _sketch(np.concatenate(parts))
    m, u = merged.to_dict(), union.to_dict()
    assert m["counts"] == u["counts"] and m["offset"] == u["offset"]
    assert m["count"] == u["count"] == 12_000
    assert m["min"] == u["min"] and m["max"] == u["max"]
    assert m["sum"] == pytest.approx(u["sum"], rel=1e-12)
    for q in QS:
        assert merged.quantile(q) == union.quantile(q)


def test_sketch_merged_percentiles_differ_from_averaged_percentiles() -> None:
    """Why the fleet merges sketches: the mean of two devices' p95 is not the fleet's p95."""
    fast, slow = _lognormal(5000, seed=3, mean=0.0), _lognormal(500, seed=4, mean=3.0)
    merged = DDSketch.merged([_sketch(fast), _sketch(slow)])
    averaged = (_sketch(fast).quantile(0.95) + _sketch(slow).quantile(0.95)) / 2
    exact = float(np.quantile(np.concatenate([fast, slow]), 0.95, method="lower"))
    assert abs(merged.quantile(0.95) - exact) <= 0.01 * exact * (1 + 1e-9)
    assert abs(averaged - exact) > 0.2 * exact


def test_sketch_roundtrips_through_json_dict() -> None:
    sk = _sketch(np.concatenate([_lognormal(2000, seed=5), np.zeros(7)]))
    d = json.loads(json.dumps(sk.to_dict()))
    back = DDSketch.from_dict(d)
    assert back.to_dict() == sk.to_dict()
    assert back.zero == 7
    for q in QS:
        assert back.quantile(q) == sk.quantile(q)


def test_sketch_empty_roundtrips_and_has_no_quantiles() -> None:
    sk = DDSketch()
    assert sk.quantile(0.5) is None and sk.mean is None
    back = DDSketch.from_dict(sk.to_dict())
    assert back.count == 0 and back.quantile(0.99) is None


def test_sketch_rejects_negative_and_nan_values() -> None:
    sk = DDSketch()
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="must be >= 0"):
            sk.add(bad)
    assert sk.count == 0


def test_sketch_merge_refuses_different_alpha() -> None:
    with pytest.raises(ValueError, match="alpha"):
        DDSketch(0.01).merge(DDSketch(0.02))


def _good() -> dict:
    return _sketch(np.array([1.0, 2.0, 3.0])).to_dict()


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"alpha": 1.5}, "sketch.alpha: Expected `float` < 1.0"),
        ({"alpha": 0.02}, "sketch: alpha must be 0.01, got 0.02"),
        ({"alpha": "x"}, "sketch.alpha: Expected `float`, got `str`"),
        ({"counts": "1,2"}, "sketch.counts: Expected `array`, got `str`"),
        ({"counts": [1, -1, 1]}, "sketch.counts[1]: Expected `int` >= 0"),
        ({"counts": [1, 1.5, 1]}, "sketch.counts[1]: Expected `int`, got `float`"),
        ({"counts": [1, True, 1]}, "sketch.counts[1]: Expected `int`, got `bool`"),
        ({"counts": [0] * 5000}, "sketch.counts: Expected `array` of length <= 4096"),
        ({"offset": 1.5}, "sketch.offset: Expected `int`, got `float`"),
        ({"count": 4}, "sketch: buckets add up to 3, count says 4"),
        ({"zero": -1}, "sketch.zero: Expected `int` >= 0"),
        ({"sum": float("nan")}, "sketch.sum: Expected `float` >= 0.0"),
        ({"sum": -1.0}, "sketch.sum: Expected `float` >= 0.0"),
        ({"min": 5.0}, "sketch: min 5.0 and max 3.0 are inconsistent"),
        ({"max": float("inf")}, "sketch.max: Expected `float` <= 1000000000.0"),
        ({"min": None}, "sketch: min None and max 3.0 are inconsistent"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_sketch_from_dict_rejects_malformed_with_protocol_error(patch: dict, fragment: str) -> None:
    with pytest.raises(ProtocolError) as err:
        DDSketch.from_dict({**_good(), **patch})
    assert fragment in str(err.value)


@pytest.mark.parametrize("missing", ["alpha", "counts", "offset", "zero", "count", "sum", "min", "max"])
def test_sketch_from_dict_rejects_missing_field(missing: str) -> None:
    d = _good()
    del d[missing]
    with pytest.raises(ProtocolError, match=f"sketch: Object missing required field `{missing}`"):
        DDSketch.from_dict(d)


def test_merges_saturate_at_64_bits_instead_of_wrapping() -> None:
    from edgefleet.sdk.sketch import SketchSum, saturating_add

    big = _sketch(np.array([1.0, 2.0]))
    big.count = big.zero = 2**63 - 2
    big.count += 2
    total = SketchSum(0.01)
    total.add(big.to_dict())
    total.add(big.to_dict())
    assert total.count == 2**63 - 1 and total.zero == 2**63 - 1
    merged = DDSketch.merged([big, big])
    assert merged.count == 2**63 - 1
    assert saturating_add(2**63 - 1, 5) == 2**63 - 1


def test_latency_recorder_take_returns_window_and_resets() -> None:
    rec = LatencyRecorder(now=100.0)
    for ms in (1.0, 2.0, 3.0, 4.0):
        rec.record(ms)
    rec.record_error()
    snap = rec.take(now=102.0)
    assert (snap.count, snap.errors, snap.seconds) == (4, 1, 2.0)
    assert snap.throughput == 2.0
    assert snap.percentiles()["p50"] == pytest.approx(2.0, rel=0.01)
    nxt = rec.take(now=103.0)
    assert (nxt.count, nxt.errors, nxt.seconds) == (0, 0, 1.0)
    assert (rec.total_count, rec.total_errors) == (4, 1)


def test_latency_recorder_counts_every_record_across_threads() -> None:
    rec = LatencyRecorder()

    def work() -> None:
        for i in range(2000):
            rec.record(0.5 + (i % 10))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = rec.take(now=1.0)
    assert snap.count == 8000 == snap.sketch.count
    assert math.isclose(snap.sketch.sum, 4 * 200 * sum(0.5 + i for i in range(10)))


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(min_value=0.0, max_value=1e6, allow_nan=False), min_size=1, max_size=300),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=4),
)
def test_sketch_merge_of_any_split_equals_sketch_of_all(values: list[float], cuts: list[int]) -> None:
    bounds = sorted({0, len(values), *(c % (len(values) + 1) for c in cuts)})
    parts = [values[a:b] for a, b in itertools.pairwise(bounds)]
    merged = DDSketch.merged(_sketch(np.array(p)) for p in parts)
    whole = _sketch(np.array(values))
    m, w = merged.to_dict(), whole.to_dict()
    assert (m["counts"], m["offset"], m["zero"], m["count"], m["min"], m["max"]) == (
        w["counts"], w["offset"], w["zero"], w["count"], w["min"], w["max"])
    for q in (0.0, 0.5, 0.99, 1.0):
        assert merged.quantile(q) == whole.quantile(q)
    assert DDSketch.from_dict(json.loads(json.dumps(m))).to_dict() == m
