"""``edgefleet fleet top``: the fleet in a terminal, straight from MQTT (no controller, no store).

It subscribes plainly (not shared: it must see every device) to status and telemetry with a clean, non-persistent
session, validates each payload with the same sdk parsers as the controller, and redraws a rich table once a second
at the terminal's real width. Not on a terminal it prints one plain table at the end (every column at its full
width, no colours or box drawing, so ``grep`` and ``awk`` can read it); ``--json`` prints the same as JSON.

A device is offline when its retained status says so (its Last Will or a shutdown) or when nothing came from it
for ``offline_after_s`` (the controller's ``--offline-after`` rule): an offline device keeps its row, marked
offline, but its last latency and throughput are not shown as live figures.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from edgefleet.sdk.errors import ProtocolError
from edgefleet.sdk.protocol import Status, Telemetry, check_id, parse_topic, subscription
from edgefleet.sdk.providers import provider_label
from edgefleet.sdk.sketch import DDSketch, quantiles
from edgefleet.sdk.transport import Incoming, MqttOptions, MqttTransport
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["FleetView", "plain_table", "run_top"]

_COLUMNS = ("device", "state", "profile", "serving", "model", "p50 ms", "p95 ms", "p99 ms", "req/s", "errors", "seen")


@dataclass
class _Row:
    device: str
    state: str = "?"
    profile: str = ""
    models: list[dict[str, Any]] = field(default_factory=list)
    last_seen: float = 0.0  # last telemetry (this process's clock)
    last_heard: float = 0.0  # last status or telemetry


class FleetView:
    """What ``top`` knows: latest status and telemetry window per device, plus merged sketches per version."""

    def __init__(self, fleet: str, offline_after_s: float = 30.0) -> None:
        self.fleet = check_id("fleet", fleet)
        if not offline_after_s > 0:
            raise ValueError(f"offline_after_s must be > 0, got {offline_after_s}")
        self.offline_after_s = offline_after_s
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
        now = time.time()
        with self._lock:
            self.messages += 1
            row = self.rows.setdefault(t.device, _Row(t.device))
            row.last_heard = now
            if isinstance(obj, Status):
                row.state = obj.state
                if obj.description is not None:
                    row.profile = obj.description.profile
                return
            row.last_seen = now
            row.models = []
            for m in obj.models:
                p50, p95, p99 = quantiles(m.sketch)
                row.models.append({"name": m.name, "version": m.version, "p50": p50, "p95": p95, "p99": p99,
                                   "rps": m.count / obj.interval_s, "errors": m.errors,
                                   "providers": m.providers, "variant": m.variant})
                # Fleet-wide per version since top started: merged sketches, never averaged percentiles.
                self.versions.setdefault((m.name, m.version), DDSketch()).merge(DDSketch.from_wire(m.sketch))

    def state_of(self, row: _Row, now: float) -> str:
        """``online``, ``offline`` (status, or silent for ``offline_after_s``) or ``unknown`` (no status yet)."""
        if row.state == "offline":
            return "offline"
        if row.last_heard and now - row.last_heard > self.offline_after_s:
            return "offline"
        return "online" if row.state == "online" else "unknown"

    def snapshot(self, sort_key: str = "device", limit: int | None = None) -> dict[str, Any]:
        """Everything shown, as plain data (``--json``): devices sorted and limited, versions, counters."""
        now = time.time()
        with self._lock:
            rows = [(r, self.state_of(r, now)) for r in self.rows.values()]
            devices = [{"device": r.device, "state": st, "profile": r.profile,
                        "last_seen": r.last_seen or None, "seen_s_ago": round(now - r.last_seen, 1) if r.last_seen
                        else None,
                        # An offline device's last figures are not live: left out.
                        "models": [dict(m) for m in r.models] if st == "online" else []} for r, st in rows]
            versions = [{"model": n, "version": v, "requests": sk.count, "p50": sk.quantile(0.5),
                         "p95": sk.quantile(0.95), "p99": sk.quantile(0.99)}
                        for (n, v), sk in sorted(self.versions.items())]
            rejected, messages = self.rejected, self.messages

        def key(d: dict[str, Any]) -> Any:
            m = d["models"][0] if d["models"] else {}
            if sort_key == "device":
                return (0, d["device"])
            if sort_key == "last_seen":
                return (0, -(d["last_seen"] or 0.0))
            val = m.get({"throughput": "rps"}.get(sort_key, sort_key))
            return (1, 0.0) if val is None else (0, -val)  # devices without the figure last

        devices.sort(key=key)
        counts = {st: sum(d["state"] == st for d in devices) for st in ("online", "offline", "unknown")}
        return {"fleet": self.fleet, "now": now, "offline_after_s": self.offline_after_s, "messages": messages,
                "rejected": rejected, "counts": {"devices": len(devices), **counts},
                "devices": devices[:limit] if limit is not None else devices, "versions": versions}

    def title(self, snap: dict[str, Any]) -> str:
        """The one-line summary above the table."""
        c = snap["counts"]
        return (f"fleet {self.fleet}: {c['devices']} devices, {c['online']} online, {c['offline']} offline, "
                f"{snap['messages']} messages, {snap['rejected']} rejected")

    def table(self, sort_key: str = "device", limit: int = 50, width: int | None = None) -> Group:
        """The rich renderable for a terminal ``width`` columns wide (rich reads the real width at every redraw):
        columns at their natural width; when they do not fit, the least needed go first (serving, p50, profile,
        p99, errors), never the device id or its state."""
        snap = self.snapshot(sort_key, limit)
        rows = [_cells(d) for d in snap["devices"]]
        natural = [max([len(col), *(len(r[i]) for r in rows)]) + (2 if col == "state" else 0)
                   for i, col in enumerate(_COLUMNS)]
        shown = list(range(len(_COLUMNS)))
        for drop in ("serving", "p50 ms", "profile", "p99 ms", "errors"):
            if width is None or sum(natural[i] + 3 for i in shown) + 1 <= width:
                break
            shown.remove(_COLUMNS.index(drop))
        t = Table(title=self.title(snap), box=box.SIMPLE_HEAD, title_justify="left")
        for i in shown:
            col = _COLUMNS[i]
            num = col.endswith(("ms", "/s", "errors", "seen"))
            t.add_column(col, justify="right" if num else "left", no_wrap=True, overflow="ellipsis")
        for d, cells in zip(snap["devices"], rows, strict=True):
            on = d["state"] == "online"
            state = Text(f"● {d['state']}", style="green") if on else Text(f"○ {d['state']}", style="red")
            t.add_row(*[state if _COLUMNS[i] == "state" else cells[i] for i in shown], style="" if on else "dim")
        v = Table(title="latency per version (merged sketches)", box=box.SIMPLE_HEAD, title_justify="left")
        for col in ("model", "version", "requests", "p50 ms", "p95 ms", "p99 ms"):
            v.add_column(col, justify="left" if col in ("model", "version") else "right", no_wrap=True)
        for x in snap["versions"]:
            v.add_row(x["model"], x["version"], str(x["requests"]), _ms(x["p50"]), _ms(x["p95"]), _ms(x["p99"]))
        return Group(t, v)


def _cells(d: dict[str, Any]) -> list[str]:
    m = d["models"][0] if d["models"] else {}
    return [d["device"], d["state"], d["profile"] or "-",
            ",".join(provider_label(p) for p in m.get("providers", [])) or "-",
            (f"{m['name']} {m['version']}" + (f" [{m['variant']}]" if m.get("variant") else "")) if m else "-",
            _ms(m.get("p50")), _ms(m.get("p95")), _ms(m.get("p99")),
            f"{m['rps']:.1f}" if m else "-", str(m.get("errors", "-")),
            f"{d['seen_s_ago']:.0f}s" if d["seen_s_ago"] is not None else "-"]


def plain_table(view: FleetView, sort_key: str = "device", limit: int | None = None) -> str:
    """The table as plain text: every column as wide as its widest cell (never cut to a terminal's width), two
    spaces apart, numbers right-aligned; the summary line first, then the per-version table."""
    snap = view.snapshot(sort_key, limit)

    def grid(header: tuple[str, ...], rows: list[list[str]], right: set[int]) -> list[str]:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
        out = []
        for r in [list(header), *rows]:
            out.append("  ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
        return out

    lines = [view.title(snap)]
    lines += grid(_COLUMNS, [_cells(d) for d in snap["devices"]], set(range(5, 11)))
    lines.append("")
    lines.append("fleet-wide latency per version since top started (merged sketches)")
    lines += grid(("model", "version", "requests", "p50 ms", "p95 ms", "p99 ms"),
                  [[x["model"], x["version"], str(x["requests"]), _ms(x["p50"]), _ms(x["p95"]), _ms(x["p99"])]
                   for x in snap["versions"]], {2, 3, 4, 5})
    return "\n".join(lines) + "\n"


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
            limit: int = 50, console: Console | None = None, offline_after_s: float = 30.0,
            output: str = "auto") -> FleetView:
    """Show the live view until Ctrl-C or ``duration_s``. ``output``: ``auto`` (live on a terminal, else one plain
    table at the end), ``plain`` or ``json`` (printed once at the end)."""
    import json

    view = FleetView(fleet, offline_after_s)
    client = watch(broker, fleet, view)
    console = console or Console()
    end = time.monotonic() + duration_s if duration_s is not None else None
    live = output == "auto" and console.is_terminal
    try:
        if live:
            with Live(view.table(sort_key, limit, console.width), console=console, refresh_per_second=2) as screen:
                while end is None or time.monotonic() < end:
                    time.sleep(1.0)
                    screen.update(view.table(sort_key, limit, console.width))
        else:
            while end is None or time.monotonic() < end:
                time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        client.stop()
    if output == "json":
        console.file.write(json.dumps(view.snapshot(sort_key, limit), indent=2) + "\n")
    elif not live:
        console.file.write(plain_table(view, sort_key, limit))
    console.file.flush()
    return view
