"""Runtime overhead: ``Model.run`` against a bare ``InferenceSession.run``, and the latency sketch's insert cost.

Both sessions load the same model with the same ``SessionOptions`` object and run the same inputs; calls are
interleaved in random order so drift from other load on the machine hits both sides alike, and medians are compared.
Goal (issue 2): overhead per call under 3% or 20 µs, whichever is larger; sketch insert ≤ 2 µs per latency.

    .venv/bin/python bench/runtime.py            # writes bench/results/runtime.md and runtime.json
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
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet.sdk.bundle import ProviderConfig, SessionConfig, extract_bundle, verify_bundle
from edgefleet.sdk.keys import PrivateKey, TrustedKeys
from edgefleet.sdk.runtime import Model, ort_info
from edgefleet.sdk.sketch import DDSketch, LatencyRecorder
from edgefleet.sdk.testing import build_test_bundle

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_PCT = 3.0
GOAL_US = 20.0
GOAL_SKETCH_US = 2.0


def _mlp(path: Path, in_dim: int = 16, hidden: int = 32, out_dim: int = 4) -> Path:
    """The tests' small MLP (MatMul/Add/Relu/MatMul/Softmax), built with onnx.helper."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("w1", (in_dim, hidden)), ("b1", (hidden,)), ("w2", (hidden, out_dim)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_dim])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", out_dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _magika() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("magika")
    if spec is None or not spec.origin:
        raise SystemExit("magika is not installed (make setup installs it)")
    return sorted(Path(spec.origin).parent.glob("models/*/model.onnx"))[-1]


PROVIDERS = {
    "cpu": ((ProviderConfig("CPUExecutionProvider"),), "all"),
    # The intel-openvino-cpu profile's choice: OpenVINO on the CPU device, CPU EP behind it, basic ORT rewrites only.
    "openvino": ((ProviderConfig("OpenVINOExecutionProvider", {"device_type": "CPU"}),
                  ProviderConfig("CPUExecutionProvider")), "basic"),
}


def _open(model: Path, name: str, tmp: Path, key: PrivateKey, trusted: TrustedKeys, threads: int,
          ep: str = "cpu") -> Model:
    providers, level = PROVIDERS[ep]
    if ep == "openvino":  # OpenVINO runs its own thread pool: pin it like ORT's intra-op threads, for less noise
        ov, *rest = providers
        providers = (ProviderConfig(ov.name, {**ov.options, "num_of_threads": str(threads)}), *rest)
    bundle = build_test_bundle(model, tmp / f"{ep}-{name}.efb", key, name=name, providers=providers,
                               session=SessionConfig(graph_optimization_level=level, intra_op_num_threads=threads))
    dest = tmp / "store" / verify_bundle(bundle, trusted).digest
    extract_bundle(bundle, trusted, dest)
    return Model.open(dest, trusted, cache_dir=tmp / "cache")


