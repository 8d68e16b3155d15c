"""The choice among candidates within budget: the simplest one unless a more complex one is faster with confidence.

Rules, in order (every one deterministic for the same measurements):

1. Without timing (the target's provider cannot run here, or ``--no-measure``): the first candidate within budget in
   the planned order (which, unmeasured, holds only the provider's conservative precisions).
2. With timing: the candidates within budget are put on a **ladder**, simplest and most accurate first, by
   ``Contender.simplicity`` (``policy.SIMPLICITY``: FP32 on the CPU EP < the provider's FP32 < fp16/bf16/f16 <
   dynamic INT8 < static INT8 < mixed precision; equal ranks by name). The first rung is the incumbent; each next
   rung replaces it only when it is **faster than the incumbent with confidence**: the upper bound of the 95%
   interval of the median of their per-round time ratios (from the same interleaved rounds) is below
   ``1 - margin``. Otherwise the incumbent stays. So a near tie, whichever side its point estimate falls on, goes to
   the simpler candidate every time, and a clear win still wins.

This holds "never a loser" on the CPU EP (FP32 is the first rung, anything else must beat it with confidence) and,
for a target whose device also has the CPU EP, FP32 on the CPU EP (the "guard", the first rung) ships unless the
target provider's candidate beats it with confidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet.sdk.timing import Comparison, TimingResult

__all__ = ["Choice", "Contender", "choose", "ladder"]


@dataclass(frozen=True)
class Contender:
    """What the choice needs to know of a candidate: ``simplicity`` is its rung on the ladder (lower: simpler and
    more accurate, ``policy.SIMPLICITY``); ``guard``: FP32 on the CPU EP for a target whose provider is another."""

    name: str
    simplicity: float
    ok: bool
    guard: bool = False


@dataclass(frozen=True)
class Choice:
    """The chosen candidate, why, and the numbers behind it."""

    name: str
    why: str
    decision: dict[str, Any]


def _speed(timing: TimingResult, name: str) -> str:
    e = timing.estimates[name]
    return f"{e.speedup:.2f}x [{1 / e.high:.2f}-{1 / e.low:.2f}]" if e.low > 0 else f"{e.speedup:.2f}x"


def _versus(cmp: Comparison) -> str:
    """``a`` as a speed-up over ``b`` with its interval: 1.04x [0.97-1.10]."""
    if cmp.low <= 0:
        return f"{1 / cmp.ratio:.2f}x"
    return f"{1 / cmp.ratio:.2f}x [{1 / cmp.high:.2f}-{1 / cmp.low:.2f}]"


def ladder(contenders: Sequence[Contender]) -> list[Contender]:
    """``contenders`` simplest first: by rank, then by name, so equal ranks always come in the same order."""
    return sorted(contenders, key=lambda c: (c.simplicity, c.name))


def choose(contenders: Sequence[Contender], timing: TimingResult | None, margin: float,
           provider: str, reference_label: str) -> Choice:
    """Apply the rules above; ``contenders`` in the planned order; ``margin``: how much faster than the incumbent
    (relative, e.g. 0.03) the upper bound of a challenger's interval must be (1 or more: nothing can beat the
    simplest). Raises ValueError when none is within budget."""
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    ok = [c for c in contenders if c.ok]
    if not ok:
        raise ValueError("no candidate within budget")
    if len(ok) == 1:
        return Choice(ok[0].name, f"the only candidate within budget on {provider}", {"timed": False})
    if timing is None or any(c.name not in timing.estimates for c in ok):
        first = next((c for c in ok if not c.guard), ok[0])
        return Choice(first.name, f"first within budget in the planned order "
                                  f"({' > '.join(c.name for c in contenders if not c.guard)})", {"timed": False})
    rungs = ladder(ok)
    incumbent = rungs[0]
    challenges: list[dict[str, Any]] = []
    for c in rungs[1:]:
        cmp = timing.compare(c.name, incumbent.name)
        won = cmp.faster(margin)
        challenges.append({"challenger": c.name, "incumbent": incumbent.name, "ratio": round(cmp.ratio, 4),
                           "ci": [round(cmp.low, 4), round(cmp.high, 4)], "won": won})
        if won:
            incumbent = c
    best = incumbent
    ratio = {c.name: timing.estimates[c.name].ratio for c in ok}
    fastest = min(rungs, key=lambda c: ratio[c.name])  # by point estimate: reported, never decisive
    decision: dict[str, Any] = {
        "timed": True, "reference": timing.reference, "rule": "ladder", "margin": round(margin, 4),
        "ladder": [c.name for c in rungs], "challenges": challenges, "fastest_point_estimate": fastest.name,
        "speedup_vs_reference": {c.name: round(1 / ratio[c.name], 3) for c in ok}, "chosen": best.name,
    }
    conf = f"{timing.policy.confidence:.0%} confidence"
    if best is rungs[0]:
        if best.guard:
            rival = min((c for c in rungs if not c.guard), key=lambda c: ratio[c.name])
            why = (f"{rival.name} on {provider} is not faster than {best.name} (FP32 on the CPU EP) by more than "
                   f"{margin:.1%} with {conf} on this device ({_versus(timing.compare(rival.name, best.name))} of "
                   f"it): the CPU EP variant ships")
        else:
            why = (f"simplest within budget on {provider}: no other candidate is faster than {best.name} by more "
                   f"than {margin:.1%} with {conf}")
    else:
        beat = next(ch["incumbent"] for ch in challenges if ch["challenger"] == best.name and ch["won"])
        why = (f"{best.name} on {provider} runs at {_versus(timing.compare(best.name, beat))} of {beat}, faster "
               f"than {beat} by more than {margin:.1%} with {conf}, and no more complex candidate beat it so")
    if rungs.index(fastest) > rungs.index(best):
        why += (f" (the lowest point estimate, {fastest.name} at {_versus(timing.compare(fastest.name, best.name))}"
                f" of {best.name}, is a near tie: the simpler one ships)")
    why += f"; {_speed(timing, best.name)} the speed of {reference_label} ({timing.estimates[best.name].rounds} " \
           f"interleaved rounds, {timing.policy.confidence:.0%} interval)"
    return Choice(best.name, why, decision)
