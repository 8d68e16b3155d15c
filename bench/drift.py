"""What output-drift statistics cost: per request on ``Model.run``, and per telemetry window on the wire.

Per request: two ``Model`` instances of the same bundle, one whose manifest names an output statistic (top-1
confidence) and one without, timed against each other in interleaved rounds (``sdk.timing``): the difference is
the statistic's computation and its sketch insert. Per window: the JSON size of a telemetry record's model entry
with and without the output sketch, after ``--requests`` requests.

    .venv/bin/python bench/drift.py             # writes bench/results/drift.md and drift.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgefleet.agent.telemetry import model_entry  # noqa: E402
from edgefleet.sdk.bundle import extract_bundle  # noqa: E402
from edgefleet.sdk.keys import TrustedKeys, generate_keypair  # noqa: E402
from edgefleet.sdk.protocol import Telemetry  # noqa: E402
from edgefleet.sdk.runtime import Model, ort_info  # noqa: E402
from edgefleet.sdk.testing import build_test_bundle, output_reference_metadata  # noqa: E402
from edgefleet.sdk.timing import TimingPolicy, interleaved_rounds  # noqa: E402

from tests.conftest import make_mlp  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def _models(work: Path) -> dict[str, tuple[Path, str, str, list[dict[str, np.ndarray]]]]:
    """name -> (model, output, statistic, samples)."""
    sys.path.insert(0, str(ROOT / "tests" / "packager"))
    import packager_models as pm

    rng = np.random.default_rng(0)
    out = {"mlp (16 -> 4, batch 1)": (make_mlp(work / "mlp.onnx"), "probs", "top1",
                                      [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(32)])}
    magika = pm.shipped_model("magika")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(magika), providers=["CPUExecutionProvider"])
    name = sess.get_outputs()[0].name
    out["magika (2048 bytes -> 214 classes)"] = (magika, name, "top1", pm.magika_samples(32))
    return out


def measure(name: str, model: Path, output: str, stat: str, samples: list[dict[str, np.ndarray]], key: Any,
            trusted: TrustedKeys, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    meta = output_reference_metadata(model, stat, output, samples)
    opened = {}
    for label, md in (("with", meta), ("without", {})):
        b = build_test_bundle(model, work / f"{label}.efb", key, metadata=md, samples=samples[:2])
        extract_bundle(b, trusted, work / label)
        opened[label] = Model.open(work / label, trusted, cache_dir=work / f"c-{label}")
    feed = samples[0]
    runners = {k: (lambda m=m: m.run(feed)) for k, m in opened.items()}
    res = interleaved_rounds(runners, "without", TimingPolicy(min_rounds=15, max_rounds=300, budget_s=args.seconds,
                                                               target_halfwidth=0.005, min_call_s=0.05))
    w, wo = res.estimates["with"], res.estimates["without"]
    # the statistic and its sketch insert alone, on this model's real output (best of 5 loops of 2000)
    m0 = opened["with"]
    out = m0.run(feed)
    alone = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(2000):
            m0._record_output(out)
        alone = min(alone, (time.perf_counter() - t0) / 2000 * 1e6)
    cmp = res.compare("with", "without")
    m = opened["with"]
    m.output_recorder.take(0.0)
    m.recorder.take(0.0)
    for i in range(args.requests):
        m.run(samples[i % len(samples)])
    entry = model_entry(m, m.recorder.take(time.monotonic()))
    with_bytes = len(Telemetry(device="d", boot="b", seq=1, interval_s=10.0, models=[entry]).to_json())
    bare = json.loads(Telemetry(device="d", boot="b", seq=1, interval_s=10.0, models=[entry]).to_json())
    bare["models"][0].pop("output", None)
    without_bytes = len(json.dumps(bare, separators=(",", ":")).encode())
    return {"model": name, "stat": stat, "with_ms": round(w.median_ms, 5), "without_ms": round(wo.median_ms, 5),
            "overhead_us": round((w.median_ms - wo.median_ms) * 1000, 2),
            "stat_alone_us": round(alone, 2), "ratio": round(cmp.ratio, 4),
            "ci": [round(cmp.low, 4), round(cmp.high, 4)], "rounds": w.rounds,
            "record_bytes_with": with_bytes, "record_bytes_without": without_bytes, "requests": args.requests}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="timing budget per model")
    ap.add_argument("--requests", type=int, default=1000, help="requests in the measured telemetry window")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        work = Path(tmp)
        key = generate_keypair(work / "k.key")
        trusted = TrustedKeys([key.public])
        for i, (name, (model, output, stat, samples)) in enumerate(_models(work).items()):
            d = work / f"m{i}"
            d.mkdir()
            rows.append(measure(name, model, output, stat, samples, key, trusted, d, args))
    info = ort_info()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared: load average {load}), Python "
                      f"{platform.python_version()}, ONNX Runtime {info.version} ({info.flavour})", "rows": rows}
    lines = ["# Output drift statistics: cost", "",
             f"Measured {res['when']} by `.venv/bin/python bench/drift.py` on {res['machine']}.", "",
             "`Model.run` with the bundle's output statistic against the same bundle without one, interleaved "
             "rounds (median of per-round ratios, 95% interval); telemetry: one record's JSON bytes with and "
             f"without the output sketch after {args.requests} requests.", "",
             "| model | statistic | statistic + sketch insert alone (µs) | Model.run without (ms) | with (ms) | "
             "difference µs | ratio [95%] | rounds | record bytes without / with |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['stat']} | {r['stat_alone_us']} | {r['without_ms']:.4f} | "
                     f"{r['with_ms']:.4f} | "
                     f"{r['overhead_us']} | {r['ratio']:.3f} [{r['ci'][0]:.3f}-{r['ci'][1]:.3f}] | {r['rounds']} | "
                     f"{r['record_bytes_without']} / {r['record_bytes_with']} |")
    lines += ["", "The statistic's own cost (first numeric column) is what a request pays; the interleaved `Model.run` "
                  "comparison shows it end to end where the model is fast enough for this shared host to resolve "
                  "microseconds (the MLP); on a model of tens of milliseconds the difference is far inside the "
                  "run-to-run noise (its interval straddles 1).", "", "Raw figures: `drift.json` beside this file."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "drift.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
