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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._rig import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
EDGEFLEET = Path(sys.executable).with_name("edgefleet")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLEET = "bench"  # each run uses its own fleet id: retained births of one run must not count in the next
GOAL_MSGS_S = 5000
GOAL_PAINT_MS = 1000


def wait(pred: Any, timeout_s: float, what: str, every_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(every_s)
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

    def __init__(self, tmp: Path, broker: str, name: str, receipts: bool = True, tree: Path | None = None, *,
                 store: str = "", fleet: str = "", core: int | None = None) -> None:
        self.fleet = fleet or f"{FLEET}-{name}"
        # ``tree``: run another edgefleet (a directory holding an ``edgefleet`` package tree) with this interpreter,
        # for an A/B against a baseline version in the same run.
        self.env = {**os.environ, "PYTHONPATH": str(tree)} if tree is not None else None
        self.db = tmp / f"{name}.db"
        self._ro: Any = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / f"controller-{name}.log", "ab")  # closed in stop()
        # Same client id on every start: the broker keeps the persistent session (and queued messages) in between.
        exe = [sys.executable, "-m", "edgefleet.sdk.cli"] if tree is not None else [str(EDGEFLEET)]
        self.store = store or str(self.db)
        self.want_core = core
        self.argv = [*exe, "fleet", "serve", "--broker", broker, "--db", self.store, "--fleet", self.fleet,
                     "--http", f"127.0.0.1:{self.port}", "--bundles", str(tmp / "bundles"), "--client-id",
                     f"bench-{name}", "--receipts" if receipts else "--no-receipts"]
        self.receipts = receipts
        self.start()

    def start(self, wait_up: bool = True) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        self.ps = psutil.Process(self.proc.pid)
        self.core = self.ps.cpu_affinity()[-1] if self.want_core is None else self.want_core
        self.ps.cpu_affinity([self.core])  # "one core": the controller may use no more than one
        if wait_up:
            wait(self.up, 60, "controller")

    def up(self) -> bool:
        try:
            return bool(get_json(self.url + "/api/ingest")["connected"])
        except OSError:
            return False

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def stored(self) -> int:
        # Counted from the bench's own read-only connection: polling the controller's API would add to its CPU time.
        import sqlite3

        if self._ro is None:
            self._ro = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        return int(self._ro.execute("SELECT count(*) FROM telemetry WHERE fleet=?", (self.fleet,)).fetchone()[0])

    def stop(self, close: bool = True) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if close:
            self.log.close()


def _payloads(sim: Any, fleet: str, n: int) -> list[tuple[str, bytes]]:
    """``n`` telemetry records round-robin over the simulator's devices, encoded ahead of the timed part."""
    from edgefleet.sdk.protocol import topic

    ids = sorted(sim.devices)
    out = []
    for k in range(n):
        dev = sim.devices[ids[k % len(ids)]]
        out.append((topic(fleet, dev.device, "telemetry"), sim.record(dev, ts=time.time())))
    return out


def _wait_stored(ctl: Controller, target: int, timeout_s: float) -> dict[str, Any]:
    """Poll the row count until ``target``; note when (and at what controller CPU time) rows started to arrive."""
    deadline = time.monotonic() + timeout_s
    out: dict[str, Any] = {"first_n": ctl.stored(), "first_t": None, "first_cpu": None}
    stored = out["first_n"]
    while time.monotonic() < deadline:
        stored = ctl.stored()
        if out["first_t"] is None and stored > out["first_n"]:
            out.update(first_n=stored, first_t=time.perf_counter(), first_cpu=ctl.cpu_s())
        if stored >= target:
            break
        time.sleep(0.05)
    out.update(stored=stored, end_t=time.perf_counter(), end_cpu=ctl.cpu_s())
    return out


def ingest_run(tmp: Path, broker: str, n_devices: int, n_messages: int, name: str,
               keep: bool = False, receipts: bool = True) -> tuple[dict[str, Any], Controller | None]:
    """Register ``n_devices``, then measure (a) live: publish ``n_messages`` while the controller ingests them,
    (b) drain: ``n_messages`` queued by the broker while the controller was stopped, ingested after it restarts.

    (b) is the controller's own rate: the publisher and broker have finished before it starts. (a) is end to end on
    one machine, where publisher, broker and controller share the cores.
    """
    ctl = Controller(tmp, broker, name, receipts)
    try:
        return _measure(ctl, broker, n_devices, n_messages, name, keep)
    except BaseException:
        ctl.stop()  # never leave a controller process behind when a run fails or times out
        raise


