"""The agent's serving numbers, kept once and shown twice: Triton's statistics extension and Prometheus.

Per model and version, as Triton reports them: inference and execution counts, success and failure counts with their
cumulative durations, and where a request's time went — ``queue`` (waiting for a free session instance),
``compute_input`` (decoding and checking the tensors), ``compute_infer`` (``session.run``), ``compute_output``
(encoding the response). ``GET /v2/models[/{m}[/versions/{v}]]/stats`` returns them in nanoseconds; ``GET /metrics``
exposes the same numbers in the Prometheus text format with base units (seconds), ``_total`` counters, a latency
histogram and HELP/TYPE for every family, named after Triton's ``nv_inference_*`` under an ``edgefleet_`` prefix
(``promtool check metrics`` is clean; a test runs it against a live agent).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["BUCKETS_S", "FAILURE_REASONS", "HTTP_LIMITS", "Exposition", "ModelStats", "Stats"]

BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Request-duration histogram bounds in seconds (sub-millisecond models to a hung-run deadline)."""

FAILURE_REASONS = ("REJECTED", "UNAVAILABLE", "TIMEOUT", "BACKEND")
"""Why an inference failed: a bad request (4xx), no capacity or a hung model (503), its deadline (504), or ONNX
Runtime itself (500). Triton uses REJECTED and BACKEND the same way."""

HTTP_LIMITS = ("connections", "requests", "memory", "body_size", "header_size", "header_timeout", "body_timeout",
               "deadline")
"""The API limits whose refusals are counted (``edgefleet_http_limit_rejections_total{limit=...}``)."""

_PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


class ModelStats:
    """Cumulative statistics of one model version since the agent started (thread-safe)."""

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self._lock = threading.Lock()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.durations = {p: [0, 0] for p in _PHASES}  # phase -> [count, ns]
        self.failures = dict.fromkeys(FAILURE_REASONS, 0)
        self.buckets = [0] * len(BUCKETS_S)
        self.pending = 0

    def begin(self) -> None:
        """A request for this model started (it counts as pending until it ends)."""
        with self._lock:
            self.pending += 1

    def success(self, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int, total_ns: int) -> None:
        """One successful request and where its time went."""
        d = self.durations
        with self._lock:
            self.pending -= 1
            self.inference_count += 1
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)
            for key, ns in (("success", total_ns), ("queue", queue_ns), ("compute_input", input_ns),
                            ("compute_infer", infer_ns), ("compute_output", output_ns)):
                d[key][0] += 1
                d[key][1] += ns
            s = total_ns / 1e9
            for i, bound in enumerate(BUCKETS_S):
                if s <= bound:
                    self.buckets[i] += 1
                    break

    def failure(self, reason: str, total_ns: int) -> None:
        """One failed request (``reason`` from :data:`FAILURE_REASONS`)."""
        with self._lock:
            self.pending -= 1
            self.failures[reason] = self.failures.get(reason, 0) + 1
            self.durations["fail"][0] += 1
            self.durations["fail"][1] += total_ns

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of every number."""
        with self._lock:
            return {"inference_count": self.inference_count, "execution_count": self.execution_count,
                    "last_inference": self.last_inference_ms, "pending": self.pending,
                    "durations": {k: tuple(v) for k, v in self.durations.items()},
                    "failures": dict(self.failures), "buckets": list(self.buckets)}

    def to_triton(self) -> dict[str, Any]:
        """The statistics extension's ``$model_stat`` object."""
        s = self.snapshot()
        d = s["durations"]
        stats = {k: {"count": d[k][0], "ns": d[k][1]} for k in _PHASES}
        stats["cache_hit"] = {"count": 0, "ns": 0}  # the agent has no response cache
        stats["cache_miss"] = {"count": 0, "ns": 0}
        batch = [{"batch_size": 1, **{k: stats[k] for k in ("compute_input", "compute_infer", "compute_output")}}
                 ] if s["execution_count"] else []
        return {"name": self.name, "version": self.version, "last_inference": s["last_inference"],
                "inference_count": s["inference_count"], "execution_count": s["execution_count"],
                "inference_stats": stats, "batch_stats": batch, "memory_usage": []}


class Stats:
    """Every model version's :class:`ModelStats`; versions no longer installed are dropped (no stale series)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], ModelStats] = {}

    def get(self, name: str, version: str) -> ModelStats:
        """The stats of (name, version), created at first use."""
        key = (name, version)
        st = self._models.get(key)
        if st is None:
            with self._lock:
                st = self._models.setdefault(key, ModelStats(name, version))
        return st

    def select(self, name: str | None = None, version: str | None = None) -> list[ModelStats]:
        """Stats of every model, of one model's versions, or of one version."""
        with self._lock:
            items = sorted(self._models.items())
        return [st for (n, v), st in items if (name is None or n == name) and (version is None or v == version)]

    def prune(self, keep: Iterable[tuple[str, str]]) -> None:
        """Forget versions not in ``keep`` (the served and installed ones) unless a request is still pending."""
        keep = set(keep)
        with self._lock:
            for key in [k for k, st in self._models.items() if k not in keep and st.pending <= 0]:
                del self._models[key]


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v))


