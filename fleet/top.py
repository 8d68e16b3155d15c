"""``edgefleet fleet top``: the fleet in a terminal, straight from MQTT (no controller, no store).

It subscribes plainly (not shared: it must see every device) to status and telemetry with a clean, non-persistent
session, validates each payload with the same sdk parsers as the controller, and redraws a rich table once a second.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from edgefleet.sdk.errors import ProtocolError
from edgefleet.sdk.protocol import Status, Telemetry, check_id, parse_topic, subscription
from edgefleet.sdk.sketch import DDSketch, quantiles
from edgefleet.sdk.transport import Incoming, MqttOptions, MqttTransport
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["FleetView", "run_top"]


@dataclass
class _Row:
    device: str
    state: str = "?"
    profile: str = ""
    models: list[dict[str, Any]] = field(default_factory=list)
    last_seen: float = 0.0


class FleetView:
    """What ``top`` knows: latest status and telemetry window per device, plus merged sketches per version."""

    def __init__(self, fleet: str) -> None:
        self.fleet = check_id("fleet", fleet)
        self.rows: dict[str, _Row] = {}
        self.versions: dict[tuple[str, str], DDSketch] = {}
        self.rejected = 0
        self.messages = 0
        self._lock = threading.Lock()

    def apply(self, topic_name: str, payload: bytes) -> None:
        """Take one MQTT message (bad payloads are counted, never raised)."""
        try:
            t = parse_topic(topic_name)
            if t.fleet != self.fleet or not payload:
                return
            obj: Status | Telemetry = (Status.from_json(payload) if t.channel == "status"
                                       else Telemetry.from_json(payload))
        except ProtocolError:
            with self._lock:
                self.rejected += 1
            return
        with self._lock:
            self.messages += 1
            row = self.rows.setdefault(t.device, _Row(t.device))
            if isinstance(obj, Status):
                row.state = obj.state
                if obj.description is not None:
                    row.profile = obj.description.profile
                return
            row.last_seen = time.time()
            row.models = []
            for m in obj.models:
                p50, p95, p99 = quantiles(m.sketch)
                row.models.append({"name": m.name, "version": m.version, "p50": p50, "p95": p95, "p99": p99,
                                   "rps": m.count / obj.interval_s, "errors": m.errors,
                                   "providers": m.providers, "variant": m.variant})
                # Fleet-wide per version since top started: merged sketches, never averaged percentiles.
                self.versions.setdefault((m.name, m.version), DDSketch()).merge(DDSketch.from_wire(m.sketch))

    def table(self, sort_key: str = "device", limit: int = 50) -> Group:
        """The rich renderable: per-device table and per-version percentiles."""
        with self._lock:
            rows = list(self.rows.values())
            versions = sorted(self.versions.items())
            rejected, messages = self.rejected, self.messages

        def key(r: _Row) -> Any:
            m = r.models[0] if r.models else {}
            if sort_key == "device":
                return r.device
            if sort_key == "last_seen":
                return -r.last_seen
            return -(m.get({"throughput": "rps"}.get(sort_key, sort_key)) or 0.0)

        rows.sort(key=key)
        online = sum(r.state == "online" for r in rows)
        t = Table(title=f"fleet {self.fleet}: {len(rows)} devices, {online} online, {messages} messages, "
                        f"{rejected} rejected", expand=False)
        for col in ("device", "online", "profile", "serving", "model", "p50 ms", "p95 ms", "p99 ms", "req/s",
                    "errors", "seen"):
            t.add_column(col, justify="right" if col.endswith(("ms", "/s", "errors", "seen")) else "left")
        now = time.time()
        for r in rows[:limit]:
            m = r.models[0] if r.models else {}
            state = Text("●", style="green") if r.state == "online" else Text("○", style="red")
            seen = f"{now - r.last_seen:.0f}s" if r.last_seen else "-"
            t.add_row(r.device, state, r.profile, ",".join(p.replace("ExecutionProvider", "") for p in
                                                             m.get("providers", [])),
                      (f"{m['name']} {m['version']}" + (f" [{m['variant']}]" if m.get("variant") else ""))
                      if m else "-", _ms(m.get("p50")), _ms(m.get("p95")),
                      _ms(m.get("p99")), f"{m['rps']:.1f}" if m else "-", str(m.get("errors", "-")), seen)
        v = Table(title="fleet-wide latency per version (merged sketches)")
        for col in ("model", "version", "requests", "p50 ms", "p95 ms", "p99 ms"):
            v.add_column(col)
        for (name, version), sk in versions:
            v.add_row(name, version, str(sk.count), _ms(sk.quantile(0.5)), _ms(sk.quantile(0.95)),
                      _ms(sk.quantile(0.99)))
        return Group(t, v)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def watch(broker: MqttOptions | str, fleet: str, view: FleetView, timeout_s: float = 10.0) -> MqttTransport:
    """Connect a clean-session client feeding ``view`` (the same connection options as every edgefleet process);
    the caller stops it with ``stop()``."""
    options = broker if isinstance(broker, MqttOptions) else MqttOptions.parse(broker)

    def on_message(msg: Incoming) -> None:
        view.apply(msg.topic, msg.payload)

    # Not shared, QoS 0, no session: top must see every device, and nothing should queue for it while it is away.
    t = MqttTransport(options, f"edgefleet-top-{uuid.uuid4().hex[:8]}", clean_start=True, session_expiry_s=0,
                      subscriptions=[(subscription(fleet, "status"), 0), (subscription(fleet, "telemetry"), 0)],
                      on_message=on_message).start()
    try:
        t.wait_ready(timeout_s)
    except Exception:
        t.stop(timeout_s=1.0)
        raise
    return t


def run_top(broker: MqttOptions | str, fleet: str, *, duration_s: float | None = None, sort_key: str = "device",
            limit: int = 50, console: Console | None = None) -> FleetView:
    """Show the live view until Ctrl-C or ``duration_s``; not on a terminal, print the table once at the end."""
    view = FleetView(fleet)
    client = watch(broker, fleet, view)
    console = console or Console()
    end = time.monotonic() + duration_s if duration_s is not None else None
    try:
        if console.is_terminal:
            with Live(view.table(sort_key, limit), console=console, refresh_per_second=2) as live:
                while end is None or time.monotonic() < end:
                    time.sleep(1.0)
                    live.update(view.table(sort_key, limit))
        else:
            while end is None or time.monotonic() < end:
                time.sleep(0.2)
            console.print(view.table(sort_key, limit))
    except KeyboardInterrupt:
        pass
    finally:
        client.stop()
    return view
