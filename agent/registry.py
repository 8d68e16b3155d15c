"""The models this agent serves, by name: swapped atomically, with the last window of a retired model kept.

An inference holds its own reference to a :class:`Model`, so swapping the registry entry never cuts a request in
flight; the old session is freed when the last request using it returns. When a model is replaced or removed, its
latency window since the last telemetry record is taken at once and handed to the next record, so no count is lost.

**Traffic split.** A canary's install may keep the version it replaces serving a share of the requests for a while
(:class:`Split`): the two versions then run side by side on the same device at the same time, and each reports its
own latency window, so the controller compares them free of what the device and its neighbours happen to be doing
(fleet/canary.py). Requests alternate deterministically (a running share, not a coin), and the split ends at its
deadline, on the next install, rollback or removal of the model, or when the agent restarts. Two versions whose
inputs or outputs differ never split (a client's request must suit whichever version answers it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgefleet.sdk.sketch import LatencySnapshot

if TYPE_CHECKING:
    from edgefleet.sdk.runtime import Model

__all__ = ["Registry", "Retired"]


def same_signature(a: Model, b: Model) -> bool:
    """Whether requests for one model suit the other (same inputs and outputs, names, types and shapes): only then
    may two versions share a model's requests."""
    return (list(a.manifest.inputs), list(a.manifest.outputs)) == (list(b.manifest.inputs), list(b.manifest.outputs))


@dataclass
class Split:
    """The previous version of a model serving ``pct`` percent of its requests until ``until`` (monotonic)."""

    previous: Model
    pct: float
    until: float
    owed: float = 0.0  # the share owed to the previous version, carried from request to request


@dataclass(frozen=True)
class Retired:
    """The final telemetry window of a model that stopped serving."""

    model: Model
    snapshot: LatencySnapshot


class Registry:
    """Thread-safe name → Model map."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, Model] = {}
        self._retired: list[Retired] = []
        self._splits: dict[str, Split] = {}
        self.ready = threading.Event()

    def get(self, name: str) -> Model | None:
        """The model serving ``name``, if any."""
        return self._models.get(name)

    def pick(self, name: str, version: str | None = None) -> Model | None:
        """The model to run a request for ``name`` on: during a split, the previous version takes its share of the
        requests (and every request that names its version); otherwise the model serving ``name``."""
        model = self._models.get(name)
        sp = self._splits.get(name)
        if sp is None:
            return model
        with self._lock:
            sp = self._splits.get(name)
            if sp is None:
                return self._models.get(name)
            if time.monotonic() >= sp.until:
                self._end_split(name)
                return self._models.get(name)
            if version is not None:
                return sp.previous if version == sp.previous.version else self._models.get(name)
            sp.owed += sp.pct / 100.0
            if sp.owed >= 1.0:
                sp.owed -= 1.0
                return sp.previous
            return self._models.get(name)

    def split_models(self) -> list[Model]:
        """The previous versions serving a split now (their windows go into telemetry too); ends expired splits."""
        with self._lock:
            now = time.monotonic()
            for name in [n for n, sp in self._splits.items() if now >= sp.until]:
                self._end_split(name)
            return [sp.previous for sp in self._splits.values()]

    def _end_split(self, name: str) -> None:
        sp = self._splits.pop(name, None)
        if sp is not None and sp.previous is not self._models.get(name):
            self._retired.append(Retired(sp.previous, sp.previous.recorder.take(time.monotonic())))

    def items(self) -> list[tuple[str, Model]]:
        """A snapshot of (name, model) pairs."""
        with self._lock:
            return sorted(self._models.items())

    def put(self, name: str, model: Model, *, split_pct: float = 0.0, split_s: float = 0.0) -> Model | None:
        """Serve ``model`` under ``name``; returns the model it replaced. With ``split_pct`` and ``split_s``, the
        replaced model (another version) keeps serving that share of the requests for ``split_s`` seconds."""
        with self._lock:
            self._end_split(name)
            old = self._models.get(name)
            self._models[name] = model
            if old is not None and old is not model:
                if 0.0 < split_pct < 100.0 and split_s > 0.0 and old.version != model.version \
                        and same_signature(old, model):
                    self._splits[name] = Split(old, split_pct, time.monotonic() + split_s)
                else:
                    self._retired.append(Retired(old, old.recorder.take(time.monotonic())))
            return old

    def replace(self, name: str, old: Model | None, new: Model, check: Callable[[], bool] | None = None) -> bool:
        """Serve ``new`` only if ``old`` still serves ``name`` (None: nothing does) and ``check()`` holds.

        Compare-and-swap for the local API's recycle and repository load: an install that activated another
        bundle meanwhile wins, and its model is never replaced by an older one.
        """
        with self._lock:
            if self._models.get(name) is not old or (check is not None and not check()):
                sp = self._splits.get(name)
                if sp is not None and old is not None and sp.previous is old and (check is None or check()):
                    sp.previous = new  # a recycled session of the split's previous version
                    self._retired.append(Retired(old, old.recorder.take(time.monotonic())))
                    return True
                return False
            self._models[name] = new
            if old is not None and old is not new:
                self._retired.append(Retired(old, old.recorder.take(time.monotonic())))
            return True

    def pop(self, name: str) -> Model | None:
        """Stop serving ``name``."""
        with self._lock:
            self._end_split(name)
            old = self._models.pop(name, None)
            if old is not None:
                self._retired.append(Retired(old, old.recorder.take(time.monotonic())))
            return old

    def take_retired(self) -> list[Retired]:
        """The windows of models retired since the last call."""
        with self._lock:
            out, self._retired = self._retired, []
            return out
