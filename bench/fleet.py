"""Fleet controller bench: sustained ingest, CPU per 1,000 messages, dashboard first paint and API latency.

For 1,000 and 10,000 simulated devices it starts a private Mosquitto on a loopback port and one controller
(``edgefleet fleet serve``, a separate process pinned to one CPU core), registers the devices (retained births), then
publishes pre-encoded telemetry records (valid sketches, realistic latencies per profile) as fast as one paho client
can, and measures how fast the controller stores them: messages/s from the first publish until rows stored == messages
sent, and the controller process's CPU seconds per 1,000 messages. With 10,000 devices known it then measures the
dashboard in headless Chromium (first contentful paint and the time until the device table shows data) and the
latency of the REST API and /metrics.

Run: ``.venv/bin/python bench/fleet.py [--quick]``; writes bench/results/fleet.md and fleet.json.
Every loop is bounded in count and time; everything runs on loopback. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
EDGEFLEET = Path(sys.executable).with_name("edgefleet")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLEET = "bench"  # each run uses its own fleet id: retained births of one run must not count in the next
GOAL_MSGS_S = 5000
GOAL_PAINT_MS = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise SystemExit(f"bench: timed out after {timeout_s:g} s waiting for {what}")


def start_broker(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = tmp / "mosquitto.conf"
    # Queues large enough that nothing is dropped while the controller catches up with a burst: the bench checks
    # rows stored == messages sent, so a broker that discards QoS 1 messages would show as loss.
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_inflight_messages 1000\nmax_queued_messages 2000000\nmax_queued_bytes 0\n"
                    f"log_dest file {tmp / 'mosquitto.log'}\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False
    wait(up, 10, "mosquitto")
    return proc, f"mqtt://127.0.0.1:{port}"


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


class Controller:
    """``edgefleet fleet serve`` as a subprocess pinned to one core."""

    def __init__(self, tmp: Path, broker: str, name: str) -> None:
        self.fleet = f"{FLEET}-{name}"
        self.db = tmp / f"{name}.db"
        self._ro: Any = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"controller-{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(EDGEFLEET), "fleet", "serve", "--broker", broker, "--db", str(self.db), "--fleet", self.fleet,
             "--http", f"127.0.0.1:{self.port}", "--bundles", str(tmp / "bundles"), "--client-id", f"bench-{name}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        cores = self.ps.cpu_affinity()
        self.core = cores[-1]
        self.ps.cpu_affinity([self.core])  # "one core": the controller may use no more than one

        def up() -> bool:
            try:
                return bool(get_json(self.url + "/api/ingest")["connected"])
            except OSError:
                return False
        wait(up, 60, "controller")

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stored(self) -> int:
        # Counted from the bench's own read-only connection: polling the controller's API would add to its CPU time.
        import sqlite3

        if self._ro is None:
            self._ro = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        return int(self._ro.execute("SELECT count(*) FROM telemetry WHERE fleet=?", (self.fleet,)).fetchone()[0])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


def ingest_run(tmp: Path, broker: str, n_devices: int, n_messages: int, name: str,
               keep: bool = False) -> tuple[dict[str, Any], Controller | None]:
    """Register ``n_devices``, publish ``n_messages`` telemetry records, measure how fast they are stored."""
    sys.path.insert(0, str(ROOT))
    from edgefleet.fleet.simulate import Simulator, make_devices
    from edgefleet.sdk.protocol import topic

    ctl = Controller(tmp, broker, name)
    devices = make_devices(n_devices, prefix="dev")
    sim = Simulator(broker, ctl.fleet, devices, interval_s=10.0, per_window=200, own_connections=0, connections=1,
                    client_prefix=f"bench-{name}")
    sim.start(timeout_s=30)
    wait(lambda: len(get_json(ctl.url + "/api/devices")["devices"]) == n_devices, 120, f"{n_devices} births stored")
    # Pre-encode every record so the timed part measures the controller, not the publisher's JSON encoding.
    ids = sorted(sim.devices)
    payloads = []
    for k in range(n_messages):
        dev = sim.devices[ids[k % len(ids)]]
        payloads.append((topic(ctl.fleet, dev.device, "telemetry"), sim.record(dev, ts=time.time())))
    client = sim._clients[0]
    cpu0 = ctl.cpu_s()
    t0 = time.perf_counter()
    for t, p in payloads:
        client.publish(t, p, qos=1)
    t_pub = time.perf_counter() - t0
    deadline = time.monotonic() + max(120.0, n_messages / 500)
    stored = 0
    while time.monotonic() < deadline:
        stored = ctl.stored()
        if stored >= n_messages:
            break
        time.sleep(0.1)
    elapsed = time.perf_counter() - t0
    cpu = ctl.cpu_s() - cpu0
    stats = get_json(ctl.url + "/api/ingest")
    result = {
        "devices": n_devices, "messages_sent": n_messages, "rows_stored": stored,
        "duplicates": stats["duplicates"].get("telemetry", 0), "rejected": stats["rejected_total"],
        "seconds": round(elapsed, 3), "msgs_per_s": round(n_messages / elapsed, 1),
        "publish_s": round(t_pub, 3), "controller_cpu_s": round(cpu, 3),
        "cpu_ms_per_1000": round(cpu / n_messages * 1e6, 1), "controller_core": ctl.core,
        "payload_bytes_mean": round(statistics.mean(len(p) for _, p in payloads[:1000])),
        "nothing_lost": stored == n_messages,
    }
    sim.stop(graceful=False)
    if not keep:
        ctl.stop()
        return result, None
    return result, ctl


def api_latency(ctl: Controller, runs: int) -> dict[str, Any]:
    devs = get_json(ctl.url + "/api/devices")["devices"]
    one = devs[len(devs) // 2]["device"]
    endpoints = {
        "GET /api/devices (all)": "/api/devices",
        "GET /api/devices/{id}": f"/api/devices/{one}",
        "GET /api/devices/{id}/telemetry (1 h)": f"/api/devices/{one}/telemetry?since={time.time() - 3600}",
        "GET /api/versions (15 min)": "/api/versions?window=900",
        "GET /api/deployments": "/api/deployments",
        "GET /metrics": "/metrics",
    }
    out = {}
    for label, path in endpoints.items():
        times, size = [], 0
        for _ in range(runs):
            t0 = time.perf_counter()
            with urllib.request.urlopen(ctl.url + path, timeout=60) as r:
                size = len(r.read())
            times.append((time.perf_counter() - t0) * 1000)
        times.sort()
        out[label] = {"p50_ms": round(statistics.median(times), 1),
                      "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 1), "bytes": size}
    return out


def first_paint(ctl: Controller, runs: int) -> dict[str, Any] | None:
    if not Path(CHROMIUM).exists():
        return None
    from playwright.sync_api import sync_playwright

    fcp, ready = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            for _ in range(runs):
                page = browser.new_page(viewport={"width": 1500, "height": 900})
                t0 = time.perf_counter()
                page.goto(ctl.url + "/")
                page.wait_for_selector("body[data-ready='1']", timeout=30_000)
                ready.append((time.perf_counter() - t0) * 1000)
                fcp.append(page.evaluate(
                    "() => (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime || null"))
                rows = page.locator("#devices tbody tr").count()
                summary = page.locator("#summary").inner_text()
                page.close()
        finally:
            browser.close()
    return {"runs": runs, "first_contentful_paint_ms": round(statistics.median(x for x in fcp if x), 1),
            "table_with_data_ms": round(statistics.median(ready), 1), "rows_rendered": rows, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer messages (a smoke run)")
    args = ap.parse_args()
    scale = 0.2 if args.quick else 1.0
    host = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}
    results: dict[str, Any] = {"host": host, "ingest": [], "goals": {"msgs_per_s": GOAL_MSGS_S,
                                                                      "first_paint_ms": GOAL_PAINT_MS}}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as d:
        tmp = Path(d)
        broker, url = start_broker(tmp)
        try:
            r1, _ = ingest_run(tmp, url, 1000, int(40_000 * scale), "d1k")
            print(f"1,000 devices: {r1['msgs_per_s']:.0f} msgs/s, {r1['rows_stored']}/{r1['messages_sent']} stored, "
                  f"{r1['cpu_ms_per_1000']} ms CPU per 1,000", flush=True)
            results["ingest"].append(r1)
            r2, ctl = ingest_run(tmp, url, 10_000, int(60_000 * scale), "d10k", keep=True)
            print(f"10,000 devices: {r2['msgs_per_s']:.0f} msgs/s, {r2['rows_stored']}/{r2['messages_sent']} stored, "
                  f"{r2['cpu_ms_per_1000']} ms CPU per 1,000", flush=True)
            results["ingest"].append(r2)
            if ctl is not None:
                try:
                    results["api_10k"] = api_latency(ctl, 10 if args.quick else 30)
                    results["dashboard_10k"] = first_paint(ctl, 3 if args.quick else 5)
                    print(f"dashboard at 10,000 devices: {results['dashboard_10k']}", flush=True)
                finally:
                    ctl.stop()
        finally:
            broker.terminate()
            broker.wait(10)
    results["host"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fleet.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "fleet.md").write_text(report(results))
    print((RESULTS / "fleet.md").read_text())


def report(r: dict[str, Any]) -> str:
    h = r["host"]
    lines = [
        "# Fleet controller bench",
        "",
        f"`.venv/bin/python bench/fleet.py` on {h['cores']} cores ({h['cpu']}), Python {h['python']}; load average "
        f"{h['load_avg_at_start']} at start, {h['load_avg_at_end']} at end (the machine is shared: figures are "
        "indicative, compare ratios). The controller is one `edgefleet fleet serve` process pinned to one core;"
        " Mosquitto and the publisher run on the same machine.",
        "",
        "## Sustained ingest (goal: >= 5,000 telemetry msgs/s on one core, nothing lost)",
        "",
        "| devices | messages sent | rows stored | duplicates | msgs/s | controller CPU ms per 1,000 msgs | payload bytes |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["ingest"]:
        lines.append(f"| {x['devices']:,} | {x['messages_sent']:,} | {x['rows_stored']:,} | {x['duplicates']} | "
                     f"{x['msgs_per_s']:,.0f} | {x['cpu_ms_per_1000']} | {x['payload_bytes_mean']} |")
    lines += ["", "msgs/s is measured from the first publish until the store holds every record (publishing itself "
              "is part of the window, so this is end-to-end). CPU is the controller process's user+system time.", ""]
    if r.get("dashboard_10k"):
        dsh = r["dashboard_10k"]
        lines += ["## Dashboard with 10,000 devices known (goal: first paint < 1 s)", "",
                  f"- first contentful paint: **{dsh['first_contentful_paint_ms']} ms** (median of {dsh['runs']})",
                  f"- device table filled with data (all 10,000 fetched, sorted, first page rendered): "
                  f"**{dsh['table_with_data_ms']} ms**",
                  f"- rows in the DOM: {dsh['rows_rendered']} (one page; the rest are a click or a filter away); "
                  f"header: {dsh['summary']!r}", ""]
    if r.get("api_10k"):
        lines += ["## API latency with 10,000 devices known", "", "| endpoint | p50 ms | p95 ms | bytes |",
                  "|---|---:|---:|---:|"]
        for k, v in r["api_10k"].items():
            lines.append(f"| {k} | {v['p50_ms']} | {v['p95_ms']} | {v['bytes']:,} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
