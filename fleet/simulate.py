"""Simulated devices: realistic status, telemetry, events and replies over a real broker, without inference.

Each simulated device announces itself with a retained ``online`` status (a Last Will of ``offline`` when it has its
own connection), publishes one telemetry record per interval with a valid latency sketch per model whose latencies
follow a log-normal around a per-profile median, and answers ``deploy``/``rollback`` commands the way an agent does:
download the bundle (checking size and sha256), read its signed manifest, report downloading → verifying → self-test
→ active as events, then exactly one reply; after that its telemetry reports the new version. ``slow`` makes given
versions slower so a canary rollout has a regression to catch. Used by ``edgefleet fleet simulate``, tests and bench.

With ``receipts=True`` the devices keep every telemetry record, event and reply until a controller's receipt names it
and send again what a later receipt skipped (``resend_after_s``), as the agent's outbox does (in memory here, bounded
by ``max_unconfirmed`` per device): what a controller killed before it stored something never reaches the store
otherwise, since the broker keeps that controller's share in its session.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import tarfile
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgefleet.sdk.errors import EdgefleetError, ProtocolError
from edgefleet.sdk.protocol import (
    Command,
    DeployArgs,
    Description,
    Event,
    ModelWindow,
    OrtInfo,
    ProcessStats,
    Receipt,
    Reply,
    ServedModel,
    Sketch,
    Status,
    Telemetry,
    check_id,
    topic,
)
from edgefleet.sdk.sketch import DDSketch
from edgefleet.sdk.transport import Incoming, MqttOptions, MqttTransport, Will

__all__ = ["PROFILE_LATENCY_MS", "SimDevice", "Simulator"]

log = logging.getLogger(__name__)

# Median latency (ms) of a small vision model per device profile, and the EPs that would serve it there: plausible
# orders of magnitude (GPU/NPU < x86 CPU < Raspberry Pi), not measurements.
PROFILE_LATENCY_MS: dict[str, tuple[float, list[str]]] = {
    "x86-cpu": (9.0, ["CPUExecutionProvider"]),
    "x86-cpu-vnni": (6.0, ["CPUExecutionProvider"]),
    "intel-openvino-cpu": (5.0, ["OpenVINOExecutionProvider"]),
    "intel-openvino-gpu": (3.5, ["OpenVINOExecutionProvider"]),
    "jetson-orin": (2.5, ["TensorrtExecutionProvider", "CUDAExecutionProvider"]),
    "nvidia-gpu": (1.2, ["CUDAExecutionProvider"]),
    "apple-silicon": (2.0, ["CoreMLExecutionProvider"]),
    "raspberry-pi-5": (38.0, ["CPUExecutionProvider"]),
}
_POOL = 32  # pre-built sketches per (profile, factor): building one per record would dominate the simulator's CPU


@dataclass
class SimDevice:
    """One simulated device's identity and what it is running."""

    device: str
    profile: str
    model: str = "detector"
    version: str = "1.0.0"
    tags: list[str] = field(default_factory=list)
    boot: str = ""
    seq: int = 0
    previous: list[str] = field(default_factory=list)  # versions to roll back to, newest last

    def description(self) -> Description:
        """The status description an agent would publish."""
        providers = PROFILE_LATENCY_MS.get(self.profile, (10.0, ["CPUExecutionProvider"]))[1]
        return Description(profile=self.profile, tags=self.tags, providers=providers,
                           ort=OrtInfo(version="1.20.1", flavour="sim", providers=providers), agent_version="sim",
                           models=[ServedModel(name=self.model, version=self.version, target=self.profile,
                                               providers=providers)])


