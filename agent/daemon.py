"""The agent process: wires store, installer, MQTT link, outbox, telemetry, commands and the local API together.

Start-up order: recover the store (staging and unreferenced bundles from a crash) → open the active bundles → local
API → outbox sender → MQTT → telemetry → commands (including the ones a crash interrupted). SIGTERM/SIGINT: stop
accepting HTTP and let in-flight requests finish, let the running command finish (bounded), store a last telemetry
record, give the outbox a moment to drain, publish the retained offline status, disconnect, exit 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from edgefleet.sdk._fs import atomic_write_text
from edgefleet.sdk.errors import ConfigError, EdgefleetError, ProtocolError
from edgefleet.sdk.protocol import Command, DeployArgs, Description, Event

from .commands import CommandFailed, Dispatcher
from .config import AgentConfig
from .db import Database
from .describe import describe
from .installer import Installer
from .journal import Journal
from .registry import Registry
from .spool import Sender, Spool
from .store import Store

__all__ = ["Agent", "resolve_profile"]

log = logging.getLogger("edgefleet.agent")


def resolve_profile(cfg: AgentConfig, probe: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The profile name this device installs bundles for, and why ("auto" takes the detected one)."""
    from edgefleet.devices.profile import get_profile

    if cfg.profile != "auto":
        get_profile(cfg.profile, cfg.profiles_dirs)
        return cfg.profile, ["set in the config"]
    if probe.get("profile") is None:
        why = "; ".join(f"{k}: {v}" for k, v in sorted(probe.get("rejected", {}).items()))
        raise ConfigError(f"agent.profile: auto-detection found no profile for this machine ({why}); set one")
    return str(probe["profile"]), list(probe.get("reasons", []))


