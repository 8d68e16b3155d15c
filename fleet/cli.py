"""CLI: ``edgefleet fleet serve|top|simulate|enroll|token|send`` and ``edgefleet deploy``, ``deployments``,
``rollback``.

``deploy``, ``deployments``, ``rollback`` and ``fleet send`` are thin clients of a running controller's HTTP API
(``--controller``): the controller holds the trusted keys, verifies bundles and drives rollouts, so any operator
machine can use them. They authenticate with an API token (``fleet token create``) given as ``--token``,
``$EDGEFLEET_TOKEN``, ``--token-file`` or ``$EDGEFLEET_TOKEN_FILE``; ``--cacert`` / ``$EDGEFLEET_CA_FILE`` trusts a
controller's own CA for ``https://``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import ssl
import sys
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import click
from edgefleet.sdk.cli import mqtt_options
from edgefleet.sdk.errors import ConfigError, EdgefleetError, InputError, ProtocolError, TransportError
from edgefleet.sdk.protocol import (
    ApiError,
    BundleUploaded,
    CanaryVerdict,
    CaptureList,
    CommandRequest,
    CommandStatus,
    Deployment,
    DeploymentList,
    DeploymentRequest,
    DeploymentTarget,
    Model,
    RollbackRequest,
    RollbackSent,
    check_id,
)

__all__ = ["deploy", "deployments", "fleet", "rollback"]

_DEFAULT_CONTROLLER = "http://127.0.0.1:8080"
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
M = TypeVar("M", bound=Model)

if TYPE_CHECKING:
    from edgefleet.sdk.transport import MqttOptions


class Api:
    """Where a running controller is and how to talk to it: base URL, API token, TLS trust."""

    def __init__(self, base: str, token: str | None = None, cacert: Path | None = None) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.ssl: ssl.SSLContext | None = None
        if cacert is not None:
            try:
                self.ssl = ssl.create_default_context(cafile=str(cacert))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"--cacert {cacert}: {exc}") from exc


def _read_token_file(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"token file {path}: {exc.strerror or exc}") from exc
    if not text:
        raise ConfigError(f"token file {path} is empty")
    return text.splitlines()[0].strip()


def _api_options(f: Any) -> Any:
    """``--controller``, ``--token``, ``--token-file``, ``--cacert``: the decorated command gets ``api: Api``."""
    @functools.wraps(f)  # also carries the options decorated below this one (click keeps them on the function)
    def make(controller: str, token: str | None, token_file: str | None, cacert: Path | None, **kw: Any) -> Any:
        if token is None and token_file:
            token = _read_token_file(token_file)
        return f(api=Api(controller, token, cacert), **kw)

    for opt in reversed([
        click.option("--controller", default=_DEFAULT_CONTROLLER, show_default=True, envvar="EDGEFLEET_CONTROLLER",
                     help="Base URL of a running controller."),
        click.option("--token", envvar="EDGEFLEET_TOKEN", help="API token (edgefleet fleet token create); default "
                     "$EDGEFLEET_TOKEN."),
        click.option("--token-file", envvar="EDGEFLEET_TOKEN_FILE", type=click.Path(dir_okay=False),
                     help="File holding the API token; default $EDGEFLEET_TOKEN_FILE."),
        click.option("--cacert", envvar="EDGEFLEET_CA_FILE", type=click.Path(exists=True, dir_okay=False,
                     path_type=Path), help="CA certificate of an https:// controller; default $EDGEFLEET_CA_FILE."),
    ]):
        make = opt(make)
    return make


def _fraction(value: str, what: str) -> float:
    """``20%`` → 0.2; ``0.2`` → 0.2."""
    v = value.strip()
    try:
        return float(v[:-1]) / 100.0 if v.endswith("%") else float(v)
    except ValueError:
        raise click.BadParameter(
            f"{what} must be a fraction like 0.2 or a percentage like 20%, got {value!r}") from None


def _percent(value: str, option: str = "--canary") -> float:
    """``10%`` or ``10`` → 10.0 (percent)."""
    v = value.strip().rstrip("%")
    try:
        return float(v)
    except ValueError:
        raise click.BadParameter(f"{option} must be a percentage like 10%, got {value!r}") from None


def _request(api: Api, method: str, path: str, answer: type[M],
             body: bytes | BinaryIO | _Counting | Model | None = None, content_type: str = "application/json",
             timeout_s: float = 120.0, length: int | None = None) -> M:
    """Call the controller's API; the answer is parsed as ``answer`` (the same class the controller built it with)."""
    headers = {"Content-Type": content_type} if body is not None else {}
    if length is not None:
        headers["Content-Length"] = str(length)  # a file body is streamed, not read into memory
    if api.token:
        headers["Authorization"] = f"Bearer {api.token}"
    data = body.to_json() if isinstance(body, Model) else body
    req = urllib.request.Request(api.base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=api.ssl) as resp:
            raw = resp.read(64 << 20)
    except urllib.error.HTTPError as exc:
        try:
            msg = ApiError.from_json(exc.read(1 << 20)).error
        except ProtocolError:
            msg = ""
        hint = ""
        if exc.code == 401 and not api.token:
            hint = " (give an API token: --token, $EDGEFLEET_TOKEN or --token-file)"
        raise InputError(f"controller refused ({exc.code}): {msg or exc.reason}{hint}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise TransportError(f"cannot reach the controller at {api.base}: {getattr(exc, 'reason', exc)}") from exc
    try:
        return answer.from_json(raw)
    except ProtocolError as exc:
        raise TransportError(f"the controller at {api.base} answered {path} with {exc}") from exc


# -- fleet group ----------------------------------------------------------------------------------------------------

@click.group()
def fleet() -> None:
    """Run the fleet controller, watch the fleet live, simulate devices."""


@fleet.command("serve")
@mqtt_options()
@click.option("--store", "db", default="edgefleet-fleet.db", show_default=True, envvar="EDGEFLEET_STORE",
              help="Where the fleet is stored: a SQLite file (one host), or postgresql://USER@HOST/DB?sslmode=... "
                   "shared by several controllers (pip install 'edgefleet[postgres]'). Env: EDGEFLEET_STORE.")
@click.option("--db", "db_old", hidden=True, help="Old name of --store.")
@click.option("--http", "http_addr", default="127.0.0.1:8080", show_default=True,
              help="HOST:PORT for the dashboard and API.")
@click.option("--bundles", "bundles_dir", default="edgefleet-bundles", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Directory of verified bundles served to agents.")
@click.option("--trust", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Trusted public key file or directory of *.pub (repeatable); bundles must be signed by one.")
@click.option("--key", "signing_key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Fleet private key (Ed25519 PEM) that signs every command; agents refuse unsigned ones by default.")
@click.option("--command-ttl", type=click.FloatRange(min=1), default=86400.0, show_default=True,
              help="Seconds a command stays valid; an agent refuses it after that (command.expired).")
@click.option("--fleet", "fleet_id", default="default", show_default=True, help="Fleet id (topic level).")
@click.option("--client-id", default="", help="MQTT client id (default: stable per host and db, for the session).")
@click.option("--share-group", default="edgefleet", show_default=True,
              help="Shared-subscription group: controllers in one group split the ingest.")
@click.option("--receipts/--no-receipts", default=True, show_default=True,
              help="Send agents receipts of what is stored (they keep every record until one names it).")
@click.option("--receipt-qos", type=click.IntRange(0, 1), default=0, show_default=True,
              help="MQTT QoS of receipts: a lost one only makes the agent send those records again (stored once).")
@click.option("--public-url", default="", help="Base URL agents download bundles from (default: http://HOST:PORT).")
@click.option("--bundle-base-url", default="",
              help="A mirror of --bundles (object storage, a CDN, any HTTP server holding <sha256>.efb): devices "
                   "fetch bundles there instead of from this controller.")
@click.option("--retention-days", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Delete telemetry, events and replies older than this (hourly); 0 keeps everything.")
@click.option("--max-clock-skew", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Refuse statuses and telemetry whose timestamp is this many seconds ahead of this clock.")
@click.option("--rollout-lease", type=click.FloatRange(min=2), default=30.0, show_default=True,
              help="Seconds a controller holds a rollout without renewing; another controller of the group resumes "
                   "it within about 4/3 of this after the first one dies.")
@click.option("--read-auth", type=click.Choice(["local", "token", "open"]), default="local", show_default=True,
              help="Reads (API, /metrics, dashboard data) without a token: from this host's loopback only (local), "
                   "never (token) or from anywhere (open). Changes always need a token.")
@click.option("--allowed-host", "allowed_hosts", multiple=True,
              help="A host name clients may use in Host: besides localhost, IP addresses, the bind address and "
                   "--public-url's (DNS rebinding guard; repeatable).")
@click.option("--max-upload", default="4GiB", show_default=True, help="Largest bundle upload (e.g. 512MiB, 4GiB).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Serve HTTPS with this certificate (PEM, chain first); needs --tls-key.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The private key of --tls-cert (PEM).")
@click.option("--mqtt-session-expiry", type=click.IntRange(0, 0xFFFFFFFF), default=60, show_default=True,
              help="Seconds the broker keeps this controller's session (and its share of the fleet's messages) "
                   "after it goes away.")
@click.option("--offline-after", type=click.FloatRange(min=0.1, max=86400), default=30.0, show_default=True,
              help="Seconds without a status or telemetry after which a device is marked offline (its Last Will "
                   "does that at once); about 3 telemetry intervals.")
@click.option("--metrics-stale-after", type=click.FloatRange(min=0.1), default=3600.0, show_default=True,
              help="Seconds without a status or telemetry after which a device leaves /metrics altogether.")
@click.option("--webhook", "webhook_url", default="", metavar="URL",
              help="POST a JSON notification here when a rule matches (docs/fleet.md, \"Webhooks\").")
@click.option("--webhook-rule", "webhook_rules", multiple=True,
              type=click.Choice(["drift", "offline", "canary", "errors"]),
              help="Only these rules (repeatable; default: all four).")
@click.pass_context
def serve(ctx: click.Context, mqtt: MqttOptions, db: str, http_addr: str, bundles_dir: Path, trust: tuple[Path, ...],
          signing_key: Path | None, command_ttl: float, fleet_id: str, client_id: str, share_group: str,
          receipts: bool, receipt_qos: int, public_url: str, retention_days: float, max_clock_skew: float,
          rollout_lease: float, db_old: str | None, read_auth: str, allowed_hosts: tuple[str, ...], max_upload: str,
          tls_cert: Path | None, tls_key: Path | None, mqtt_session_expiry: int, bundle_base_url: str,
          offline_after: float, metrics_stale_after: float, webhook_url: str,
          webhook_rules: tuple[str, ...]) -> None:
    """Run a controller: MQTT ingest into the store, deployments, dashboard, REST API, /metrics, bundle downloads.

    The configuration, the store and the HTTP port are checked before anything connects to the broker: a
    controller that cannot start says why in one line (-v for the traceback) and leaves no MQTT session behind.
    """
    import logging

    from .controller import Controller, ControllerConfig, ListenError

    db = db_old or db
    if not ctx.find_root().params.get("verbose"):
        logging.getLogger("edgefleet").setLevel(logging.INFO)  # a daemon says what it does; -vv adds debug

    host, _, port = http_addr.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter(f"--http must be HOST:PORT, got {http_addr!r}")
    try:
        cfg = ControllerConfig(broker=mqtt, db=db, fleet=fleet_id, http_host=host.strip("[]"), http_port=int(port),
                               bundles_dir=bundles_dir, trust=list(trust), client_id=client_id,
                               share_group=share_group, public_url=public_url, retention_days=retention_days,
                               signing_key=signing_key, command_ttl_s=command_ttl, receipts=receipts,
                               receipt_qos=receipt_qos,
                               max_clock_skew_s=max_clock_skew, read_auth=read_auth,
                               allowed_hosts=tuple(allowed_hosts), max_upload_bytes=_size(max_upload, "--max-upload"),
                               tls_cert=tls_cert, tls_key=tls_key, mqtt_session_expiry_s=mqtt_session_expiry,
                               rollout_lease_s=rollout_lease, bundle_base_url=bundle_base_url,
                               offline_after_s=offline_after, metrics_stale_after_s=metrics_stale_after,
                               webhook_url=webhook_url,
                               webhook_rules=tuple(webhook_rules) or ("drift", "offline", "canary", "errors"))
        ctl = Controller(cfg)
        click.echo(f"edgefleet controller {cfg.client_id}: fleet {fleet_id}, broker {mqtt}, store {ctl.store}",
                   err=True)
        if not trust:
            click.echo("warning: no --trust key: this controller will refuse every bundle (deployments need one)",
                       err=True)
        if signing_key is None:
            click.echo("warning: no --key: commands go out unsigned; agents refuse them unless they run with "
                       "commands.require_signed = false", err=True)
        ctl.serve_forever()
    except ListenError as exc:  # a busy port is a usage problem, as for the agent: one line, exit code 2
        if ctx.find_root().params.get("verbose"):
            traceback.print_exc()
        raise _UsageExit(str(exc)) from None
    except OSError as exc:
        if ctx.find_root().params.get("verbose"):  # the root command prints an EdgefleetError's own
            traceback.print_exc()
        raise ConfigError(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}") from None


class _UsageExit(click.ClickException):
    """``Error: <message>`` and exit code 2 (click's code for usage errors), without click's usage line."""

    exit_code = 2


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
          "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4, "tb": 1000**4, "tib": 1 << 40}


def _size(text: str, what: str) -> int:
    """``512MiB`` → 536870912."""
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):].strip()
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise click.BadParameter(f"{what} must be a size like 512MiB or 4GiB, got {text!r}") from None
    if not 1 <= value <= 1 << 50:
        raise click.BadParameter(f"{what} must be between 1 byte and 1 PiB, got {text!r}")
    return int(value)


# -- API tokens -----------------------------------------------------------------------------------------------------

@fleet.group("token")
def token_group() -> None:
    """API tokens for the controller's HTTP API (stored hashed in the controller's store)."""


_db_option = click.option("--store", "--db", "db", default="edgefleet-fleet.db", show_default=True,
                          envvar="EDGEFLEET_STORE",
                          help="The controller's store (the same --store as fleet serve). Env: EDGEFLEET_STORE.")


def _parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``3600`` (seconds), ``0``/``never``."""
    t = text.strip().lower()
    if t in ("0", "never", ""):
        return 0.0
    mult = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}.get(t[-1:], None)
    try:
        return float(t[:-1]) * mult if mult else float(t)
    except ValueError:
        raise click.BadParameter(f"--expires must be like 30d, 12h, 90m or seconds, got {text!r}") from None


@token_group.command("create")
@click.option("--scope", type=click.Choice(["read", "capture", "deploy", "admin"]), required=True,
              help="read: the API and /metrics; capture: also upload captured samples (a device's token); deploy: "
                   "also bundles, deployments, rollbacks; admin: everything.")
@click.option("--name", required=True, help="What the token is for (shown in token list).")
@click.option("--fleet", "fleet_id", default="*", show_default=True, help="The fleet it works for (* for all).")
@click.option("--expires", default="never", show_default=True, help="Lifetime: 30d, 12h, 90m, seconds, or never.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the token to this file (mode 0600) instead of printing it.")
@_db_option
@_json_option
def token_create(scope: str, name: str, fleet_id: str, expires: str, out_file: Path | None, db: str,
                 as_json: bool) -> None:
    """Create an API token and show it once (only a hash of it is stored)."""
    from edgefleet.sdk._fs import atomic_write_text

    from .auth import issue_token
    from .store import open_store

    if fleet_id != "*":
        try:
            check_id("fleet", fleet_id)
        except ProtocolError as exc:
            raise click.BadParameter(str(exc)) from None
    store = open_store(db)
    try:
        issued = issue_token(store, name, scope, fleet=fleet_id, ttl_s=_parse_duration(expires))
    finally:
        store.close()
    rec = issued.record
    if out_file is not None:
        atomic_write_text(out_file, issued.token + "\n", mode=0o600)
    if as_json:
        click.echo(json.dumps({"id": rec.id, "name": rec.name, "scope": rec.scope, "fleet": rec.fleet,
                               "expires": rec.expires, **({} if out_file else {"token": issued.token})}))
    elif out_file is not None:
        click.echo(f"token {rec.id} ({rec.scope}, {rec.name}) written to {out_file}", err=True)
    else:
        click.echo(issued.token)
        click.echo(f"token {rec.id} ({rec.scope}, {rec.name}): shown once, stored only as a hash; use it as "
                   "--token, $EDGEFLEET_TOKEN or Authorization: Bearer", err=True)


@token_group.command("list")
@_db_option
@_json_option
def token_list(db: str, as_json: bool) -> None:
    """The API tokens: id, scope, fleet, name, expiry (never a secret)."""
    from .store import open_store

    store = open_store(db)
    try:
        toks = store.tokens()
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([{"id": t.id, "name": t.name, "scope": t.scope, "fleet": t.fleet, "created": t.created,
                                "expires": t.expires} for t in toks], indent=2))
        return
    if not toks:
        click.echo("no tokens")
    for t in toks:
        exp = time.strftime("%Y-%m-%d %H:%M", time.localtime(t.expires)) if t.expires else "never"
        click.echo(f"{t.id}  {t.scope:<7} fleet {t.fleet:<12} expires {exp:<16} {t.name}")


@token_group.command("revoke")
@click.argument("token_id")
@_db_option
def token_revoke(token_id: str, db: str) -> None:
    """Revoke (delete) the token TOKEN_ID: requests carrying it are refused from now on."""
    from .store import open_store

    store = open_store(db)
    try:
        gone = store.revoke_token(token_id.strip())
    finally:
        store.close()
    if not gone:
        raise InputError(f"no token {token_id[:20]!r} in {db}")
    click.echo(f"token {token_id} revoked")


# -- ad-hoc commands ------------------------------------------------------------------------------------------------

@fleet.command("send")
@click.argument("device")
@click.argument("kind", type=click.Choice(["describe", "benchmark", "rollback", "remove", "configure"]))
@click.option("--args", "args_json", default="{}", show_default=True,
              help='The command\'s arguments as JSON, e.g. \'{"telemetry_interval_s": 5}\'.')
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=0.0,
              help="Wait up to this many seconds for the device's reply and show it.")
@_api_options
@_json_option
def send(device: str, kind: str, args_json: str, wait_s: float, api: Api, as_json: bool) -> None:
    """Send one command to DEVICE through a running controller, which resends it until answered or expired.

    describe, benchmark and rollback need a deploy token; remove and configure an admin token.
    """
    try:
        args = json.loads(args_json)
        req = CommandRequest.from_dict({"kind": kind, "args": args})
    except (ValueError, ProtocolError) as exc:
        raise click.BadParameter(f"--args: {exc}") from None
    st = _request(api, "POST", f"/api/devices/{urllib.parse.quote(device, safe='')}/commands", CommandStatus, req)
    deadline = time.monotonic() + wait_s
    while st.state == "pending" and time.monotonic() < deadline:
        time.sleep(0.5)
        st = _request(api, "GET", f"/api/commands/{st.id}", CommandStatus)
    if as_json:
        click.echo(json.dumps(st.to_dict(), indent=2))
        return
    click.echo(f"command {st.id} ({st.kind}) to {st.device}: {st.state}, sent {st.sends}x")
    if st.reply is not None:
        r = st.reply
        detail = json.dumps(r.result) if r.status == "ok" else f"{r.error.code}: {r.error.message}" if r.error else ""
        click.echo(f"  reply {r.status}: {detail[:2000]}")
    if st.reply is not None and st.reply.status == "error":
        raise EdgefleetError(f"{device} refused {kind}")


@fleet.command("top")
@mqtt_options()
@click.option("--fleet", "fleet_id", default="default", show_default=True, help="Fleet id.")
@click.option("--duration", type=float, default=None, help="Exit after this many seconds (default: until Ctrl-C).")
@click.option("--sort", "sort_key", type=click.Choice(["device", "p95", "p99", "throughput", "errors", "last_seen"]),
              default="device", show_default=True, help="Column to sort by (latency/errors descending).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="Rows shown.")
@click.option("--offline-after", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Show a device offline after this many seconds without a status or telemetry (its Last Will "
                   "shows it at once).")
@_json_option
def top(mqtt: MqttOptions, fleet_id: str, duration: float | None, sort_key: str, limit: int, offline_after: float,
        as_json: bool) -> None:
    """A live view of the fleet straight from MQTT (no controller needed).

    On a terminal it redraws at the terminal's width until Ctrl-C (or --duration); otherwise (a pipe, a file) it
    watches for --duration and prints one plain table with every column at full width; --json prints the same as
    JSON (default --duration 5 s with --json).
    """
    from .top import run_top

    if as_json and duration is None:
        duration = 5.0
    run_top(mqtt, fleet_id, duration_s=duration, sort_key=sort_key, limit=limit, offline_after_s=offline_after,
            output="json" if as_json else "auto")


@fleet.command("simulate")
@mqtt_options()
@click.option("--fleet", "fleet_id", default="default", show_default=True, help="Fleet id.")
@click.option("--devices", "n", type=click.IntRange(1, 100_000), default=10, show_default=True,
              help="How many devices.")
@click.option("--interval", type=click.FloatRange(0.01, 3600), default=1.0, show_default=True,
              help="Seconds between telemetry records of each device.")
@click.option("--profiles", default="", help="Comma-separated profiles to cycle through (default: all).")
@click.option("--prefix", default="sim", show_default=True, help="Device id prefix.")
@click.option("--model", default="detector", show_default=True, help="Model name the devices report.")
@click.option("--version", "version", default="1.0.0", show_default=True, help="Model version they start with.")
@click.option("--tag", "tags", multiple=True, help="Tag every device (repeatable).")
@click.option("--slow", multiple=True, help="VERSION=FACTOR: that version's latency is FACTOR times slower.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
@click.option("--receipts/--no-receipts", default=False, show_default=True,
              help="Keep every message until a controller's receipt names it and send again what receipts skip "
                   "(as agents do).")
def simulate(mqtt: MqttOptions, fleet_id: str, n: int, interval: float, profiles: str, prefix: str, model: str,
             version: str, tags: tuple[str, ...], slow: tuple[str, ...], duration: float | None,
             receipts: bool) -> None:
    """Simulated devices publishing realistic telemetry (and answering deploy/rollback) to a real broker."""
    from .simulate import PROFILE_LATENCY_MS, Simulator, make_devices

    profs = [p.strip() for p in profiles.split(",") if p.strip()] or None
    for p in profs or []:
        if p not in PROFILE_LATENCY_MS:
            raise click.BadParameter(f"unknown profile {p!r}; known: {', '.join(PROFILE_LATENCY_MS)}")
    factors = {}
    for s in slow:
        v, _, f = s.partition("=")
        try:
            factors[v] = float(f)
        except ValueError:
            raise click.BadParameter(f"--slow must be VERSION=FACTOR, got {s!r}") from None
    sim = Simulator(mqtt, fleet_id, make_devices(n, prefix=prefix, profiles=profs, model=model, version=version,
                                                  tags=list(tags)), interval_s=interval, slow=factors,
                    receipts=receipts)
    from edgefleet.sdk._signals import interrupt_on_stop_signals

    with interrupt_on_stop_signals():  # SIGTERM, SIGHUP: the same clean stop (offline statuses) as Ctrl-C
        sim.start()
        click.echo(f"simulating {n} devices in fleet {fleet_id} every {interval:g} s (Ctrl-C to stop)", err=True)
        t = sim.run_telemetry(duration_s=duration)
        bars = _terminal_progress() if duration is not None else None
        bar = bars.timed(f"{n} devices", duration) if bars is not None and duration is not None else None
        try:
            t0 = time.monotonic()
            while t.is_alive():
                t.join(0.5)
                if bar is not None:  # a terminal: elapsed of --duration, records sent so far
                    bar.update(time.monotonic() - t0, f"{sim.sent:,} records")
            if bar is not None and duration is not None:
                bar.update(duration, f"{sim.sent:,} records")
        except KeyboardInterrupt:
            pass
        finally:
            if bar is not None:
                bar.close()
            sim.stop()
    click.echo(f"published {sim.sent} telemetry records", err=True)


# -- deployments ----------------------------------------------------------------------------------------------------

# `deploy --wait` exit codes (docs/fleet.md, "Exit codes"); 1 and 2 are click's (error, usage).
EXIT_CODES = {"completed": 0, "halted": 3, "completed-with-failures": 4, "failed": 5, "rolled-back": 5}
EXIT_STILL_RUNNING = 6


def _ratio(v: CanaryVerdict) -> str:
    if v.p95_ratio is None:
        return ""
    ci = f" [{v.ratio_low:.2f}, {v.ratio_high:.2f}]" if v.ratio_low is not None and v.ratio_high is not None else ""
    return f"p95 x{v.p95_ratio:.2f}{ci}"


def _verdict_line(v: CanaryVerdict, limit: float) -> str:
    """One line of a canary look: requests so far vs needed, time, the p95 ratio and its interval vs the limit."""
    parts = [f"{v.canary_count}/{v.needed_count} requests" if v.needed_count else f"{v.canary_count} requests",
             f"{v.elapsed_s:.0f}/{v.max_s:.0f} s" if v.max_s else ""]
    r = _ratio(v)
    if r:
        parts.append(f"{r} (limit x{1 + limit:.2f})")
    if v.baseline_p95 is not None and v.canary_p95 is not None:
        parts.append(f"p95 {v.baseline_p95:.2f} → {v.canary_p95:.2f} ms")
    return f"{v.bundle}: " + ", ".join(p for p in parts if p)


def _print_deployment(dep: Deployment) -> None:
    b = ", ".join(f"{x.name} {x.version} ({x.target})" for x in dep.bundles)
    click.echo(f"deployment {dep.id}: {dep.state}  {b}")
    policy = dep.decision.policy
    click.echo(f"  to {','.join(dep.selector)}  canary {dep.canary_pct:g}% (at least {policy.min_canary_devices} "
               f"per target, seed {policy.seed}, split {policy.canary_split:g}%)  max p95 regression "
               f"{dep.max_p95_regression:.0%}")
    if dep.message:
        click.echo(f"  {dep.message}")
    for v in dep.decision.canary or []:
        click.echo(f"  verdict {v.outcome or ('proceed' if v.proceed else 'halt')}: {v.bundle}: {v.reason}")
        for x in v.excluded[:10]:
            click.echo(f"    left out {x}")
    for look in dep.decision.observing or []:
        if not dep.decision.canary:
            click.echo(f"  observing {_verdict_line(look, dep.max_p95_regression)}")
    targets = dep.targets or []
    sent = {t.sha256 for t in targets if t.sha256}
    for b_ in dep.bundles:
        if b_.sha256 not in sent:
            click.echo(f"  no selected device has target {b_.target}: {b_.name} {b_.version} not sent")
    click.echo("  " + "  ".join(f"{k}: {v}" for k, v in sorted(dep.progress.items())))
    for t in targets:
        extra = f"  ({t.reason})" if t.reason else ""
        ver = f"{t.previous_version or '-'} → {t.version}" if t.version else "-"
        click.echo(f"  {t.device:<24} {t.profile:<20} {t.phase:<7} {t.state:<12} {ver}{extra}")


_SETTLED = ("active", "failed", "rolled-back", "skipped", "removed")


def _settled(dep: Deployment) -> int:
    """Devices of a deployment that reached a final state (what its progress bar counts)."""
    return sum(n for state, n in dep.progress.items() if state in _SETTLED)


class _Counting:
    """A file read through, counting bytes for a progress bar (http.client sends a file body block by block)."""

    def __init__(self, fh: BinaryIO, advance: Any) -> None:
        self._fh = fh
        self._advance = advance

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._advance(len(data))
        return data


class _Bars:
    """rich progress bars on stderr, for a terminal only (a pipe or a log gets the plain lines instead)."""

    def __init__(self, console: Any) -> None:
        self.console = console

    @contextlib.contextmanager
    def upload(self, what: str, total: int) -> Iterator[Any]:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), console=self.console) as p:
            task = p.add_task(what, total=total)
            yield lambda n: p.advance(task, n)

    def rollout(self, total: int) -> _RolloutBar:
        return _RolloutBar(self.console, total)

    def timed(self, what: str, seconds: float) -> _TimedBar:
        return _TimedBar(self.console, what, seconds)


class _TimedBar:
    """A run of known length: seconds elapsed out of the total, ETA, and a count beside it."""

    def __init__(self, console: Any, what: str, seconds: float) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._p = Progress(TextColumn(what), BarColumn(), TimeElapsedColumn(), TextColumn("/"),
                           TimeRemainingColumn(), TextColumn("{task.description}"), console=console)
        self._task = self._p.add_task("", total=max(seconds, 0.001))
        self._p.start()

    def update(self, elapsed: float, line: str) -> None:
        self._p.update(self._task, completed=elapsed, description=line)

    def close(self) -> None:
        self._p.stop()


class _RolloutBar:
    """Settled devices of a rollout out of its total, elapsed time, and the rollout's state line."""

    def __init__(self, console: Any, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("rollout"), BarColumn(), MofNCompleteColumn(), TextColumn("devices"),
                           TimeElapsedColumn(), TextColumn("{task.description}"), console=console)
        self._task = self._p.add_task("", total=max(total, 1))
        self._p.start()

    def update(self, settled: int, line: str) -> None:
        self._p.update(self._task, completed=settled, description=line[:100])

    def close(self) -> None:
        self._p.stop()


def _terminal_progress() -> _Bars | None:
    """Progress bars when stderr is a terminal, else None."""
    from rich.console import Console

    console = Console(stderr=True)
    return _Bars(console) if console.is_terminal else None


def _progress(dep: Deployment) -> str:
    """What a waiting ``deploy`` shows: the state, device counts, and while observing each bundle's last look."""
    counts = " ".join(f"{k}={v}" for k, v in sorted(dep.progress.items()))
    if dep.state == "observing" and dep.decision.observing:
        return "; ".join(f"observing {_verdict_line(v, dep.max_p95_regression)}" for v in dep.decision.observing)
    return f"{dep.state}: {counts}"


@click.command("deploy")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--to", "to", multiple=True, required=True,
              help="Devices: ids, tag:NAME, profile:NAME or all (repeatable or comma-separated).")
@click.option("--canary", default="0", show_default=True,
              help="Percent of each target's devices that install first, e.g. 10% (at least --min-canary-devices).")
@click.option("--min-canary-devices", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Canaries per target at least (a target with fewer devices keeps one out of the canary).")
@click.option("--split", default="50%", show_default=True,
              help="Share of each canary's requests its previous version keeps serving while the canary is judged, "
                   "so both versions are timed side by side on the same device (0 turns it off).")
@click.option("--max-p95-regression", default="20%", show_default=True, help="Halt if canary p95 rises by more.")
@click.option("--max-error-increase", default="1%", show_default=True, help="Halt if the error rate rises by more.")
@click.option("--max-output-drift", type=click.FloatRange(0.0, 100.0), default=0.25, show_default=True,
              help="Halt if the canaries' output distribution departs from the previous version's by more (quantile "
                   "distance, docs/fleet.md \"Output drift\"); 0 turns the check off.")
@click.option("--observe", "observe_s", type=float, default=60.0, show_default=True,
              help="Seconds of canary telemetry before the first look; the last look is at 3x this.")
@click.option("--min-samples", type=int, default=200, show_default=True,
              help="Canary requests needed to judge (the error-rate rule may need more).")
@click.option("--baseline", "baseline_s", type=click.FloatRange(min=1), default=900.0, show_default=True,
              help="Seconds of telemetry before the deployment that make the baseline.")
@click.option("--seed", type=click.IntRange(0, 2**62), default=None,
              help="Seed of the canary choice (default: drawn by the controller and recorded).")
@click.option("--url", "urls", multiple=True,
              help="Where devices fetch the bundle instead of the controller (http:// or https://: object storage, "
                   "a CDN ...); one per bundle, in the order of BUNDLES. The bundle is still uploaded to the "
                   "controller, which verifies it.")
@click.option("--wait/--no-wait", default=False,
              help="Wait until the deployment finishes, showing its progress; the exit code says how it ended.")
@click.option("--wait-timeout", type=click.FloatRange(min=1), default=3600.0, show_default=True,
              help="With --wait: give up waiting after this many seconds (the rollout goes on; exit code 6).")
@_api_options
@_json_option
def deploy(bundles: tuple[Path, ...], to: tuple[str, ...], canary: str, min_canary_devices: int, split: str,
           max_p95_regression: str, max_error_increase: str, max_output_drift: float, observe_s: float,
           min_samples: int, baseline_s: float, seed: int | None, urls: tuple[str, ...], wait: bool,
           wait_timeout: float, api: Api, as_json: bool) -> None:
    """Deploy BUNDLES (one per target profile) to the selected devices, optionally staged with canaries.

    Each selected device gets the bundle whose target is its profile; a bundle whose target no selected device has
    is reported and not sent. The controller verifies every bundle with its trusted keys before anything is sent.

    With --wait the exit code says how the rollout ended: 0 completed, 3 halted by its canaries (a regression, or
    not enough data to judge), 4 completed with failed devices, 5 failed or rolled back, 6 still running at
    --wait-timeout; 1 is an error (bundle refused, controller unreachable), 2 a usage error.
    """
    # Check every option before uploading anything.
    fields: dict[str, Any] = {"to": list(to), "canary": _percent(canary),
                              "max_p95_regression": _fraction(max_p95_regression, "--max-p95-regression"),
                              "max_error_increase": _fraction(max_error_increase, "--max-error-increase"),
                              "max_output_drift": max_output_drift, "observe_s": observe_s,
                              "min_samples": min_samples, "baseline_s": baseline_s,
                              "min_canary_devices": min_canary_devices, "seed": seed,
                              "split": _percent(split, "--split")}
    if urls and len(urls) != len(bundles):
        raise click.BadParameter(f"give one --url per bundle ({len(bundles)}), got {len(urls)}")
    try:
        fake = [f"{i:064x}" for i in range(len(bundles))]  # every option is checked before anything is uploaded
        DeploymentRequest.from_dict({**fields, "bundles": fake, "urls": dict(zip(fake, urls, strict=False))})
    except ProtocolError as exc:
        raise click.BadParameter(str(exc)) from None
    ids = []
    bars = None if as_json else _terminal_progress()
    for b in bundles:
        size = b.stat().st_size
        with open(b, "rb") as fh:
            if bars is None:
                up = _request(api, "POST", "/api/bundles", BundleUploaded, fh, "application/octet-stream",
                              length=size)
            else:
                with bars.upload(f"upload {b.name}", size) as advance:
                    up = _request(api, "POST", "/api/bundles", BundleUploaded, _Counting(fh, advance),
                                  "application/octet-stream", length=size)
        ids.append(up.sha256)
        if not as_json:
            click.echo(f"uploaded {b.name}: {up.name} {up.version} for {up.target} (signed by {up.key_id})")
    dep = _request(api, "POST", "/api/deployments", Deployment,
                   DeploymentRequest.from_dict({**fields, "bundles": ids, "urls": dict(zip(ids, urls, strict=True))
                                                if urls else {}}))
    if not as_json:
        sent = {t.sha256 for t in dep.targets or [] if t.sha256}
        for x in dep.bundles:
            if x.sha256 not in sent:
                click.echo(f"note: no selected device has target {x.target}: {x.name} {x.version} is not sent")
        canaries = [t.device for t in dep.targets or [] if t.phase == "canary"]
        click.echo(f"deployment {dep.id}: {len([t for t in dep.targets or [] if t.sha256])} devices"
                   + (f", canaries first: {', '.join(canaries[:20])}{' ...' if len(canaries) > 20 else ''}"
                      if canaries else ""))
    if not wait:
        if as_json:
            click.echo(json.dumps(dep.to_dict(), indent=2))
        return
    deadline = time.monotonic() + wait_timeout
    shown, shown_at = "", 0.0
    rollout = bars.rollout(len([t for t in dep.targets or [] if t.sha256])) if bars is not None else None
    try:
        while dep.state in ("canary", "observing", "rolling-out"):
            if time.monotonic() > deadline:
                if rollout is not None:
                    rollout.close()
                click.echo(f"Error: deployment {dep.id} still {dep.state} after {wait_timeout:g} s; follow it "
                           f"with: edgefleet deployments show {dep.id}", err=True)
                sys.exit(EXIT_STILL_RUNNING)
            line = _progress(dep)
            if rollout is not None:  # a terminal: one bar of settled devices, with the rollout's state beside it
                rollout.update(_settled(dep), line)
            elif not as_json and (line != shown or time.monotonic() - shown_at > 15) and \
                    (time.monotonic() - shown_at > 3 or line.split(":")[0] != shown.split(":")[0]):
                click.echo(f"  {time.strftime('%H:%M:%S')} {line}", err=True)
                shown, shown_at = line, time.monotonic()
            time.sleep(1.0)
            dep = _request(api, "GET", f"/api/deployments/{dep.id}", Deployment)
        if rollout is not None:
            rollout.update(_settled(dep), f"{dep.state}")
    finally:
        if rollout is not None:
            rollout.close()
    if as_json:
        click.echo(json.dumps(dep.to_dict(), indent=2))
    else:
        _print_deployment(dep)
    code = EXIT_CODES.get(dep.state, 5)
    if code and not as_json:
        click.echo(f"Error: deployment {dep.id} {dep.state}: {dep.message}"[:2000], err=True)
    sys.exit(code)


@click.group("deployments")
def deployments() -> None:
    """List and show deployments of a running controller."""


@deployments.command("list")
@_api_options
@_json_option
def deployments_list(api: Api, as_json: bool) -> None:
    """Deployments, newest first, with per-state device counts."""
    deps = _request(api, "GET", "/api/deployments", DeploymentList).deployments
    if as_json:
        click.echo(json.dumps([d.to_dict() for d in deps], indent=2))
        return
    if not deps:
        click.echo("no deployments")
    for d in deps:
        b = ", ".join(f"{x.name} {x.version}" for x in d.bundles)
        prog = " ".join(f"{k}={v}" for k, v in sorted(d.progress.items()))
        click.echo(f"{d.id}  {d.state:<12} {b:<30} {prog}")


def _deployment_id(api: Api, dep_id: str) -> str:
    """``latest`` → the id of the newest deployment; any other id as given."""
    if dep_id != "latest":
        return dep_id
    deps = _request(api, "GET", "/api/deployments", DeploymentList).deployments
    if not deps:
        raise InputError("no deployments yet, so no latest one")
    return deps[0].id


@deployments.command("show")
@click.argument("dep_id")
@_api_options
@_json_option
def deployments_show(dep_id: str, api: Api, as_json: bool) -> None:
    """One deployment (DEP_ID, or latest): policy, canary decision and every device's state."""
    dep_id = _deployment_id(api, dep_id)
    dep = _request(api, "GET", f"/api/deployments/{urllib.parse.quote(dep_id, safe='')}", Deployment)
    if as_json:
        click.echo(json.dumps(dep.to_dict(), indent=2))
    else:
        _print_deployment(dep)


@fleet.group("captures")
def captures_group() -> None:
    """Captured inference inputs the devices uploaded (opt-in per model: the agent's [capture] section)."""


@captures_group.command("list")
@click.option("--model", help="Only this model.")
@_api_options
@_json_option
def captures_list(model: str | None, api: Api, as_json: bool) -> None:
    """Samples held per model, version and device."""
    q = f"?model={urllib.parse.quote(model, safe='')}" if model else ""
    res = _request(api, "GET", f"/api/captures{q}", CaptureList)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
        return
    if not res.captures:
        click.echo("no captured samples")
    for c in res.captures:
        click.echo(f"{c.model:<24} {c.version:<12} {c.device:<24} {c.samples:>7} samples {c.bytes:>12,} bytes")


@captures_group.command("export")
@click.argument("model")
@click.option("-o", "--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .npz to write: one array per input, one row per captured request (package --calibration).")
@click.option("--version", "version", help="Only this version (default: every version of MODEL).")
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=10_000, show_default=True,
              help="The newest this many samples.")
@_api_options
def captures_export(model: str, out_file: Path, version: str | None, limit: int, api: Api) -> None:
    """Export MODEL's captured inputs as calibration or validation data for `edgefleet package`."""
    from edgefleet.sdk._fs import atomic_write_bytes

    q = urllib.parse.urlencode({"limit": limit, **({"version": version} if version else {})})
    data, headers = _download(api, f"/api/captures/{urllib.parse.quote(model, safe='')}/export?{q}")
    atomic_write_bytes(out_file, data)
    click.echo(f"{out_file}: {headers.get('X-Edgefleet-Samples', '?')} samples of {model}")


def _download(api: Api, path: str, timeout_s: float = 300.0) -> tuple[bytes, Mapping[str, str]]:
    """GET raw bytes from the controller (errors as in _request)."""
    headers = {"Authorization": f"Bearer {api.token}"} if api.token else {}
    req = urllib.request.Request(api.base + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=api.ssl) as resp:
            return resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        try:
            msg = ApiError.from_json(exc.read(1 << 20)).error
        except ProtocolError:
            msg = ""
        raise InputError(f"controller refused ({exc.code}): {msg or exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise TransportError(f"cannot reach the controller at {api.base}: {getattr(exc, 'reason', exc)}") from exc


def _rollback_answered(t: DeploymentTarget) -> bool:
    """The device answered its rollback: rolled back, or it failed (the target keeps its state and says why)."""
    return t.state in ("rolled-back", "failed") or t.reason.startswith("rollback failed")


@click.command("rollback")
@click.argument("dep_id")
@click.option("--device", "devices", multiple=True, help="Only these devices (default: every active one).")
@click.option("--wait/--no-wait", default=False,
              help="Wait until every device answered the rollback; exit 5 when one failed, 6 at --wait-timeout.")
@click.option("--wait-timeout", type=click.FloatRange(min=1), default=600.0, show_default=True,
              help="With --wait: give up waiting after this many seconds (exit code 6).")
@_api_options
@_json_option
def rollback(dep_id: str, devices: tuple[str, ...], wait: bool, wait_timeout: float, api: Api, as_json: bool) -> None:
    """Roll the devices of deployment DEP_ID (or latest) back to the bundle they ran before.

    A device that got its first version of the model from this deployment removes it (it ran none before).
    """
    dep_id = _deployment_id(api, dep_id)
    body = RollbackRequest(devices=list(devices) if devices else None)
    path = f"/api/deployments/{urllib.parse.quote(dep_id, safe='')}"
    res = _request(api, "POST", f"{path}/rollback", RollbackSent, body)
    sent = res.rollback_sent
    if not sent:
        raise EdgefleetError(f"no active device in deployment {dep_id} to roll back")
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
    else:
        click.echo(f"deployment {dep_id}: rollback sent to {len(sent)} device(s): {', '.join(sent)}")
    if not wait:
        return
    deadline = time.monotonic() + wait_timeout
    while True:
        dep = _request(api, "GET", path, Deployment)
        states = {t.device: t for t in dep.targets or [] if t.device in sent}
        if all(_rollback_answered(t) for t in states.values()):
            break
        if time.monotonic() > deadline:
            left = sorted(d for d, t in states.items() if not _rollback_answered(t))
            click.echo(f"Error: no answer to the rollback from {', '.join(left)} within {wait_timeout:g} s",
                       err=True)
            sys.exit(EXIT_STILL_RUNNING)
        time.sleep(1.0)
    failed = sorted(d for d, t in states.items() if t.state != "rolled-back")
    for d, t in sorted(states.items()) if not as_json else ():
        click.echo(f"  {d:<24} {t.state}" + (f"  ({t.reason})" if t.reason else ""))
    if failed:
        click.echo(f"Error: the rollback failed on {', '.join(failed)}", err=True)
        sys.exit(EXIT_CODES["failed"])


@fleet.command("enroll")
@click.argument("device")
@click.option("--fleet", "fleet_id", required=True, help="Fleet id the device belongs to.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Enrollment directory: broker password file, ACL and per-device credentials.")
@click.option("--cert", is_flag=True, help="Issue a client certificate from the fleet CA instead of a password.")
@click.option("--controller", "as_controller", is_flag=True,
              help="Enroll a controller account (reads every device's channels, writes their cmd).")
def enroll_cmd(device: str, fleet_id: str, out_dir: Path, cert: bool, as_controller: bool) -> None:
    """Issue MQTT credentials for DEVICE and rewrite the Mosquitto password file, ACL and dynamic-security
    configuration that confine it."""
    from .enroll import enroll

    res = enroll(out_dir, device, fleet_id, cert=cert, role="controller" if as_controller else "device")
    click.echo(f"enrolled {res.role} {res.name} in fleet {res.fleet} ({res.auth}); credentials in "
               f"{res.credentials_dir}; broker config lines in {out_dir / 'mosquitto.conf'} (password and ACL "
               f"files) or {out_dir / 'mosquitto-dynsec.conf'} (dynamic-security plugin, which also refuses "
               "subscriptions outside an account's topics; restart the broker after enrolling)")
