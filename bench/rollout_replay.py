"""Replay canary verdicts offline on the telemetry a bench/rollout.py run stored (``--keep-store``).

Every trial's deployment is read back from the copied controller store; the canaries' and controls' windows are
gathered exactly as the controller gathers them (fleet/rollout.py ``_judge``), cut at each look's time, and judged by
the current :func:`edgefleet.fleet.canary.judge`. A trial that halted early has no telemetry of the new version past
its halt, so its later looks see what the controller would have seen had it halted then; the replay reports the
first look that decides.

    python bench/rollout_replay.py bench/results/rollout.json /tmp/rollout-store.db
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def replay(result: dict[str, Any], store_path: Path, **judge_kw: Any) -> list[dict[str, Any]]:
    from edgefleet.fleet import canary
    from edgefleet.fleet.store.sqlite import SQLiteStore
    from edgefleet.sdk.protocol import RolloutPolicy, TelemetryWindow

    store = SQLiteStore(store_path)
    out = []
    try:
        for trial in result["trials"]:
            dep = store.deployment(trial["deployment"])
            if dep is None or dep.decision.policy is None:
                continue
            policy: RolloutPolicy = dep.decision.policy
            targets = dep.targets or []
            cans = [t for t in targets if t.phase == "canary"]
            rest = [t for t in targets if t.phase == "rest"]
            start = max(t.activated for t in cans)
            created = dep.created

            def windows(device: str, version: str, since: float, until: float, fleet: str = dep.fleet,
                        name: str = cans[0].name) -> list[TelemetryWindow]:
                return store.windows(fleet, device, since=since, until=until, name=name, version=version,
                                     with_sketch=True)

            verdict = None
            for j, m in enumerate(canary.LOOKS):
                now = start + m * policy.observe_s
                c_units = []
                for t in cans:
                    ws = [w for w in windows(t.device, t.version, created, now)
                          if w.ts - w.interval_s >= (t.activated or created)][1:]
                    split = [w for w in windows(t.device, t.previous_version, created, now)
                             if w.ts - w.interval_s >= (t.activated or created)][1:]
                    c_units.append(canary.DeviceWindows(
                        t.device, windows(t.device, t.previous_version, created - policy.baseline_s, created), ws,
                        split if policy.canary_split > 0 else []))
                k_units = [canary.DeviceWindows(
                    t.device, windows(t.device, t.previous_version, created - policy.baseline_s, created),
                    windows(t.device, t.previous_version, start, now)) for t in rest if t.previous_version]
                verdict = canary.judge("replay", c_units, k_units, policy, elapsed_s=m * policy.observe_s,
                                       final=j == len(canary.LOOKS) - 1, first=False, seed=(policy.seed or 0) + j,
                                       **judge_kw)
                if verdict.outcome != "observing":
                    break
            assert verdict is not None
            out.append({"trial": trial["trial"], "kind": trial["kind"], "outcome": verdict.outcome,
                        "ratio": verdict.p95_ratio, "low": verdict.ratio_low, "high": verdict.ratio_high,
                        "elapsed_s": verdict.elapsed_s, "reason": verdict.reason, "was": trial["outcome"]})
    finally:
        store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("result", type=Path, help="bench/rollout.py's results JSON")
    ap.add_argument("store", type=Path, help="the store it kept (--keep-store)")
    args = ap.parse_args()
    rows = replay(json.loads(args.result.read_text()), args.store)
    for r in rows:
        rng = f"x{r['ratio']:.2f} [{r['low']:.2f}, {r['high']:.2f}]" if r["ratio"] else "-"
        print(f"{r['kind']:<5} {r['trial']:>2}: {r['outcome']:<13} {rng:<22} at {r['elapsed_s']:>5.0f} s "
              f"(bench: {r['was']})")
    for kind, good in (("A/A", "proceed"), ("+30%", "halt")):
        ks = [r for r in rows if r["kind"] == kind]
        ok = sum((r["outcome"] == "proceed") == (good == "proceed") for r in ks)
        print(f"{kind}: {ok}/{len(ks)} right")


if __name__ == "__main__":
    main()
