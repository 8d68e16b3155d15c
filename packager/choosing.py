"""The choice among candidates within budget: measured speed with its confidence, near-ties to the simpler one.

Rules, in order (every one deterministic for the same measurements):

1. Without timing (the target's provider cannot run here, or ``--no-measure``): the first candidate within budget in
   the planned order (which, unmeasured, holds only the provider's conservative precisions).
2. With timing, among the target provider's candidates: find the fastest by its median per-round ratio; every
   candidate not slower than it by more than ``tie_margin`` with confidence is tied with it; of the tied, the
   simplest and most accurate ships (fp32 < fp16/bf16/f16 < dynamic INT8 < static INT8; ties of rank by name).
3. On the CPU EP a candidate replaces FP32 only when it is faster than FP32 with confidence: never a loser.
4. For a target whose device also has the CPU EP, FP32 on the CPU EP (the "guard") ships instead when it is faster
   than the choice by more than ``tie_margin`` with confidence: the target's provider lost on its own device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet.sdk.timing import TimingResult

__all__ = ["Choice", "Contender", "choose"]


@dataclass(frozen=True)
class Contender:
    """What the choice needs to know of a candidate."""

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


def choose(contenders: Sequence[Contender], timing: TimingResult | None, tie_margin: float,
           provider: str, reference_label: str) -> Choice:
    """Apply the rules above; ``contenders`` in the planned order. Raises ValueError when none is within budget."""
    ok = [c for c in contenders if c.ok]
    if not ok:
        raise ValueError("no candidate within budget")
    if len(ok) == 1:
        return Choice(ok[0].name, f"the only candidate within budget on {provider}", {"timed": False})
    if timing is None or any(c.name not in timing.estimates for c in ok):
        first = next((c for c in ok if not c.guard), ok[0])
        return Choice(first.name, f"first within budget in the planned order "
                                  f"({' > '.join(c.name for c in contenders if not c.guard)})", {"timed": False})
    target = [c for c in ok if not c.guard] or ok
    guard = next((c for c in ok if c.guard), None)
    ratio = {c.name: timing.estimates[c.name].ratio for c in ok}
    fastest = min(target, key=lambda c: (ratio[c.name], c.simplicity, c.name))
    tied = [c for c in target if c is fastest or not timing.compare(c.name, fastest.name).slower(tie_margin)]
    best = min(tied, key=lambda c: (c.simplicity, c.name))
    ref = timing.reference
    decision: dict[str, Any] = {
        "timed": True, "reference": ref, "fastest": fastest.name, "tied_with_fastest": [c.name for c in tied],
        "tie_margin": tie_margin, "speedup_vs_reference": {c.name: round(1 / ratio[c.name], 3) for c in ok},
    }
    if best is fastest:
        why = f"fastest within budget on {provider}"
    else:
        why = (f"within the measured noise (+{tie_margin:.1%}) of the fastest ({fastest.name}) and simpler or more "
               f"accurate, on {provider}")
    ref_c = next((c for c in target if c.name == ref), None)
    if ref_c is not None and best is not ref_c and not timing.compare(best.name, ref).faster(0.0):
        decision["kept_reference"] = f"{best.name} is not faster than {ref} with confidence"
        why = f"{best.name} was not faster than {ref} with confidence, so {ref} ships (never a loser)"
        best = ref_c
    if guard is not None and best is not guard and timing.compare(guard.name, best.name).faster(tie_margin):
        decision["guard_won"] = True
        why = (f"{best.name} on {provider} is slower than {reference_label} on this device "
               f"({_speed(timing, best.name)} of it): the CPU EP variant ships")
        best = guard
    decision["chosen"] = best.name
    why += f"; {_speed(timing, best.name)} the speed of {reference_label} ({timing.estimates[best.name].rounds} " \
           f"interleaved rounds, 95% interval)"
    return Choice(best.name, why, decision)
