"""Canary choice and the canary verdict: which devices install first, and what their telemetry says.

**Choice.** Per target (one bundle each), ``k = max(ceil(pct% of the devices getting it), min_canary_devices)``
devices, never all of them when there are two or more (the rest is the control group, and what a halt protects),
drawn at random with a seed the deployment records: reproducible, not steerable by naming a device ``aaa-0``.

**The unit of evidence.** Requests on one device are not independent (a busy host slows a run of them together),
so a request is not the sample unit. The agent's telemetry window is: each window carries a mergeable latency
sketch per model version, and the verdict works on merges of those sketches over time slots.

**The comparison.** By preference: (split) each canary keeps its previous version on a share of its requests while
judged (agent/registry.py, "Traffic split"), so the new version is compared with the previous one on the same
devices over the same seconds, and whatever else the device does slows both alike; (paired) without a split, the
canaries' own before/after, with, when at least :data:`MIN_CONTROLS` controls keep the previous version meanwhile,
the controls' before/after divided out over the same time slots (a difference in differences); (beside) no canary
baseline: the canaries against the controls over the same slots. Measured on a busy 2-core host, devices there
switch between states (x1, x2) for tens of seconds as the scheduler moves them on and off a core a busy process
holds: only the split keeps an identical bundle's ratio within a few percent (bench/results/rollout.md).

**The statistic.** The ratio of tail latency, new over previous, each side merged over its devices and slots. Tail
latency is the geometric mean of the quantiles p75, p76 ... p99 (:data:`TAIL`): a p95 smoothed so that it does not
jump when the 95th percentile falls into a gap of the distribution (a busy host's latency has one, between requests
that ran alone and those that waited for a core), and that moves exactly as the p95 does when every request slows
alike. The bare p95 ratio is computed as well, and a regression it shows on its own halts too. With three or more
canaries (or controls), a device whose own ratio lies more than :data:`OUTLIER_MADS` scaled MADs from the others' is
left out and named, so one device reporting invented latency can neither pass nor halt a rollout alone.

**The interval.** A bootstrap of that statistic: time blocks of telemetry windows are resampled (blocks of about
n^(1/3) windows keep the short-range correlation in time; the same blocks for every device and for both versions of
a split, so what is compared stays paired in time); without a split, devices are resampled too (a device's state
over the whole observation is then part of the noise). The percentile interval of the ratio is taken at
``1 - (1 - CONFIDENCE) / len(LOOKS)`` at each look: the controller looks at ``LOOKS`` times ``observe_s``, so over
all looks the chance of a wrong call is at most ``1 - CONFIDENCE`` (Bonferroni).

**The decision** at each look, per bundle: halt when the interval (or the bare p95's) lies above
``1 + max_p95_regression`` or the error rate is shown to have risen more than ``max_error_increase`` (Wilson
interval); proceed when the interval lies below the limit, the error rate is shown within its limit, ``observe_s``
has passed and the canaries served at least ``min_samples`` requests; otherwise look again, and at the last look
(3 x ``observe_s``) say **cannot judge** and halt. A first deployment (no previous version on the canaries) has no
latency to compare: it is judged on errors alone and needs the same number of requests.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgefleet.sdk.protocol import CanaryVerdict, RolloutPolicy, TelemetryWindow
from edgefleet.sdk.protocol.api import Outcome

from .drift import canary_drift

__all__ = ["CONFIDENCE", "LOOKS", "DeviceWindows", "canary_count", "choose_canaries", "judge", "requests_needed"]

CONFIDENCE = 0.95
"""Of a verdict, over all looks."""
LOOKS = (1.0, 1.5, 2.0, 2.5, 3.0)
"""When the controller judges, in multiples of ``observe_s``."""
MIN_WINDOWS = 4
"""Telemetry windows a device needs in a period to count (each is one sample of its latency)."""
MIN_CONTROLS = 3
"""Control devices needed to correct for a common drift (fewer could steer the correction alone)."""
OUTLIER_MADS = 3.0
MAD_FLOOR = math.log(1.10)
"""A device is an outlier only when more than 10% (x OUTLIER_MADS) away from the median: honest devices differ."""
RESAMPLES = 1000
TAIL = tuple(round(0.75 + 0.01 * i, 2) for i in range(25))
"""The quantiles p75, p76 ... p99 whose geometric mean is the verdict's tail latency (see "The statistic")."""
P95 = (0.95,)
_PERIODS = {"before": ("before",), "after": ("after", "split")}
"""Periods that share one grid of time slots (so a resample keeps them paired)."""
_GROUP = {p: g for g, ps in _PERIODS.items() for p in ps}
_Z_CACHE: dict[float, float] = {}


