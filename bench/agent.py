"""Agent footprint and local-API overheads: this tree's agent against a baseline agent, both measured in one run.

The baseline is the agent at ``--baseline`` (default: the last commit before the local API was rebuilt on h11, issue
13), exported with ``git archive`` and run from that copy by the same interpreter; both agents run as real processes
(``edgefleet agent run``) against one real Mosquitto, side by side, and are measured the same way:

* RSS with no model (goal < 60 MB) and idle CPU over two telemetry intervals (goal < 1 % of a core), same window;
* inference through each local API (HTTP keep-alive with binary tensors and with JSON, and tritonclient) against a
  bare ``InferenceSession.run`` of the same model in this process: every kind of call for both agents interleaved
  with the order rotated each round; medians (goal ≤ 1 ms added at p50 for a small model);
* which tritonclient HTTP calls work, and keep-alive after an error (tritonclient's own connection pool);
* issue 18's attacks: eight concurrent 60 MiB bodies (peak RSS; the baseline gets binary bodies only — with JSON
  bodies it reached 6.4 GB in issue 18), and 50 connections trickling a request head (held, and threads, after 15 s);
* install time from the deploy command to serving, against a bare ``InferenceSession`` creation;
* cost per recorded latency (``LatencyRecorder.record``, goal ≤ 2 µs).

    .venv/bin/python bench/agent.py          # writes bench/results/agent.md and agent.json

Timings are reported, never pass/fail: this machine is shared.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
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
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
GOALS = {"rss_mb": 60.0, "idle_cpu_pct": 1.0, "record_us": 2.0, "api_added_ms": 1.0}
BASELINE_REF = "b7c9130"  # the agent before its local API was rebuilt (stdlib http.server, hand-written framing)
MIB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mosquitto(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = _free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def mlp(path: Path) -> Path:
    """The tests' small MLP: 16 → 32 → 4, MatMul/Add/Relu/MatMul/Softmax."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("w1", (16, 32)), ("b1", (32,)), ("w2", (32, 4)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def sum_model(path: Path) -> Path:
    """x [n] float32 -> ReduceSum: a big input and a tiny output (the memory attack's target)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)], "sum",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def magika() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("magika")
    if spec is None or not spec.origin:
        return None
    found = sorted(Path(spec.origin).parent.glob("models/*/model.onnx"))
    return found[-1] if found else None


def baseline_tree(ref: str, dest: Path) -> Path:
    """The components at ``ref`` as an importable ``edgefleet`` package under ``dest`` (prepended to sys.path, it
    wins over this tree's editable install, whose finder comes after the path finder)."""
    pkg = dest / "edgefleet"
    pkg.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "sdk", "devices", "agent"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(pkg)], input=archive, check=True)
    (pkg / "__init__.py").write_text("")
    return dest