class Agent:
    """One device agent."""

    def __init__(self, cfg: AgentConfig) -> None:
        from edgefleet.sdk.keys import TrustedKeys

        from .mqtt import MqttLink
        from .probe import probe_host
        from .telemetry import Reporter

        self.cfg = cfg
        self.boot = uuid.uuid4().hex
        self.started = time.time()
        self.store = Store(cfg.data_dir, reserve_bytes=cfg.reserve_bytes, ballast_bytes=cfg.ballast_bytes)
        self.db = Database(self.store.state / "agent.db", storage=self.store.storage)
        self.journal = Journal(self.db, cfg.journal_max_entries, cfg.journal_max_pending)
        self.spool = Spool(self.db, cfg.spool_max_records, cfg.receipts, max_events=cfg.max_events,
                           max_replies=cfg.max_replies, max_held=cfg.max_held)
        self.registry = Registry()
        self.trusted = TrustedKeys.from_paths(cfg.trusted_keys)
        if not len(self.trusted):
            raise ConfigError(f"agent.trusted_keys: no public keys found in {', '.join(map(str, cfg.trusted_keys))}")
        probe = probe_host(cfg.profiles_dirs)
        self.host: dict[str, Any] = probe["host"]
        self.profile, self.profile_reasons = resolve_profile(cfg, probe)
        self.targets = (self.profile, *[t for t in cfg.accept_targets if t != self.profile])
        self.installer = Installer(self.store, self.registry, self.trusted, targets=self.targets,
                                   allow_fallback=cfg.allow_fallback, timeout_s=cfg.download_timeout_s,
                                   ca_file=cfg.download_ca_file, download_max_s=cfg.download_max_s,
                                   max_bundle_bytes=cfg.max_bundle_bytes, variant_budget_s=cfg.variant_budget_s,
                                   host=self.host,
                                   on_step=lambda step, data: log.info(f"install {step}", extra={"step_data": data}))
        # Sampled input capture (agent/capture.py): only for the models the config names, only through the local API.
        self.capture = None
        self.uploader = None
        if cfg.capture.models:
            from .capture import CaptureRing, Uploader

            self.capture = CaptureRing(self.store.root / "captures", cfg.capture, storage=self.store.storage)
            if cfg.capture.upload_url:
                self.uploader = Uploader(self.capture, cfg.device, ca_file=cfg.download_ca_file)
        self.api = None
        if cfg.api.address is not None:
            from .api import ApiServer
            from .repository import Repository

            host, port = cfg.api.address
            self.api = ApiServer(host, port, self.registry, config=cfg.api,
                                 repository=Repository(self.store, self.installer, self.registry),
                                 on_event=lambda kind, message, data: self.event(kind, message, level="error",
                                                                                 data=data),
                                 status=self._api_status, device=cfg.device, capture=self.capture)
        self.link = MqttLink(cfg.broker, cfg.fleet, cfg.device, self.boot, describe=self.describe,
                             on_command=self._on_command, on_connected=self._on_connected,
                             on_published=lambda: self.sender.wake(),
                             on_receipt=(lambda r: self.sender.receipt(r)) if cfg.receipts != "off" else None)
        self.sender = Sender(self.spool, self.link.publish, resend_after_s=cfg.resend_after_s)
        self.reporter = Reporter(cfg.device, self.boot, self.link.topic("telemetry"), self.registry, self.spool,
                                 interval_s=self._initial_interval(), wake_sender=self.sender.wake,
                                 status=lambda: {**self.spool.status(), "resent_total": self.sender.resent,
                                                 "journal": self.journal.status(),
                                                 "storage": self.store.storage.status()})
        self.dispatcher = Dispatcher(cfg.device, self.journal, self.spool, self.installer, self.registry,
                                     reply_topic=self.link.topic("reply"), wake_sender=self.sender.wake,
                                     describe=self.describe, configure=self.configure, event=self.event,
                                     changed=self.link.republish_status, trusted=self.trusted,
                                     require_signed=cfg.require_signed_commands, fleet=cfg.fleet,
                                     require_bound=cfg.require_bound_commands)
        if not cfg.require_signed_commands:
            log.warning("commands.require_signed = false: unsigned commands are executed (development only)")
        if not cfg.require_bound_commands:
            log.warning("commands.require_bound = false: signed commands that name no device are executed "
                        "(only while controllers older than command binding remain)")
        self._stop = threading.Event()

    # -- pieces the others call ---------------------------------------------------------------------------------------

    def describe(self) -> Description:
        """The device description (birth message, describe command)."""
        api = f"{self.api.host}:{self.api.port}" if self.api else None
        return describe(self.host, self.profile, self.profile_reasons, self.registry, self.store, {
            "accept_targets": list(self.targets), "tags": list(self.cfg.tags), "api": api, "boot": self.boot,
            "telemetry_interval_s": self.reporter.interval_s, "started": self.started,
        })

    def event(self, kind: str, message: str, *, level: str = "info", data: Mapping[str, Any] | None = None) -> None:
        """Store an event in the outbox (published on the events channel)."""
        topic = self.link.topic("events")
        lvl: Any = level

        def make(seq: int) -> bytes:
            ev = dict(device=self.cfg.device, boot=self.boot, seq=seq, kind=kind, level=lvl)
            try:
                return Event(**ev, message=message[:4096], data=dict(data or {})).to_json()
            except ProtocolError as exc:
                # Data the protocol cannot carry (say a NaN in a result) must not cost the event: send what can go.
                log.warning("event data not sent", extra={"kind": kind, "error": str(exc)})
                cmd = (data or {}).get("command")
                keep = {"command": cmd} if isinstance(cmd, str) else {}
                return Event(**ev, message=f"{message} (data not representable: {exc})"[:4096], data=keep).to_json()

        self.spool.add_event(topic, make, boot=self.boot)
        self.sender.wake()

    def configure(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The ``configure`` command: telemetry interval (persisted while the config file's value is unchanged)."""
        unknown = sorted(set(args) - {"telemetry_interval_s"})
        if unknown:
            raise CommandFailed("protocol", "configure",
                                f"unknown setting(s) {unknown}; settable: telemetry_interval_s")
        if "telemetry_interval_s" in args:
            value = float(args["telemetry_interval_s"])
            self.reporter.set_interval(value)
            self.db.set_meta("telemetry_interval_s", json.dumps({"value": value,
                                                                 "config": self.cfg.telemetry_interval_s}))
        return {"telemetry_interval_s": self.reporter.interval_s}

    def _initial_interval(self) -> float:
        # A `configure` survives restarts, until the operator changes the value in the config file.
        raw = self.db.get_meta("telemetry_interval_s")
        if raw:
            try:
                saved = json.loads(raw)
                if saved.get("config") == self.cfg.telemetry_interval_s:
                    return float(saved["value"])
            except (ValueError, TypeError, KeyError, AttributeError):
                pass
        return self.cfg.telemetry_interval_s

    def _api_status(self) -> dict[str, Any]:
        # outbox and link state for the API's /metrics
        return {"spool": self.spool.count("telemetry"), "dropped_total": self.spool.dropped_total,
                "unconfirmed": self.spool.unconfirmed(), "resent_total": self.sender.resent,
                "mqtt_connected": self.link.connected.is_set()}

    def _on_command(self, message: Any) -> None:
        self.dispatcher.receive(message)

    def _on_connected(self, up: bool) -> None:
        self.sender.set_connected(up)

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Recover, load, and start every part."""
        keep = set()
        for entry in self.journal.pending():
            try:
                cmd = Command.from_json(entry.payload)
                if cmd.kind == "deploy":
                    keep.add(cmd.args_as(DeployArgs).sha256)
            except EdgefleetError:
                continue
        self.store.recover(keep_downloads=keep)
        self.store.storage.refill()  # the ballast a full disk will free for the agent's own writes
        for name, digest, error in self.installer.load_all():
            self.event("load", f"bundle {digest[:12]} of {name} does not open: {error}", level="error",
                       data={"name": name, "digest": digest})
        if self.api is not None:
            self.api.start()
        self._write_runtime()
        self.sender.start()
        self.dispatcher.start()  # before the link: pending commands are queued once, from the journal
        self.link.start()
        self.reporter.start()
        if self.uploader is not None:
            self.uploader.start()
        log.info("agent started", extra={"device": self.cfg.device, "fleet": self.cfg.fleet, "profile": self.profile,
                                         "boot": self.boot, "models": [n for n, _ in self.registry.items()],
                                         "api": f"{self.api.host}:{self.api.port}" if self.api else None})

    def _write_runtime(self) -> None:
        # Lets tools and tests find a port picked at random (api.listen = "127.0.0.1:0") and the running pid.
        info = {"pid": os.getpid(), "boot": self.boot, "device": self.cfg.device,
                "api": f"{self.api.host}:{self.api.port}" if self.api else None}
        try:
            atomic_write_text(self.store.state / "runtime.json", json.dumps(info) + "\n")
        except OSError as exc:  # a full disk must not keep the agent from serving: the file is only advisory
            log.error("cannot write runtime.json", extra={"error": str(exc)})

    def request_stop(self) -> None:
        """Ask :meth:`run` to shut down (signal handlers call this)."""
        self._stop.set()

    def stop(self) -> None:
        """Graceful shutdown (see the module docstring)."""
        if self.api is not None:
            finished = self.api.stop(timeout=10.0)
            if not finished:
                log.warning("in-flight HTTP requests did not finish within 10 s")
        self.dispatcher.stop(timeout=10.0)
        self.reporter.stop(final=True)
        if self.uploader is not None:
            self.uploader.stop()
        if self.capture is not None:
            self.capture.stop()
        # What is not acknowledged by then stays in the outbox and goes out after the next start.
        deadline = time.monotonic() + 5.0
        while self.link.connected.is_set() and not self.sender.drained() and time.monotonic() < deadline:
            time.sleep(0.02)
        # A moment more for the controller's receipts, so the next start need not send those rows again.
        deadline = min(deadline, time.monotonic() + 1.0)
        while self.link.connected.is_set() and not self.sender.drained(confirmed=True) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.link.stop("shutdown")
        self.sender.stop()
        self.db.close()
        (self.store.state / "runtime.json").unlink(missing_ok=True)
        self.store.close()
        log.info("agent stopped", extra={"device": self.cfg.device})

    def run(self) -> int:
        """Run in the foreground until SIGTERM or SIGINT; returns the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: a closed terminal stops it too
            signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        while not self._stop.wait(1.0):
            pass
        log.info("stopping", extra={"device": self.cfg.device})
        self.stop()
        return 0