def _interleaved(fns: list[Callable[[], Any]], n: int, warmup: int) -> list[list[float]]:
    """Per-call wall times (µs) of each function, interleaved in a new random order every round.

    Random, not rotated: with a fixed cycle each function always follows the same other one, and a session that runs
    right after itself finds its weights still in cache (measured here: that alone is worth ~2% on magika).
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    clock = time.perf_counter_ns
    rng = np.random.default_rng(12345)
    for _ in range(n):
        for idx in rng.permutation(len(fns)):
            t0 = clock()
            fns[idx]()
            times[idx].append((clock() - t0) / 1000.0)
    return times


def _overhead(model: Model, feed: Mapping[str, np.ndarray], n: int, warmup: int) -> dict[str, Any]:
    import onnxruntime as ort

    bare = ort.InferenceSession(str(model.model_path), sess_options=model._session_options,
                                providers=model._providers)
    names = [o.name for o in model.manifest.outputs]
    ref = bare.run(names, dict(feed))
    got = model.run(feed)
    for name, r in zip(names, ref, strict=True):
        np.testing.assert_allclose(got[name], r, rtol=1e-6, atol=1e-6)
    # A second bare session gives the noise floor: two identical sessions differ by this much on this machine.
    bare2 = ort.InferenceSession(str(model.model_path), sess_options=model._session_options,
                                 providers=model._providers)
    # And Model.run against its own session's run: the wrapper's cost without session-to-session differences.
    own = model.session
    t_model, t_bare, t_bare2, t_own = _interleaved(
        [lambda: model.run(feed), lambda: bare.run(names, feed), lambda: bare2.run(names, feed),
         lambda: own.run(names, feed)], n, warmup
    )
    med_m, med_b = statistics.median(t_model), statistics.median(t_bare)
    noise = abs(statistics.median(t_bare2) - med_b)
    wrapper = med_m - statistics.median(t_own)
    over = med_m - med_b
    goal = max(GOAL_PCT / 100.0 * med_b, GOAL_US)
    return {
        "model": model.name, "calls": n, "inputs": {k: list(v.shape) for k, v in feed.items()},
        "providers": list(model.placement.serving), "intra_op_threads": model.manifest.session.intra_op_num_threads,
        "onnxruntime": f"{model.ort.version} ({model.ort.flavour})",
        "bare_median_us": round(med_b, 2), "model_median_us": round(med_m, 2),
        "bare_p90_us": round(float(np.percentile(t_bare, 90)), 2),
        "model_p90_us": round(float(np.percentile(t_model, 90)), 2),
        "overhead_us": round(over, 2), "overhead_pct": round(100.0 * over / med_b, 2),
        "noise_floor_us": round(noise, 2), "overhead_vs_own_session_us": round(wrapper, 2),
        "goal_us": round(goal, 2), "meets_goal": over <= goal,
        # Over the goal but within what two identical sessions differ by: this machine cannot tell.
        "verdict": "yes" if over <= goal else "inconclusive (noise floor over the goal)" if noise > goal else "NO",
    }


def _per_call_us(fn: Callable[[float], Any], values: np.ndarray, repeats: int = 5) -> float:
    """Best-of-``repeats`` mean cost of ``fn(v)`` over ``values``, minus the bare loop's cost."""
    vals = [float(v) for v in values]

    def loop(f: Callable[[float], Any]) -> float:
        t0 = time.perf_counter_ns()
        for v in vals:
            f(v)
        return (time.perf_counter_ns() - t0) / 1000.0 / len(vals)

    def nothing(v: float) -> None:
        return None

    best = min(loop(fn) for _ in range(repeats))
    base = min(loop(nothing) for _ in range(repeats))
    return max(best - base, 0.0)


def _sketch_costs(n: int) -> dict[str, Any]:
    values = np.random.default_rng(0).lognormal(0.0, 1.0, n)  # latencies in ms, median 1 ms
    sk = DDSketch()
    add_us = _per_call_us(sk.add, values)
    rec = LatencyRecorder()
    record_us = _per_call_us(rec.record, values)
    parts = [DDSketch() for _ in range(10)]
    for i, v in enumerate(values):
        parts[i % 10].add(float(v))
    t0 = time.perf_counter_ns()
    merged = DDSketch.merged(parts)
    merge_us = (time.perf_counter_ns() - t0) / 1000.0
    payload = json.dumps(merged.to_dict())
    return {
        "values": n, "add_us": round(add_us, 3), "record_us": round(record_us, 3),
        "meets_goal": record_us <= GOAL_SKETCH_US and add_us <= GOAL_SKETCH_US,
        "merge_10_sketches_us": round(merge_us, 1), "serialised_bytes": len(payload),
        "buckets": len(merged.to_dict()["counts"]),
    }


