"""The models this agent serves, by name: swapped atomically, with the last window of a retired model kept.

An inference holds its own reference to a :class:`Model`, so swapping the registry entry never cuts a request in
flight; the old session is freed when the last request using it returns. When a model is replaced or removed, its
latency window since the last telemetry record is taken at once and handed to the next record, so no count is lost.
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
        self.ready = threading.Event()

    def get(self, name: str) -> Model | None:
        """The model serving ``name``, if any."""
        return self._models.get(name)

    def items(self) -> list[tuple[str, Model]]:
        """A snapshot of (name, model) pairs."""
        with self._lock:
            return sorted(self._models.items())

    def put(self, name: str, model: Model) -> Model | None:
        """Serve ``model`` under ``name``; returns the model it replaced."""
        with self._lock:
            old = self._models.get(name)
            self._models[name] = model
            if old is not None and old is not model:
                self._retired.append(Retired(old, old.recorder.take(time.monotonic())))
            return old

    def replace(self, name: str, old: Model | None, new: Model, check: Callable[[], bool] | None = None) -> bool:
        """Serve ``new`` only if ``old`` still serves ``name`` (None: nothing does) and ``check()`` holds.

        Compare-and-swap for the local API's recycle and repository load: an install that activated another
        bundle meanwhile wins, and its model is never replaced by an older one.
        """
        with self._lock:
            if self._models.get(name) is not old or (check is not None and not check()):
                return False
            self._models[name] = new
            if old is not None and old is not new:
                self._retired.append(Retired(old, old.recorder.take(time.monotonic())))
            return True

    def pop(self, name: str) -> Model | None:
        """Stop serving ``name``."""
        with self._lock:
            old = self._models.pop(name, None)
            if old is not None:
                self._retired.append(Retired(old, old.recorder.take(time.monotonic())))
            return old

    def take_retired(self) -> list[Retired]:
        """The windows of models retired since the last call."""
        with self._lock:
            out, self._retired = self._retired, []
            return out
