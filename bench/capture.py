"""What sampled input capture adds to a request on the local API (KServe path), and how the ring holds a flood.

The only work capture adds to a request is ``CaptureRing.offer`` after the inference (writing and uploading happen
on their own threads): a random draw for every request of a captured model, and for a kept one its input arrays put
into the bounded queue (references, no copy). This times ``offer`` per call (best of 5 loops) for inputs of three
sizes, at rate 0 (the draw only), at rate 1 (every request queued) and for a model not captured; then floods a ring
with a 1 MiB cap from 4 threads and reports what it kept, evicted and dropped.

    .venv/bin/python bench/capture.py             # writes bench/results/capture.md and capture.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgefleet.agent.capture import CaptureConfig, CaptureRing  # noqa: E402

RESULTS = ROOT / "bench" / "results"
INPUTS = {
    "mlp x [1, 16] float32": {"x": np.ones((1, 16), np.float32)},
    "magika bytes [1, 2048] int32": {"bytes": np.ones((1, 2048), np.int32)},
    "image [1, 3, 224, 224] float32": {"image": np.ones((1, 3, 224, 224), np.float32)},
}


def per_call_us(ring: CaptureRing, model: str, feed: dict[str, np.ndarray], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            ring.offer(model, "1", feed)
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
        ring.flush(60)
    return round(best, 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        for name, feed in INPUTS.items():
            row: dict[str, Any] = {"inputs": name, "bytes": int(sum(a.nbytes for a in feed.values()))}
            for label, rate, model in (("not captured", 1.0, "other"), ("rate 0", 0.0, "m"), ("rate 1", 1.0, "m")):
                # a big queue and ring: this times the request path, not the writer keeping up
                ring = CaptureRing(Path(tmp) / f"{len(rows)}-{label}", CaptureConfig(
                    models=("m",), rate=rate, max_bytes=1 << 30, max_pending=100_000))
                calls = args.calls if label != "rate 1" or row["bytes"] < 100_000 else args.calls // 10
                row[label] = per_call_us(ring, model, feed, calls)
                ring.stop()
            rows.append(row)
        ring = CaptureRing(Path(tmp) / "flood", CaptureConfig(models=("m",), rate=1.0, max_bytes=1 << 20,
                                                              max_pending=64))
        feed = INPUTS["magika bytes [1, 2048] int32"]

        def flood() -> None:
            for _ in range(5000):
                ring.offer("m", "1", feed)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=flood) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ring.flush(60)
        seconds = time.perf_counter() - t0
        ring.stop()
        disk = sum(f.stat().st_size for f in (Path(tmp) / "flood").rglob("*.npz"))
        flood_row = {**ring.status(), "on_disk_bytes": disk, "cap_bytes": 1 << 20, "seconds": round(seconds, 2),
                     "requests": 20_000}
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared: load average {load}), Python "
                      f"{platform.python_version()}, numpy {np.__version__}", "offer_us": rows, "flood": flood_row}
    lines = ["# Sampled input capture: cost on the request path, and a flood", "",
             f"Measured {res['when']} by `.venv/bin/python bench/capture.py` on {res['machine']}.", "",
             "`CaptureRing.offer`, the only thing capture adds to a local-API request (best of 5 loops, µs per call):",
             "", "| inputs | bytes | model not captured | captured, rate 0 (draw only) "
             "| rate 1 (queued for the writer) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['inputs']} | {r['bytes']:,} | {r['not captured']} | {r['rate 0']} | {r['rate 1']} |")
    f = flood_row
    lines += ["", f"Flood: 4 threads x 5,000 requests of 8 KiB inputs at rate 1 into a ring capped at 1 MiB with a "
                  f"64-sample queue ({f['seconds']} s): {f['written']:,} written, {f['evicted']:,} evicted (oldest "
                  f"first), {f['dropped_queue']:,} dropped at the full queue, {f['dropped_storage']:,} for the disk "
                  f"reserve; {f['on_disk_bytes']:,} bytes on disk at the end (cap {f['cap_bytes']:,}).", "",
              "Raw figures: `capture.json` beside this file."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "capture.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "capture.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