def _machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = ort_info()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "system": platform.system(),
        "python": platform.python_version(), "numpy": np.__version__,
        "onnxruntime": info.version, "ort_flavour": info.flavour, "providers": list(info.providers),
        "edgefleet": metadata.version("edgefleet"), "load_avg_at_start": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [
        "# Runtime overhead and sketch cost",
        "",
        f"Measured {m['date']} by `.venv/bin/python bench/runtime.py` on {m['cpu']} ({m['cores']} cores, "
        f"{m['machine']}, shared with other work: load average {', '.join(f'{x:.1f}' for x in m['load_avg_at_start'])} "
        f"at start), Python {m['python']}, numpy {m['numpy']}; ONNX Runtime per row (`.venv` has the CPU "
        "flavour, the OpenVINO rows run in `.venv-openvino`).",
        "",
        "## `Model.run` vs bare `InferenceSession.run`",
        "",
        "Same model file, same `SessionOptions` object, same providers and inputs, "
        f"{res['overhead'][0]['intra_op_threads']} intra-op thread(s); calls interleaved in a new random order "
        "every round; medians. The noise floor is the gap between two identical bare sessions measured the same way; "
        "'vs own session' compares `Model.run` with a direct `run` on the Model's own session (no session-to-session "
        "difference).",
        f"Goal: overhead under {GOAL_PCT:g}% or {GOAL_US:g} µs per call, whichever is larger.",
        "",
        "| model | served by | ONNX Runtime | inputs | calls | bare median µs | Model.run median µs | overhead µs "
        "| overhead % | noise floor µs | vs own session µs | goal µs | meets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["overhead"]:
        shapes = ", ".join(f"{k} {v}" for k, v in r["inputs"].items())
        meets = r["verdict"]
        served = r["providers"][0].removesuffix("ExecutionProvider")
        lines.append(f"| {r['model']} | {served} | {r['onnxruntime']} | {shapes} | {r['calls']} | "
                     f"{r['bare_median_us']} | {r['model_median_us']} | "
                     f"{r['overhead_us']} | {r['overhead_pct']} | {r['noise_floor_us']} | "
                     f"{r['overhead_vs_own_session_us']} | {r['goal_us']} | {meets} |")
    s = res["sketch"]
    lines += [
        "",
        "What the overhead pays for: the input check against the manifest (names, dtype, rank, fixed dims), the",
        "latency measurement and its insert into the mergeable sketch, and the outputs as a dict by name: a few µs,",
        "which is what the small model shows. On the real model that is far below what this shared 2-core machine",
        "resolves: an overhead smaller than the noise floor (even negative) means no measurable difference.",
        "",
        "## Latency sketch",
        "",
        f"DDSketch (alpha 0.01) over {s['values']:,} lognormal latencies; cost per value with the bare Python loop "
        "subtracted, best of 5.",
        f"Goal: ≤ {GOAL_SKETCH_US:g} µs per latency.",
        "",
        "| operation | cost |",
        "|---|---|",
        f"| `DDSketch.add` | {s['add_us']} µs |",
        f"| `LatencyRecorder.record` (lock + add + count) | {s['record_us']} µs |",
        f"| merge 10 sketches of {s['values'] // 10:,} values | {s['merge_10_sketches_us']} µs |",
        f"| merged sketch as JSON | {s['serialised_bytes']} bytes, {s['buckets']} buckets |",
        "",
        f"Meets the goal: {'yes' if s['meets_goal'] else 'NO'}.",
        "",
        "Raw figures: `runtime.json` beside this file.",
        "",
    ]
    return "\n".join(lines)


def _measure(ep: str, small_calls: int, real_calls: int, threads: int) -> list[dict[str, Any]]:
    """Overhead rows for the small MLP and magika on one provider set."""
    from edgefleet.sdk.keys import generate_keypair

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        t = Path(tmp)
        key = generate_keypair(t / "bench.key")
        trusted = TrustedKeys([key.public])
        small = _open(_mlp(t / "mlp.onnx"), "mlp", t, key, trusted, threads, ep)
        feed = {"x": np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)}
        rows.append(_overhead(small, feed, small_calls, warmup=200))
        real = _open(_magika(), "magika", t, key, trusted, threads, ep)
        feed = {"bytes": np.random.default_rng(2).integers(0, 256, (1, 2048)).astype(np.int32)}
        rows.append(_overhead(real, feed, real_calls, warmup=20))
    return rows


def _openvino_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The same measurement in the OpenVINO venv (its own ORT flavour), when that venv exists."""
    python = Path(__file__).resolve().parents[1] / ".venv-openvino" / "bin" / "python"
    # Compare venv prefixes, not interpreters: both venvs' python link to the same base interpreter.
    if not python.exists() or Path(sys.prefix).resolve() == python.parents[1].resolve():
        return []
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-ov-") as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [str(python), __file__, "--ep", "openvino", "--rows-only", str(out), "--small-calls",
               str(args.small_calls), "--real-calls", str(args.real_calls), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            print(f"OpenVINO run failed, left out: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return []
        return list(json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-calls", type=int, default=5000, help="interleaved calls for the small MLP (>= 1000)")
    ap.add_argument("--real-calls", type=int, default=300, help="interleaved calls for magika (>= 100)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of both sessions (1: least noise)")
    ap.add_argument("--ep", choices=sorted(PROVIDERS), default="cpu", help="provider set of the bundles")
    ap.add_argument("--rows-only", type=Path, help="write just the overhead rows as JSON here (used for the "
                    "OpenVINO venv run)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.small_calls < 1000 or args.real_calls < 100:
        ap.error("the goal is stated over >= 1000 calls (small model) and >= 100 calls (real model)")
    rows = _measure(args.ep, args.small_calls, args.real_calls, args.threads)
    if args.rows_only:
        args.rows_only.write_text(json.dumps(rows))
        return 0
    results: dict[str, Any] = {"machine": _machine(), "overhead": rows + _openvino_rows(args)}
    results["sketch"] = _sketch_costs(200_000)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "runtime.md").write_text(_markdown(results))
    print(_markdown(results))
    ok = all(r["verdict"] != "NO" for r in results["overhead"]) and results["sketch"]["meets_goal"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