class AgentUnderTest:
    """One agent process with its own data dir and config."""

    def __init__(self, label: str, tmp: Path, broker_port: int, pub: Path, pythonpath: Path | None) -> None:
        self.label = label
        self.device = f"bench-{label}"
        self.data = tmp / f"data-{label}"
        cfg = tmp / f"{label}.toml"
        cfg.write_text(f'[agent]\ndevice = "{self.device}"\nfleet = "bench"\ndata_dir = "{self.data}"\n'
                       f'trusted_keys = ["{pub}"]\nprofile = "x86-cpu"\nlog_level = "warning"\n'
                       f'[mqtt]\nurl = "mqtt://127.0.0.1:{broker_port}"\n[api]\nlisten = "127.0.0.1:0"\n'
                       '[commands]\nrequire_signed = false\n')
        env = dict(os.environ)
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)
            cmd = [sys.executable, "-c", "from edgefleet.sdk.cli import main; main()"]
        else:
            cmd = [EDGEFLEET]
        self.log = tmp / f"{label}.log"
        self.proc = subprocess.Popen([*cmd, "agent", "run", "--config", str(cfg)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))
        runtime = self.data / "state" / "runtime.json"
        deadline = time.monotonic() + 60
        while not runtime.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{label} agent did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.api = json.loads(runtime.read_text())["api"]
        self.ps = psutil.Process(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Controller:
    """Sends commands and waits for replies, like the fleet controller does."""

    def __init__(self, port: int, fleet: str, devices: list[str]) -> None:
        import paho.mqtt.client as mqtt
        from edgefleet.sdk import protocol
        from paho.mqtt.enums import CallbackAPIVersion

        self.protocol = protocol
        self.fleet = fleet
        self.replies: dict[str, tuple[float, dict[str, Any]]] = {}
        self.telemetry: dict[str, list[dict[str, Any]]] = {d: [] for d in devices}
        self.cond = threading.Condition()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-ctl", protocol=mqtt.MQTTv5)

        def on_message(c: Any, u: Any, msg: Any) -> None:
            obj = json.loads(msg.payload)
            device = msg.topic.split("/")[3]
            with self.cond:
                if msg.topic.endswith("/telemetry"):
                    self.telemetry[device].append(obj)
                else:
                    self.replies[obj["id"]] = (time.perf_counter(), obj)
                self.cond.notify_all()

        self.c.on_message = on_message
        self.c.connect("127.0.0.1", port)
        for d in devices:
            self.c.subscribe(protocol.topic(fleet, d, "reply"), qos=1)
            self.c.subscribe(protocol.topic(fleet, d, "telemetry"), qos=1)
        self.c.loop_start()
        time.sleep(0.2)

    def inside_p50_ms(self, device: str, name: str, after_seq: int, until_seq: int) -> float | None:
        """p50 of ``session.run`` inside the agent (its own telemetry sketches merged) between two records."""
        from edgefleet.sdk.sketch import DDSketch

        with self.cond:
            self.cond.wait_for(lambda: any(t["seq"] >= until_seq for t in self.telemetry[device]), 30)
            recs = [t for t in self.telemetry[device] if after_seq < t["seq"] <= until_seq]
        sk = DDSketch.merged(DDSketch.from_dict(m["sketch"]) for r in recs for m in r["models"] if m["name"] == name)
        return sk.quantile(0.5)

    def last_seq(self, device: str) -> int:
        with self.cond:
            self.cond.wait_for(lambda: bool(self.telemetry[device]), 30)
            return max(t["seq"] for t in self.telemetry[device])

    def call(self, device: str, kind: str, args: dict[str, Any],
             timeout: float = 120) -> tuple[float, float, dict[str, Any]]:
        cmd = self.protocol.command(kind, args)
        t0 = time.perf_counter()
        self.c.publish(self.protocol.topic(self.fleet, device, "cmd"), cmd.to_json(), qos=1)
        with self.cond:
            if not self.cond.wait_for(lambda: cmd.id in self.replies, timeout):
                raise RuntimeError(f"no reply to {kind} within {timeout} s")
            t1, reply = self.replies[cmd.id]
        if reply["status"] != "ok":
            raise RuntimeError(f"{device} {kind}: {reply}")
        return t0, t1, reply


def wait_ready(api: str, name: str, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    conn = http.client.HTTPConnection(*api.split(":"), timeout=5)
    while time.monotonic() < deadline:
        conn.request("GET", f"/v2/models/{name}/ready")
        resp = conn.getresponse()
        resp.read()
        if resp.status == 200:
            return time.perf_counter()
        time.sleep(0.002)
    raise RuntimeError(f"{name} not ready")


def bench_record(n: int = 200_000) -> float:
    from edgefleet.sdk.sketch import LatencyRecorder

    rec = LatencyRecorder()
    values = np.random.default_rng(0).lognormal(0.0, 0.5, n).tolist()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _v in values:
            pass
        loop = time.perf_counter() - t0
        t0 = time.perf_counter()
        record = rec.record
        for v in values:
            record(v)
        best = min(best, (time.perf_counter() - t0 - loop) / n * 1e6)
    return best


def _binary_request(name: str, x: np.ndarray, dtype: str) -> tuple[bytes, dict[str, str]]:
    raw = np.ascontiguousarray(x).tobytes()
    head = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": dtype,
                                   "parameters": {"binary_data_size": len(raw)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def _json_request(name: str, x: np.ndarray, dtype: str) -> tuple[bytes, dict[str, str]]:
    return json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": dtype,
                                   "data": x.ravel().tolist()}]}).encode(), {"Content-Type": "application/json"}


