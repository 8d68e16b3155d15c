"""Agent configuration: one TOML file, every value overridable by a command-line flag.

A malformed file is refused with a :class:`ConfigError` naming the file, the key and the reason, so an operator can
fix it without reading code. The format is documented in docs/agent.md; unknown keys are errors (a typo must not
silently fall back to a default).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgefleet.sdk.errors import ConfigError
from edgefleet.sdk.protocol import check_id
from edgefleet.sdk.transport import MQTT_KEYS, MqttOptions

from .capture import CaptureConfig
from .spool import RECEIPT_MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["AGENT_MQTT_DEFAULTS", "AgentConfig", "ApiConfig", "BrokerConfig", "load_config", "parse_config"]


BrokerConfig = MqttOptions
"""How to reach the MQTT broker: the sdk transport's options (the ``[mqtt]`` section is the same everywhere)."""

AGENT_MQTT_DEFAULTS = MqttOptions(session_expiry_s=7 * 24 * 3600)
"""The agent keeps its session (and the commands queued in it) for a week by default."""


@dataclass(frozen=True)
class ApiConfig:
    """The local Open Inference Protocol endpoint (empty ``listen`` disables it) and its limits (docs/agent.md)."""

    # 8000: the KServe/Triton HTTP port, so the agent and the controller (8080) share a host by default
    listen: str = "127.0.0.1:8000"
    max_body_bytes: int = 64 << 20
    max_inflight_bytes: int = 256 << 20
    max_connections: int = 64
    max_requests: int = 16
    instances: int = 1
    request_timeout_s: float = 30.0
    terminate_grace_s: float = 2.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 30.0
    admin_token_file: str = ""

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to bind, or None when the API is disabled."""
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)


@dataclass(frozen=True)
class AgentConfig:
    """Everything ``edgefleet agent run`` needs."""

    device: str
    fleet: str
    data_dir: Path
    trusted_keys: tuple[Path, ...]
    broker: MqttOptions = AGENT_MQTT_DEFAULTS
    api: ApiConfig = ApiConfig()
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    profile: str = "auto"
    profiles_dirs: tuple[Path, ...] = ()
    accept_targets: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    allow_fallback: bool = False
    telemetry_interval_s: float = 10.0
    spool_max_records: int = 10_000
    receipts: str = "auto"
    resend_after_s: float = 10.0
    require_signed_commands: bool = True
    require_bound_commands: bool = True
    max_bundle_bytes: int = 4 << 30
    download_timeout_s: float = 30.0
    download_max_s: float = 3600.0
    download_ca_file: str = ""
    variant_budget_s: float = 20.0
    reserve_bytes: int = 64 << 20
    ballast_bytes: int = 8 << 20
    max_events: int = 1000
    max_replies: int = 1000
    max_held: int = 1000
    journal_max_entries: int = 10_000
    journal_max_pending: int = 100
    log_level: str = "info"
    source: str = ""


# section -> key -> (type, check) ; the check returns an error reason or "".
_SECTIONS: dict[str, set[str]] = {
    "agent": {"device", "fleet", "data_dir", "trusted_keys", "profile", "profiles_dirs", "accept_targets", "tags",
              "allow_fallback", "log_level"},
    "mqtt": set(MQTT_KEYS),
    "telemetry": {"interval_s", "spool_max_records", "receipts", "resend_after_s"},
    "api": {"listen", "max_body_bytes", "max_inflight_bytes", "max_connections", "max_requests", "instances",
            "request_timeout_s", "terminate_grace_s", "header_timeout_s", "body_timeout_s", "idle_timeout_s",
            "admin_token_file"},
    "install": {"max_bundle_bytes", "download_timeout_s", "download_max_s", "ca_file", "variant_budget_s"},
    "storage": {"reserve_bytes", "ballast_bytes", "max_events", "max_replies", "max_held", "journal_max_entries",
                "journal_max_pending"},
    "commands": {"require_signed", "require_bound"},
    "capture": {"models", "rate", "max_bytes", "outputs", "max_pending", "upload_url", "token_file",
                "upload_interval_s"},
}
_LOG_LEVELS = ("debug", "info", "warning", "error")


class _Reader:
    """Typed access to one config mapping that names ``section.key`` in every error."""

    def __init__(self, data: Mapping[str, Any], source: str) -> None:
        self.data = data
        self.source = source

    def err(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {reason}")

    def get(self, key: str, default: Any = None) -> Any:
        section, _, name = key.partition(".")
        return self.data.get(section, {}).get(name, default)

    def text(self, key: str, default: str = "") -> str:
        v = self.get(key, default)
        if not isinstance(v, str):
            raise self.err(key, f"must be a string, got {v!r}")
        return v

    def num(self, key: str, default: float, lo: float, hi: float, integer: bool = False) -> Any:
        v = self.get(key, default)
        ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type:
            raise self.err(key, f"must be {'an integer' if integer else 'a number'}, got {v!r}")
        if not lo <= v <= hi:
            raise self.err(key, f"must be in {lo:g}..{hi:g}, got {v!r}")
        return int(v) if integer else float(v)

    def flag(self, key: str, default: bool) -> bool:
        v = self.get(key, default)
        if not isinstance(v, bool):
            raise self.err(key, f"must be true or false, got {v!r}")
        return v

    def texts(self, key: str) -> list[str]:
        v = self.get(key, [])
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.err(key, f"must be a string or a list of strings, got {v!r}")
        return v


def _parse_broker(r: _Reader, base: Path) -> MqttOptions:
    return MqttOptions.from_mapping(r.data.get("mqtt", {}), r.source, base, defaults=AGENT_MQTT_DEFAULTS)


def _parse_api(r: _Reader, listen: str, base: Path) -> ApiConfig:
    d = ApiConfig()
    max_body = r.num("api.max_body_bytes", d.max_body_bytes, 1024, 1 << 34, integer=True)
    inflight = r.num("api.max_inflight_bytes", max(d.max_inflight_bytes, max_body), 1024, 1 << 36, integer=True)
    if inflight < max_body:
        raise r.err("api.max_inflight_bytes", f"must be >= api.max_body_bytes ({max_body}), got {inflight}: a body "
                                              "that size could never be admitted")
    token = _existing(r, "api.admin_token_file", base)
    if token:
        try:
            text = Path(token).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeError) as exc:
            raise r.err("api.admin_token_file", f"cannot read {token}: {exc}") from exc
        if len(text) < 16 or any(c.isspace() for c in text):
            raise r.err("api.admin_token_file", f"{token} must hold one token of at least 16 characters, no spaces")
    return ApiConfig(
        listen=listen, max_body_bytes=max_body, max_inflight_bytes=inflight,
        max_connections=r.num("api.max_connections", d.max_connections, 1, 65536, integer=True),
        max_requests=r.num("api.max_requests", d.max_requests, 1, 65536, integer=True),
        instances=r.num("api.instances", d.instances, 1, 256, integer=True),
        request_timeout_s=r.num("api.request_timeout_s", d.request_timeout_s, 0.01, 86400),
        terminate_grace_s=r.num("api.terminate_grace_s", d.terminate_grace_s, 0.01, 3600),
        header_timeout_s=r.num("api.header_timeout_s", d.header_timeout_s, 0.01, 3600),
        body_timeout_s=r.num("api.body_timeout_s", d.body_timeout_s, 0.01, 86400),
        idle_timeout_s=r.num("api.idle_timeout_s", d.idle_timeout_s, 0.01, 86400),
        admin_token_file=token,
    )


def _existing(r: _Reader, key: str, base: Path) -> str:
    value = r.text(key)
    if not value:
        return ""
    p = _resolve(value, base)
    if not p.is_file():
        raise r.err(key, f"file {p} does not exist")
    return str(p)


def _parse_capture(r: _Reader, base: Path) -> CaptureConfig:
    """The ``[capture]`` section (agent/capture.py): off unless ``models`` names at least one model."""
    models = tuple(r.texts("capture.models"))
    for m in models:
        try:
            check_id("model", m)
        except Exception as exc:  # noqa: BLE001 - ProtocolError: said as this key's error
            raise r.err("capture.models", str(exc)) from None
    url = r.text("capture.upload_url")
    if url and not url.startswith(("http://", "https://")):
        raise r.err("capture.upload_url", f"must be an http:// or https:// URL, got {url[:80]!r}")
    return CaptureConfig(
        models=models, rate=r.num("capture.rate", 0.01, 0.0, 1.0), outputs=r.flag("capture.outputs", False),
        max_bytes=r.num("capture.max_bytes", 64 << 20, 1024, 1 << 40, integer=True),
        max_pending=r.num("capture.max_pending", 64, 1, 100_000, integer=True), upload_url=url,
        token_file=_existing(r, "capture.token_file", base),
        upload_interval_s=r.num("capture.upload_interval_s", 10.0, 0.05, 86400))


def _resolve(value: str, base: Path) -> Path:
    # Relative paths in a config file are relative to the file, so a config directory can be moved as a whole.
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (base / p).resolve()


def parse_config(data: Mapping[str, Any], source: str = "<config>", base: Path | None = None) -> AgentConfig:
    """Validate a parsed TOML mapping (sections agent, mqtt, telemetry, api, install, storage, commands) into an
    AgentConfig."""
    try:
        return _parse_config(data, source, base)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        # Paths and URLs the OS or urllib cannot take: a NUL byte, a name over NAME_MAX, "mqtt://[::1" ...
        raise ConfigError(f"{source}: {exc}") from exc


def _parse_config(data: Mapping[str, Any], source: str, base: Path | None) -> AgentConfig:
    base = base or Path.cwd()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: must be a TOML table")
    for section, table in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}]; sections are {', '.join(_SECTIONS)}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: [{section}] must be a table")
        unknown = sorted(set(table) - _SECTIONS[section])
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                              f"[{section}] takes {', '.join(sorted(_SECTIONS[section]))}")
    r = _Reader(data, source)
    ids = {}
    for key in ("agent.device", "agent.fleet"):
        value = r.get(key)
        if value is None:
            raise r.err(key, "is required")
        try:
            ids[key] = check_id(key, value)
        except ValueError as exc:
            raise r.err(key, str(exc)) from exc
    data_dir = r.text("agent.data_dir")
    if not data_dir:
        raise r.err("agent.data_dir", "is required (where the agent keeps bundles, caches and its queue)")
    keys = [_resolve(k, base) for k in r.texts("agent.trusted_keys")]
    if not keys:
        raise r.err("agent.trusted_keys", "is required: the public key file(s) or directory whose signatures to trust")
    for k in keys:
        if not k.exists():
            raise r.err("agent.trusted_keys", f"{k} does not exist")
    targets = tuple(r.texts("agent.accept_targets"))
    for t in targets:
        try:
            check_id("agent.accept_targets", t)
        except ValueError as exc:
            raise r.err("agent.accept_targets", str(exc)) from exc
    tags = tuple(r.texts("agent.tags"))
    for t in tags:
        try:
            check_id("agent.tags", t)
        except ValueError as exc:
            raise r.err("agent.tags", str(exc)) from exc
    receipts = r.text("telemetry.receipts", "auto")
    if receipts not in RECEIPT_MODES:
        raise r.err("telemetry.receipts", f"must be one of {', '.join(RECEIPT_MODES)}, got {receipts!r}")
    level = r.text("agent.log_level", "info").lower()
    if level not in _LOG_LEVELS:
        raise r.err("agent.log_level", f"must be one of {', '.join(_LOG_LEVELS)}, got {level!r}")
    listen = r.text("api.listen", ApiConfig.listen)
    if listen:
        _, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise r.err("api.listen", f"must be host:port (port 0 picks a free one) or \"\" to disable, got {listen!r}")
    return AgentConfig(
        device=ids["agent.device"],
        fleet=ids["agent.fleet"],
        data_dir=_resolve(data_dir, base),
        trusted_keys=tuple(keys),
        broker=_parse_broker(r, base),
        api=_parse_api(r, listen, base),
        capture=_parse_capture(r, base),
        profile=r.text("agent.profile", "auto") or "auto",
        profiles_dirs=tuple(_resolve(d, base) for d in r.texts("agent.profiles_dirs")),
        accept_targets=targets,
        tags=tags,
        allow_fallback=r.flag("agent.allow_fallback", False),
        telemetry_interval_s=r.num("telemetry.interval_s", 10.0, 0.01, 3600),
        spool_max_records=r.num("telemetry.spool_max_records", 10_000, 10, 10_000_000, integer=True),
        receipts=receipts,
        resend_after_s=r.num("telemetry.resend_after_s", 10.0, 0.1, 24 * 3600),
        require_signed_commands=r.flag("commands.require_signed", True),
        require_bound_commands=r.flag("commands.require_bound", True),
        max_bundle_bytes=r.num("install.max_bundle_bytes", AgentConfig.max_bundle_bytes, 1, 1 << 40, integer=True),
        download_timeout_s=r.num("install.download_timeout_s", 30.0, 0.1, 3600),
        download_max_s=r.num("install.download_max_s", 3600.0, 1.0, 7 * 24 * 3600),
        download_ca_file=_existing(r, "install.ca_file", base),
        variant_budget_s=r.num("install.variant_budget_s", 20.0, 0.5, 3600),
        reserve_bytes=r.num("storage.reserve_bytes", AgentConfig.reserve_bytes, 0, 1 << 44, integer=True),
        ballast_bytes=r.num("storage.ballast_bytes", AgentConfig.ballast_bytes, 0, 1 << 34, integer=True),
        max_events=r.num("storage.max_events", AgentConfig.max_events, 10, 10_000_000, integer=True),
        max_replies=r.num("storage.max_replies", AgentConfig.max_replies, 10, 10_000_000, integer=True),
        max_held=r.num("storage.max_held", AgentConfig.max_held, 10, 1_000_000, integer=True),
        journal_max_entries=r.num("storage.journal_max_entries", AgentConfig.journal_max_entries, 100, 10_000_000,
                                  integer=True),
        journal_max_pending=r.num("storage.journal_max_pending", AgentConfig.journal_max_pending, 1, 100_000,
                                  integer=True),
        log_level=level,
        source=source,
    )


# Flag name -> dotted config key, for ``edgefleet agent run`` overrides.
FLAG_KEYS = {
    "device": "agent.device", "fleet": "agent.fleet", "data_dir": "agent.data_dir",
    "trusted_keys": "agent.trusted_keys",
    "profile": "agent.profile", "broker": "mqtt.url", "keepalive": "mqtt.keepalive_s",
    "telemetry_interval": "telemetry.interval_s", "api": "api.listen", "log_level": "agent.log_level",
    "require_signed": "commands.require_signed",
}


def load_config(path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None) -> AgentConfig:
    """Read ``path`` (may be None: flags only), apply ``overrides`` (dotted keys such as ``mqtt.url``), validate."""
    data: dict[str, dict[str, Any]] = {}
    source = "<flags>"
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        source = str(p)
        base = p.resolve().parent
        try:
            loaded = tomllib.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config {p}: {exc.strerror or exc}") from exc
        except (tomllib.TOMLDecodeError, UnicodeError) as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in loaded.items()}
    for dotted, value in (overrides or {}).items():
        if value is None or value == ():
            continue
        section, _, key = dotted.partition(".")
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        table[key] = list(value) if isinstance(value, tuple) else value
    return parse_config(data, source, base)


def with_runtime_port(cfg: AgentConfig, port: int) -> AgentConfig:
    """The config with the API port actually bound (``api.listen`` may ask for port 0)."""
    addr = cfg.api.address
    if addr is None:
        return cfg
    return replace(cfg, api=replace(cfg.api, listen=f"{addr[0]}:{port}"))