def _measure(ctl: Controller, broker: str, n_devices: int, n_messages: int, name: str,
             keep: bool) -> tuple[dict[str, Any], Controller | None]:
    from edgefleet.fleet.simulate import Simulator, make_devices

    sim = Simulator(broker, ctl.fleet, make_devices(n_devices, prefix="dev"), interval_s=10.0, per_window=200,
                    own_connections=0, connections=1, client_prefix=f"bench-{name}")
    sim.start(timeout_s=30)
    wait(lambda: len(get_json(ctl.url + "/api/devices")["devices"]) == n_devices, 120, f"{n_devices} births stored")
    client = sim._clients[0]
    timeout = max(120.0, n_messages / 500)

    # (a) live
    payloads = _payloads(sim, ctl.fleet, n_messages)
    cpu0 = ctl.cpu_s()
    t0 = time.perf_counter()
    for t, p in payloads:
        client.publish(t, p, qos=1)
    w = _wait_stored(ctl, n_messages, timeout)
    live = {"seconds": round(w["end_t"] - t0, 3), "msgs_per_s": round(n_messages / (w["end_t"] - t0), 1),
            "rows_stored": w["stored"], "cpu_ms_per_1000": round((w["end_cpu"] - cpu0) / n_messages * 1e6, 1)}

    # (b) drain: the broker holds the controller's persistent session while it is stopped
    ctl.stop(close=False)
    payloads = _payloads(sim, ctl.fleet, n_messages)
    for t, p in payloads:
        client.publish(t, p, qos=1)
    sim.flush(timeout)
    ctl.start(wait_up=False)
    w = _wait_stored(ctl, 2 * n_messages, timeout)
    stored2 = w["stored"]
    drained = stored2 - w["first_n"]
    span = w["end_t"] - w["first_t"] if w["first_t"] else 0.0
    drain_rate = drained / span if span > 0 else 0.0
    cpu = w["end_cpu"] - w["first_cpu"] if w["first_cpu"] is not None else 0.0
    wait(ctl.up, 30, "controller API")
    stats = get_json(ctl.url + "/api/ingest")
    result = {
        "devices": n_devices, "receipts": ctl.receipts, "receipts_sent": stats.get("receipts", 0),
        "messages_sent": 2 * n_messages, "rows_stored": stored2,
        "nothing_lost": stored2 == 2 * n_messages, "duplicates": stats["duplicates"].get("telemetry", 0),
        "rejected": stats["rejected_total"], "live": live,
        "drain": {"messages": drained, "msgs_per_s": round(drain_rate, 1), "seconds": round(span, 3),
                  "controller_cpu_s": round(cpu, 3),
                  "cpu_ms_per_1000": round(cpu / drained * 1e6, 1) if drained else None,
                  "cpu_bound_msgs_per_s": round(drained / cpu, 1) if cpu > 0 else None},
        "controller_core": ctl.core,
        "payload_bytes_mean": round(statistics.mean(len(p) for _, p in payloads[:1000])),
    }
    sim.stop(graceful=False)
    if not keep:
        ctl.stop()
        return result, None
    return result, ctl


def baseline_tree(ref: str, tmp: Path) -> Path:
    """An ``edgefleet`` package tree of git ``ref`` (``git archive``: nothing registered in the repository)."""
    src = tmp / f"src-{ref}"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "sdk", "devices", "packager", "agent", "fleet"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    tree = tmp / f"tree-{ref}"
    (tree / "edgefleet").mkdir(parents=True)
    for comp in ("sdk", "devices", "packager", "agent", "fleet"):
        (tree / "edgefleet" / comp).symlink_to(src / comp)
    return tree


def ab_ingest(tmp: Path, broker: str, ref: str, rounds: int, n_devices: int, n_messages: int,
              this_ref: str | None = None) -> dict[str, Any]:
    """The controller's own drain rate, this version (or ``this_ref``) against ``ref``, interleaved round by round
    (receipts on)."""
    tree = baseline_tree(ref, tmp)
    this_tree = baseline_tree(this_ref, tmp) if this_ref else None
    rows: dict[str, list[dict[str, Any]]] = {"baseline": [], "this": []}
    ratios: list[float] = []
    for i in range(rounds):
        got = {}
        for label in (("baseline", "this") if i % 2 == 0 else ("this", "baseline")):
            ctl = Controller(tmp, broker, f"ab{i}-{label}", True, tree if label == "baseline" else this_tree)
            try:
                r, _ = _measure(ctl, broker, n_devices, n_messages, f"ab{i}-{label}", keep=False)
            except BaseException:
                ctl.stop()
                raise
            got[label] = r
            rows[label].append(r)
            print(f"A/B round {i + 1}/{rounds} {label}: drain {r['drain']['cpu_ms_per_1000']} ms CPU/1,000, "
                  f"{r['rows_stored']}/{r['messages_sent']} stored", flush=True)
        ratios.append(got["this"]["drain"]["cpu_ms_per_1000"] / got["baseline"]["drain"]["cpu_ms_per_1000"])

    def med(label: str, key: str) -> float:
        return round(statistics.median(r["drain"][key] for r in rows[label]), 1)

    return {"ref": ref, "this": this_ref or "this tree", "rounds": rounds, "devices": n_devices,
            "messages_per_round": 2 * n_messages,
            "baseline": {"cpu_ms_per_1000": med("baseline", "cpu_ms_per_1000"),
                         "cpu_bound_msgs_per_s": med("baseline", "cpu_bound_msgs_per_s")},
            "this_result": {"cpu_ms_per_1000": med("this", "cpu_ms_per_1000"),
                     "cpu_bound_msgs_per_s": med("this", "cpu_bound_msgs_per_s")},
            "ratio_cpu_per_message": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios],
            "nothing_lost": all(r["nothing_lost"] for rs in rows.values() for r in rs),
            "duplicates": sum(r["duplicates"] for rs in rows.values() for r in rs)}


