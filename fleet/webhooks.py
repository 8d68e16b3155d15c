"""Webhooks: what the controller stores fires an HTTP POST to an operator's endpoint (chat, paging, a ticket).

Rules, each on by default when a webhook URL is set (``fleet serve --webhook URL [--webhook-rule R ...]``):

| rule | fires on |
|---|---|
| ``drift`` | a ``drift`` event (fleet/drift.py: a device's outputs departed from the reference or from the fleet) |
| ``offline`` | a ``device.offline`` event (Last Will, shutdown, or silence) |
| ``canary`` | a deployment that halted: p95 regression, error rate, output drift or cannot judge (its message says) |
| ``errors`` | an agent event of level ``error`` (failed install, a model that does not open, ...) |

The notifier polls the store every ``interval_s`` for events received since the last poll and for deployments that
became ``halted``, and POSTs each match as JSON ``{"rule", "fleet", "event" | "deployment", "text"}`` (``text``: one
line for chat tools) with a deadline of ``timeout_s``. A failed POST is tried again on the next polls, up to
``attempts`` times; the queue holds at most ``max_queue`` notifications (beyond it the oldest are dropped and
counted), so an endpoint that is down never grows the controller's memory. Every controller of a group that has a
webhook fires it: give the webhook to one of them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RULES", "WebhookConfig", "WebhookNotifier"]

log = logging.getLogger("edgefleet.fleet.webhooks")
RULES = ("drift", "offline", "canary", "errors")


@dataclass(frozen=True)
class WebhookConfig:
    """Where to POST, which rules, and the bounds."""

    url: str
    rules: tuple[str, ...] = RULES
    interval_s: float = 2.0
    timeout_s: float = 10.0
    attempts: int = 5
    max_queue: int = 1000

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"webhook URL must be http:// or https://, got {self.url[:80]!r}")
        bad = sorted(set(self.rules) - set(RULES))
        if bad:
            raise ValueError(f"unknown webhook rule(s) {bad}; known: {', '.join(RULES)}")
        if not self.interval_s > 0 or not self.timeout_s > 0 or self.attempts < 1 or self.max_queue < 1:
            raise ValueError("webhook interval_s and timeout_s must be > 0, attempts and max_queue >= 1")


@dataclass
class _Pending:
    body: bytes
    tries: int = 0


@dataclass
class WebhookNotifier:
    """Polls the store and POSTs what the rules match (one thread; ``poll_once`` for tests)."""

    store: Any
    fleet: str
    cfg: WebhookConfig
    counts: dict[str, int] = field(default_factory=lambda: {"sent": 0, "failed": 0, "dropped": 0})
    _queue: deque[_Pending] = field(default_factory=deque)
    since: float = field(default_factory=time.time)
    _halted: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> WebhookNotifier:
        """Start polling; deployments already halted at start are not reported again."""
        self._halted = {d.id for d in self.store.deployments(self.fleet, 1000) if d.state == "halted"}
        self._thread = threading.Thread(target=self._loop, name="controller-webhooks", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling (a POST in flight finishes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.cfg.timeout_s + 1)

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            try:
                self.poll_once()
            except Exception:  # retried next round; ingest and HTTP must go on
                log.exception("webhook poll failed")

    def matches(self) -> Iterable[tuple[str, dict[str, Any], str]]:
        """(rule, payload, one line) for what arrived since the last poll."""
        rules = set(self.cfg.rules)
        events = self.store.events(self.fleet, None, self.since, 5000)
        for e in events:
            self.since = max(self.since, e.received)
            rule = ("drift" if e.kind == "drift" else "offline" if e.kind == "device.offline"
                    else "errors" if e.level == "error" else None)
            if rule in rules:
                yield rule, {"event": e.to_dict()}, f"[{self.fleet}] {e.device}: {e.kind}: {e.message}"[:1000]
        if "canary" in rules:
            for d in self.store.deployments(self.fleet, 100):
                if d.state == "halted" and d.id not in self._halted:
                    self._halted.add(d.id)
                    yield "canary", {"deployment": d.to_dict()}, f"[{self.fleet}] deployment {d.id} halted: " \
                                                                  f"{d.message}"[:1000]

    def poll_once(self) -> int:
        """Queue what matches now, then POST the queue oldest first; returns how many were sent."""
        for rule, payload, text in self.matches():
            body = json.dumps({"rule": rule, "fleet": self.fleet, "text": text, **payload},
                              separators=(",", ":"), default=str).encode()
            self._queue.append(_Pending(body))
            while len(self._queue) > self.cfg.max_queue:
                self._queue.popleft()
                self.counts["dropped"] += 1
        sent = 0
        while self._queue:
            item = self._queue[0]
            req = urllib.request.Request(self.cfg.url, data=item.body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as r:
                    r.read(1 << 16)
            except (urllib.error.URLError, OSError) as exc:
                item.tries += 1
                self.counts["failed"] += 1
                if item.tries >= self.cfg.attempts:
                    self._queue.popleft()
                    self.counts["dropped"] += 1
                log.warning("webhook POST failed; tried again at the next poll",
                            extra={"url": self.cfg.url[:200], "error": str(exc), "tries": item.tries})
                break
            self._queue.popleft()
            self.counts["sent"] += 1
            sent += 1
        return sent
