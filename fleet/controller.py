"""One controller process: store + MQTT ingest + deployments + HTTP, started and stopped together."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from edgefleet.sdk.errors import ConfigError, TransportError
from edgefleet.sdk.keys import PrivateKey, TrustedKeys, load_private_key
from edgefleet.sdk.protocol import MAX_FUTURE_SKEW_S, Command, Event, check_id, sign_command, topic
from edgefleet.sdk.transport import MqttOptions, publish_properties

from .bundles import BundleLibrary
from .captures import CaptureStore
from .commands import Commander
from .drift import DriftMonitor
from .http import HttpPolicy, Liveness, make_app
from .ingest import Ingestor
from .rollout import Deployer
from .store import Store, open_store
from .store.base import Batch
from .webhooks import WebhookConfig, WebhookNotifier

__all__ = ["CommandSigner", "Controller", "ControllerConfig", "ListenError"]

log = logging.getLogger(__name__)


class CommandSigner:
    """Signs commands with the fleet key, each with an expiry and a per-device counter that only goes up.

    The counter is ``max(last + 1, microseconds since the epoch)``: strictly increasing per device within this
    process, and above anything sent before a controller restart (or by another controller a moment earlier) without
    shared state, as long as the controllers' clocks move forward. The agent refuses any counter not above the last
    one it accepted (``command.replay``).
    """

    def __init__(self, key: PrivateKey, ttl_s: float, fleet: str | None = None) -> None:
        self.key = key
        self.ttl_s = ttl_s
        self.fleet = fleet
        self._last: dict[str, int] = {}
        self._lock = threading.Lock()

    def next_counter(self, device: str) -> int:
        """The next counter for ``device``."""
        with self._lock:
            counter = max(self._last.get(device, 0) + 1, int(time.time() * 1e6))
            self._last[device] = counter
            return counter

    def sign(self, device: str, cmd: Command) -> Command:
        """``cmd`` signed for ``device`` (and this signer's fleet): bound to them, so a copy delivered anywhere else
        is refused (``command.target``)."""
        return sign_command(cmd, self.key, counter=self.next_counter(device), ttl_s=self.ttl_s, device=device,
                            fleet=self.fleet)


class ListenError(ConfigError):
    """The HTTP address cannot be served (in use, not this host's): the CLI says so in one line, exit code 2."""


def _close_loop(loop: asyncio.AbstractEventLoop, runner: web.AppRunner | None) -> None:
    """Clean up a server that failed to start: its runner, then every task still pending, then the loop."""
    try:
        if runner is not None:
            loop.run_until_complete(runner.cleanup())
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    except Exception:  # the start already failed; that error is the one to report
        log.debug("cleaning up after a failed HTTP start", exc_info=True)
    finally:
        loop.close()


@dataclass
class ControllerConfig:
    """Everything ``edgefleet fleet serve`` takes."""

    broker: str | MqttOptions = "mqtt://127.0.0.1:1883"  # a URL, or every connection option (fleet serve's)
    db: str = "edgefleet-fleet.db"
    fleet: str = "default"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    bundles_dir: Path = Path("edgefleet-bundles")
    trust: list[Path] = field(default_factory=list)
    client_id: str = ""
    share_group: str = "edgefleet"
    receipts: bool = True  # tell agents what is stored, so they keep and resend what a broker lost
    receipt_qos: int = 0  # a lost receipt only makes the agent resend (stored once): QoS 0 is enough
    public_url: str = ""  # how agents reach this controller's /bundles (default: http://HOST:PORT)
    bundle_base_url: str = ""  # a mirror of bundles_dir (<sha256>.efb) devices fetch from instead, e.g. a CDN
    retention_days: float = 30.0  # telemetry, events and replies older than this are deleted hourly; 0 keeps all
    rollout_lease_s: float = 30.0  # a rollout whose controller is silent this long is resumed by another one
    signing_key: Path | None = None  # Ed25519 fleet key that signs every command (agents require it by default)
    command_ttl_s: float = 86400.0  # a command not executed within this time is refused by the agent (expired)
    max_clock_skew_s: float = MAX_FUTURE_SKEW_S  # statuses/telemetry further ahead of our clock are refused
    # How long the broker keeps this controller's MQTT session (and its share of the fleet's messages) after it
    # goes away: a restart within it resumes; after it the broker gives the share group's messages to the others.
    mqtt_session_expiry_s: int = 60
    mqtt: MqttOptions = field(init=False)  # ``broker`` as validated options (TLS, credentials ...)
    # HTTP (fleet/http.py HttpPolicy): who may read without a token, extra Host names, body limits, TLS.
    read_auth: str = "local"
    allowed_hosts: tuple[str, ...] = ()
    max_upload_bytes: int = 4 << 30
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Liveness: a device not heard from (status or telemetry) for offline_after_s is marked offline (its Last Will
    # does that at once); one not heard from for metrics_stale_after_s leaves /metrics.
    offline_after_s: float = 30.0
    metrics_stale_after_s: float = 3600.0
    # Output drift (fleet/drift.py): every drift_interval_s, each device's output statistic over the last
    # drift_window_s against its bundle's reference; a distance over drift_threshold (plus the measured noise) with
    # at least drift_min_values values raises a drift event. 0 turns the check off.
    drift_interval_s: float = 60.0
    drift_window_s: float = 900.0
    drift_threshold: float = 0.25
    drift_min_values: int = 200
    # Captured inference samples (fleet/captures.py): where they are kept (default: beside the bundles directory)
    # and how much at most (oldest out first).
    captures_dir: Path | None = None
    captures_max_bytes: int = 1 << 30
    # Webhooks (fleet/webhooks.py): POST what the rules match (drift, offline, canary, errors) to this URL; "" none.
    webhook_url: str = ""
    webhook_rules: tuple[str, ...] = ("drift", "offline", "canary", "errors")

    def __post_init__(self) -> None:
        check_id("fleet", self.fleet)
        self.mqtt = self.broker if isinstance(self.broker, MqttOptions) else MqttOptions.parse(self.broker)
        if self.receipt_qos not in (0, 1):
            raise ConfigError(f"receipt_qos must be 0 or 1, got {self.receipt_qos!r}")
        if not 0 <= self.mqtt_session_expiry_s <= 0xFFFFFFFF:
            raise ConfigError(f"mqtt_session_expiry_s must be in [0, 2^32-1], got {self.mqtt_session_expiry_s}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(f"HTTP port must be in [0, 65535], got {self.http_port}")
        if not self.command_ttl_s > 0:
            raise ConfigError(f"command_ttl_s must be > 0, got {self.command_ttl_s}")
        if not self.max_clock_skew_s > 0:
            raise ConfigError(f"max_clock_skew_s must be > 0, got {self.max_clock_skew_s}")
        if self.bundle_base_url and not self.bundle_base_url.startswith(("http://", "https://")):
            raise ConfigError(f"bundle_base_url must be an http:// or https:// URL, got {self.bundle_base_url[:80]!r}")
        if not 0 < self.offline_after_s <= 86400:
            raise ConfigError(f"offline_after_s must be in (0, 86400], got {self.offline_after_s}")
        if not self.metrics_stale_after_s >= self.offline_after_s:
            raise ConfigError(f"metrics_stale_after_s must be >= offline_after_s ({self.offline_after_s}), "
                              f"got {self.metrics_stale_after_s}")
        if not self.drift_interval_s >= 0 or not self.drift_window_s > 0 or not self.drift_threshold > 0 \
                or not self.drift_min_values >= 1:
            raise ConfigError("drift_interval_s must be >= 0, drift_window_s and drift_threshold > 0, drift_min_values "
                              f">= 1; got {self.drift_interval_s}, {self.drift_window_s}, {self.drift_threshold}, "
                              f"{self.drift_min_values}")
        if not self.retention_days >= 0:
            raise ConfigError(f"retention_days must be >= 0, got {self.retention_days}")
        if not self.client_id:
            # Stable per host, store and HTTP port, so a restarted controller resumes its persistent session (queued
            # messages) and two controllers of one host never share an id (the broker would disconnect one of them).
            where = self.db if "://" in self.db else os.path.abspath(self.db)
            db_key = hashlib.sha256(f"{where}|{self.http_port}".encode()).hexdigest()[:8]  # hash() varies per run
            self.client_id = f"edgefleet-ctl-{socket.gethostname()}-{db_key}"[-64:]
            self.client_id = "".join(c if c.isalnum() or c in "_.-" else "-" for c in self.client_id)


class Controller:
    """Runs a controller; ``start()``/``stop()`` from a thread or ``serve_forever()`` from the CLI."""

    def __init__(self, config: ControllerConfig, store: Store | None = None) -> None:
        # Everything that can be wrong with the configuration fails here, before anything connects (issue 18: a
        # controller that failed on a busy HTTP port had already opened an MQTT session that took half of the
        # fleet's telemetry): keys, TLS files, the store, the bundle directory. The port is checked by start(),
        # which binds it before connecting to the broker.
        self.config = config
        self.port = config.http_port
        self.ssl_context = _server_tls(config.tls_cert, config.tls_key)
        self.store = store or open_store(config.db)
        self.signer = CommandSigner(load_private_key(config.signing_key), config.command_ttl_s, config.fleet) \
            if config.signing_key is not None else None
        trusted = TrustedKeys.from_paths(config.trust) if config.trust else TrustedKeys()
        try:
            self.library = BundleLibrary(config.bundles_dir, trusted)
        except OSError as exc:
            raise ConfigError(f"bundles directory {config.bundles_dir}: {exc.strerror or exc}") from exc
        self.ingest = Ingestor(self.store, broker=config.mqtt, fleet=config.fleet, client_id=config.client_id,
                               share_group=config.share_group, receipts=config.receipts, receipt_qos=config.receipt_qos,
                               max_future_skew_s=config.max_clock_skew_s,
                               session_expiry_s=config.mqtt_session_expiry_s)
        self.commander = Commander(self.store, config.fleet, self._publish, ttl_s=config.command_ttl_s)
        self.deployer = Deployer(self.store, config.fleet, self.library, self.commander.send, self.public_url,
                                 owner=config.client_id, lease_s=config.rollout_lease_s,
                                 bundle_base_url=config.bundle_base_url)
        try:
            policy = HttpPolicy(read_auth=config.read_auth, allowed_hosts=tuple(config.allowed_hosts),  # type: ignore[arg-type]
                                max_upload_bytes=config.max_upload_bytes, bind_host=config.http_host,
                                public_url=config.public_url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            where = config.captures_dir or Path(config.bundles_dir).parent / "edgefleet-captures"
            self.captures = CaptureStore(where, config.captures_max_bytes)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"captures directory: {exc}") from exc
        self.app = make_app(self.store, config.fleet, self.deployer, self.ingest, self.commander, policy,
                            Liveness(config.offline_after_s, config.metrics_stale_after_s), self.captures)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._pruner: threading.Thread | None = None
        self._resender: threading.Thread | None = None
        self._liveness: threading.Thread | None = None
        self._drift: threading.Thread | None = None
        self.webhooks: WebhookNotifier | None = None
        if config.webhook_url:
            try:
                wh = WebhookConfig(config.webhook_url, tuple(config.webhook_rules))
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
            self.webhooks = WebhookNotifier(self.store, config.fleet, wh)
        self.drift = DriftMonitor(self.store, config.fleet, self.library.root, trusted, config.drift_threshold,
                                  config.drift_min_values, config.drift_window_s, emit=self._emit_events)

    @property
    def public_url(self) -> str:
        """Base URL agents download bundles from."""
        c = self.config
        return (c.public_url or self.url).rstrip("/")

    @property
    def url(self) -> str:
        """Base URL of the HTTP API."""
        host = self.config.http_host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.ssl_context is not None else 'http'}://{host}:{self.port}"

    def _publish(self, device: str, cmd: Command) -> None:
        if self.signer is not None:
            cmd = self.signer.sign(device, cmd)
        props = publish_properties(response_topic=topic(self.config.fleet, device, "reply"),
                                   correlation=cmd.id.encode())
        # QoS 1, not retained: the device's persistent session queues it while the device is offline.
        if self.ingest.transport.publish(topic(self.config.fleet, device, "cmd"), cmd.to_json(),
                                         properties=props) is None:
            raise TransportError(f"publishing command {cmd.id} to {device} failed: the MQTT client's queue is full")

    async def _start_http(self) -> None:
        # lingering_time: after refusing a body (401, 413 ...) the server reads and discards what the client still
        # sends for at most 2 s, so it gets the answer rather than a reset, then closes (aiohttp's default is 10 s).
        # Header limits: aiohttp's (8 KiB lines, 32 KiB fields, 128 headers).
        self._runner = web.AppRunner(self.app, access_log=None, lingering_time=2.0, keepalive_timeout=75.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.http_host, self.config.http_port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()  # stops the live-update task: nothing is left pending when the loop closes
            raise ListenError(f"cannot serve HTTP on {self.config.http_host}:{self.config.http_port}: "
                              f"{exc.strerror or exc}") from None
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        self.deployer.public_url = self.public_url

    def start(self, timeout_s: float = 15.0) -> None:
        """Start the HTTP server in a background thread (port 0 picks a free port), then ingest: a port that cannot
        be bound fails before anything connects to the broker."""

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_http())
            except BaseException as exc:  # noqa: BLE001 - reported to start() below
                self._error = exc
                _close_loop(loop, self._runner)  # no "Task was destroyed but it is pending!" after a failed start
                self._started.set()
                return
            self._started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name="controller-http", daemon=True)
        self._thread.start()
        self._started.wait(timeout_s)
        if self._error is not None:
            raise self._error
        try:
            self.ingest.start(timeout_s)
        except BaseException:
            self._stop_http()
            raise
        self._pruner = threading.Thread(target=self._maintenance_loop, name="controller-maintenance", daemon=True)
        self._pruner.start()
        self._resender = threading.Thread(target=self._resend_loop, name="controller-resend", daemon=True)
        self._resender.start()
        self._liveness = threading.Thread(target=self._liveness_loop, name="controller-liveness", daemon=True)
        self._liveness.start()
        if self.config.drift_interval_s > 0:
            self._drift = threading.Thread(target=self._drift_loop, name="controller-drift", daemon=True)
            self._drift.start()
        if self.webhooks is not None:
            self.webhooks.start()

    def _emit_events(self, events: list[Event]) -> None:
        """Store events the controller raises itself (drift) with the devices' own."""
        self.store.write(Batch(self.config.fleet, controller_events=events))

    def _drift_loop(self) -> None:
        """Judge output drift every ``drift_interval_s`` (fleet/drift.py)."""
        while not self._stopping.wait(self.config.drift_interval_s):
            try:
                self.drift.check(time.time())
            except Exception:  # retried next round; ingest and HTTP must go on
                log.exception("output drift check failed")

    def _liveness_loop(self) -> None:
        """Mark offline the devices that went quiet without a Last Will (a hung agent, a half-open connection the
        broker has not noticed yet): checked every fifth of ``offline_after_s`` (0.2..5 s), from ``offline_after_s``
        after start."""
        after = self.config.offline_after_s
        # A controller judges silence only once it has listened for offline_after_s itself: after a restart the
        # broker replays every retained status, and a large fleet's take a while to store.
        if self._stopping.wait(after):
            return
        while not self._stopping.wait(min(5.0, max(0.2, after / 5))):
            now = time.time()
            try:
                gone = self.store.mark_silent(self.config.fleet, now - after, now)
            except Exception:  # retried next round; ingest and HTTP must go on
                log.exception("marking silent devices offline failed")
                continue
            if gone:
                log.info("offline after %g s of silence: %s", after, ", ".join(gone[:20]) +
                         (f" and {len(gone) - 20} more" if len(gone) > 20 else ""))

    def _resend_loop(self, period_s: float = 1.0) -> None:
        """Send again every command whose device reconnected without answering it (fleet/commands.py)."""
        while not self._stopping.wait(period_s):
            try:
                self.commander.resend_due()
            except Exception:  # retried next round; ingest and HTTP must go on
                log.exception("resending lost commands failed")

    def _maintenance_loop(self, prune_every_s: float = 3600.0) -> None:
        """Resume orphaned rollouts (every third of a lease) and apply retention (hourly)."""
        next_prune = time.monotonic()
        while not self._stopping.is_set():
            try:
                self.deployer.adopt()
            except Exception:  # retried next round; ingest and HTTP must go on
                log.exception("resuming orphaned rollouts failed")
            if self.config.retention_days > 0 and time.monotonic() >= next_prune:
                next_prune = time.monotonic() + prune_every_s
                try:
                    # Every controller of a group may prune: deletes are idempotent and chunked.
                    removed = self.store.prune(self.config.fleet, time.time() - self.config.retention_days * 86400.0)
                    if any(removed.values()):
                        log.info("retention: deleted %s", removed)
                except Exception:  # retried next period
                    log.exception("retention prune failed")
            if self._stopping.wait(self.config.rollout_lease_s / 3):
                return

    def stop(self) -> None:
        """Stop rollouts, HTTP and ingest (flushing what was received); a second call does nothing."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self.webhooks is not None:
            self.webhooks.stop()
        for t in (self._pruner, self._resender, self._liveness, self._drift):
            if t is not None:
                t.join(30)
        self.deployer.stop()  # releases the leases of unfinished rollouts, for another controller to resume
        self._stop_http()
        self.ingest.stop()
        self.store.close()

    def _stop_http(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def serve_forever(self) -> None:
        """Run until interrupted (Ctrl-C / SIGTERM)."""
        import signal

        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGHUP):  # as Ctrl-C: kill, systemd, a closed terminal
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        log.info("controller %s started: fleet %s, broker %s, http %s", self.config.client_id, self.config.fleet,
                 self.config.mqtt, self.url)
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()


def _server_tls(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The HTTP server's TLS context (TLS 1.2 or newer), or None without a certificate; ConfigError naming the file
    that does not load."""
    if cert is None or key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS certificate {cert} / key {key} do not load: {exc}") from exc
    return ctx