def bench_api(agents: list[AgentUnderTest], model_name: str, model_path: Path, inp: str, x: np.ndarray, dtype: str,
              calls: int) -> dict[str, Any]:
    """Interleaved: bare session.run, and per agent HTTP infer (binary, JSON) and tritonclient; medians in µs."""
    import onnxruntime as ort
    import tritonclient.http as tc

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # as the bundle's session: no idle spinning threads fighting across the processes
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    reqs = {"binary": _binary_request(inp, x, dtype), "json": _json_request(inp, x, dtype)}
    t_in = tc.InferInput(inp, list(x.shape), dtype)
    t_in.set_data_from_numpy(x)
    fns: dict[str, Any] = {"bare": lambda: sess.run(None, {inp: x})}
    closers = []
    for a in agents:
        host, port = a.api.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        triton = tc.InferenceServerClient(url=a.api)
        closers += [conn.close, triton.close]

        def http_call(kind: str, conn: http.client.HTTPConnection = conn) -> None:
            body, headers = reqs[kind]
            conn.request("POST", f"/v2/models/{model_name}/infer", body, headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{kind}: HTTP {resp.status}")

        fns[f"{a.label}:binary"] = lambda f=http_call: f("binary")
        fns[f"{a.label}:json"] = lambda f=http_call: f("json")
        fns[f"{a.label}:tritonclient"] = lambda t=triton: t.infer(model_name, [t_in])
    order = list(fns)
    for f in fns.values():
        for _ in range(20):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu0 = {a.label: a.ps.cpu_times() for a in agents}
    for i in range(calls):
        rot = order[i % len(order):] + order[:i % len(order)]
        for k in rot:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t0) * 1e6)
    # the agent's own CPU per request (its three kinds of call): what serving costs the device, whatever the noise
    cpu_us = {}
    for a in agents:
        c1 = a.ps.cpu_times()
        spent = (c1.user - cpu0[a.label].user) + (c1.system - cpu0[a.label].system)
        cpu_us[a.label] = spent / (3 * calls) * 1e6
    for c in closers:
        c()
    med = {k: statistics.median(v) for k, v in times.items()}
    p90 = {k: float(np.percentile(v, 90)) for k, v in times.items()}
    return {"calls": calls, "median_us": med, "p90_us": p90, "agent_cpu_us_per_request": cpu_us,
            "added_us": {k: med[k] - med["bare"] for k in fns if k != "bare"}}


