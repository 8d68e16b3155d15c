"""SIGTERM while a request is being served: the request completes with 200, the agent publishes offline, exits 0."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
from _agent_util import Watcher, http_json, sha_size
from edgefleet.sdk.bundle import SessionConfig


def _slow_model(path: Path, layers: int = 24, dim: int = 768) -> Path:
    """A chain of dim×dim MatMul+Tanh: tens of ms per layer on one thread, so a request is surely in flight."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array((np.random.default_rng(0).standard_normal((dim, dim)) / dim**0.5).astype(np.float32),
                                "w")
    nodes, prev = [], "x"
    for i in range(layers):
        nodes += [helper.make_node("MatMul", [prev, "w"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [f"t{i}"])]
        prev = f"t{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", dim])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_sigterm_lets_inflight_request_finish_then_publishes_offline(agent_factory, mosquitto, make_bundle,
                                                                     tmp_path: Path) -> None:
    model = _slow_model(tmp_path / "slow.onnx")
    agent = agent_factory(start=False)
    w = Watcher(mosquitto, agent.device)
    agent.start()
    bundle = make_bundle(model, name="slow", session=SessionConfig(intra_op_num_threads=1))
    sha, size = sha_size(bundle)
    assert w.wait_reply(w.send("deploy", {"url": bundle.as_uri(), "sha256": sha, "size": size}))["status"] == "ok"
    body = json.dumps({"inputs": [{"name": "x", "shape": [64, 768], "datatype": "FP32",
                                   "data": [0.01] * (64 * 768)}]}).encode()
    t0 = time.perf_counter()
    assert http_json("POST", f"http://{agent.api}/v2/models/slow/infer", body)[0] == 200
    one = time.perf_counter() - t0
    result: dict = {}

    def call() -> None:
        result["r"] = http_json("POST", f"http://{agent.api}/v2/models/slow/infer", body, timeout=60)
        result["done"] = time.perf_counter()

    t = threading.Thread(target=call)
    t.start()
    time.sleep(min(0.3, one / 3))  # the request is being served now
    assert agent.proc is not None
    agent.proc.terminate()
    signalled = time.perf_counter()
    assert agent.wait(60) == 0
    t.join(10)
    status, resp = result["r"]
    assert status == 200, resp
    assert resp["outputs"][0]["shape"] == [64, 768]
    off = w.wait_for("status", lambda s: s["state"] == "offline")
    assert off["reason"] == "shutdown"
    assert result["done"] > signalled
    w.close()
