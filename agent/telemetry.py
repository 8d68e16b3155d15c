"""Telemetry: every interval, one record per device with a window per model and version, stored then published.

A model's window is taken from its :class:`LatencyRecorder` (count, errors, mergeable DDSketch) and reported with
p50/p95/p99, throughput, the providers actually serving (``model.placement.serving``, not the ones asked for) and
its cold start (session creation and first run). Models replaced or removed during the window report their last
window too. The record also carries the agent process's CPU and RSS, and system load, memory and temperature where
readable. ``seq`` comes from a counter persisted with the record, so (device, seq) never repeats, even across
restarts; ``boot`` identifies this agent process run (a new uuid per start: a change tells the fleet the agent
restarted; the kernel's boot id is in the status description).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.sdk.protocol import (
    ColdStart,
    ModelTotals,
    ModelWindow,
    OutputWindow,
    ProcessStats,
    SystemStats,
    Telemetry,
)
from edgefleet.sdk.sketch import LatencySnapshot

from .registry import Registry
from .spool import Spool

if TYPE_CHECKING:
    from edgefleet.sdk.runtime import Model

__all__ = ["Reporter", "model_entry", "read_temperature"]

log = logging.getLogger("edgefleet.agent.telemetry")


def read_temperature() -> float | None:
    """Highest CPU/SoC temperature in °C where the OS exposes one (Linux thermal zones, psutil sensors)."""
    best: float | None = None
    for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
        try:
            value = int(zone.read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
        if -40.0 < value < 150.0:
            best = value if best is None else max(best, value)
    if best is None:
        try:
            import psutil

            temps = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
            values = [t.current for entries in temps.values() for t in entries if t.current]
            best = max(values) if values else None
        except (OSError, AttributeError, RuntimeError):
            best = None
    return best


def model_entry(model: Model, snap: LatencySnapshot) -> ModelWindow:
    """The telemetry entry of one model window (with the output statistic's sketch, when the bundle names one)."""
    pct = snap.percentiles()
    output = None
    stat = getattr(model, "output_stat", None)
    if stat is not None:
        out = model.output_recorder.take(time.monotonic())
        if out.count:
            output = OutputWindow(output=stat.output, stat=stat.stat, sketch=out.sketch.to_wire())
    return ModelWindow(
        name=model.name, version=model.version, digest=model.digest, target=model.manifest.target,
        count=snap.count, errors=snap.errors, window_s=round(snap.seconds, 3),
        throughput=round(snap.throughput, 3),
        p50_ms=pct["p50"], p95_ms=pct["p95"], p99_ms=pct["p99"], mean_ms=pct["mean"],
        sketch=snap.sketch.to_wire(),
        providers=list(model.placement.serving),
        fallback=model.placement.fallback,
        variant=model.variant,
        output=output,
        cold_start=ColdStart(session_ms=round(model.session_ms, 3),
                             first_run_ms=None if model.first_run_ms is None else round(model.first_run_ms, 3)),
        total=ModelTotals(count=model.recorder.total_count, errors=model.recorder.total_errors),
    )


class Reporter:
    """Builds a record every ``interval_s`` and stores it in the outbox (the sender publishes it)."""

    def __init__(self, device: str, boot: str, topic: str, registry: Registry, spool: Spool, *, interval_s: float,
                 wake_sender: Callable[[], None], status: Callable[[], dict[str, Any]] | None = None) -> None:
        import psutil

        self.device = device
        self.boot = boot
        self.topic = topic
        self.registry = registry
        self.spool = spool
        self.wake_sender = wake_sender
        self.status: Callable[[], dict[str, Any]] = status or dict
        self._interval = interval_s
        self._proc = psutil.Process(os.getpid())
        self._proc.cpu_percent(None)
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self.records = 0
        self.last_seq = 0

    @property
    def interval_s(self) -> float:
        """Current interval."""
        return self._interval

    def set_interval(self, seconds: float) -> None:
        """Change the interval (``configure`` command); takes effect now."""
        if not 0.1 <= seconds <= 3600:
            raise ValueError(f"telemetry interval must be in 0.1..3600 s, got {seconds}")
        self._interval = float(seconds)
        self._changed.set()

    def start(self) -> None:
        """Start the periodic loop."""
        self._thread.start()

    def stop(self, final: bool = True) -> None:
        """Stop; with ``final`` store one last record so the counts since the last one are not lost."""
        self._stop.set()
        self._changed.set()
        self._thread.join(5)
        if final:
            self.collect()

    def _run(self) -> None:
        next_at = time.monotonic() + self._interval
        while not self._stop.is_set():
            self._changed.wait(max(0.0, next_at - time.monotonic()))
            if self._stop.is_set():
                return
            if self._changed.is_set():
                self._changed.clear()
                next_at = min(next_at, time.monotonic() + self._interval)
                if time.monotonic() < next_at:
                    continue
            try:
                self.collect()
            except Exception:
                log.exception("telemetry record failed")
            # Fixed-rate schedule: the interval does not drift with the time spent building a record.
            next_at += self._interval
            if next_at < time.monotonic():
                next_at = time.monotonic() + self._interval

    def collect(self) -> int:
        """Take every model's window, store one record, wake the sender; returns its seq."""
        import psutil

        now = time.monotonic()
        models = [model_entry(r.model, r.snapshot) for r in self.registry.take_retired()]
        models += [model_entry(m, m.recorder.take(now)) for _, m in self.registry.items()]
        models += [model_entry(m, m.recorder.take(now)) for m in self.registry.split_models()]
        with self._proc.oneshot():
            mem = self._proc.memory_info()
            process = ProcessStats(cpu_percent=self._proc.cpu_percent(None), rss_bytes=mem.rss,
                                   threads=self._proc.num_threads())
        vm = psutil.virtual_memory()
        system: dict[str, Any] = {"mem_available_bytes": vm.available, "mem_total_bytes": vm.total,
                                  "temperature_c": read_temperature()}
        try:
            system["load1"] = os.getloadavg()[0]
        except (OSError, AttributeError):
            pass
        system.update(self.status())
        interval = self._interval

        stats = SystemStats(**system)

        def make(seq: int, dropped: int) -> bytes:
            return Telemetry(device=self.device, boot=self.boot, seq=seq, models=models, interval_s=interval,
                             process=process, system=stats, dropped=dropped).to_json()

        _, seq = self.spool.add_telemetry(self.topic, make, boot=self.boot)
        self.records += 1
        self.last_seq = seq
        self.wake_sender()
        return seq
