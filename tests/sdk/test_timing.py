"""The robust timing method: per-round ratios cancel a noisy neighbour; intervals say when the data cannot decide.

These tests drive the method with a fake clock (deterministic), because a timing is never a pass/fail test here.
"""

from __future__ import annotations

import pytest
from edgefleet.sdk.timing import TimingPolicy, TimingResult, compare, interleaved_rounds, median_ci


class FakeClock:
    """A clock that advances only when a fake runner 'works'; a neighbour multiplies every cost in some rounds."""

    def __init__(self) -> None:
        self.now = 0.0
        self.load = 1.0

    def __call__(self) -> float:
        return self.now

    def runner(self, cost_s: float):
        def run() -> None:
            self.now += cost_s * self.load
        return run


def test_ratios_cancel_a_neighbour_that_slows_whole_rounds():
    clock = FakeClock()
    calls = {"n": 0}
    fast, slow = clock.runner(0.001), clock.runner(0.002)

    def ref() -> None:
        calls["n"] += 1
        clock.load = 10.0 if (calls["n"] // 40) % 3 == 0 else 1.0  # heavy load comes and goes between rounds
        slow()

    policy = TimingPolicy(min_rounds=9, max_rounds=21, budget_s=1e9, min_call_s=0.01, warmup=1)
    res = interleaved_rounds({"ref": ref, "fast": fast}, "ref", policy, clock=clock)
    est = res.estimates["fast"]
    assert est.ratio == pytest.approx(0.5, rel=0.01)
    assert est.low <= 0.5 <= est.high
    assert res.stopped in ("converged", "max_rounds")


def test_converges_early_when_quiet():
    clock = FakeClock()
    policy = TimingPolicy(min_rounds=5, max_rounds=41, budget_s=1e9)
    res = interleaved_rounds({"ref": clock.runner(0.002), "b": clock.runner(0.001)}, "ref", policy, clock=clock)
    assert res.stopped == "converged" and len(res.times_ms["b"]) == 5


def test_budget_stops_after_min_rounds():
    clock = FakeClock()
    policy = TimingPolicy(min_rounds=3, max_rounds=41, budget_s=0.001, target_halfwidth=0.0001)
    res = interleaved_rounds({"ref": clock.runner(0.002), "b": clock.runner(0.001)}, "ref", policy, clock=clock)
    assert res.stopped == "budget" and len(res.times_ms["b"]) == 3


def test_median_ci_is_distribution_free_and_covers_the_median():
    med, lo, hi = median_ci([1.0, 1.1, 0.9, 5.0, 1.05, 0.95, 1.0, 20.0, 1.02])
    assert med == 1.02 and lo <= med <= hi and hi < 20.0


def test_compare_says_when_it_cannot_decide():
    a = [1.00, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97]
    b = [1.01, 0.99, 1.00, 1.02, 0.98, 1.00, 1.01]
    c = compare(a, b)
    assert not c.faster(0.0) and not c.slower(0.0)  # a near-tie: neither is faster with confidence
    fast = compare([x * 0.8 for x in b], b)
    assert fast.faster(0.05)


def test_result_round_trips_through_json():
    clock = FakeClock()
    res = interleaved_rounds({"ref": clock.runner(0.002), "b": clock.runner(0.001)}, "ref",
                             TimingPolicy(min_rounds=3, max_rounds=5), clock=clock)
    back = TimingResult.from_dict(res.to_dict())
    assert back.estimates["b"].ratio == pytest.approx(res.estimates["b"].ratio)
    assert back.compare("b", "ref").ratio == pytest.approx(0.5)


def test_policy_refuses_bad_values():
    with pytest.raises(ValueError, match="min_rounds"):
        TimingPolicy(min_rounds=2)
    with pytest.raises(ValueError, match="unknown timing policy"):
        TimingPolicy.from_dict({"rounds": 3})
