"""Liveness bench: how fast a dead device shows as offline, and what liveness and /metrics cost at fleet size.

* **Last Will**: a real agent process (``edgefleet agent run``) is SIGKILLed (or SIGTERMed: its own ``offline``);
  measured from the signal until the controller's store says ``offline`` (the dashboard and ``fleet top`` read the
  same state; the Chromium test saw ~0.3 s to the page).
* **Silence**: a simulated device keeps its connection but stops publishing; measured from its last message until
  the controller marks it offline (``--offline-after`` plus up to one check period).
* **At 10,000 devices** (SQLite): one ``Store.mark_silent`` pass with nothing due (what every check costs) and with
  every device due (10,000 rows and events in one transaction), and ``GET /metrics`` (size, time) with every device
  online and with half offline.

Run: ``.venv/bin/python bench/liveness.py [--rounds N]``; writes bench/results/liveness.md and liveness.json. Timings
are reported, never asserted; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._rig import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
EDGEFLEET = Path(sys.executable).with_name("edgefleet")


def wait(pred: Any, timeout_s: float, what: str, step: float = 0.005) -> float:
    """Poll until ``pred()``; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic()
        time.sleep(step)
    raise SystemExit(f"bench: timed out after {timeout_s:g} s waiting for {what}")


def start_broker(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"log_dest file {tmp / 'mosquitto.log'}\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False
    wait(up, 10, "mosquitto", 0.05)
    return proc, f"mqtt://127.0.0.1:{port}"


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def agent_deaths(tmp: Path, broker: str, rounds: int) -> dict[str, Any]:
    """Real agents: SIGKILL (the broker's Last Will) and SIGTERM (the agent's own offline) until stored offline."""
    from edgefleet.fleet.controller import Controller, ControllerConfig
    from edgefleet.sdk.keys import generate_keypair

    generate_keypair(tmp / "fleet.key", tmp / "fleet.pub")
    ctl = Controller(ControllerConfig(broker=broker, db=str(tmp / "agents.db"), fleet="lv", http_port=0,
                                      bundles_dir=tmp / "bundles", client_id="lv-ctl", offline_after_s=30.0))
    ctl.start()
    out: dict[str, list[float]] = {"SIGKILL": [], "SIGTERM": []}
    try:
        for i in range(rounds):
            for sig_name, sig in (("SIGKILL", signal.SIGKILL), ("SIGTERM", signal.SIGTERM)):
                dev = f"a{i}-{sig_name.lower()}"
                data = tmp / dev
                data.mkdir()
                with open(tmp / f"{dev}.log", "ab") as log:
                    proc = subprocess.Popen(
                        [str(EDGEFLEET), "agent", "run", "--device", dev, "--fleet", "lv", "--broker", broker,
                         "--data-dir", str(data), "--trust", str(tmp / "fleet.pub"), "--profile", "x86-cpu",
                         "--telemetry-interval", "1", "--api", "127.0.0.1:0", "--log-level", "warning"],
                        stdout=log, stderr=subprocess.STDOUT)
                    try:
                        wait(lambda dev=dev: getattr(ctl.store.device("lv", dev), "state", "") == "online", 120,
                             f"{dev} online", 0.05)
                        time.sleep(1.5)  # a telemetry record or two, as in steady state
                        t0 = time.monotonic()
                        proc.send_signal(sig)
                        t1 = wait(lambda dev=dev: getattr(ctl.store.device("lv", dev), "state", "") == "offline", 60,
                                  f"{dev} offline")
                        out[sig_name].append(t1 - t0)
                    finally:
                        if proc.poll() is None:
                            proc.kill()
                        proc.wait(30)
    finally:
        ctl.stop()
    return {k: summary(v) for k, v in out.items()}


def silence(tmp: Path, broker: str, rounds: int, offline_after_s: float) -> dict[str, Any]:
    """A simulated device that stops publishing but keeps its connection (no will)."""
    from edgefleet.fleet.controller import Controller, ControllerConfig
    from edgefleet.fleet.simulate import Simulator, make_devices

    ctl = Controller(ControllerConfig(broker=broker, db=str(tmp / "silence.db"), fleet="sl", http_port=0,
                                      bundles_dir=tmp / "bundles-s", client_id="sl-ctl",
                                      offline_after_s=offline_after_s))
    ctl.start()
    time.sleep(offline_after_s + 0.5)  # the controller judges silence only after listening that long itself
    lags = []
    try:
        for i in range(rounds):
            (d,) = make_devices(1, prefix=f"s{i}")
            sim = Simulator(broker, "sl", [d], client_prefix=f"sl-{i}")
            sim.start()
            try:
                sim.publish_round()
                sim.flush()
                t_last = time.monotonic()
                wait(lambda i=i: ctl.store.counts("sl")["telemetry"] >= i + 1, 30, "the record stored", 0.01)
                t1 = wait(lambda d=d: getattr(ctl.store.device("sl", d.device), "state", "") == "offline",
                          offline_after_s + 30, "silence offline")
                lags.append(t1 - t_last)
            finally:
                sim.stop(graceful=False)
    finally:
        ctl.stop()
    return {"offline_after_s": offline_after_s, **summary(lags)}


def at_scale(tmp: Path, broker: str, n: int, runs: int) -> dict[str, Any]:
    """10,000 devices in a SQLite store: mark_silent passes and /metrics scrapes."""
    from edgefleet.fleet.controller import Controller, ControllerConfig
    from edgefleet.fleet.simulate import Simulator, make_devices
    from edgefleet.fleet.store import Batch, open_store
    from edgefleet.sdk.protocol import Status, Telemetry

    db = tmp / "scale.db"
    store = open_store(str(db))
    devs = make_devices(n, prefix="big", profiles=["x86-cpu", "jetson-orin", "raspberry-pi-5"])
    sim = Simulator(broker, "big", devs)  # used only to build valid telemetry records, never started
    now = time.time()
    for i in range(0, n, 1000):
        part = devs[i:i + 1000]
        store.write(Batch("big", received=now, statuses=[Status(device=d.device, state="online", boot=d.boot,
                                                                 description=d.description(), ts=now) for d in part],
                          telemetry=[Telemetry.from_json(sim.record(d, now)) for d in part]))
    res: dict[str, Any] = {"devices": n}
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        assert store.mark_silent("big", time.time() - 3600, time.time()) == []
        t.append(time.perf_counter() - t0)
    res["mark_silent_none_due_ms"] = summary([x * 1000 for x in t])
    res["metrics_build_ab_all_online"] = metrics_ab(store, runs)
    store.close()

    def scrape(url: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"{url}/metrics", timeout=120) as r:
            body = r.read()
        return time.perf_counter() - t0, len(body)

    ctl = Controller(ControllerConfig(broker=broker, db=str(db), fleet="big", http_port=0, bundles_dir=tmp / "b2",
                                      client_id="big-ctl", offline_after_s=3600.0))
    ctl.start()
    try:
        scrape(ctl.url)  # warm-up
        xs = [scrape(ctl.url) for _ in range(runs)]
        res["metrics_all_online"] = {"bytes": xs[-1][1], **summary([x[0] * 1000 for x in xs])}
        half = [d.device for d in devs[::2]]
        store = open_store(str(db))
        store.write(Batch("big", statuses=[Status(device=d, state="offline", boot=sim.devices[d].boot)
                                           for d in half]))
        store.close()
        xs = [scrape(ctl.url) for _ in range(runs)]
        res["metrics_half_offline"] = {"bytes": xs[-1][1], **summary([x[0] * 1000 for x in xs])}
    finally:
        ctl.stop()
    store = open_store(str(db))
    res["metrics_build_ab_half_offline"] = metrics_ab(store, runs)
    t0 = time.perf_counter()
    due = store.mark_silent("big", time.time() + 1, time.time())
    res["mark_silent_all_due"] = {"marked": len(due), "ms": (time.perf_counter() - t0) * 1000}
    store.close()
    return res


def _old_metrics_text(ref: str = "08acce3") -> Any:
    """``metrics_text`` as it was before this change (``_ms`` units, a gauge with quantiles), from git, for an A/B
    of the text build on the same rows."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:fleet/http.py"], capture_output=True, text=True,
                         check=True).stdout
    body = src[src.index("def _esc("):src.index("async def metrics(")]
    import math

    from edgefleet.sdk.sketch import DDSketch

    ns: dict[str, Any] = {"Any": Any, "math": math, "DDSketch": DDSketch, "__name__": "old_metrics"}
    exec(compile("from __future__ import annotations\n" + body, "old_metrics", "exec"), ns)
    return ns["metrics_text"]


def metrics_ab(store: Any, runs: int) -> dict[str, Any]:
    """Build the /metrics text from the same store rows with the old and the new code, interleaved."""
    from edgefleet.fleet.http import metrics_text

    old = _old_metrics_text()
    ingest = {"received": {"telemetry": 1}, "stored": {"telemetry": 1}, "duplicates": {}, "rejected": [],
              "receipts": 0}
    times: dict[str, list[float]] = {"old": [], "new": []}
    sizes = {}
    for _ in range(runs):
        now = time.time()
        devices, versions, totals = store.devices("big", full=False), store.version_stats("big", now - 300), \
            store.version_totals("big")
        for name in ("old", "new"):
            t0 = time.perf_counter()
            text = old("big", devices, versions, totals, ingest, 0) if name == "old" else \
                metrics_text("big", devices, versions, totals, ingest, 0, now=now)
            times[name].append((time.perf_counter() - t0) * 1000)
            sizes[name] = len(text.encode())
    return {k: {"bytes": sizes[k], **summary(v)} for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--devices", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgefleet-liveness-") as d:
        tmp = Path(d)
        broker_proc, broker = start_broker(tmp)
        try:
            res = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                   "python": platform.python_version(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "agent_death_to_offline_s": agent_deaths(tmp, broker, args.rounds),
                   "silence_to_offline_s": silence(tmp, broker, args.rounds, 2.0),
                   "scale": at_scale(tmp, broker, args.devices, args.rounds)}
        finally:
            broker_proc.terminate()
            broker_proc.wait(10)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "liveness.json").write_text(json.dumps(res, indent=2) + "\n")
    a, s, sc = res["agent_death_to_offline_s"], res["silence_to_offline_s"], res["scale"]
    lines = [
        "# Liveness: how fast a dead device shows offline, and the cost at fleet size",
        "",
        f"`bench/liveness.py` on {res['machine']}, Python {res['python']}, {res['when']} (a shared 2-core machine: "
        "read the figures as orders of magnitude). Medians of the rounds, [min, max].",
        "",
        "| what | median | range | rounds |",
        "|---|---|---|---|",
        f"| real agent SIGKILLed → stored offline (broker's Last Will) | {a['SIGKILL']['median']:.3f} s | "
        f"{a['SIGKILL']['min']:.3f}–{a['SIGKILL']['max']:.3f} s | {a['SIGKILL']['n']} |",
        f"| real agent SIGTERMed → stored offline (its own offline status) | {a['SIGTERM']['median']:.3f} s | "
        f"{a['SIGTERM']['min']:.3f}–{a['SIGTERM']['max']:.3f} s | {a['SIGTERM']['n']} |",
        f"| silent device (connection kept) → offline, `--offline-after {s['offline_after_s']:g}` | "
        f"{s['median']:.2f} s | {s['min']:.2f}–{s['max']:.2f} s | {s['n']} |",
        "",
        f"At {sc['devices']:,} devices (SQLite):",
        "",
        "| what | figure |",
        "|---|---|",
        f"| `mark_silent` pass, nothing due (every check) | {sc['mark_silent_none_due_ms']['median']:.2f} ms |",
        f"| `mark_silent` pass, all {sc['mark_silent_all_due']['marked']:,} due (rows + events, one transaction) | "
        f"{sc['mark_silent_all_due']['ms']:.0f} ms |",
        f"| `GET /metrics`, all online | {sc['metrics_all_online']['median']:.0f} ms, "
        f"{sc['metrics_all_online']['bytes'] / 1e6:.1f} MB |",
        f"| `GET /metrics`, half offline (no live series for them) | {sc['metrics_half_offline']['median']:.0f} ms, "
        f"{sc['metrics_half_offline']['bytes'] / 1e6:.1f} MB |",
        "",
        "The text build alone, from the same rows, old and new code interleaved in one process (old: `08acce3`, "
        "`_ms` units, a gauge with quantiles, offline devices' last figures exported):",
        "",
        "| fleet | old | new | new / old | size old → new |",
        "|---|---|---|---|---|",
        *[f"| {label} | {ab['old']['median']:.0f} ms | {ab['new']['median']:.0f} ms | "
          f"{ab['new']['median'] / ab['old']['median']:.2f}x | {ab['old']['bytes'] / 1e6:.1f} → "
          f"{ab['new']['bytes'] / 1e6:.1f} MB |"
          for label, ab in (("all online", sc["metrics_build_ab_all_online"]),
                            ("half offline", sc["metrics_build_ab_half_offline"]))],
        "",
    ]
    (RESULTS / "liveness.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
