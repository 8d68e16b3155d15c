"""Does the canary verdict call rollouts right on a busy 2-core host? A/A trials against +30% regressions.

Real parts only: Mosquitto, a controller process, ``--agents`` real agent processes (x86-cpu, CPU EP) serving a
MatMul+Relu model under steady open-loop load through their Open Inference Protocol endpoints (bench/_rig.py), and
``--hogs`` busy-loop processes (default 1: one of two cores kept busy) as the noisy neighbour. Trials
alternate, so both kinds see the same host:

- **A/A**: a new version whose model is byte-for-byte the running one. It should proceed.
- **+30%**: a new version whose model has at least 30% more run time (layers are added until its measured run
  time, interleaved with the base's in this process, is x1.3 or more): real extra compute on every request. It
  should halt.

Each trial is one ``POST /api/deployments`` with ``--canary 50%`` (with 6 agents: 3 canaries, 3 controls), the
given ``--observe`` and ``--split`` (the share of each canary's requests its previous version keeps serving, so the
verdict compares the versions side by side; 0 makes it compare canaries with controls and with their own past, as
before the split existed); the outcome is the controller's verdict. A regression that got through is undone by deploying
the base model again (no canary) before the next trial. Results: bench/results/rollout.md and rollout.json.

    python bench/rollout.py                   # 20 + 20 trials, about 35 minutes here (each trial up to 3 x observe)
    python bench/rollout.py --trials 3        # a quick look
    python bench/rollout.py --report bench/results/rollout.json   # the Markdown again from a run's JSON

SIGTERM, SIGHUP and Ctrl-C stop it cleanly: the trials done so far are reported, and every process it started stops.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._rig import Rig, http_error_text, make_mlp, wait

RESULTS = Path(__file__).resolve().parent / "results"
RUNNING = ("canary", "observing", "rolling-out")


def _upload(rig: Rig, path: Path) -> str:
    with open(path, "rb") as fh:
        req = urllib.request.Request(rig.url + "/api/bundles", data=fh.read(), method="POST",
                                     headers={"Content-Type": "application/octet-stream",
                                              "Authorization": f"Bearer {rig.token}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return str(json.loads(r.read())["sha256"])


def _post(rig: Rig, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(rig.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {rig.token}"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"bench: {path} refused: {http_error_text(exc)}") from None


def _deploy(rig: Rig, sha: str, *, canary: float, observe_s: float, limit: float, seed: int,
            split: float = 0.0) -> dict[str, Any]:
    """One deployment to every agent; returns the finished deployment."""
    dep = _post(rig, "/api/deployments", {
        "bundles": [sha], "to": ["all"], "canary": canary, "observe_s": observe_s, "max_p95_regression": limit,
        "max_error_increase": 0.05, "min_samples": 200, "baseline_s": 60.0, "min_canary_devices": 3, "seed": seed,
        "split": split})
    dep_id = dep["id"]

    def done() -> dict[str, Any] | None:
        """The deployment, once it ended and every device answered its deploy and any rollback."""
        d = rig.api("GET", f"/api/deployments/{dep_id}")
        if d["state"] in RUNNING:
            return None
        for t in d.get("targets") or []:
            if t.get("cmd_id") and t["state"] in ("pending", "downloading", "verifying", "self-test"):
                return None
            if t.get("rollback_cmd_id") and t["state"] not in ("rolled-back", "failed") \
                    and not str(t.get("reason", "")).startswith("rollback failed"):
                return None
        return dict(d)

    return dict(wait(done, 3 * observe_s + 180, f"deployment {dep_id}"))


def _settle(rig: Rig, seconds: float) -> None:
    """Let every agent report ``seconds`` of telemetry on what it runs now (the next trial's baseline)."""
    time.sleep(seconds)


def _verdict(dep: dict[str, Any]) -> dict[str, Any]:
    looks = dep.get("decision", {}).get("canary") or []
    v = looks[-1] if looks else {}
    return {"state": dep["state"], "outcome": v.get("outcome") or ("proceed" if v.get("proceed") else "halt"),
            "reason": v.get("reason", dep.get("message", "")), "ratio": v.get("p95_ratio"),
            "low": v.get("ratio_low"), "high": v.get("ratio_high"), "elapsed_s": v.get("elapsed_s"),
            "canary_count": v.get("canary_count")}


def _model_ratio(base: Path, slow: Path, runs: int = 200) -> float:
    """Run time of ``slow`` over ``base`` in this process, interleaved (what the +30% really is)."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sb = ort.InferenceSession(str(base), opts, providers=["CPUExecutionProvider"])
    ss = ort.InferenceSession(str(slow), opts, providers=["CPUExecutionProvider"])
    x = {"x": np.ones((1, 256), np.float32)}
    tb, ts = [], []
    for _ in range(20):  # warm-up
        sb.run(None, x)
        ss.run(None, x)
    for _ in range(runs):
        for sess, out in ((sb, tb), (ss, ts)):
            t0 = time.perf_counter()
            sess.run(None, x)
            out.append(time.perf_counter() - t0)
    # the 10th percentiles: the runs no other process delayed (a median under load mixes in waits for a core, which
    # do not grow with the model's work, and would call a much slower model "+30%")
    return float(np.percentile(ts, 10) / np.percentile(tb, 10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="Trials of each kind.")
    ap.add_argument("--agents", type=int, default=6)
    ap.add_argument("--layers", type=int, default=20, help="Layers of the base model.")
    ap.add_argument("--rows", type=int, default=128, help="Rows each layer multiplies (the work per request).")
    ap.add_argument("--regression", type=float, default=0.30, help="Extra layers of the slow model (fraction).")
    ap.add_argument("--rate", type=float, default=10.0, help="Requests per second per agent.")
    ap.add_argument("--observe", type=float, default=30.0, help="Seconds before the first look (--observe).")
    ap.add_argument("--hogs", type=int, default=1, help="Busy-loop processes beside the agents (a busy host).")
    ap.add_argument("--split", type=float, default=50.0, help="--split (percent); 0 for no split.")
    ap.add_argument("--limit", type=float, default=0.20, help="--max-p95-regression.")
    ap.add_argument("--settle", type=float, default=5.0, help="Seconds of telemetry between trials.")
    ap.add_argument("--out", type=Path, default=RESULTS / "rollout.md")
    ap.add_argument("--report", type=Path, help="Only write the Markdown report of this results JSON.")
    ap.add_argument("--keep-store", type=Path, help="Copy the controller's store (SQLite) here at the end: every "
                    "trial's telemetry, to replay verdicts offline (bench/rollout_replay.py).")
    args = ap.parse_args()
    if args.report is not None:
        result = json.loads(args.report.read_text())
        args.report.with_suffix(".md").write_text(report(result))
        print(report(result))
        return

    t_start = time.monotonic()
    trials: list[dict[str, Any]] = []
    load = os.getloadavg()
    from edgefleet.sdk._signals import interrupt_on_stop_signals

    with interrupt_on_stop_signals(), tempfile.TemporaryDirectory(prefix="edgefleet-bench-rollout-") as tmp_s:
        # SIGTERM/SIGHUP as Ctrl-C: the rig's finally stops the broker, controller and agents it started
        tmp = Path(tmp_s)
        base = make_mlp(tmp / "base.onnx", args.layers, rows=args.rows)
        # The slow model: layers added until its measured run time is at least 1 + regression times the base's.
        slow_layers = round(args.layers * (1 + args.regression))
        while True:
            slow = make_mlp(tmp / "slow.onnx", slow_layers, rows=args.rows)
            model_ratio = _model_ratio(base, slow)
            if model_ratio >= 1 + args.regression or slow_layers >= 2 * args.layers:
                break
            slow_layers += 1
        print(f"models: {args.layers} and {slow_layers} layers of {args.rows}x256; measured run-time ratio "
              f"x{model_ratio:.3f}", flush=True)
        rig = Rig(tmp, args.agents, rate=args.rate, interval_s=1.0)
        # The noisy neighbour: processes that keep cores busy for the whole run, whatever else runs on the host.
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
        try:
            from edgefleet.sdk.bundle import SessionConfig
            from edgefleet.sdk.keys import load_private_key
            from edgefleet.sdk.testing import build_test_bundle

            key = load_private_key(rig.key)
            version = [0]

            def bundle(model: Path) -> str:
                version[0] += 1
                path = build_test_bundle(model, tmp / f"mlp-{version[0]}.efb", key, name=rig.model_name,
                                         version=f"1.0.{version[0]}", tolerance=_tolerance(),
                                         session=SessionConfig(intra_op_num_threads=1))
                return _upload(rig, path)

            first = _deploy(rig, bundle(base), canary=0.0, observe_s=args.observe, limit=args.limit, seed=0)
            if first["state"] != "completed":
                raise SystemExit(f"bench: the first deployment ended {first['state']}: {first.get('message')}")
            rig.start_load()
            _settle(rig, max(args.settle, 8.0))
            try:
                _run_trials(rig, args, trials, bundle, base, slow)
            except KeyboardInterrupt:
                print(f"interrupted: reporting the {len(trials)} trials done", flush=True)
            load = os.getloadavg()
            if args.keep_store is not None:
                _copy_store(rig.db, args.keep_store)
        finally:
            for h in hogs:
                h.kill()
                h.wait()
            rig.close()
    _write(args, trials, load, model_ratio, slow_layers, rig, t_start)


def _copy_store(db: Path, dest: Path) -> None:
    """A consistent copy of the live controller's SQLite store (the backup API, not a file copy under WAL)."""
    import sqlite3

    src = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        out = sqlite3.connect(dest)
        with out:
            src.backup(out)
        out.close()
    finally:
        src.close()
    print(f"store copied to {dest}", flush=True)


def _run_trials(rig: Rig, args: argparse.Namespace, trials: list[dict[str, Any]], bundle: Any, base: Path,
                slow: Path) -> None:
    """Alternate A/A and +30% trials, appending each verdict to ``trials``."""
    for i in range(args.trials):
        for kind, model in (("A/A", base), ("+30%", slow)):
            t0 = time.monotonic()
            dep = _deploy(rig, bundle(model), canary=50.0, observe_s=args.observe, limit=args.limit,
                          seed=1000 + len(trials), split=args.split)
            v = _verdict(dep)
            v.update(kind=kind, trial=i + 1, wall_s=round(time.monotonic() - t0, 1), deployment=dep["id"])
            trials.append(v)
            print(f"{kind:<5} {i + 1:>2}: {v['outcome']:<13} {dep['state']:<10} after "
                  f"{v['elapsed_s'] or 0:.0f} s ({v['wall_s']:.0f} s): {v['reason']}", flush=True)
            if kind == "+30%" and dep["state"] != "halted":  # a miss: every device runs the slow model now
                _deploy(rig, bundle(base), canary=0.0, observe_s=args.observe, limit=args.limit, seed=0)
            _settle(rig, args.settle)


def _write(args: argparse.Namespace, trials: list[dict[str, Any]], load: tuple[float, float, float],
           model_ratio: float, slow_layers: int, rig: Rig, t_start: float) -> None:
    result = {
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_end": load},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model_ratio": model_ratio, "slow_layers": slow_layers, "requests_sent": rig.sent,
        "request_errors": rig.errors, "wall_s": round(time.monotonic() - t_start), "trials": trials,
    }
    RESULTS.mkdir(exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.write_text(report(result))
    print(report(result))


def _half_width(trials: list[dict[str, Any]]) -> float:
    """Median half-width of the trials' intervals on the log scale (0.18 is what a 20% limit needs at best)."""
    import math

    w = [(math.log(t["high"]) - math.log(t["low"])) / 2 for t in trials if t["low"] and t["high"]]
    return statistics.median(w) if w else float("nan")


def _tolerance() -> Any:
    from edgefleet.sdk import Tolerance

    return Tolerance(max_abs=1e-3, min_cosine=0.999)


def _count(trials: list[dict[str, Any]], kind: str, state: str) -> tuple[int, int]:
    ts = [t for t in trials if t["kind"] == kind]
    return sum(1 for t in ts if (t["state"] == "halted") == (state == "halted")), len(ts)


def report(r: dict[str, Any]) -> str:
    """The results as Markdown."""
    trials = r["trials"]
    aa_ok, aa_n = _count(trials, "A/A", "completed")
    reg_ok, reg_n = _count(trials, "+30%", "halted")
    c = r["config"]
    lines = [
        "# Canary verdicts on a busy host: A/A against a real +30% regression (bench/rollout.py)",
        "",
        f"{r['host']['cpus']} CPUs, {c.get('hogs', 0)} busy-loop process(es) beside the agents, shared with other "
        "work (load average at the end "
        f"{', '.join(f'{x:.1f}' for x in r['host']['loadavg_end'])}); {c['agents']} real agents (x86-cpu, CPU EP) "
        f"under {c['rate']:g} requests/s each of open-loop load, telemetry every 1 s; canary 50% (3 canaries, "
        f"3 controls), `--split {c.get('split', 0.0):g}%`, `--observe {c['observe']:g}` (looks at 1, 1.5, 2, 2.5 "
        "and 3x), "
        f"`--max-p95-regression {c['limit']:.0%}`, `--max-error-increase 5%`, 200 requests needed. "
        f"The slow model has {r['slow_layers']} layers against {c['layers']}: measured run-time ratio "
        f"**x{r['model_ratio']:.2f}** (10th percentiles, interleaved, one thread). {r['requests_sent']:,} requests, "
        f"{r['request_errors']} errors; {r['wall_s'] / 60:.1f} minutes.",
        "",
        "| trials | proceeded | halted | goal |",
        "|---|---|---|---|",
        f"| A/A (identical model, new version) | **{aa_ok}/{aa_n}** | {aa_n - aa_ok} | proceeds in ≥ 19/20 |",
        f"| +30% (more layers) | {reg_n - reg_ok} | **{reg_ok}/{reg_n}** | halts in ≥ 19/20 |",
        "",
        "| trial | kind | verdict | state | p95 ratio [interval] | decided after | wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        ratio = (f"x{t['ratio']:.2f} [{t['low']:.2f}, {t['high']:.2f}]" if t["ratio"] is not None
                 and t["low"] is not None and t["high"] is not None else "-")
        lines.append(f"| {t['trial']} | {t['kind']} | {t['outcome']} | {t['state']} | {ratio} | "
                     f"{t['elapsed_s'] or 0:.0f} s | {t['wall_s']:.0f} s |")
    est = {k: sorted(t["ratio"] for t in trials if t["kind"] == k and t["ratio"] is not None) for k in ("A/A", "+30%")}
    if est["A/A"] and est["+30%"]:
        lines += ["", "The canaries' p95 ratio (point estimate), over the trials: "
                  + "; ".join(f"{k} median x{statistics.median(v):.2f}, range x{v[0]:.2f}-x{v[-1]:.2f}, "
                              f"{sum(x > 1 + c['limit'] for x in v)}/{len(v)} above the limit" for k, v in est.items())
                  + ". Interval half-widths (log scale, median over trials): "
                  + f"{_half_width(trials):.2f}."]
    misses = [t for t in trials if (t["kind"] == "A/A") == (t["state"] == "halted")]
    if misses:
        lines += ["", "Wrong calls:", ""]
        lines += [f"- {t['kind']} trial {t['trial']}: {t['reason']}" for t in misses]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