def _tree_cpu(root: psutil.Process | None) -> dict[int, float]:
    """CPU seconds (user+system) of a process and its children, per pid."""
    if root is None:
        return {}
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        out[p.pid] = t.user + t.system
    return out


def _delta(before: dict[int, float], after: dict[int, float]) -> float:
    # A process that started inside the window counts whole; one that ended inside it is lost (PostgreSQL's
    # backends live as long as the controllers' pools, so none does here).
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


class _Components:
    """CPU seconds of the controllers, the broker and the database server, sampled together."""

    def __init__(self, ctls: list[Controller], broker: subprocess.Popen[bytes], db: psutil.Process | None) -> None:
        self.ctls, self.broker, self.db = ctls, psutil.Process(broker.pid), db

    def sample(self) -> dict[str, Any]:
        return {"controllers": [c.cpu_s() for c in self.ctls], "broker": _tree_cpu(self.broker),
                "database": _tree_cpu(self.db), "t": time.perf_counter()}

    @staticmethod
    def cost(a: dict[str, Any], b: dict[str, Any], n: int) -> dict[str, Any]:
        """CPU ms per 1,000 messages per component between two samples, and messages per controller CPU-second."""
        ctl = sum(y - x for x, y in zip(a["controllers"], b["controllers"], strict=True))
        broker, db = _delta(a["broker"], b["broker"]), _delta(a["database"], b["database"])
        return {"seconds": round(b["t"] - a["t"], 3), "msgs_per_s": round(n / (b["t"] - a["t"]), 1),
                "controller_cpu_ms_per_1000": round(ctl / n * 1e6, 1),
                "controller_cpu_ms_per_1000_each": [round((y - x) / n * 1e6, 1)
                                                    for x, y in zip(a["controllers"], b["controllers"], strict=True)],
                "broker_cpu_ms_per_1000": round(broker / n * 1e6, 1),
                "database_cpu_ms_per_1000": round(db / n * 1e6, 1) if b["database"] else None,
                "msgs_per_controller_cpu_s": round(n / ctl, 1) if ctl > 0 else None}


def _stored_by(ctls: list[Controller]) -> int:
    """Telemetry rows the controllers stored since they started (their own counters, ``?store=0``: no query on the
    database, whose CPU is measured)."""
    total = 0
    for c in ctls:
        try:
            total += int(get_json(c.url + "/api/ingest?store=0")["stored"].get("telemetry", 0))
        except OSError:
            pass  # still starting
    return total