class _SketchPool:
    """Pre-built latency windows per (profile, slowdown) so thousands of devices cost little CPU to simulate."""

    def __init__(self, seed: int, per_window: int) -> None:
        self._rng = random.Random(seed)
        self._per_window = per_window
        self._pools: dict[tuple[str, float], list[tuple[int, Sketch]]] = {}

    def window(self, profile: str, factor: float, errors_rate: float = 0.002) -> tuple[int, Sketch]:
        """``(errors, sketch)`` of one window of that profile's latencies."""
        key = (profile, factor)
        pool = self._pools.get(key)
        if pool is None:
            median = PROFILE_LATENCY_MS.get(profile, (10.0, []))[0] * factor
            pool = []
            for _ in range(_POOL):
                sk = DDSketch()
                n = self._rng.randint(self._per_window // 2, self._per_window)
                for _ in range(n):
                    sk.add(self._rng.lognormvariate(0.0, 0.25) * median)
                errors = sum(1 for _ in range(n) if self._rng.random() < errors_rate)
                pool.append((errors, sk.to_wire()))
            self._pools[key] = pool
        return pool[self._rng.randrange(_POOL)]


class Simulator:
    """Run ``devices`` simulated devices against a broker; ``start()`` then ``stop()`` (or use as a context)."""

    def __init__(self, broker: MqttOptions | str, fleet: str, devices: list[SimDevice], *, interval_s: float = 1.0,
                 slow: Mapping[str, float] | None = None, error_rates: Mapping[str, float] | None = None,
                 per_window: int = 50, own_connections: int = 200, connections: int = 4, seed: int = 0,
                 answer_commands: bool = True, client_prefix: str = "sim", receipts: bool = False,
                 resend_after_s: float = 5.0, max_unconfirmed: int = 10_000) -> None:
        self.broker = broker if isinstance(broker, MqttOptions) else MqttOptions.parse(broker)
        self.fleet = check_id("fleet", fleet)
        self.devices = {d.device: d for d in devices}
        self.interval_s = interval_s
        self.slow = dict(slow or {})
        self.error_rates = dict(error_rates or {})
        self.answer_commands = answer_commands
        self.sent = 0
        self.commands: list[dict[str, Any]] = []  # every command message received (a copy sent again included)
        self._handled: set[tuple[str, str]] = set()  # (device, command id) run
        self._pool = _SketchPool(seed, per_window)
        self._stop = threading.Event()
        self._telemetry_stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        # Few devices: one connection each, so each has its own Last Will. Many (bench): a few shared connections,
        # since a broker connection per simulated device would measure the simulator, not the controller.
        ids = sorted(self.devices)
        n_conn = len(ids) if len(ids) <= own_connections else max(1, connections)
        self._groups = [ids[i::n_conn] for i in range(n_conn)]
        self._own = n_conn == len(ids)
        self._clients: list[MqttTransport] = []
        # Receipts: device -> (kind, boot, seq or reply id) -> (topic, payload, when sent); device -> its client.
        self.receipts = receipts
        self.resend_after_s = resend_after_s
        self.max_unconfirmed = max_unconfirmed
        self._unconfirmed: dict[str, dict[tuple[str, str, str], tuple[str, bytes, float]]] = {}
        self._client_of: dict[str, MqttTransport] = {}
        self._last_receipt = 0.0
        self.confirmed = 0  # messages a receipt named
        self.refused = 0  # messages a negative receipt named
        self.resent = 0
        self.unconfirmed_dropped = 0
        self._client_devices: dict[int, list[str]] = {}
        self._prefix = client_prefix
        for d in devices:
            d.boot = d.boot or f"b{random.Random(d.device).randrange(16**8):08x}{int(time.time())}"

    # lifecycle -----------------------------------------------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> None:
        """Connect every device connection and publish births; telemetry starts on ``run_telemetry``."""
        for i, group in enumerate(self._groups):
            cid = f"{self._prefix}-{group[0]}" if self._own else f"{self._prefix}-{i}-{len(self._groups)}"
            will = None
            if self._own:
                will = Will(topic(self.fleet, group[0], "status"),
                            Status(device=group[0], state="offline", boot=self.devices[group[0]].boot,
                                   reason="lost").to_json())
            subs = [(topic(self.fleet, dev, "cmd"), 1) for dev in group] if self.answer_commands else []
            if self.receipts:  # one filter for a shared connection, the device's own topic otherwise
                subs.append((topic(self.fleet, group[0], "receipt") if self._own else
                             f"edgefleet/v1/{self.fleet}/+/receipt", 1))
            holder: list[MqttTransport] = []
            client = MqttTransport(self.broker, cid[:64], clean_start=False, session_expiry_s=3600, will=will,
                                   subscriptions=subs, max_inflight=1000,
                                   on_connect=self._make_on_connect(group, holder),
                                   on_message=self._make_on_message(holder))
            holder.append(client)
            self._clients.append(client.start())
            self._client_of.update(dict.fromkeys(group, client))
        for c in self._clients:
            c.wait_ready(timeout_s)
        if self.receipts:
            t = threading.Thread(target=self._resend_loop, name="sim-resend", daemon=True)
            t.start()
            self._threads.append(t)

    def _make_on_connect(self, group: list[str], holder: list[MqttTransport]) -> Any:
        def on_connect(session_present: bool) -> None:
            for dev in group:
                d = self.devices[dev]
                holder[0].publish(topic(self.fleet, dev, "status"),
                                  Status(device=dev, state="online", boot=d.boot,
                                         description=d.description()).to_json(), retain=True)
        return on_connect

    def _make_on_message(self, holder: list[MqttTransport]) -> Any:
        def on_message(msg: Incoming) -> None:
            self._on_message(holder[0], msg)
        return on_message

    def stop(self, *, graceful: bool = True) -> None:
        """Stop telemetry; graceful: publish ``offline`` statuses, else drop connections (Last Will fires)."""
        self._stop.set()
        for t in self._threads:
            t.join(10)
        for client, group in zip(self._clients, self._groups, strict=True):
            if graceful:
                infos = [client.publish(topic(self.fleet, dev, "status"),
                                        Status(device=dev, state="offline", boot=self.devices[dev].boot,
                                               reason="shutdown").to_json(), retain=True) for dev in group]
                for info in infos:
                    if info is not None:
                        info.wait_for_publish(5)
                client.stop()
            else:
                client.kill()  # no DISCONNECT packet: the broker sees a lost connection and sends the will

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # telemetry -----------------------------------------------------------------------------------------------------
    def record(self, d: SimDevice, ts: float | None = None) -> bytes:
        """The next telemetry payload of one device (advances its seq)."""
        factor = self.slow.get(d.version, 1.0)
        errors, sk = self._pool.window(d.profile, factor, self.error_rates.get(d.version, 0.002))
        providers = PROFILE_LATENCY_MS.get(d.profile, (10.0, ["CPUExecutionProvider"]))[1]
        d.seq += 1
        models = [ModelWindow(name=d.model, version=d.version, count=sk.count, errors=errors, providers=providers,
                              sketch=sk)]
        return Telemetry(device=d.device, boot=d.boot, seq=d.seq, models=models, interval_s=self.interval_s,
                         ts=time.time() if ts is None else ts,
                         process=ProcessStats(cpu_percent=round(random.uniform(2, 30), 1),
                                              rss_bytes=180 << 20)).to_json()

    def publish_round(self) -> int:
        """Publish one telemetry record for every device now; returns how many."""
        n = 0
        for client, group in zip(self._clients, self._groups, strict=True):
            for dev in group:
                with self._lock:
                    d = self.devices[dev]
                    payload = self.record(d)
                    self._keep(dev, ("telemetry", d.boot, str(d.seq)), topic(self.fleet, dev, "telemetry"), payload)
                client.publish(topic(self.fleet, dev, "telemetry"), payload)
                n += 1
        with self._lock:
            self.sent += n
        return n

    def run_telemetry(self, *, rounds: int | None = None, duration_s: float | None = None) -> threading.Thread:
        """Publish a round every interval in a background thread, until stopped or the count/time bound is hit."""
        def loop() -> None:
            end = time.monotonic() + duration_s if duration_s is not None else None
            done = 0
            next_at = time.monotonic()
            while (not self._stop.is_set() and not self._telemetry_stop.is_set()
                   and (rounds is None or done < rounds) and (end is None or time.monotonic() < end)):
                self.publish_round()
                done += 1
                next_at += self.interval_s
                self._telemetry_stop.wait(max(0.0, next_at - time.monotonic()))
        t = threading.Thread(target=loop, name="sim-telemetry", daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def stop_telemetry(self) -> None:
        """Stop publishing telemetry (commands are still answered, unconfirmed messages still resent)."""
        self._telemetry_stop.set()
        for t in self._threads:
            if t.name == "sim-telemetry":
                t.join(10)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every published message has been handed to the broker."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(c.unacknowledged() == 0 for c in self._clients):
                return
            time.sleep(0.02)

    # commands ------------------------------------------------------------------------------------------------------
    def _on_message(self, client: MqttTransport, msg: Incoming) -> None:
        parts = msg.topic.split("/")
        dev = parts[3]
        if parts[-1] == "receipt":
            self._on_receipt(dev, msg.payload)
            return
        try:
            cmd = Command.from_json(msg.payload)
        except ProtocolError as exc:
            log.warning("sim %s: bad command: %s", dev, exc)
            return
        with self._lock:
            self.commands.append({"device": dev, **cmd.to_dict()})
            if (dev, cmd.id) in self._handled:
                return  # an agent runs a command id once; its reply is kept until a receipt names it
            self._handled.add((dev, cmd.id))
        # Off the network thread: a deploy downloads over HTTP, which must not block MQTT keepalives.
        threading.Thread(target=self._handle, args=(client, dev, cmd), daemon=True).start()

    def _emit(self, client: MqttTransport, d: SimDevice, kind: str, message: str, data: dict[str, Any],
              level: str = "info") -> None:
        """An event as the agent sends it (``data.command``: the command it is about; ``data.state``: progress)."""
        lvl: Any = level
        with self._lock:
            d.seq += 1
            payload = Event(device=d.device, boot=d.boot, seq=d.seq, kind=kind, message=message, level=lvl,
                            data=data).to_json()
            self._keep(d.device, ("events", d.boot, str(d.seq)), topic(self.fleet, d.device, "events"), payload)
        client.publish(topic(self.fleet, d.device, "events"), payload)

    def _handle(self, client: MqttTransport, dev: str, cmd: Command) -> None:
        d = self.devices[dev]
        cid = cmd.id
        try:
            if cmd.kind == "deploy":
                result = self._deploy(client, d, cid, cmd.args_as(DeployArgs))
            elif cmd.kind == "rollback":
                with self._lock:
                    if not d.previous:
                        raise EdgefleetError("nothing to roll back to")
                    old, d.version = d.version, d.previous.pop()
                self._emit(client, d, "rollback", f"rolled back {d.model} {old} -> {d.version}",
                           {"command": cid, "version": d.version})
                result = {"name": d.model, "version": d.version}
            else:
                result = {"description": d.description().to_dict()}
            answer = Reply.ok(cid, dev, result)
        except EdgefleetError as exc:
            answer = Reply.failed(cid, dev, exc.code, str(exc), cmd.kind)
        client.publish(topic(self.fleet, dev, "status"),
                       Status(device=dev, state="online", boot=d.boot, description=d.description()).to_json(),
                       retain=True)
        payload = answer.to_json()
        with self._lock:
            self._keep(dev, ("reply", "", cid), topic(self.fleet, dev, "reply"), payload)
        client.publish(topic(self.fleet, dev, "reply"), payload)

    # receipts ------------------------------------------------------------------------------------------------------
    def _keep(self, dev: str, key: tuple[str, str, str], topic_name: str, payload: bytes) -> None:
        """Hold a message until a receipt names it (with ``_lock`` held)."""
        if not self.receipts:
            return
        held = self._unconfirmed.setdefault(dev, {})
        if len(held) >= self.max_unconfirmed:  # bounded, like the agent's outbox: the oldest goes
            del held[next(iter(held))]
            self.unconfirmed_dropped += 1
        held[key] = (topic_name, payload, time.monotonic())

    def _on_receipt(self, dev: str, payload: bytes | bytearray) -> None:
        try:
            r = Receipt.from_json(payload)
        except ProtocolError as exc:
            log.warning("sim %s: bad receipt: %s", dev, exc)
            return
        if r.device not in self.devices:
            return  # another simulator's device on a shared filter
        with self._lock:
            held = self._unconfirmed.get(r.device, {})
            named = 0
            for kind, ranges in (("telemetry", r.telemetry), ("events", r.events)):
                for boot, spans in ranges.items():
                    for lo, hi in spans:
                        for seq in range(lo, hi + 1) if hi - lo < 100_000 else ():
                            named += held.pop((kind, boot, str(seq)), None) is not None
            for rid in r.replies:
                named += held.pop(("reply", "", rid), None) is not None
            if r.refused:
                self.refused += named
            else:
                self.confirmed += named
            self._last_receipt = time.monotonic()

    def _resend_loop(self) -> None:
        """Send again what was sent ``resend_after_s`` before the latest receipt and is still not named by one (the
        agent's rule: a controller is alive, so the broker lost it, or gave it to a controller that died)."""
        while not self._stop.wait(0.25):
            again: list[tuple[MqttTransport, str, bytes]] = []
            with self._lock:
                cutoff = self._last_receipt - self.resend_after_s
                now = time.monotonic()
                for dev, held in self._unconfirmed.items():
                    for key, (topic_name, payload, sent) in held.items():
                        if sent < cutoff:
                            held[key] = (topic_name, payload, now)
                            again.append((self._client_of[dev], topic_name, payload))
                self.resent += len(again)
            for client, topic_name, payload in again:
                client.publish(topic_name, payload)

    def unconfirmed(self) -> int:
        """Messages no receipt has named yet."""
        with self._lock:
            return sum(len(h) for h in self._unconfirmed.values())

    def _deploy(self, client: MqttTransport, d: SimDevice, cid: str, args: DeployArgs) -> dict[str, Any]:
        self._emit(client, d, "deploy.progress", "downloading bundle", {"command": cid, "state": "downloading"})
        try:
            with urllib.request.urlopen(args.url, timeout=30) as resp:
                data = resp.read(args.size + 1)
        except OSError as exc:
            self._emit(client, d, "deploy", f"download failed: {exc}", {"command": cid, "step": "download"},
                       "error")
            raise EdgefleetError(f"download failed: {exc}") from exc
        self._emit(client, d, "deploy.progress", "verifying bundle", {"command": cid, "state": "verifying"})
        if len(data) != args.size or hashlib.sha256(data).hexdigest() != args.sha256:
            raise EdgefleetError(f"bundle size/sha256 differ from the command ({len(data)} bytes)")
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            member = tf.extractfile("manifest.json")
            manifest = json.loads(member.read()) if member else {}
        if manifest.get("target") != d.profile:
            raise EdgefleetError(f"bundle target {manifest.get('target')!r} is not this device's {d.profile!r}")
        self._emit(client, d, "deploy.progress", "self-test", {"command": cid, "state": "self-test"})
        with self._lock:
            d.previous.append(d.version)
            d.model, d.version = manifest["name"], manifest["version"]
        self._emit(client, d, "deploy", f"{d.model} {d.version} active", {"command": cid, "name": d.model,
                                                                            "version": d.version})
        return {"name": d.model, "version": d.version}


def make_devices(n: int, *, prefix: str = "sim", profiles: list[str] | None = None, model: str = "detector",
                 version: str = "1.0.0", tags: list[str] | None = None) -> list[SimDevice]:
    """``n`` simulated devices cycling through ``profiles`` (default: every profile in PROFILE_LATENCY_MS)."""
    profs = profiles or list(PROFILE_LATENCY_MS)
    width = max(4, len(str(n)))
    return [SimDevice(f"{prefix}-{i:0{width}d}", profs[i % len(profs)], model=model, version=version,
                      tags=list(tags or [])) for i in range(n)]
