"""Run candidates here: outputs for the accuracy gate and latency, on the target's EP when this host has it.

Sessions on the target's EP go through :class:`edgefleet.sdk.runtime.Model` (the device's own code path), so a
provider that silently falls back (OpenVINO rejecting an option, say) fails here exactly as it would on a device.
Latency is measured interleaved (round-robin over candidates) so that a noisy neighbour on a shared host slows
every candidate alike; the median of all timed runs is reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet.sdk.bundle import Manifest, ProviderConfig, SessionConfig, TensorSpec
from edgefleet.sdk.errors import EdgefleetError, ModelError

__all__ = ["Runner", "cpu_session", "interleaved_latency", "interleaved_times", "run_all"]


class Runner:
    """Something with ``run(feed) -> list[np.ndarray]`` and a name for reports."""

    def __init__(self, session: Any, where: str) -> None:
        self.session = session
        self.where = where
        self._names = [o.name for o in session.get_outputs()]

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name."""
        try:
            return dict(zip(self._names, self.session.run(self._names, dict(feed)), strict=True))
        except Exception as exc:
            raise ModelError(f"{self.where}: inference failed: {str(exc).splitlines()[0]}") from exc


def cpu_session(path: Path, level: str = "all") -> Runner:
    """A plain CPU EP session (references and proxies)."""
    import onnxruntime as ort
    from edgefleet.sdk.runtime import make_session_options

    so = make_session_options(SessionConfig(graph_optimization_level=level))
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"cannot load {path.name} on the CPU EP: {str(exc).splitlines()[0]}") from exc
    return Runner(sess, "CPUExecutionProvider")


def target_session(path: Path, providers: Sequence[ProviderConfig], session: SessionConfig,
                   inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], cache_dir: Path) -> Runner:
    """A session built exactly as the device will build it (sdk runtime, no fallback allowed)."""
    from edgefleet.sdk.runtime import Model

    manifest = Manifest(name="candidate", version="0", target="candidate", precision="fp32", model="model.onnx",
                        providers=tuple(providers), session=session, inputs=tuple(inputs), outputs=tuple(outputs),
                        files={})
    try:
        model = Model(path, manifest, allow_fallback=False, cache_dir=cache_dir)
    except EdgefleetError:
        raise
    return Runner(model.session, providers[0].name)


def run_all(runner: Runner, samples: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Outputs for every sample."""
    return [runner.run(s) for s in samples]


def interleaved_latency(runners: Mapping[str, Runner], feed: Mapping[str, np.ndarray], rounds: int = 9,
                        min_round_s: float = 0.03, warmup: int = 3) -> dict[str, float]:
    """Median latency in ms per runner, timed in interleaved rounds."""
    times = interleaved_times(runners, feed, rounds, min_round_s, warmup)
    return {n: statistics.median(t) for n, t in times.items()}


def interleaved_times(runners: Mapping[str, Runner], feed: Mapping[str, np.ndarray], rounds: int = 9,
                      min_round_s: float = 0.03, warmup: int = 3) -> dict[str, list[float]]:
    """Every timed run in ms per runner, timed in interleaved rounds."""
    if not runners:
        return {}
    per_run: dict[str, int] = {}
    for name, r in runners.items():
        for _ in range(warmup):
            r.run(feed)
        t0 = time.perf_counter()
        r.run(feed)
        one = max(time.perf_counter() - t0, 1e-5)
        per_run[name] = max(1, min(50, int(min_round_s / one)))
    times: dict[str, list[float]] = {n: [] for n in runners}
    for _ in range(rounds):
        for name, r in runners.items():
            sess, names, f = r.session, r._names, dict(feed)
            for _ in range(per_run[name]):
                t0 = time.perf_counter()
                sess.run(names, f)
                times[name].append((time.perf_counter() - t0) * 1000.0)
    return times
