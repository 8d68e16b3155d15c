"""Runs inference requests on the served sessions: a bounded number at a time per model, each within its deadline.

- **Instances**: at most ``instances`` runs of one model at a time (Triton's ``instance_group`` count); the others
  wait in the model's queue (the ``queue`` statistic) until a run ends or their deadline passes (504).
- **Deadline**: ONNX Runtime's ``run`` cannot be interrupted from Python, but ``RunOptions.terminate`` makes it stop
  at the next node (also between the iterations of a Loop or Scan subgraph). A watchdog thread sets it on every run
  whose request deadline has passed; the run then fails at once and the request is answered 504.
- **Hung sessions**: a run still inside ``run`` ``terminate_grace_s`` after ``terminate`` (one kernel that runs for
  minutes: terminate is only checked between nodes) is abandoned: its client gets the 504 from the watchdog, its
  session takes no new requests, and a fresh session of the same bundle is opened and swapped in (``recycle``), so
  the model keeps serving. The abandoned thread and session are freed when ``run`` finally returns. At most
  ``max_hung`` abandoned runs per model exist at a time: past that the model answers 503 (with ``Retry-After``)
  until one returns, rather than piling up threads, sessions and busy cores.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgefleet.sdk.errors import ModelError

from .httpd import HttpError
from .registry import Registry

if TYPE_CHECKING:
    import numpy as np
    from edgefleet.sdk.runtime import Model

    from .httpd import Request

__all__ = ["Runner"]

log = logging.getLogger("edgefleet.agent.serving")

_POLL_BUSY_S = 0.05  # watchdog period while requests come (deadline precision)
_STAY_BUSY_S = 2.0  # ... and for this long after the last run: a steady stream of requests never has to wake it


class _Slots:
    """Serving state of one session (one Model object)."""

    __slots__ = ("__weakref__", "hung", "sem", "stuck")

    def __init__(self, instances: int) -> None:
        self.sem = threading.BoundedSemaphore(instances)
        self.hung = False  # takes no new requests (a run on it did not stop after terminate)
        self.stuck = 0  # abandoned runs still inside session.run


@dataclass(eq=False)
class _Run:
    name: str
    model: Model
    slots: _Slots
    deadline: float
    options: Any
    request: Request | None
    expired_at: float | None = None
    hung: bool = field(default=False)


class Runner:
    """Runs requests on registry models with per-model instance slots, deadlines, terminate and recycling."""

    def __init__(self, registry: Registry, *, instances: int = 1, terminate_grace_s: float = 2.0, max_hung: int = 1,
                 reopen: Callable[[Model], Model | None] | None = None,
                 on_event: Callable[[str, str, Mapping[str, Any]], None] | None = None) -> None:
        self.registry = registry
        self.instances = instances
        self.terminate_grace_s = terminate_grace_s
        self.max_hung = max_hung
        self.reopen = reopen
        self.on_event = on_event or (lambda kind, message, data: None)
        self._lock = threading.Condition()
        self._slots: weakref.WeakKeyDictionary[Model, _Slots] = weakref.WeakKeyDictionary()
        self._runs: set[_Run] = set()
        self._stuck: dict[str, int] = {}
        self.recycles: dict[str, int] = {}
        self._stopping = False
        self._sleeping = False  # the watchdog waits for a first run (no timeout)
        self._last_run = 0.0
        self._thread = threading.Thread(target=self._watch, name="api-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watchdog."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._thread.join(2)

    def hung_runs(self) -> dict[str, int]:
        """Abandoned runs still inside ONNX Runtime, per model name."""
        with self._lock:
            return {k: v for k, v in self._stuck.items() if v}

    def available(self, name: str, model: Model) -> str | None:
        """Why ``model`` cannot take a request now (hung, being recycled), or None."""
        with self._lock:
            st = self._slots.get(model)
            stuck = self._stuck.get(name, 0)
        if st is not None and st.hung:
            if stuck > self.max_hung or self.reopen is None:
                return (f"model {name!r} is hung: {stuck} run(s) did not stop after their deadline and are still "
                        "inside ONNX Runtime; it takes requests again when they return")
            return f"model {name!r} is being recycled: a run did not stop after its deadline; a fresh session opens"
        return None

    def _slots_for(self, model: Model) -> _Slots:
        st = self._slots.get(model)
        if st is None:
            with self._lock:
                st = self._slots.get(model)
                if st is None:
                    st = self._slots[model] = _Slots(self.instances)
        return st

    def run(self, name: str, model: Model, inputs: Mapping[str, np.ndarray], deadline: float,
            request: Request | None = None) -> tuple[dict[str, np.ndarray], int, int]:
        """Run once within ``deadline`` (monotonic); returns outputs, queue ns and ``session.run`` ns.

        Raises HttpError 503 (hung model), 504 (deadline, queued or running), or ModelError (ONNX Runtime failed).
        """
        import onnxruntime as ort

        why = self.available(name, model)
        if why is not None:
            raise HttpError(503, why, [("Retry-After", str(max(1, round(self.terminate_grace_s))))])
        st = self._slots_for(model)
        t0 = time.perf_counter_ns()
        left = deadline - time.monotonic()
        if left <= 0 or not st.sem.acquire(timeout=left):
            raise HttpError(504, f"request deadline passed while queued for model {name!r} ({self.instances} "
                                 "run(s) at a time: api.instances)")
        queue_ns = time.perf_counter_ns() - t0
        options = ort.RunOptions()
        options.log_severity_level = 4  # a terminated run is answered 504; ORT's own stderr line adds nothing
        run = _Run(name, model, st, deadline, options, request)
        with self._lock:
            self._runs.add(run)
            if self._sleeping:
                self._sleeping = False
                self._lock.notify_all()
        t1 = time.perf_counter_ns()
        try:
            try:
                outputs = model.run(inputs, run_options=options)
            except ModelError:
                if run.expired_at is not None:
                    raise HttpError(504, f"request deadline passed while model {name!r} was running: the run was "
                                         "terminated") from None
                raise
            if run.expired_at is not None:  # finished in the race with terminate: the deadline still passed
                raise HttpError(504, f"request deadline passed while model {name!r} was running")
            return outputs, queue_ns, time.perf_counter_ns() - t1
        finally:
            with self._lock:
                self._runs.discard(run)
                self._last_run = time.monotonic()
                if run.hung:
                    st.stuck -= 1
                    self._stuck[name] = self._stuck.get(name, 1) - 1
                    if st.stuck == 0:
                        st.hung = False  # usable again if it still serves (no fresh session replaced it)
            st.sem.release()
            if run.hung:
                log.warning("a hung run returned", extra={"model": name,
                                                          "ms": round((time.perf_counter_ns() - t1) / 1e6)})

    # -- watchdog -----------------------------------------------------------------------------------------------------

    def _watch(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                if self._runs or time.monotonic() - self._last_run < _STAY_BUSY_S:
                    self._lock.wait(_POLL_BUSY_S)
                else:  # nothing to watch: sleep until a run starts (no wake-ups while the agent is idle)
                    self._sleeping = True
                    while self._sleeping and not self._stopping:
                        self._lock.wait()
                    continue
                now = time.monotonic()
                expired, hung = [], []
                for r in self._runs:
                    if r.expired_at is None and now >= r.deadline:
                        r.expired_at = now
                        expired.append(r)
                    elif r.expired_at is not None and not r.hung and now >= r.expired_at + self.terminate_grace_s:
                        r.hung = True
                        r.slots.hung = True
                        r.slots.stuck += 1
                        self._stuck[r.name] = self._stuck.get(r.name, 0) + 1
                        hung.append((r, self._stuck[r.name]))
            for r in expired:
                r.options.terminate = True
            for r, stuck in hung:
                self._on_hung(r, stuck)

    def _on_hung(self, run: _Run, stuck: int) -> None:
        name = run.name
        msg = (f"request deadline passed and model {name!r} did not stop within {self.terminate_grace_s:g} s of "
               "terminate (api.terminate_grace_s): its session is abandoned")
        if run.request is not None:
            run.request.abort(504, msg)
        if self.reopen is None or stuck > self.max_hung:
            log.error("model hung; not recycled", extra={"model": name, "stuck_runs": stuck,
                                                         "max_hung": self.max_hung})
            self.on_event("model.hung", f"{msg}; {stuck} run(s) stuck (max {self.max_hung}): the model answers 503 "
                                        "until they return", {"name": name, "stuck_runs": stuck})
            return
        threading.Thread(target=self._recycle, args=(run.name, run.model, msg), name="api-recycle",
                         daemon=True).start()

    def _recycle(self, name: str, model: Model, msg: str) -> None:
        assert self.reopen is not None
        t0 = time.perf_counter()
        try:
            fresh = self.reopen(model)
        except Exception as exc:  # noqa: BLE001 - reported; the model answers 503 until the hung run returns
            log.error("recycle failed", extra={"model": name, "error": str(exc)})
            self.on_event("model.recycle_failed", f"{msg}; a fresh session could not be opened: {exc}",
                          {"name": name})
            return
        if fresh is None or not self.registry.replace(name, model, fresh):
            return  # the bundle was replaced or removed meanwhile: nothing to recycle
        with self._lock:
            self.recycles[name] = self.recycles.get(name, 0) + 1
        ms = round((time.perf_counter() - t0) * 1000, 1)
        log.warning("model session recycled", extra={"model": name, "version": fresh.version, "open_ms": ms})
        self.on_event("model.recycled", f"{msg}; a fresh session serves (opened in {ms} ms)",
                      {"name": name, "version": fresh.version, "digest": fresh.digest})