def tritonclient_matrix(api: str, model: str, x: np.ndarray) -> dict[str, str]:
    """Which tritonclient HTTP calls work against an agent: "ok" or the error (one line)."""
    import tritonclient.http as tc

    client = tc.InferenceServerClient(url=api)
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    calls: dict[str, Any] = {
        "is_server_live / is_server_ready": lambda: client.is_server_live() and client.is_server_ready(),
        "get_server_metadata": lambda: client.get_server_metadata(),
        "is_model_ready / get_model_metadata": lambda: (client.is_model_ready(model), client.get_model_metadata(model)),
        "infer (binary and JSON outputs)": lambda: (client.infer(model, [inp]), client.infer(
            model, [inp], outputs=[tc.InferRequestedOutput("probs", binary_data=False)])),
        "infer, gzip request and response": lambda: client.infer(model, [inp], request_compression_algorithm="gzip",
                                                                 response_compression_algorithm="gzip"),
        "infer, deflate request and response": lambda: client.infer(
            model, [inp], request_compression_algorithm="deflate", response_compression_algorithm="deflate"),
        "infer with class_count (classification)": lambda: client.infer(
            model, [inp], outputs=[tc.InferRequestedOutput("probs", class_count=2)]).as_numpy("probs"),
        "async_infer": lambda: client.async_infer(model, [inp]).get_result(),
        "get_model_config": lambda: client.get_model_config(model),
        "get_inference_statistics": lambda: client.get_inference_statistics(model),
        "get_model_repository_index": lambda: client.get_model_repository_index(),
        "unload_model / load_model": lambda: (client.unload_model(model), client.load_model(model)),
        "get_log_settings / update_log_settings": lambda: (client.get_log_settings(),
                                                           client.update_log_settings({"log_info": False})),
    }

    def after_error() -> None:
        try:
            client.infer("no-such-model", [inp])
        except Exception:  # noqa: BLE001 - the 404 is the point; the next call must still work
            pass
        client.infer(model, [inp])

    calls["keep-alive: infer after a 404 on the same connection"] = after_error
    out = {}
    for name, fn in calls.items():
        try:
            fn()
            out[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported as the call's result
            out[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}" if str(exc) else type(exc).__name__
    try:
        client.close()
    except Exception:  # noqa: BLE001
        pass
    return out


def memory_attack(agent: AgentUnderTest, with_json: bool) -> dict[str, Any]:
    """Eight concurrent 60 MiB inference bodies (half of them JSON when ``with_json``); the agent's peak RSS."""
    host, port = agent.api.split(":")
    n = 60 * MIB // 4 - 64
    raw = np.ones(n, np.float32).tobytes()
    head = json.dumps({"inputs": [{"name": "x", "shape": [n], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    binary = (f"POST /v2/models/sum/infer HTTP/1.1\r\nHost: a\r\nInference-Header-Content-Length: {len(head)}\r\n"
              f"Content-Length: {len(head) + len(raw)}\r\n\r\n").encode() + head + raw
    values = (60 * MIB - 100) // 4
    text = b'{"inputs": [{"name": "x", "shape": [%d], "datatype": "FP32", "data": [' % values + \
        b"0.5," * (values - 1) + b"0.5]}]}"
    js = f"POST /v2/models/sum/infer HTTP/1.1\r\nHost: a\r\nContent-Length: {len(text)}\r\n\r\n".encode() + text
    time.sleep(0.5)
    base = agent.ps.memory_info().rss
    peak = base
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, agent.ps.memory_info().rss)
            time.sleep(0.005)

    statuses: list[str] = []

    def send(payload: bytes) -> None:
        try:
            with socket.create_connection((host, int(port)), timeout=120) as s:
                try:
                    s.sendall(payload)
                except OSError:
                    pass
                s.settimeout(120)
                first = s.recv(64)
                statuses.append(first.split(b" ", 2)[1].decode() if first else "closed")
        except OSError as exc:
            statuses.append(type(exc).__name__)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=send, args=(js if with_json and i % 2 else binary,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    took = time.monotonic() - t0
    stop.set()
    sampler.join()
    time.sleep(0.5)
    return {"bodies": "4 binary + 4 JSON" if with_json else "8 binary", "seconds": took,
            "rss_before_mb": base / MIB, "peak_rss_mb": peak / MIB, "rss_after_mb": agent.ps.memory_info().rss / MIB,
            "statuses": sorted(statuses)}


def slow_loris(agent: AgentUnderTest, conns: int = 50, every_s: float = 2.0, watch_s: float = 15.0
               ) -> dict[str, Any]:
    """``conns`` connections each sending a request head one byte every ``every_s``: how many the agent still holds
    after ``watch_s``, and its threads."""
    host, port = agent.api.split(":")
    threads_before = agent.ps.num_threads()
    head = b"POST /v2/models/sum/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nX-Pad: " + b"a" * 100
    socks = [socket.create_connection((host, int(port)), timeout=5) for _ in range(conns)]
    closed: set[int] = set()
    t0 = time.monotonic()
    i = 0
    peak_threads = threads_before
    while time.monotonic() - t0 < watch_s:
        for k, s in enumerate(socks):
            if k in closed:
                continue
            try:
                s.send(head[i:i + 1])
                s.setblocking(False)
                try:
                    s.recv(1024)
                    closed.add(k)  # the server answered (408) or closed it
                except BlockingIOError:
                    pass  # still held, nothing said
                except OSError:
                    closed.add(k)
                s.setblocking(True)
            except OSError:
                closed.add(k)
        i += 1
        peak_threads = max(peak_threads, agent.ps.num_threads())
        time.sleep(every_s)
    held = conns - len(closed)
    threads_end = agent.ps.num_threads()
    for s in socks:
        s.close()
    return {"connections": conns, "byte_every_s": every_s, "after_s": watch_s, "still_held": held,
            "threads_before": threads_before, "threads_peak": peak_threads, "threads_at_end": threads_end}


def bare_session_ms(path: Path, runs: int = 5) -> float:
    import onnxruntime as ort

    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--idle-s", type=float, default=20.0, help="idle CPU window (default: 2 telemetry intervals)")
    ap.add_argument("--calls", type=int, default=2000, help="interleaved API calls for the small model")
    ap.add_argument("--baseline", default=BASELINE_REF, help=f"git ref of the baseline agent (default {BASELINE_REF})")
    args = ap.parse_args()

    from edgefleet.sdk.bundle import SessionConfig
    from edgefleet.sdk.keys import generate_keypair
    from edgefleet.sdk.runtime import ort_info
    from edgefleet.sdk.testing import build_test_bundle

    base_commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.baseline], check=True,
                                 capture_output=True, text=True).stdout.strip()
    head_commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                                 capture_output=True, text=True).stdout.strip()
    results: dict[str, Any] = {"goals": GOALS, "baseline": base_commit, "head": head_commit}
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-agent-") as tmp_s:
        tmp = Path(tmp_s)
        broker, port = start_mosquitto(tmp)
        key = generate_keypair(tmp / "fleet.key")
        pub = tmp / "fleet.pub"
        agents: list[AgentUnderTest] = []
        try:
            agents.append(AgentUnderTest("baseline", tmp, port, pub, baseline_tree(args.baseline, tmp / "baseline")))
            agents.append(AgentUnderTest("new", tmp, port, pub, None))
            base, new = agents
            for a in agents:  # which code each process runs: only the new API has /metrics
                conn = http.client.HTTPConnection(*a.api.split(":"), timeout=5)
                conn.request("GET", "/metrics")
                has_metrics = conn.getresponse().status == 200
                assert has_metrics == (a is new), f"{a.label} agent runs the wrong tree"
            time.sleep(3.0)
            idle: dict[str, Any] = {}
            c0 = {a.label: a.ps.cpu_times() for a in agents}
            t0 = time.monotonic()
            time.sleep(args.idle_s)
            for a in agents:
                c1 = a.ps.cpu_times()
                cpu = ((c1.user - c0[a.label].user) + (c1.system - c0[a.label].system)) / (time.monotonic() - t0)
                idle[a.label] = {"rss_mb": a.ps.memory_info().rss / 1e6, "idle_cpu_pct": cpu * 100,
                                 "onnxruntime_loaded": any("onnxruntime" in m.path for m in a.ps.memory_maps()),
                                 "threads": a.ps.num_threads()}
                print(f"{a.label}: no model: RSS {idle[a.label]['rss_mb']:.1f} MB, idle CPU "
                      f"{idle[a.label]['idle_cpu_pct']:.3f} % of a core")
            results["idle"] = idle
            results["idle_window_s"] = args.idle_s

            ctl = Controller(port, "bench", [a.device for a in agents])
            models = [("mlp", mlp(tmp / "mlp.onnx"), "x", np.ones((1, 16), np.float32), "FP32", args.calls)]
            mg = magika()
            if mg is not None:
                x = np.random.default_rng(0).integers(0, 256, (1, 2048)).astype(np.int32)
                models.append(("magika", mg, "bytes", x, "INT32", max(100, args.calls // 20)))
            results["install"] = []
            results["api"] = []
            for name, path, inp, x, dtype, calls in models:
                bundle = build_test_bundle(path, tmp / f"{name}.efb", key, name=name,
                                           session=SessionConfig(intra_op_num_threads=1))
                raw = bundle.read_bytes()
                sha, size = hashlib.sha256(raw).hexdigest(), len(raw)
                for a in agents:
                    t_cmd, t_reply, reply = ctl.call(a.device, "deploy", {"url": bundle.as_uri(), "sha256": sha,
                                                                          "size": size})
                    t_ready = wait_ready(a.api, name)
                    inst = {"agent": a.label, "model": name, "bundle_bytes": size,
                            "command_to_reply_ms": (t_reply - t_cmd) * 1000,
                            "command_to_serving_ms": (t_ready - t_cmd) * 1000,
                            "steps_ms": reply["result"]["timings_ms"], "bare_session_ms": bare_session_ms(path)}
                    results["install"].append(inst)
                    print(f"{a.label} install {name}: command→serving {inst['command_to_serving_ms']:.1f} ms")
                    ctl.call(a.device, "configure", {"telemetry_interval_s": 0.5})
                time.sleep(0.6)  # let a record at the new interval close: the API calls start after it
                before = {a.label: ctl.last_seq(a.device) for a in agents}
                r = bench_api(agents, name, path, inp, x, dtype, calls)
                time.sleep(0.6)
                r["inside_agent_p50_us"] = {
                    a.label: (ctl.inside_p50_ms(a.device, name, before[a.label], ctl.last_seq(a.device) + 1) or 0.0)
                    * 1000 for a in agents}
                r["model"] = name
                r["input"] = f"{inp} {list(x.shape)} {dtype}"
                results["api"].append(r)
                print(f"api {name}: median µs {({k: round(v, 1) for k, v in r['median_us'].items()})}")
            results["with_model_rss_mb"] = {a.label: a.ps.memory_info().rss / 1e6 for a in agents}
            x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
            results["tritonclient"] = {a.label: tritonclient_matrix(a.api, "mlp", x) for a in agents}
            for a in agents:
                ok = sum(v == "ok" for v in results["tritonclient"][a.label].values())
                print(f"{a.label}: {ok}/{len(results['tritonclient'][a.label])} tritonclient calls work")

            sb = build_test_bundle(sum_model(tmp / "sum.onnx"), tmp / "sum.efb", key, name="sum",
                                   samples=[{"x": np.ones(8, np.float32)}])
            raw = sb.read_bytes()
            for a in agents:
                ctl.call(a.device, "deploy", {"url": sb.as_uri(), "sha256": hashlib.sha256(raw).hexdigest(),
                                              "size": len(raw)})
            results["memory_attack"] = {"baseline": memory_attack(base, with_json=False),
                                        "new": memory_attack(new, with_json=True),
                                        "new_binary_only": memory_attack(new, with_json=False)}
            for k, v in results["memory_attack"].items():
                print(f"8 x 60 MiB ({v['bodies']}) {k}: RSS {v['rss_before_mb']:.0f} -> peak {v['peak_rss_mb']:.0f} "
                      f"MiB, statuses {v['statuses']}")
            results["slow_loris"] = {a.label: slow_loris(a) for a in agents}
            for k, v in results["slow_loris"].items():
                print(f"slow loris {k}: {v['still_held']}/{v['connections']} held after {v['after_s']:.0f} s, "
                      f"threads {v['threads_before']} -> peak {v['threads_peak']} -> {v['threads_at_end']}")
            ctl.c.loop_stop()
        finally:
            for a in agents:
                a.stop()
            broker.terminate()
            broker.wait(10)
    results["record_us"] = bench_record()
    print(f"LatencyRecorder.record: {results['record_us']:.3f} µs")
    info = ort_info()
    results["env"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
                      "ort": f"{info.version} ({info.flavour})", "cpu": _cpu(), "cores": os.cpu_count(),
                      "load_at_start": load, "paho": metadata.version("paho-mqtt"), "h11": metadata.version("h11"),
                      "tritonclient": metadata.version("tritonclient")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "agent.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "agent.md").write_text(render(results))
    print(f"wrote {RESULTS / 'agent.md'}")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def render(r: dict[str, Any]) -> str:
    e, g = r["env"], r["goals"]
    small = r["api"][0]
    labels = ("baseline", "new")
    added = {k: small["added_us"][f"{k}:binary"] / 1000 for k in labels}
    lines = [
        "# Agent footprint and overheads: the new local API against the baseline", "",
        f"Measured {e['date']} by `.venv/bin/python bench/agent.py` on {e['cpu']} ({e['cores']} cores, shared with "
        f"other work: load average {', '.join(f'{x:.1f}' for x in e['load_at_start'])} at start), Python "
        f"{e['python']}, ONNX Runtime {e['ort']}, paho-mqtt {e['paho']}, h11 {e['h11']}, tritonclient "
        f"{e['tritonclient']}, Mosquitto on loopback. Two real agent processes (`edgefleet agent run`) in the same "
        f"run, measured from outside with psutil: **baseline** = the agent at `{r['baseline']}` (stdlib "
        "`http.server`, hand-written framing; exported with `git archive` and run by the same interpreter), **new** "
        f"= this tree at `{r['head']}` (h11 framing, limits, Triton's extensions, /metrics).", "",
        "| measure | baseline | new | goal | new meets |", "|---|---|---|---|---|",
        f"| RSS, no model installed | {r['idle']['baseline']['rss_mb']:.1f} MB | {r['idle']['new']['rss_mb']:.1f} MB "
        f"| < {g['rss_mb']:.0f} MB | {_yes(r['idle']['new']['rss_mb'] < g['rss_mb'])} |",
        f"| idle CPU ({r['idle_window_s']:.0f} s, telemetry every 10 s) | "
        f"{r['idle']['baseline']['idle_cpu_pct']:.3f} % | {r['idle']['new']['idle_cpu_pct']:.3f} % | "
        f"< {g['idle_cpu_pct']:.0f} % of a core | {_yes(r['idle']['new']['idle_cpu_pct'] < g['idle_cpu_pct'])} |",
        f"| threads, idle | {r['idle']['baseline']['threads']} | {r['idle']['new']['threads']} | — | — |",
        f"| local API added at p50, small model (binary tensors) | {added['baseline']:.3f} ms | "
        f"{added['new']:.3f} ms | ≤ {g['api_added_ms']:.0f} ms | {_yes(added['new'] <= g['api_added_ms'])} |",
        f"| RSS with mlp, magika and the attack model served | "
        f"{r['with_model_rss_mb']['baseline']:.1f} MB | {r['with_model_rss_mb']['new']:.1f} MB | — | — |",
        f"| cost per recorded latency (`LatencyRecorder.record`, same code) | {r['record_us']:.3f} µs | "
        f"{r['record_us']:.3f} µs | ≤ {g['record_us']:.0f} µs | {_yes(r['record_us'] <= g['record_us'])} |", "",
        "With no model neither agent has loaded ONNX Runtime (ORT mapped: baseline "
        f"{r['idle']['baseline']['onnxruntime_loaded']}, new {r['idle']['new']['onnxruntime_loaded']}).", "",
        "## Local API against a bare `InferenceSession.run`", "",
        "Same model file, one intra-op thread everywhere; the bare session runs in the benchmark process, each API in "
        "its agent process; the seven kinds of call (bare, and binary / JSON / tritonclient for each agent) are "
        "interleaved with the order rotated every round; medians and p90 in µs. `binary` and `json` are a keep-alive "
        "`http.client` connection with the binary tensor extension or JSON tensors; `tritonclient` is "
        "`tritonclient.http` (its own client-side cost included).", "",
        "| model | input | calls | bare | agent | binary | json | tritonclient | added at p50 (binary / json / "
        "tritonclient) | session.run inside the agent (telemetry p50) | agent CPU per request |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in r["api"]:
        m, p, d = a["median_us"], a["p90_us"], a["added_us"]
        for k in labels:
            lines.append(
                f"| {a['model']} | {a['input']} | {a['calls']} | {m['bare']:.0f} (p90 {p['bare']:.0f}) | {k} | "
                f"{m[f'{k}:binary']:.0f} (p90 {p[f'{k}:binary']:.0f}) | {m[f'{k}:json']:.0f} "
                f"(p90 {p[f'{k}:json']:.0f}) | {m[f'{k}:tritonclient']:.0f} (p90 {p[f'{k}:tritonclient']:.0f}) | "
                f"{d[f'{k}:binary']:.0f} / {d[f'{k}:json']:.0f} / {d[f'{k}:tritonclient']:.0f} | "
                f"{a['inside_agent_p50_us'][k]:.0f} | {a['agent_cpu_us_per_request'][k]:.0f} |")
    lines += ["", "What the added time pays for: loopback TCP both ways, HTTP framing (h11 in the new agent, "
              "`http.server` in the baseline), decoding the request and encoding the response, the input check "
              "against the manifest, the deadline bookkeeping and the statistics. `session.run inside the agent` is "
              "what each agent measured around `session.run` itself: when it matches the bare median, the rest is "
              "outside the session. `agent CPU per request` is the agent process's CPU time (user + system, psutil) "
              "over the interleaved run divided by its requests (its three kinds alike, telemetry every 0.5 s "
              "included): the cost of serving on the device, less sensitive to the shared machine's noise than wall "
              "time. h11's framing costs more CPU than `http.server`'s (about 60 µs a request in a "
              "micro-benchmark here, request parse plus response), bought for correct framing (chunked, "
              "100-continue, pipelining, keep-alive after errors, strict refusal of ambiguous requests). For the "
              "larger model most of the difference is thread wake-ups waiting for a core on this shared 2-core "
              "machine.", "",
              "## tritonclient's HTTP calls", "",
              "Each call of `tritonclient.http.InferenceServerClient` that applies to a device, against each agent "
              "(`ok`, or the error tritonclient raised).", "",
              "| call | baseline | new |", "|---|---|---|"]
    for call in r["tritonclient"]["new"]:
        lines.append(f"| {call} | {r['tritonclient']['baseline'].get(call, '—')} | {r['tritonclient']['new'][call]} |")
    ma = r["memory_attack"]
    lines += ["", "## Issue 18's attacks", "",
              "Eight concurrent 60 MiB inference bodies to a model that sums its input (no big intermediate tensors: "
              "what grows is the HTTP layer). The baseline gets binary bodies only: with JSON bodies it reached "
              "6.4 GB RSS in issue 18 (not repeated on this shared machine). The new agent runs with its defaults "
              "(`api.max_inflight_bytes` = 256 MiB, `api.max_body_bytes` = 64 MiB).", "",
              "| agent | bodies | RSS before | peak RSS | RSS after | answers | took |",
              "|---|---|---|---|---|---|---|"]
    for k, v in ma.items():
        answers = ", ".join(f"{s}×{v['statuses'].count(s)}" for s in sorted(set(v["statuses"])))
        lines.append(f"| {k.replace('_binary_only', '')} | {v['bodies']} | {v['rss_before_mb']:.0f} MiB | "
                     f"{v['peak_rss_mb']:.0f} MiB | {v['rss_after_mb']:.0f} MiB | {answers} | {v['seconds']:.1f} s |")
    sl = r["slow_loris"]
    lines += ["", f"Slow loris: {sl['new']['connections']} connections each sending a request head one byte every "
              f"{sl['new']['byte_every_s']:g} s, watched for {sl['new']['after_s']:.0f} s.", "",
              "| agent | connections still held | agent threads before / peak / at the end |", "|---|---|---|"]
    for k in labels:
        v = sl[k]
        lines.append(f"| {k} | {v['still_held']} of {v['connections']} | {v['threads_before']} / {v['threads_peak']} "
                     f"/ {v['threads_at_end']} |")
    lines += ["", "## Install time: deploy command → serving", "",
              "From publishing the `deploy` command (file:// URL) to the reply, and to `/v2/models/{name}/ready` "
              "answering 200; against creating a bare `InferenceSession` for the same model (median of 5).", "",
              "| agent | model | bundle | command → reply | command → serving | bare session | steps (ms) |",
              "|---|---|---|---|---|---|---|"]
    for i in r["install"]:
        steps = ", ".join(f"{k} {v:.1f}" for k, v in i["steps_ms"].items())
        lines.append(f"| {i['agent']} | {i['model']} | {i['bundle_bytes'] / 1024:.0f} KiB | "
                     f"{i['command_to_reply_ms']:.1f} ms | {i['command_to_serving_ms']:.1f} ms | "
                     f"{i['bare_session_ms']:.1f} ms | {steps} |")
    lines += ["", "An install does more than create a session: it checks the download's sha256, verifies the "
              "signature, hashes every file again while extracting, creates the session with its provider cache, "
              "runs a warm-up and the self-test, and fsyncs the store and the pointer file. The first install also "
              "pays the agent's one-time import of ONNX Runtime.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