def canary_count(n: int, pct: float, min_devices: int) -> int:
    """How many of a target's ``n`` devices are canaries (0 when the rollout is not staged)."""
    if n <= 0 or not 0.0 < pct < 100.0:
        return 0
    k = max(math.ceil(n * pct / 100.0 - 1e-9), min_devices)
    return min(k, n - 1) if n > 1 else 1


def choose_canaries(devices_by_target: Mapping[str, Sequence[str]], pct: float, min_devices: int,
                    seed: int) -> set[str]:
    """The canary devices: per target, :func:`canary_count` of them drawn at random (reproducible from ``seed``)."""
    chosen: set[str] = set()
    for target in sorted(devices_by_target):
        devs = sorted(devices_by_target[target])
        rng = random.Random(f"{seed}/{target}")  # a string seed is hashed stably (not by PYTHONHASHSEED)
        chosen.update(rng.sample(devs, canary_count(len(devs), pct, min_devices)))
    return chosen


def _z(confidence: float) -> float:
    """The two-sided normal quantile for ``confidence``."""
    if confidence not in _Z_CACHE:
        _Z_CACHE[confidence] = statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)
    return _Z_CACHE[confidence]


def look_confidence() -> float:
    """The confidence of each look's interval, so that all looks together keep :data:`CONFIDENCE`."""
    return 1.0 - (1.0 - CONFIDENCE) / len(LOOKS)


def requests_needed(policy: RolloutPolicy, base_rate: float = 0.0) -> int:
    """Canary requests needed before a verdict: ``min_samples``, and enough that an error-free canary shows its
    error rate below ``base_rate + max_error_increase`` (the upper Wilson bound with no errors is z^2 / (n + z^2))."""
    limit = min(1.0, base_rate + policy.max_error_increase)
    z = _z(look_confidence())
    need_err = math.ceil(z * z * (1.0 - limit) / limit) if limit > 0 else 0
    return max(policy.min_samples, need_err)


def _wilson(errors: int, n: int, confidence: float) -> tuple[float, float]:
    if n <= 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = errors / n
    den = 1.0 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


@dataclass(frozen=True)
class DeviceWindows:
    """One device's telemetry windows in the two periods: ``before`` (previous version, before the deployment) and
    ``after`` (canaries: the new version after activation; controls: still the previous version meanwhile)."""

    device: str
    before: Sequence[TelemetryWindow]
    after: Sequence[TelemetryWindow]
    split: Sequence[TelemetryWindow] = ()
    """Canaries only: the previous version's windows over the same time, from its share of a traffic split."""


def _usable(ws: Sequence[TelemetryWindow]) -> list[TelemetryWindow]:
    return [w for w in ws if w.sketch is not None and w.count > 0]


def _totals(units: Sequence[DeviceWindows], period: str) -> tuple[int, int]:
    n = e = 0
    for u in units:
        for w in getattr(u, period):
            n += w.count
            e += w.errors
    return n, e


