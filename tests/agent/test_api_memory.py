"""Issue 18: eight concurrent 60 MiB bodies drove the agent to 6.4 GB. Against a real agent process with its default
limits, the same attack (four binary-tensor bodies, four JSON bodies, at once) stays within the memory budget: the
bodies are admitted in turn (``api.max_inflight_bytes``), the JSON ones refused before they are decoded."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import psutil
from _agent_util import Watcher, sha_size
from _api_models import sum_model
from _api_util import read_response

MIB = 1 << 20


def test_eight_concurrent_60mib_bodies_keep_the_agent_within_its_memory_budget(agent_factory, mosquitto, make_bundle,
                                                                              tmp_path) -> None:
    agent = agent_factory(start=False)
    w = Watcher(mosquitto, agent.device)
    agent.start()
    w.wait_for("status", lambda s: s["state"] == "online")
    bundle = make_bundle(sum_model(tmp_path / "sum.onnx"), name="sum",
                         samples=[{"x": np.ones(8, np.float32)}, {"x": np.arange(5, dtype=np.float32)}])
    sha, size = sha_size(bundle)
    assert w.wait_reply(w.send("deploy", {"url": bundle.as_uri(), "sha256": sha, "size": size}),
                        timeout=120)["status"] == "ok"
    host, port = agent.api.split(":")
    proc = psutil.Process(agent.proc.pid)

    n = 60 * MIB // 4 - 64
    raw = np.ones(n, np.float32).tobytes()
    head = json.dumps({"inputs": [{"name": "x", "shape": [n], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    binary = (f"POST /v2/models/sum/infer HTTP/1.1\r\nHost: a\r\nInference-Header-Content-Length: {len(head)}\r\n"
              f"Content-Length: {len(head) + len(raw)}\r\n\r\n").encode() + head + raw
    values = (60 * MIB - 100) // 4
    text = b'{"inputs": [{"name": "x", "shape": [%d], "datatype": "FP32", "data": [' % values + \
        b"0.5," * (values - 1) + b"0.5]}]}"
    js = (f"POST /v2/models/sum/infer HTTP/1.1\r\nHost: a\r\nContent-Length: {len(text)}\r\n\r\n").encode() + text
    assert 59 * MIB < len(binary) < 61 * MIB and 59 * MIB < len(js) < 61 * MIB

    time.sleep(0.5)
    base = proc.memory_info().rss
    peak = base
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.005)

    answers: dict[int, bytes] = {}

    def send(i: int, payload: bytes) -> None:
        with socket.create_connection((host, int(port)), timeout=60) as s:
            try:
                s.sendall(payload)
            except OSError:
                pass  # refused and closed before the whole body went: the answer is what counts
            answers[i] = read_response(s, 60, one=True)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=send, args=(i, binary if i % 2 == 0 else js)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    took = time.monotonic() - t0
    stop.set()
    sampler.join()
    w.close()

    statuses = sorted(a.split(b" ", 2)[1].decode() for a in answers.values())
    assert statuses == ["200"] * 4 + ["413"] * 4, statuses
    for i in range(0, 8, 2):
        out = json.loads(answers[i].partition(b"\r\n\r\n")[2])
        assert out["outputs"][0]["data"] == [float(n)]
    for i in range(1, 8, 2):
        assert b"binary tensor extension" in answers[i]
    grown = (peak - base) / MIB
    print(f"\n8 x 60 MiB bodies (4 binary, 4 JSON) in {took:.1f} s: agent RSS {base / MIB:.0f} MiB before, peak "
          f"{peak / MIB:.0f} MiB (+{grown:.0f} MiB); api.max_inflight_bytes = 256 MiB")
    # Bodies held at once are capped at 256 MiB; on top of them one run's copies and the allocator's slack.
    assert grown < 256 + 2 * 64 + 64, f"agent RSS grew by {grown:.0f} MiB"
    assert agent.terminate() == 0
