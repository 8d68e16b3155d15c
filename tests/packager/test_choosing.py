"""The choice's ladder on synthetic interleaved timings: a near tie goes to the simpler candidate whichever point
estimate is lower, a clear win still wins, and the ladder's order is the documented one."""

from __future__ import annotations

import random

import pytest
from edgefleet.packager.choosing import Contender, choose, ladder
from edgefleet.packager.planning import Candidate
from edgefleet.sdk.timing import TimingPolicy, TimingResult

MARGIN = 0.03
OV = "OpenVINOExecutionProvider"


def _timing(true_ms: dict[str, float], reference: str, seed: int, rounds: int = 41,
            jitter: float = 0.04) -> TimingResult:
    """Interleaved rounds as a loaded host gives them: a per-round load factor shared by every runner (a neighbour
    slowing the whole round, up to 3x) times each runner's own jitter (+-``jitter``)."""
    rng = random.Random(seed)
    times: dict[str, list[float]] = {n: [] for n in true_ms}
    for _ in range(rounds):
        load = 1.0 + 2.0 * rng.random() ** 3
        for name, ms in true_ms.items():
            times[name].append(ms * load * (1.0 + rng.uniform(-jitter, jitter)))
    return TimingResult.from_dict({"reference": reference, "policy": TimingPolicy().to_dict(), "times_ms": times,
                                   "calls": {n: 1 for n in true_ms}, "seconds": 1.0})


def _pair(simpler: str, other: str, guard: bool = False) -> list[Contender]:
    return [Contender(other, 2.0, True), Contender(simpler, 0.0 if guard else 1.0, True, guard=guard)]


@pytest.mark.parametrize("true_ratio", [0.985, 1.0, 1.015])
def test_choose_near_tie_goes_to_the_simpler_candidate_whichever_point_estimate_is_lower(true_ratio):
    lower_estimate = set()
    for seed in range(30):
        timing = _timing({"fp32": 10.0, "int8-dynamic": 10.0 * true_ratio}, "fp32", seed)
        ests = timing.estimates
        lower_estimate.add(min(("fp32", "int8-dynamic"), key=lambda n: ests[n].ratio))
        choice = choose(_pair("fp32", "int8-dynamic"), timing, MARGIN, "CPUExecutionProvider", "FP32")
        assert choice.name == "fp32", (seed, choice.why, choice.decision)
        assert choice.decision["challenges"][0]["won"] is False
    if true_ratio < 1:
        # the point estimate favoured the complex candidate in these runs, and still the simpler one shipped
        assert "int8-dynamic" in lower_estimate


def test_choose_clear_win_still_wins():
    for seed in range(30):
        timing = _timing({"fp32": 10.0, "int8-dynamic": 6.0}, "fp32", seed)
        choice = choose(_pair("fp32", "int8-dynamic"), timing, MARGIN, "CPUExecutionProvider", "FP32")
        assert choice.name == "int8-dynamic", (seed, choice.decision)
        assert "with 95% confidence" in choice.why


def test_choose_cpu_guard_ships_on_a_near_tie_with_the_target_provider_and_says_so():
    for seed in range(30):
        # OpenVINO FP32 1% faster by its true time: within the noise, so FP32 on the CPU EP ships every time
        timing = _timing({"cpu-fp32": 10.0, "fp32": 9.9}, "cpu-fp32", seed)
        choice = choose(_pair("cpu-fp32", "fp32", guard=True), timing, MARGIN, OV, "FP32 on the CPU EP")
        assert choice.name == "cpu-fp32", (seed, choice.decision)
        assert "the CPU EP variant ships" in choice.why
    timing = _timing({"cpu-fp32": 10.0, "fp32": 5.0}, "cpu-fp32", 0)
    assert choose(_pair("cpu-fp32", "fp32", guard=True), timing, MARGIN, OV, "FP32 on the CPU EP").name == "fp32"


def test_choose_challenger_must_beat_the_incumbent_not_the_first_rung():
    # bf16 clearly beats fp32; int8-static beats fp32 too but is a near tie with bf16: bf16 (simpler) ships
    contenders = [Contender("int8-static", 4, True), Contender("bf16", 2, True), Contender("fp32", 1, True)]
    for seed in range(20):
        timing = _timing({"fp32": 10.0, "bf16": 6.0, "int8-static": 5.95}, "fp32", seed)
        choice = choose(contenders, timing, MARGIN, OV, "FP32")
        assert choice.name == "bf16", (seed, choice.decision)
        assert [c["won"] for c in choice.decision["challenges"]] == [True, False]


def test_choose_a_margin_of_the_measured_noise_keeps_the_simpler_candidate():
    # 10% faster with confidence at a 3% floor; but when the A/A pair measured 15% of noise that is a tie
    timing = _timing({"fp32": 10.0, "int8-dynamic": 9.0}, "fp32", 3, jitter=0.02)
    assert choose(_pair("fp32", "int8-dynamic"), timing, MARGIN, "CPUExecutionProvider", "FP32").name == \
        "int8-dynamic"
    assert choose(_pair("fp32", "int8-dynamic"), timing, 0.15, "CPUExecutionProvider", "FP32").name == "fp32"


def test_ladder_order_is_cpu_fp32_provider_fp32_float16_dynamic_static_mixed():
    cands = [
        Candidate("int8-static-excl7", "int8", [], int8="static"),
        Candidate("int8-static-s8", "int8", [], int8="static"),
        Candidate("int8-static", "int8", [], int8="static"),
        Candidate("int8-dynamic", "int8", [], int8="dynamic"),
        Candidate("f16", "f16", []),
        Candidate("bf16", "bf16", []),
        Candidate("fp32", "fp32", []),
        Candidate("cpu-fp32", "fp32", [], cpu_guard=True),
    ]
    order = [c.name for c in ladder([Contender(c.name, c.simplicity, True, c.cpu_guard) for c in cands])]
    assert order == ["cpu-fp32", "fp32", "bf16", "f16", "int8-dynamic", "int8-static", "int8-static-s8",
                     "int8-static-excl7"]