class _Grid:
    """Every window's sketch as a row of bucket counts on one grid, and the p95 of sums of rows, vectorised."""

    def __init__(self, windows: Sequence[TelemetryWindow]) -> None:
        import numpy as np

        sks = [w.sketch for w in windows if w.sketch is not None]
        alpha = sks[0].alpha if sks else 0.01
        keys = [k for s in sks if s.counts for k in (s.offset, s.offset + len(s.counts) - 1)]
        self.lo = min(keys) if keys else 0
        hi = max(keys) if keys else 0
        gamma_ln = math.log((1.0 + alpha) / (1.0 - alpha))
        ks = np.arange(self.lo, hi + 1, dtype=np.float64)
        rep = 2.0 * np.exp(ks * gamma_ln) / (math.exp(gamma_ln) + 1.0)
        # column 0: the zero bucket (values below the sketch's minimum), then one column per bucket key
        self.log_rep = np.log(np.concatenate([[1e-6], rep]))
        self.width = len(rep) + 1
        self.alpha = alpha

    def rows(self, windows: Sequence[TelemetryWindow]) -> Any:
        import numpy as np

        out = np.zeros((len(windows), self.width), np.float64)
        for i, w in enumerate(windows):
            s = w.sketch
            if s is None or s.alpha != self.alpha:
                continue
            out[i, 0] = s.zero
            if s.counts:
                a = 1 + s.offset - self.lo
                out[i, a:a + len(s.counts)] = s.counts
        return out

    def log_q(self, counts: Any, qs: Sequence[float]) -> Any:
        """The mean of the log quantiles ``qs`` of each row of summed bucket counts (NaN for an empty row), by
        DDSketch.quantile's rank rule."""
        import numpy as np

        counts = np.atleast_2d(counts)
        cum = np.cumsum(counts, axis=1)
        total = cum[:, -1]
        out = np.zeros(len(total))
        for q in qs:
            rank = q * (total - 1.0)
            idx = np.minimum((cum <= rank[:, None] + 1e-9).sum(axis=1), self.width - 1)
            out += self.log_rep[idx]
        return np.where(total > 0, out / len(qs), np.nan)


def _slots(windows: Sequence[TelemetryWindow], slot_s: float) -> tuple[list[int], int]:
    """Each window's time slot, as an index into the sorted distinct slots of the period; and their number."""
    raw = [math.floor(w.ts / slot_s) for w in windows]
    distinct = sorted(set(raw))
    pos = {s: i for i, s in enumerate(distinct)}
    return [pos[s] for s in raw], len(distinct)


def _block_weights(n_slots: int, rng: Any, resamples: int) -> Any:
    """Moving-block bootstrap: how often each slot is drawn in each resample (resamples x n_slots)."""
    import numpy as np

    if n_slots == 0:
        return np.zeros((resamples, 0))
    block = max(1, round(n_slots ** (1.0 / 3.0)))
    block = min(block, n_slots)
    n_blocks = math.ceil(n_slots / block)
    starts = rng.integers(0, n_slots - block + 1, size=(resamples, n_blocks))
    idx = (starts[:, :, None] + np.arange(block)[None, None, :]).reshape(resamples, -1)[:, :n_slots]
    weights = np.zeros((resamples, n_slots))
    np.add.at(weights, (np.repeat(np.arange(resamples), idx.shape[1]), idx.ravel()), 1.0)
    return weights


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"x{r:.2f}"