class Exposition:
    """Builds a Prometheus text-format (0.0.4) page: each family once, HELP and TYPE first, then its samples."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._seen: set[str] = set()

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[Mapping[str, str], float]] | float) -> None:
        """One gauge or counter family; ``samples`` is a number or (labels, value) pairs."""
        if name in self._seen:
            raise ValueError(f"metric family {name} written twice")
        self._seen.add(name)
        self._lines.append(f"# HELP {name} {help_text.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
        self._lines.append(f"# TYPE {name} {kind}")
        if isinstance(samples, (int, float)):
            self._lines.append(f"{name} {_num(samples)}")
            return
        for labels, value in samples:
            self._lines.append(f"{name}{self._labels(labels)} {_num(value)}")

    def histogram(self, name: str, help_text: str,
                  samples: Iterable[tuple[Mapping[str, str], list[int], float, int]]) -> None:
        """A histogram family: per label set the per-bucket counts (not cumulative), the sum in seconds and the
        count (observations above the last bound are only in ``+Inf``)."""
        if name in self._seen:
            raise ValueError(f"metric family {name} written twice")
        self._seen.add(name)
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} histogram")
        for labels, counts, total, count in samples:
            running = 0
            for bound, n in zip(BUCKETS_S, counts, strict=True):
                running += n
                self._lines.append(f"{name}_bucket{self._labels({**labels, 'le': _num(float(bound))})} {running}")
            self._lines.append(f"{name}_bucket{self._labels({**labels, 'le': '+Inf'})} {count}")
            self._lines.append(f"{name}_sum{self._labels(labels)} {_num(total)}")
            self._lines.append(f"{name}_count{self._labels(labels)} {count}")

    @staticmethod
    def _labels(labels: Mapping[str, str]) -> str:
        if not labels:
            return ""
        return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"

    def text(self) -> str:
        """The page."""
        return "\n".join(self._lines) + "\n"


def model_families(out: Exposition, stats: list[ModelStats]) -> None:
    """The per-model inference families (Triton's ``nv_inference_*`` in base units)."""
    snaps = [(st, st.snapshot()) for st in stats]

    def per(fn: Any) -> list[tuple[dict[str, str], float]]:
        return [({"model": st.name, "version": st.version}, fn(s)) for st, s in snaps]

    out.family("edgefleet_inference_request_success_total", "counter",
               "Successful inference requests.", per(lambda s: s["durations"]["success"][0]))
    out.family("edgefleet_inference_request_failure_total", "counter",
               "Failed inference requests by reason: REJECTED (bad request), UNAVAILABLE (no capacity, model hung), "
               "TIMEOUT (request deadline), BACKEND (ONNX Runtime error).",
               [({"model": st.name, "version": st.version, "reason": r}, s["failures"].get(r, 0))
                for st, s in snaps for r in FAILURE_REASONS])
    out.family("edgefleet_inference_count_total", "counter",
               "Inferences performed (one per request: shapes include the batch dimension).",
               per(lambda s: s["inference_count"]))
    out.family("edgefleet_inference_exec_count_total", "counter", "Model executions (session runs).",
               per(lambda s: s["execution_count"]))
    for phase, what in (("queue", "waiting for a free session instance"),
                        ("compute_input", "decoding and checking input tensors"),
                        ("compute_infer", "inside ONNX Runtime session.run"),
                        ("compute_output", "encoding output tensors")):
        out.family(f"edgefleet_inference_{phase}_duration_seconds_total", "counter",
                   f"Cumulative time of successful requests spent {what}.",
                   per(lambda s, p=phase: s["durations"][p][1] / 1e9))
    out.histogram("edgefleet_inference_request_duration_seconds",
                  "Duration of successful inference requests, from the whole body received to the response ready.",
                  [({"model": st.name, "version": st.version}, s["buckets"], s["durations"]["success"][1] / 1e9,
                    s["durations"]["success"][0]) for st, s in snaps])
    out.family("edgefleet_inference_pending_requests", "gauge", "Requests queued or running, per model.",
               per(lambda s: s["pending"]))
    out.family("edgefleet_inference_last_timestamp_seconds", "gauge",
               "Unix time of the last successful inference (0: none yet).",
               per(lambda s: s["last_inference"] / 1000.0))


def process_families(out: Exposition) -> None:
    """The standard ``process_*`` families (as the Prometheus client libraries export them)."""
    import psutil

    p = psutil.Process()
    with p.oneshot():
        cpu = p.cpu_times()
        mem = p.memory_info()
        start = p.create_time()
        try:
            fds = p.num_fds()
        except (AttributeError, psutil.Error):  # not on Windows
            fds = None
        threads = p.num_threads()
    out.family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.",
               cpu.user + cpu.system)
    out.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", mem.rss)
    out.family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", mem.vms)
    out.family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.",
               start)
    if fds is not None:
        out.family("process_open_fds", "gauge", "Number of open file descriptors.", fds)
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if soft != resource.RLIM_INFINITY:
                out.family("process_max_fds", "gauge", "Maximum number of open file descriptors.", soft)
        except (ImportError, OSError, ValueError):
            pass
    out.family("process_threads", "gauge", "Number of OS threads in the process.", threads)