def _count_rows(store: str, fleet: str) -> tuple[int, int]:
    """(rows, distinct (device, boot, seq)) of this fleet's telemetry, read from the store itself."""
    sql = ("SELECT count(*), count(DISTINCT device || '/' || boot || '/' || seq) FROM telemetry WHERE fleet=")
    if store.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(store) as conn:
            row = conn.execute(sql + "%s", (fleet,)).fetchone()
    else:
        import sqlite3

        with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=60) as conn:
            row = conn.execute(sql + "?", (fleet,)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def scale_run(tmp: Path, pg: Any, backend: str, n_ctl: int, n_devices: int, n_messages: int) -> dict[str, Any]:
    """``n_ctl`` controllers (one share group, each pinned to its own core) on one store, receipts on: ``n_messages``
    ingested live, then as many drained after all controllers restart; CPU per component, loss and duplicates."""
    from edgefleet.fleet.simulate import Simulator, make_devices

    name = f"{backend[:2]}{n_ctl}"
    d = tmp / name
    d.mkdir()
    broker, url = start_broker(d)
    fleet = f"{FLEET}-{name}"
    store = str(d / "fleet.db") if backend == "sqlite" else pg.create_database(f"bench_{tmp.name}_{name}")
    db_proc = psutil.Process(pg.pids()[0]) if backend == "postgresql" else None
    cores = os.cpu_count() or 1
    ctls: list[Controller] = []
    sim = None
    try:
        for i in range(n_ctl):
            ctls.append(Controller(d, url, f"{name}-c{i}", True, store=store, fleet=fleet,
                                   core=(cores - 1 - i) % cores))
        sim = Simulator(url, fleet, make_devices(n_devices, prefix="dev"), interval_s=10.0, per_window=200,
                        own_connections=0, connections=1, client_prefix=f"bench-{name}", receipts=True)
        sim.start(timeout_s=30)
        for c in ctls:
            wait(lambda c=c: len(get_json(c.url + "/api/devices")["devices"]) == n_devices, 120, "births stored")
        client = sim._clients[0]
        timeout = max(180.0, n_messages / 300)
        comp = _Components(ctls, broker, db_proc)

        # live: publisher, broker, controllers and database all at work
        payloads = _payloads(sim, fleet, n_messages)
        base = _stored_by(ctls)
        a = comp.sample()
        for t, p in payloads:
            client.publish(t, p, qos=1)
        # Polled 4 times a second: each poll is an HTTP request the controllers serve (their CPU is measured).
        wait(lambda: _stored_by(ctls) - base >= n_messages, timeout, f"{n_messages} messages stored (live)", 0.25)
        live = _Components.cost(a, comp.sample(), n_messages)
        live["batches"] = [get_json(c.url + "/api/ingest?store=0").get("batches", 0) for c in ctls]  # births too

        # drain: the broker queues a share for each stopped controller's session; all restart together
        for c in ctls:
            c.stop(close=False)
        payloads = _payloads(sim, fleet, n_messages)
        for t, p in payloads:
            client.publish(t, p, qos=1)
        sim.flush(timeout)
        for c in ctls:
            c.start(wait_up=False)
        comp = _Components(ctls, broker, db_proc)  # new controller processes
        deadline = time.monotonic() + timeout
        while _stored_by(ctls) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        a = comp.sample()
        first = _stored_by(ctls)
        wait(lambda: _stored_by(ctls) >= n_messages, timeout, f"{n_messages} messages stored (drain)", 0.25)
        drain = _Components.cost(a, comp.sample(), n_messages - first)
        time.sleep(1.5)  # the last receipts and acks
        stats = [get_json(c.url + "/api/ingest?store=0") for c in ctls]
        rows, distinct = _count_rows(store, fleet)
        return {"backend": backend, "controllers": n_ctl, "devices": n_devices, "messages_sent": 2 * n_messages,
                "rows_stored": rows, "lost": 2 * n_messages - distinct, "stored_twice": rows - distinct,
                "redelivered_deduplicated": sum(s["duplicates"].get("telemetry", 0) for s in stats),
                "receipts_sent": sum(s.get("receipts", 0) for s in stats),
                "split": [s["stored"].get("telemetry", 0) for s in stats], "live": live, "drain": drain,
                "batches": [s.get("batches", 0) for s in stats],  # since the restart: the drain's write batches
                # Retained statuses every controller receives again when it subscribes after the restart: written in
                # the drain's window, so they weigh on its CPU per telemetry message (N controllers: N x devices).
                "statuses_in_drain": [s["received"].get("status", 0) for s in stats],
                "receipts_confirmed": sim.confirmed}
    finally:
        if sim is not None:
            sim.stop(graceful=False)
        for c in ctls:
            c.stop()
        broker.terminate()
        broker.wait(10)


def run_scale(n_devices: int, n_messages: int, configs: list[tuple[str, int]], rounds: int = 1) -> dict[str, Any]:
    """The scale matrix (backends x controllers), ``rounds`` times (configurations interleaved), on one PostgreSQL
    server with its default (durable) settings."""
    sys.path.insert(0, str(ROOT))
    from tests.pg_server import PostgresServer

    out: dict[str, Any] = {"load_avg_at_start": [round(x, 2) for x in os.getloadavg()], "runs": []}
    pg = PostgresServer() if any(b == "postgresql" for b, _ in configs) else None
    try:
        out["postgresql"] = _pg_version(pg) if pg is not None else None
        with tempfile.TemporaryDirectory(prefix="edgefleet-bench-scale-") as d:
            for i, (backend, n) in enumerate((b, n) for _ in range(rounds) for b, n in configs):
                sub = Path(d) / f"round{i // len(configs)}"
                sub.mkdir(exist_ok=True)
                r = scale_run(sub, pg, backend, n, n_devices, n_messages)
                r["round"] = i // len(configs)
                print(f"{backend}, {n} controller(s): live {r['live']['msgs_per_s']:,.0f} msgs/s, controller "
                      f"{r['live']['controller_cpu_ms_per_1000']} ms CPU/1,000 "
                      f"({r['live']['msgs_per_controller_cpu_s'] or 0:,.0f}/CPU-s), broker "
                      f"{r['live']['broker_cpu_ms_per_1000']}, db {r['live']['database_cpu_ms_per_1000']}; drain "
                      f"{r['drain']['msgs_per_s']:,.0f} msgs/s ({r['drain']['msgs_per_controller_cpu_s'] or 0:,.0f}"
                      f"/CPU-s); lost {r['lost']}, stored twice {r['stored_twice']}", flush=True)
                out["runs"].append(r)
    finally:
        if pg is not None:
            pg.stop()
    out["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _pg_version(pg: Any) -> str:
    import psycopg

    with psycopg.connect(pg.url()) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


# Where a controller's time goes, by the first of these frames found in a sampled stack (py-spy's raw output).
_PROFILE_BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("writer: store, per-minute sketch merge", ("_merge_minutes (", "merge_minute (")),
    ("writer: store, derived windows and summaries (Python)", (";derive (fleet/store/_derive.py:",)),
    ("writer: store, device summaries (SQL)", ("_write_summaries (",)),
    ("writer: store, telemetry rows and the rest of the batch's SQL", ("_write_telemetry (", "_insert_telemetry (",
                                                                       "PostgresStore._copy (")),
    ("writer: store, commit", ("_Tx.__exit__", "_tx (")),
    ("writer: store, other", ("SQLiteStore.write (", "PostgresStore.write (")),
    ("writer: parse and validate (protocol model)", ("Ingestor._parse_into (",)),
    ("writer: receipts (build, queue)", ("Ingestor._flush_receipts (", "Ingestor._note_receipts (")),
    ("writer: acks (queue)", ("MqttTransport.ack (",)),
    ("writer: batching", ("Ingestor._write_loop (",)),
    ("network: socket reads", ("BufferedClient._sock_recv (",)),
    ("network: hand-off to the writer", ("MqttTransport._on_message (",)),
    ("network: MQTT packet decoding (paho)", ("Client._packet_read (",)),
    ("network: socket writes (acks, receipts)", ("loop_write (",)),
    ("network: select loop", ("MqttTransport._run (",)),
    ("HTTP server (the bench's progress polls)", ("run_forever (", "_worker (")),
]


def profile(backend: str, n_messages: int) -> dict[str, Any]:
    """Sample one controller with py-spy (``$PY_SPY`` or ``py-spy`` on the PATH; not a project dependency) while it
    drains ``n_messages`` queued for it, receipts on; the samples summed by where they are (``_PROFILE_BUCKETS``)."""
    spy = os.environ.get("PY_SPY") or shutil.which("py-spy")
    if not spy:
        raise SystemExit("bench: --profile needs py-spy (pip install py-spy in any venv; set PY_SPY to its path)")
    sys.path.insert(0, str(ROOT))
    from edgefleet.fleet.simulate import Simulator, make_devices

    from tests.pg_server import PostgresServer

    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-profile-") as d:
        tmp = Path(d)
        broker, url = start_broker(tmp)
        pg = PostgresServer() if backend == "postgresql" else None
        ctl = sim = None
        try:
            store = pg.create_database("profile") if pg is not None else str(tmp / "fleet.db")
            ctl = Controller(tmp, url, "profile", True, store=store)
            sim = Simulator(url, ctl.fleet, make_devices(1000, prefix="dev"), interval_s=10.0, per_window=200,
                            own_connections=0, connections=1, client_prefix="profile", receipts=True)
            sim.start(timeout_s=30)
            wait(lambda: len(get_json(ctl.url + "/api/devices")["devices"]) == 1000, 120, "births stored")
            ctl.stop(close=False)
            for t, p in _payloads(sim, ctl.fleet, n_messages):
                sim._clients[0].publish(t, p, qos=1)
            sim.flush(300)
            ctl.start(wait_up=False)
            raw = tmp / "profile.txt"
            spy_proc = subprocess.Popen([spy, "record", "-p", str(ctl.proc.pid), "-f", "raw", "-o", str(raw),
                                         "-r", "200", "--nonblocking", "-d", "600"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait(lambda: _stored_by([ctl]) > 0, 120, "the first row")
            c0, t0 = ctl.cpu_s(), time.perf_counter()
            wait(lambda: _stored_by([ctl]) >= n_messages, 600, "the drain", 0.25)
            cpu, secs = ctl.cpu_s() - c0, time.perf_counter() - t0
            spy_proc.send_signal(2)  # py-spy writes its file on SIGINT
            spy_proc.wait(60)
            buckets: dict[str, int] = {}
            total = 0
            for line in raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if not count.isdigit():
                    continue
                total += int(count)
                name = next((b for b, subs in _PROFILE_BUCKETS if any(x in stack for x in subs)), "other")
                buckets[name] = buckets.get(name, 0) + int(count)
        finally:
            if sim is not None:
                sim.stop(graceful=False)
            if ctl is not None:
                ctl.stop()
            broker.terminate()
            if pg is not None:
                pg.stop()
    return {"backend": backend, "messages": n_messages, "seconds": round(secs, 2), "cpu_s": round(cpu, 3),
            "msgs_per_cpu_s": round(n_messages / cpu, 1) if cpu else None, "samples": total,
            "shares": {k: round(v / total, 4) for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])},
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def profile_report(profiles: list[dict[str, Any]]) -> str:
    """The profiles as Markdown."""
    lines = ["# Where a controller's ingest time goes", "",
             "`.venv/bin/python bench/fleet.py --profile` (py-spy, 200 samples/s, not a project dependency: "
             "`PY_SPY=/path/to/py-spy`): one controller drains messages queued while it was stopped (1,000 devices, "
             "receipts on, QoS 0), sampled from its first stored row to its last. Shares are of the samples in the "
             "controller's threads that were not idle (a thread waiting for the GIL counts as busy), grouped by the "
             "first matching frame (bench/fleet.py `_PROFILE_BUCKETS`). PostgreSQL's own work is in its server "
             "processes, not here (bench/results/fleet.md, database CPU).", ""]
    names = [b for b, _ in _PROFILE_BUCKETS] + ["other"]
    lines += ["| where | " + " | ".join(p["backend"] for p in profiles) + " |",
              "|---|" + "---:|" * len(profiles)]
    for name in names:
        if any(name in p["shares"] for p in profiles):
            lines.append(f"| {name} | " + " | ".join(f"{p['shares'].get(name, 0):.1%}" for p in profiles) + " |")
    lines += ["", "| | " + " | ".join(p["backend"] for p in profiles) + " |", "|---|" + "---:|" * len(profiles),
              "| messages drained | " + " | ".join(f"{p['messages']:,}" for p in profiles) + " |",
              "| controller CPU s (messages per CPU-second) | "
              + " | ".join(f"{p['cpu_s']} ({p['msgs_per_cpu_s'] or 0:,.0f})" for p in profiles) + " |",
              "| samples | " + " | ".join(f"{p['samples']:,}" for p in profiles) + " |",
              "| load average at the end | " + " | ".join(str(p["load_avg"]) for p in profiles) + " |", ""]
    return "\n".join(lines)


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

    fcp, ready, complete = [], [], []
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
                page.wait_for_selector("body[data-complete='1']", timeout=30_000)
                complete.append((time.perf_counter() - t0) * 1000)
                fcp.append(page.evaluate(
                    "() => (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime || null"))
                rows = page.locator("#devices tbody tr").count()
                summary = page.locator("#summary").inner_text()
                page.close()
        finally:
            browser.close()
    return {"runs": runs, "first_contentful_paint_ms": round(statistics.median(x for x in fcp if x), 1),
            "table_with_data_ms": round(statistics.median(ready), 1),
            "all_devices_loaded_ms": round(statistics.median(complete), 1), "rows_rendered": rows, "summary": summary}


def ab_report(ab: dict[str, Any]) -> str:
    """The A/B as Markdown."""
    b, t = ab["baseline"], ab["this_result"]
    return "\n".join([
        "# Fleet ingest A/B", "",
        f"`.venv/bin/python bench/fleet.py --ab {ab['ref']}"
        f"{'' if ab['this'] == 'this tree' else ' --this ' + ab['this']}`: the controller's drain (messages the broker "
        "queued while it was stopped, ingested after it restarts: the controller alone on its core, receipts on), "
        f"{ab['this']} against `{ab['ref']}`, {ab['devices']:,} devices, {ab['messages_per_round'] // 2:,} telemetry "
        "messages drained per controller and round (after as many ingested live), "
        f"{ab['rounds']} rounds interleaved (the order alternates). Load average at the end: "
        f"{ab['load_avg']} (a shared machine: read the ratio).", "",
        "| | controller CPU ms per 1,000 messages (median) | messages per CPU-second (median) |",
        "|---|---:|---:|",
        f"| `{ab['ref']}` (baseline) | {b['cpu_ms_per_1000']} | {b['cpu_bound_msgs_per_s']:,.0f} |",
        f"| {ab['this']} | {t['cpu_ms_per_1000']} | {t['cpu_bound_msgs_per_s']:,.0f} |", "",
        f"Median per-round ratio of CPU per message, {ab['this']} / baseline: **{ab['ratio_cpu_per_message']}** "
        f"(rounds: {ab['ratios']}). Every run stored every message: {ab['nothing_lost']}; duplicates: "
        f"{ab['duplicates']}.", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer messages (a smoke run)")
    ap.add_argument("--report-only", action="store_true", help="rewrite fleet.md from fleet.json, measure nothing")
    ap.add_argument("--ab", metavar="GIT_REF", help="only an A/B of the ingest drain: this tree against GIT_REF, "
                    "interleaved (writes fleet-ab.json and .md)")
    ap.add_argument("--rounds", type=int, default=None, help="A/B rounds (default 4); --scale rounds (default 3)")
    ap.add_argument("--this", dest="this_ref", metavar="GIT_REF",
                    help="with --ab: measure GIT_REF instead of this tree")
    ap.add_argument("--scale", action="store_true", help="only the scale matrix: SQLite and PostgreSQL, 1 and 2 "
                    "controllers, CPU per component (merged into fleet.json and fleet.md)")
    ap.add_argument("--devices", type=int, default=1000, help="with --scale: simulated devices (default 1,000; "
                    "with 10,000 nearly every message gets its own receipt, as in a fleet reporting every 10 s)")
    ap.add_argument("--configs", default="sqlite:1,postgresql:1,sqlite:2,postgresql:2",
                    help="with --scale: BACKEND:CONTROLLERS,... (default: all four)")
    ap.add_argument("--profile", action="store_true", help="only a py-spy profile of one controller's drain, "
                    "SQLite and PostgreSQL (writes fleet-profile.json and .md)")
    args = ap.parse_args()
    if args.profile:
        profs = [profile(b, 6000 if args.quick else 30_000) for b in ("sqlite", "postgresql")]
        (RESULTS / "fleet-profile.json").write_text(json.dumps(profs, indent=1) + "\n")
        (RESULTS / "fleet-profile.md").write_text(profile_report(profs))
        print(profile_report(profs))
        return
    if args.rounds is None:
        args.rounds = 3 if args.scale else 4
    if args.scale:
        configs = [(b, int(n)) for b, n in (c.split(":") for c in args.configs.split(","))]
        got = run_scale(args.devices, 6000 if args.quick else 30_000, configs, args.rounds)
        path = RESULTS / "fleet.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        results["scale" if args.devices == 1000 else f"scale_{args.devices}"] = got
        path.write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / "fleet.md").write_text(report(results))
        print(scale_report(got, args.devices))
        return
    if args.ab:
        with tempfile.TemporaryDirectory(prefix="edgefleet-bench-ab-") as d:
            broker, url = start_broker(Path(d))
            try:
                ab = ab_ingest(Path(d), url, args.ab, args.rounds, 1000, 6000 if args.quick else 15_000, args.this_ref)
            finally:
                broker.terminate()
        ab["load_avg"] = [round(x, 2) for x in os.getloadavg()]
        name = f"fleet-ab-{args.this_ref or 'tree'}-vs-{args.ab}"
        (RESULTS / f"{name}.json").write_text(json.dumps(ab, indent=1) + "\n")
        (RESULTS / f"{name}.md").write_text(ab_report(ab))
        print(ab_report(ab))
        return
    if args.report_only:
        (RESULTS / "fleet.md").write_text(report(json.loads((RESULTS / "fleet.json").read_text())))
        return
    scale = 0.2 if args.quick else 1.0
    host = {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}
    results: dict[str, Any] = {"host": host, "ingest": [], "goals": {"msgs_per_s": GOAL_MSGS_S,
                                                                      "first_paint_ms": GOAL_PAINT_MS}}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as d:
        tmp = Path(d)
        broker, url = start_broker(tmp)
        try:
            # Receipts (one small QoS 1 message back per device and half second) against none, in the same run.
            runs = ((1000, 30_000, "d1k-norcpt", False), (1000, 30_000, "d1k", True),
                    (10_000, 40_000, "d10k-norcpt", False), (10_000, 40_000, "d10k", True))
            for n_dev, n_msg, name, rcpt in runs:
                r, ctl = ingest_run(tmp, url, n_dev, int(n_msg * scale), name, keep=name == "d10k", receipts=rcpt)
                print(f"{n_dev:,} devices, receipts {'on' if rcpt else 'off'}: "
                      f"drain {r['drain']['msgs_per_s']:.0f} msgs/s "
                      f"({r['drain']['cpu_ms_per_1000']} ms CPU/1,000), "
                      f"live {r['live']['msgs_per_s']:.0f} msgs/s, {r['rows_stored']}/{r['messages_sent']} stored",
                      flush=True)
                results["ingest"].append(r)
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


def scale_report(sc: dict[str, Any], devices: int = 1000) -> str:
    """The scale matrix as Markdown."""
    flag = "" if devices == 1000 else f" --devices {devices}"
    lines = [
        f"## Scale-out: SQLite and PostgreSQL, 1 and 2 controllers, receipts on, {devices:,} devices", "",
        f"`.venv/bin/python bench/fleet.py --scale{flag}`: one Mosquitto, PostgreSQL {sc.get('postgresql') or '-'} "
        f"with its default (durable) settings, {devices:,} simulated devices on one connection that subscribes to "
        "their receipts "
        "(QoS 0, the default), N `fleet serve` processes in one share group, each pinned to its own core. Load "
        f"average {sc['load_avg_at_start']} at start, {sc['load_avg_at_end']} at end (a shared 2-core machine). "
        "*Live*: messages published while the controllers run, from the first publish until the controllers have "
        "stored them all (publisher, broker, controllers and database share the 2 cores). *Drain*: the same number "
        "queued by the broker while every controller was stopped, from the first row stored after they restart to "
        "the last. CPU is user+system time per 1,000 messages: of the controllers (summed), of Mosquitto, of the "
        "PostgreSQL server (postmaster and backends; SQLite runs inside the controller). *Per controller CPU-second* "
        "= messages / controller CPU seconds: what one controller core sustains when it has the core to itself."
        + (f" Note: {sc['note']}." if sc.get("note") else ""), "",
        "| store | controllers | phase | msgs/s (wall) | msgs per controller CPU-second (min–max) | controller CPU "
        "ms/1,000 (each) | broker CPU ms/1,000 | database CPU ms/1,000 |",
        "|---|---:|---|---:|---:|---:|---:|---:|"]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in sc["runs"]:
        groups.setdefault((r["backend"], r["controllers"]), []).append(r)

    def med(xs: list[Any]) -> Any:
        xs = [x for x in xs if x is not None]
        return round(statistics.median(xs), 1) if xs else None

    for (backend, n), rs in groups.items():
        for phase in ("live", "drain"):
            xs = [r[phase] for r in rs]
            rates = [x["msgs_per_controller_cpu_s"] or 0 for x in xs]
            each = " + ".join(str(med([x["controller_cpu_ms_per_1000_each"][i] for x in xs])) for i in range(n))
            db = med([x["database_cpu_ms_per_1000"] for x in xs])
            spread = f" ({min(rates):,.0f}–{max(rates):,.0f})" if len(rs) > 1 else ""
            lines.append(f"| {backend} | {n} | {phase} | {med([x['msgs_per_s'] for x in xs]):,.0f} | "
                         f"**{med(rates):,.0f}**{spread} | {med([x['controller_cpu_ms_per_1000'] for x in xs])}"
                         f"{f' ({each})' if n > 1 else ''} | {med([x['broker_cpu_ms_per_1000'] for x in xs])} | "
                         f"{'in the controller' if db is None else db} |")
    rounds = max(len(rs) for rs in groups.values())
    lines += ["", f"Medians of {rounds} round(s), the configurations interleaved round by round. Below, each round's "
              "end state, read from the store: *lost* = messages sent whose (device, boot, seq) is not stored, "
              "*stored twice* = rows minus distinct keys; *redelivered* = messages the broker delivered again that "
              "the store recognised as already stored.", "",
              "| store | controllers | round | messages sent | rows stored | lost | stored twice | redelivered "
              "(de-duplicated) | split between controllers | receipts sent in the drain (per message) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in sc["runs"]:
        lines.append(f"| {r['backend']} | {r['controllers']} | {r.get('round', 0) + 1} | {r['messages_sent']:,} | "
                     f"{r['rows_stored']:,} | {r['lost']} | {r['stored_twice']} | {r['redelivered_deduplicated']} | "
                     f"{' / '.join(f'{v:,}' for v in r['split'])} | {r['receipts_sent']:,} "
                     f"({r['receipts_sent'] / (r['messages_sent'] / 2):.2f}) |")  # counted since the restart
    lines.append("")
    return "\n".join(lines)


def report(r: dict[str, Any]) -> str:
    if "host" not in r:
        return "# Fleet controller bench\n\n" + "\n".join(
            scale_report(r[k], int(k.split("_")[1]) if "_" in k else 1000) for k in sorted(r) if k.startswith("scale"))
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
        "| devices | receipts | messages sent | rows stored | duplicates | drain msgs/s (controller alone) | "
        "live msgs/s (end to end) | controller CPU ms per 1,000 (live) | payload bytes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["ingest"]:
        d = x["drain"]
        share = d["controller_cpu_s"] / d["seconds"] if d["seconds"] else 0.0
        rc = f"on ({x.get('receipts_sent', 0):,} sent)" if x.get("receipts", True) else "off"
        lines.append(f"| {x['devices']:,} | {rc} | {x['messages_sent']:,} | {x['rows_stored']:,} | {x['duplicates']} | "
                     f"**{d['msgs_per_s']:,.0f}** (CPU {d['cpu_ms_per_1000']} ms/1,000 → "
                     f"**{d['cpu_bound_msgs_per_s'] or 0:,.0f}/s** per CPU-second; busy {share:.0%} of the time) | "
                     f"{x['live']['msgs_per_s']:,.0f} | {x['live']['cpu_ms_per_1000']} | {x['payload_bytes_mean']} |")
    lines += ["", "Each run sends the messages twice. *Drain*: the controller is stopped, the broker queues N messages "
              "for its persistent session, the controller restarts and the rate is measured from the first stored row "
              "to the last — the controller alone on its core. *Live*: N messages published while the controller runs, "
              "timed from the first publish until the store holds them all; the publisher (one Python paho client) "
              "and Mosquitto share the machine, so this is the slower, end-to-end figure. CPU is the controller "
              "process's user+system time. Rows stored = messages sent in every run (QoS 1, acked after commit).",
              "",
              "Reading them: the controller needs the CPU time shown per 1,000 messages, so a core it had to itself "
              "would sustain the *per CPU-second* rate. During the drain it was busy only part of the time (shown): "
              "its core is shared with the other work on this machine (see the load average), and its network and "
              "writer threads hand the GIL to each other — hence the lower wall-clock rate (the two causes are not "
              "separated here). Where the CPU time goes (measured per thread): about a third in paho's network "
              "thread (it reads each packet's header a byte at a time), the rest in the writer: validating with "
              "the sdk parser (JSON and the sketch) and the SQLite transaction. More ingest: more controllers in "
              "the share group (docs/scaling.md).", ""]
    if r.get("dashboard_10k"):
        dsh = r["dashboard_10k"]
        lines += ["## Dashboard with 10,000 devices known (goal: first paint < 1 s)", "",
                  f"- first contentful paint: **{dsh['first_contentful_paint_ms']} ms** (median of {dsh['runs']})",
                  f"- device table showing data (first page of 100 devices, fetched on its own): "
                  f"**{dsh['table_with_data_ms']} ms**",
                  f"- all 10,000 devices loaded, sorted and the page re-rendered (sorting and filtering work on the "
                  f"whole fleet from here): **{dsh.get('all_devices_loaded_ms', '-')} ms**",
                  f"- rows in the DOM: {dsh['rows_rendered']} (one page; the rest are a click or a filter away); "
                  f"header: {dsh['summary']!r}", ""]
    if r.get("api_10k"):
        lines += ["## API latency with 10,000 devices known", "", "| endpoint | p50 ms | p95 ms | bytes |",
                  "|---|---:|---:|---:|"]
        for k, v in r["api_10k"].items():
            lines.append(f"| {k} | {v['p50_ms']} | {v['p95_ms']} | {v['bytes']:,} |")
        lines.append("")
    if any(k.startswith("scale") for k in r):
        lines += ["The sections above come from the last full run (`bench/fleet.py`); the scale-out sections below "
                  "were measured later (`--scale`), after buffered MQTT reads, QoS 0 receipts and corked writes, whose "
                  "effect alone the A/B files measure (fleet-ab-*.md). Where a controller's time goes: "
                  "fleet-profile.md.", ""]
    for key in sorted(k for k in r if k.startswith("scale")):
        lines += [scale_report(r[key], int(key.split("_")[1]) if "_" in key else 1000)]
    return "\n".join(lines)


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