def judge(bundle: str, canaries: Sequence[DeviceWindows], controls: Sequence[DeviceWindows],
          policy: RolloutPolicy, *, elapsed_s: float, final: bool, first: bool, seed: int = 0) -> CanaryVerdict:
    """One look at one bundle's canaries: ``observing`` (look again), ``proceed``, ``halt`` or ``cannot-judge``.

    ``canaries`` and ``controls`` hold every device's windows for both periods; ``first`` says the canaries had no
    previous version (only errors can be judged); ``final`` is the last look (an undecided verdict is
    ``cannot-judge``). The resampling is seeded, so a verdict is reproducible from the stored telemetry.
    """
    import numpy as np

    conf = look_confidence()
    max_s = LOOKS[-1] * policy.observe_s
    c_n, c_err = _totals(canaries, "after")
    c_base_n, c_base_err = _totals(canaries, "before")
    if c_base_n == 0:  # no baseline on the canaries themselves: the controls' error rate is the baseline
        c_base_n, c_base_err = (sum(x) for x in zip(_totals(controls, "before"), _totals(controls, "after"),
                                                    strict=True))
    base_rate = 0.0 if first or c_base_n == 0 else c_base_err / (c_base_n + c_base_err)
    needed = requests_needed(policy, base_rate)
    c_rate = c_err / (c_n + c_err) if c_n + c_err else 0.0
    common: dict[str, Any] = dict(bundle=bundle, canary_count=c_n, canary_error_rate=c_rate,
                                  baseline_error_rate=None if first else base_rate, baseline_count=c_base_n,
                                  confidence=CONFIDENCE, needed_count=needed, elapsed_s=round(elapsed_s, 1),
                                  max_s=max_s)

    def verdict(outcome: Outcome, reason: str, **kw: Any) -> CanaryVerdict:
        return CanaryVerdict(proceed=outcome == "proceed", outcome=outcome, reason=reason, **{**common, **kw})

    def undecided(why: str, **kw: Any) -> CanaryVerdict:
        if final:
            return verdict("cannot-judge", f"cannot judge after {elapsed_s:.0f} s: {why}", **kw)
        return verdict("observing", why, **kw)

    # -- errors (pooled: a device that fails requests can halt a rollout, never push one through) --------------------
    err_limit = base_rate + policy.max_error_increase
    e_lo, e_hi = _wilson(c_err, c_n + c_err, conf)
    err_text = f"errors {base_rate:.2%} → {c_rate:.2%}" if not first else f"errors {c_rate:.2%}"
    if c_n + c_err >= 20 and e_lo > err_limit:
        return verdict("halt", f"error rate rose to {c_rate:.2%} (at least {e_lo:.2%}, {conf:.1%} look interval), "
                               f"over the {'+' if not first else ''}{policy.max_error_increase:.2%} limit")
    enough = c_n >= needed
    short = f"{c_n} of the {needed} canary requests needed on the new version"
    err_ok = e_hi <= err_limit

    if first:
        if not enough:
            return undecided(short)
        if not err_ok:
            return undecided(f"{err_text}: not yet shown within the {policy.max_error_increase:.2%} limit")
        if elapsed_s < policy.observe_s:
            return verdict("observing", f"{err_text} so far; judging after {policy.observe_s:g} s")
        return verdict("proceed", f"first deployment (no previous version to compare latency with): {err_text} in "
                                  f"{c_n} requests, within the {policy.max_error_increase:.2%} limit")

    # -- output drift: a canary whose outputs depart from its own on the previous version halts the rollout, even
    # with a fine latency (fleet/drift.py; not judged when no canary has min_samples values on both versions) --------
    if policy.max_output_drift > 0:
        departed, dist, why = canary_drift({u.device: u.before for u in canaries},
                                           {u.device: u.after for u in canaries},
                                           threshold=policy.max_output_drift, min_values=policy.min_samples)
        common["output_drift"] = None if dist is None else round(dist, 4)
        if departed:
            return verdict("halt", f"{why}: the canaries' outputs departed from the previous version's")

    # -- latency ---------------------------------------------------------------------------------------------------
    units = [DeviceWindows(u.device, _usable(u.before), _usable(u.after), _usable(u.split)) for u in canaries]
    excluded = [f"{u.device}: fewer than {MIN_WINDOWS} windows with requests on the new version"
                for u in units if len(u.after) < MIN_WINDOWS]
    units = [u for u in units if len(u.after) >= MIN_WINDOWS]
    split = [u for u in units if len(u.split) >= MIN_WINDOWS]
    paired = [u for u in units if len(u.before) >= MIN_WINDOWS]
    ctl = [DeviceWindows(u.device, _usable(u.before), _usable(u.after)) for u in controls]
    ctl_after = [u for u in ctl if len(u.after) >= MIN_WINDOWS]
    mode: str
    if split:
        # each canary against its own previous version over the same seconds: nothing else is needed
        excluded += [f"{u.device}: fewer than {MIN_WINDOWS} windows of the previous version beside the new one"
                     for u in units if len(u.split) < MIN_WINDOWS]
        units, mode, ctl = split, "split", []
    elif paired:
        excluded += [f"{u.device}: fewer than {MIN_WINDOWS} windows on the previous version before the deployment"
                     for u in units if len(u.before) < MIN_WINDOWS]
        units, mode = paired, "paired"
        ctl = [u for u in ctl_after if len(u.before) >= MIN_WINDOWS]
    elif len(ctl_after) >= MIN_CONTROLS:
        mode, ctl = "beside", ctl_after  # no canary baseline: compare with the controls over the same time
    else:
        return undecided("no baseline: no canary has telemetry of the previous version from before the deployment "
                         f"and fewer than {MIN_CONTROLS} devices still run it", excluded=excluded[:512])
    if not units:
        return undecided("no canary has enough telemetry windows yet", excluded=excluded[:512])

    every = [w for u in (*units, *ctl) for w in (*u.before, *u.after, *u.split)]
    grid = _Grid(every)
    rng = np.random.default_rng(seed)
    slot_s = max(0.05, max(w.interval_s for w in every))
    # Each period's windows (all devices together) fall into time slots; a resample draws blocks of slots, the
    # same for every device and for both versions of a split, so what is compared stays paired in time.
    weights: dict[str, Any] = {}
    cells: dict[tuple[int, str], tuple[Any, list[int]]] = {}  # (unit index, period) -> (bucket rows, slot per row)
    every_unit = [*units, *ctl]
    for group, periods in _PERIODS.items():
        seq = [(j, p) for p in periods for j in range(len(every_unit))]
        pos, n_slots = _slots([w for j, p in seq for w in getattr(every_unit[j], p)], slot_s)
        weights[group] = np.vstack([np.ones((1, n_slots)), _block_weights(n_slots, rng, RESAMPLES)])
        i = 0
        for j, p in seq:
            mine = getattr(every_unit[j], p)
            cells[(j, p)] = (grid.rows(mine), pos[i:i + len(mine)])
            i += len(mine)

    # Without a split, devices are resampled too (with replacement within canaries and within controls, the same
    # draw for all periods of a device): a device's state over the whole observation (a core it shares with a busy
    # process ...) is then part of the noise, however many requests it served. A split pairs each canary with
    # itself: time blocks alone are resampled.
    n_all = len(every_unit)
    dev_w = np.ones((RESAMPLES + 1, n_all))
    for lo_j, hi_j in ((0, len(units)), (len(units), n_all)) if mode != "split" else ():
        if hi_j > lo_j:
            picks = rng.integers(lo_j, hi_j, size=(RESAMPLES, hi_j - lo_j))
            dev_w[1:, lo_j:hi_j] = 0.0
            np.add.at(dev_w[1:], (np.repeat(np.arange(RESAMPLES), hi_j - lo_j), picks.ravel()), 1.0)

    summed: dict[tuple[tuple[int, ...], str, bool], Any] = {}  # the bucket sums, shared by the tail and bare p95

    def merged(js: Sequence[int], period: str, observed_only: bool = False, qs: Sequence[float] = TAIL) -> Any:
        """Log tail latency (``qs``) of the units ``js`` merged in ``period``: [observed, resample 1, ...]."""
        key = (tuple(js), period, observed_only)
        total = summed.get(key)
        if total is None:
            w = weights[_GROUP[period]]
            w = w[:1] if observed_only else w
            total = np.zeros((w.shape[0], grid.width))
            for j in js:
                rows, slots = cells[(j, period)]
                if slots:
                    total += dev_w[:w.shape[0], j:j + 1] * (w[:, slots] @ rows)
            summed[key] = total
        return grid.log_q(total, qs)

    # Screen: each device's own (observed) change, against the others of its group; with three or more, one far
    # from the rest is left out and named (a device reporting invented latency neither passes nor halts alone).
    n_u = len(units)

    def own(j: int) -> float:
        after = float(merged([j], "after", True)[0])
        if mode == "beside":
            return after
        return after - float(merged([j], "split" if mode == "split" else "before", True)[0])

    def screen(js: list[int], label: str) -> list[int]:
        if len(js) < 3:
            return js
        eff = np.array([own(j) for j in js])
        med = float(np.nanmedian(eff))
        mad = 1.4826 * float(np.nanmedian(np.abs(eff - med)))
        far = ~(np.abs(eff - med) <= OUTLIER_MADS * max(mad, MAD_FLOOR))  # NaN is far too
        for k in np.flatnonzero(far):
            rel = math.exp(eff[k] - med) if math.isfinite(eff[k]) else None
            excluded.append(f"{every_unit[js[k]].device}: p95 {_fmt_ratio(rel)} on its own against the other "
                            f"{label}, an outlier")
        return [j for j, f in zip(js, far, strict=True) if not f]

    can_js = screen(list(range(n_u)), "canaries")
    ctl_js = screen(list(range(n_u, n_u + len(ctl))), "controls")
    if len(ctl_js) < MIN_CONTROLS and mode != "split":
        if mode == "beside":
            return undecided(f"fewer than {MIN_CONTROLS} controls to compare with", excluded=excluded[:512])
        ctl_js = []
    # The statistic: log p95 of the canaries merged against, in order of preference, (split) their previous version
    # merged over the same slots; (paired, with controls) the controls merged over the same slots, less the same
    # difference before the deployment (a difference in differences); (paired) their own before; (beside) the
    # controls over the same slots.
    def effect_of(qs: Sequence[float]) -> Any:
        can_after = merged(can_js, "after", qs=qs)
        if mode == "split":
            return can_after - merged(can_js, "split", qs=qs)
        if mode == "paired" and ctl_js:
            return (can_after - merged(ctl_js, "after", qs=qs)) - (merged(can_js, "before", qs=qs)
                                                                   - merged(ctl_js, "before", qs=qs))
        if mode == "paired":
            return can_after - merged(can_js, "before", qs=qs)
        return can_after - merged(ctl_js, "after", qs=qs)

    q_lo, q_hi = (1.0 - conf) / 2.0, 1.0 - (1.0 - conf) / 2.0
    effect = effect_of(TAIL)
    bare = effect_of(P95)  # the bare p95: a regression it shows halts too
    bare_lo = float(np.nanquantile(bare[1:], q_lo)) if np.isfinite(bare[1:]).any() else math.nan
    point = float(effect[0])
    lo, hi = (float(x) for x in np.nanquantile(effect[1:], [q_lo, q_hi])) if np.isfinite(effect[1:]).any() \
        else (math.nan, math.nan)
    n_dev, n_ctl = len(can_js), len(ctl_js)
    if not all(math.isfinite(x) for x in (point, lo, hi)):
        return undecided("the canaries' telemetry gives no p95 yet", excluded=excluded[:512])
    limit = math.log1p(policy.max_p95_regression)
    ratio, r_lo, r_hi = math.exp(point), math.exp(lo), math.exp(hi)
    how = (f"{n_dev} canar{'y' if n_dev == 1 else 'ies'}"
           + (" vs their previous version beside" if mode == "split" else f" vs {n_ctl} controls" if n_ctl
              else " before/after"))
    can_units = [units[j] for j in can_js]
    lat = dict(p95_ratio=round(ratio, 4), ratio_low=round(r_lo, 4), ratio_high=round(r_hi, 4), devices=n_dev,
               controls=n_ctl, excluded=excluded[:512],
               canary_p95=_merged_p95([w for u in can_units for w in u.after]),
               baseline_p95=_merged_p95([w for u in can_units for w in u.split] if mode == "split"
                                        else [w for u in can_units for w in u.before] if mode == "paired"
                                        else [w for j in ctl_js for w in every_unit[j].after]))
    text = f"p95 {_fmt_ratio(ratio)} [{r_lo:.2f}, {r_hi:.2f}] ({how}, {CONFIDENCE:.0%} interval)"
    if lo > limit:
        return verdict("halt", f"{text}: regressed over the +{policy.max_p95_regression:.0%} limit", **lat)
    if math.isfinite(bare_lo) and bare_lo > limit:
        return verdict("halt", f"{text}; the bare p95 alone x{math.exp(float(bare[0])):.2f} (at least "
                               f"x{math.exp(bare_lo):.2f}): regressed over the +{policy.max_p95_regression:.0%} "
                               "limit", **lat)
    if not enough:
        return undecided(f"{short}; {text}", **lat)
    if hi <= limit and err_ok and elapsed_s >= policy.observe_s:
        return verdict("proceed", f"{text}: within the +{policy.max_p95_regression:.0%} limit; {err_text}", **lat)
    if hi > limit:
        more = ""
        if point < limit and hi > point:
            # the interval narrows about as 1/sqrt(windows): time for its upper end to reach the limit
            grow = ((hi - point) / (limit - point)) ** 2
            more = f"; at this rate about {max(0.0, elapsed_s * (grow - 1.0)):.0f} s more would decide"
        return undecided(f"{text} reaches over the +{policy.max_p95_regression:.0%} limit{more}", **lat)
    if not err_ok:
        return undecided(f"{err_text}: not yet shown within the {policy.max_error_increase:.2%} limit", **lat)
    return verdict("observing", f"{text} so far; judging after {policy.observe_s:g} s", **lat)


def _merged_p95(windows: Sequence[TelemetryWindow]) -> float | None:
    from edgefleet.sdk.sketch import DDSketch

    sk = DDSketch.merged(DDSketch.from_wire(w.sketch) for w in windows if w.sketch is not None)
    return sk.quantile(0.95)
