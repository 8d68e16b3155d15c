"""The controller's HTTP side (aiohttp): dashboard, JSON REST API, server-sent events, /metrics, bundle downloads.

Every read goes to the store (never to state kept by this process), so with several controllers behind a load
balancer each page shows the whole fleet. Store calls are blocking SQLite calls and run in a thread. Every error is
a 4xx/5xx with a JSON body ``{"error": "<one line>"}`` — bad input, a missing route, a body over its limit, and an
unexpected failure alike. See docs/api.md.

What guards it (:class:`HttpPolicy`, docs/api.md "Authentication" and docs/operations.md; issue 18 created a
deployment with a ``text/plain`` POST from any web page, with any ``Host``):

* **Tokens** (:mod:`edgefleet.fleet.auth`): every state-changing request needs ``Authorization: Bearer <token>``
  with the scope it asks for (``deploy``, ``admin``); reads need a ``read`` token unless ``read_auth`` says
  otherwise (``local``, the default: not from this host's loopback; ``open``: never). Bundle downloads (``/bundles/``,
  signed files named by their sha256, what agents fetch) and the dashboard page itself need none.
* **Host** (DNS rebinding): the ``Host`` header must be an IP literal, ``localhost``, the address the server is
  bound to, the public URL's host or one of ``allowed_hosts``; anything else is 421 before any other check.
* **Origin** (CSRF): a state-changing request from a browser must come from the same origin (``Origin`` equal to
  the ``Host`` it was sent to) and not be ``Sec-Fetch-Site: cross-site``; a browser never sends a token
  cross-origin without a CORS preflight, which this server never grants.
* **Content-Type**: JSON bodies only as ``application/json``, bundles only as ``application/octet-stream`` (415).
* **Sizes, while streaming**: a body whose ``Content-Length`` is over its limit is refused (413) before a byte of
  it is read; a chunked one is cut off at the limit. JSON bodies: ``max_json_bytes``; uploads:
  ``max_upload_bytes``, streamed to disk, never held in memory. Unauthenticated requests are refused before their
  body is read at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ipaddress
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec
from aiohttp import web
from edgefleet.sdk.errors import BundleError, EdgefleetError, InputError, ProtocolError
from edgefleet.sdk.protocol import (
    MAX_PAYLOAD,
    ApiError,
    ApiTokenInfo,
    ApiTokenList,
    BundleUploaded,
    CaptureList,
    CaptureRow,
    CaptureStored,
    CommandRequest,
    CommandStatus,
    DeploymentList,
    DeploymentRequest,
    DeviceList,
    DeviceRow,
    EventList,
    EventRow,
    IngestCounters,
    Rejected,
    RollbackRequest,
    RollbackSent,
    VariantList,
    VariantPick,
    VersionList,
    VersionStats,
    WindowList,
    check_id,
)
from edgefleet.sdk.protocol._model import prevalidated
from edgefleet.sdk.sketch import DDSketch

from .auth import AuthError, allows, authenticate
from .bundles import bundle_filename
from .captures import CaptureStore
from .commands import Commander
from .ingest import Ingestor
from .rollout import Deployer, Selector
from .store import ApiToken, Store, VersionSketch, VersionTotal

__all__ = ["MAX_UPLOAD", "HttpPolicy", "Liveness", "make_app", "metrics_text"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD = 4 << 30  # bundles are model files: large, but not unbounded (the agent's default cap too)
_SSE_MAX_ROWS = 2000  # above this many changed devices per tick, SSE says "refresh" instead of sending rows
# Command kinds the API sends, and the scope each needs (deploy goes through deployments, which pick the bundle).
_COMMAND_SCOPES = {"describe": "deploy", "benchmark": "deploy", "rollback": "deploy", "remove": "admin",
                   "configure": "admin"}


@dataclass(frozen=True)
class HttpPolicy:
    """Who may use the HTTP API, from where, and how much they may send (see the module docstring)."""

    read_auth: Literal["local", "token", "open"] = "local"
    allowed_hosts: tuple[str, ...] = ()
    max_json_bytes: int = MAX_PAYLOAD
    max_upload_bytes: int = MAX_UPLOAD
    bind_host: str = "127.0.0.1"
    public_url: str = ""
    _hosts: frozenset[str] = field(init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self) -> None:
        if self.read_auth not in ("local", "token", "open"):
            raise ValueError(f"read_auth must be local, token or open, got {self.read_auth!r}")
        if not 1024 <= self.max_json_bytes <= 64 << 20:
            raise ValueError(f"max_json_bytes must be in [1024, 64 MiB], got {self.max_json_bytes}")
        if not 1 <= self.max_upload_bytes <= 1 << 50:
            raise ValueError(f"max_upload_bytes must be in [1, 2^50], got {self.max_upload_bytes}")
        hosts = {"localhost", *(h.lower() for h in self.allowed_hosts)}
        if self.bind_host and self.bind_host not in ("0.0.0.0", "::", ""):
            hosts.add(self.bind_host.lower().strip("[]"))
        if self.public_url:
            h = urlsplit(self.public_url).hostname
            if h:
                hosts.add(h.lower())
        object.__setattr__(self, "_hosts", frozenset(hosts))

    def host_allowed(self, host_header: str) -> bool:
        """Whether a ``Host`` header names this server (an IP literal always does: it cannot be rebound)."""
        try:
            host = urlsplit(f"//{host_header}").hostname or ""
        except ValueError:
            return False
        if not host:
            return False
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            return host.lower() in self._hosts


StoreKey = web.AppKey("store", Store)
FleetKey = web.AppKey("fleet", str)
DeployerKey = web.AppKey("deployer", Deployer)
IngestKey = web.AppKey("ingest", Ingestor)
CommanderKey = web.AppKey("commander", Commander)
PolicyKey = web.AppKey("policy", HttpPolicy)
HubKey: web.AppKey[_Hub] = web.AppKey("hub")


@dataclass(frozen=True)
class Liveness:
    """When a device counts as offline, and when it leaves /metrics (``fleet serve --offline-after`` and
    ``--metrics-stale-after``)."""

    offline_after_s: float = 30.0
    metrics_stale_after_s: float = 3600.0


LivenessKey = web.AppKey("liveness", Liveness)
CapturesKey = web.AppKey("captures", CaptureStore)
_MAX_CAPTURE_BYTES = 64 << 20
_TOKEN: web.RequestKey[ApiToken | None] = web.RequestKey("token", ApiToken | None)  # type: ignore[arg-type]


_encode = msgspec.json.Encoder().encode


def _json(data: Any, status: int = 200) -> web.Response:
    """A JSON response from a protocol object (what docs/api.md and sdk/schemas/api-*.json describe)."""
    return web.Response(body=_encode(data), status=status, content_type="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None, *, close: bool = False) -> web.Response:
    """A JSON error; ``close``: and close the connection after it, so a body nobody will read is not drained (an
    unauthenticated or oversized upload costs the sender's bandwidth, not ours)."""
    resp = _json(ApiError(error=message.splitlines()[0][:4000] if message else "error"), status)
    if headers:
        resp.headers.update(headers)
    if close:
        resp.force_close()
    return resp


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    """Every failure as a JSON error: ours, aiohttp's own (404, 405, 413 ...) and unexpected ones (500)."""
    try:
        return await handler(request)
    except AuthError as exc:
        return _error(exc.status, str(exc), {"WWW-Authenticate": 'Bearer realm="edgefleet"'}
                      if exc.status == 401 else None, close=request.body_exists)
    except (InputError, ProtocolError) as exc:
        return _error(400, str(exc))
    except BundleError as exc:
        return _error(422, str(exc))
    except EdgefleetError as exc:
        return _error(400, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        why = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return _error(exc.status, why or exc.reason, {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers
                      else None, close=exc.status in (413, 415) and request.body_exists)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path[:200])
        return _error(500, "internal error (logged by the controller)")


def _needed_scope(request: web.Request) -> str | None:
    """The token scope a request needs (None: none; reads are subject to the read policy)."""
    path, method = request.path, request.method
    if path == "/" or path.startswith("/static/") or path.startswith("/bundles/") or path == "/favicon.ico":
        return None
    if method in ("GET", "HEAD", "OPTIONS"):
        return "admin" if path == "/api/tokens" else "read"
    if method == "POST" and path.startswith("/api/captures/"):
        return "capture"  # a device's token: upload its samples, nothing else that changes state
    return "deploy"  # every state change; a command's own kind may need more (api_send_command)


def _is_loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address((request.remote or "").split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@web.middleware
async def _guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                 ) -> web.StreamResponse:
    """Host, Origin, token and scope checks, before a handler runs or a byte of the body is read."""
    policy = request.app[PolicyKey]
    if not policy.host_allowed(request.headers.get("Host", "")):
        return _error(421, f"Host {request.headers.get('Host', '')[:80]!r} is not this controller (DNS rebinding "
                           "guard: add it with --allowed-host)", close=True)
    safe = request.method in ("GET", "HEAD", "OPTIONS")
    if not safe:
        origin = request.headers.get("Origin")
        if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != request.host.lower()):
            return _error(403, f"cross-origin request from {origin[:80]!r} refused", close=True)
        if request.headers.get("Sec-Fetch-Site") == "cross-site":
            return _error(403, "cross-site request refused", close=True)
    needed = _needed_scope(request)
    request[_TOKEN] = None
    if needed is not None:
        auth = request.headers.get("Authorization", "")
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "bearer" or not value:
                raise AuthError("Authorization must be 'Bearer <token>'")
            tok = await _run(authenticate, request.app[StoreKey], value, request.app[FleetKey])
            if not allows(tok.scope, needed):
                raise AuthError(f"token {tok.id} ({tok.scope}) may not do this: it needs the {needed} scope", 403)
            request[_TOKEN] = tok
        elif not (needed == "read" and (policy.read_auth == "open"
                                        or (policy.read_auth == "local" and _is_loopback(request)))):
            raise AuthError(f"this needs a token with the {needed} scope (Authorization: Bearer <token>; "
                            "edgefleet fleet token create)")
    return await handler(request)


def _num(request: web.Request, key: str, default: float, lo: float = -math.inf, hi: float = math.inf) -> float:
    raw = request.query.get(key)
    if raw is None or raw == "":
        return default
    try:
        val = float(raw)
    except ValueError:
        raise InputError(f"query parameter {key} must be a number, got {raw[:40]!r}") from None
    if not lo <= val <= hi or math.isnan(val):
        raise InputError(f"query parameter {key} must be in [{lo:g}, {hi:g}], got {raw[:40]!r}")
    return val


async def _run(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kw)


async def _big(request: web.Request, text: str, content_type: str) -> web.Response:
    """A large body (the device list, /metrics), gzipped at level 1 when the client accepts it.

    At 10,000 devices these are 4–10 MB of text that compress 8x in ~30 ms at level 1 (aiohttp's own compression
    uses the much slower default level); over a real network that is the difference between seconds and a blink.
    """
    body = text.encode()
    if len(body) > 64 * 1024 and "gzip" in request.headers.get("Accept-Encoding", ""):
        packed = await _run(gzip.compress, body, 1)
        return web.Response(body=packed, content_type=content_type, charset="utf-8",
                            headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
    return web.Response(body=body, content_type=content_type, charset="utf-8")


def _version_stats(v: VersionSketch) -> VersionStats:
    sk = v.sketch
    return VersionStats(name=v.name, version=v.version, count=v.count, errors=v.errors, p50=sk.quantile(0.5),
                        p95=sk.quantile(0.95), p99=sk.quantile(0.99), mean=sk.mean)


# -- REST -----------------------------------------------------------------------------------------------------------

async def index(request: web.Request) -> web.FileResponse:
    """The dashboard page."""
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def api_devices(request: web.Request) -> web.Response:
    """Every known device with status and latest window per model (``?full=1``: with status descriptions)."""
    since = _num(request, "changed_since", 0.0, 0.0)
    now = time.time()
    store, fleet = request.app[StoreKey], request.app[FleetKey]
    if request.query.get("full") in ("1", "true"):
        rows = await _run(store.devices, fleet, since)
        with prevalidated():  # rows the store read (validated when they came in): not validated again
            return _json(DeviceList(fleet=fleet, now=now, total=len(rows), devices=rows))
    limit = int(_num(request, "limit", -1, 1, 1e9)) if "limit" in request.query else None
    total, rows = await _run(store.devices_json, fleet, since, limit)
    # The rows arrive as JSON text from the store: splice them in rather than decode and re-encode 10,000 rows.
    return await _big(request, f'{{"fleet":{json.dumps(fleet)},"now":{now!r},"total":{total},"devices":{rows}}}',
                      "application/json")


async def api_device(request: web.Request) -> web.Response:
    """One device."""
    dev = await _run(request.app[StoreKey].device, request.app[FleetKey], request.match_info["device"])
    if dev is None:
        return _error(404, f"no device {request.match_info['device'][:64]!r}")
    return _json(dev)


async def api_telemetry(request: web.Request) -> web.Response:
    """Telemetry windows in a time range (device timestamps, seconds since the epoch)."""
    now = time.time()
    since = _num(request, "since", now - 3600, 0.0)
    until = _num(request, "until", math.inf, 0.0)
    if until < since:
        raise InputError(f"until ({until:g}) is before since ({since:g})")
    limit = int(_num(request, "limit", 5000, 1, 100_000))
    device = request.match_info.get("device") or request.query.get("device")
    rows = await _run(request.app[StoreKey].windows, request.app[FleetKey], device, since, until,
                      request.query.get("name"), request.query.get("version"), limit)
    with prevalidated():
        return _json(WindowList(since=since, until=None if math.isinf(until) else until, windows=rows))


async def api_versions(request: web.Request) -> web.Response:
    """Fleet-wide p50/p95/p99 per (model, version) from merged sketches over the last ``window`` seconds."""
    window = _num(request, "window", 900.0, 60.0, 30 * 86400.0)
    stats = await _run(request.app[StoreKey].version_stats, request.app[FleetKey], time.time() - window)
    return _json(VersionList(window_s=window, versions=[_version_stats(s) for s in stats]))


async def api_variants(request: web.Request) -> web.Response:
    """Which variant of each multi-variant bundle the devices pinned, per device class (``?name=`` one model)."""
    rows = await _run(request.app[StoreKey].devices, request.app[FleetKey], 0.0)
    return _json(VariantList(variants=variant_picks(rows, request.query.get("name"))))


def variant_picks(rows: Any, name: str | None = None) -> list[VariantPick]:
    """Count devices per (model, version, digest, profile, pinned variant) from their status descriptions."""
    picks: dict[tuple[str, str, str, str, str], list[str]] = {}
    for row in rows:
        desc = row.description
        if desc is None:
            continue
        for m in desc.models:
            if m.variant and (name is None or m.name == name):
                picks.setdefault((m.name, m.version, m.digest, row.profile, m.variant), []).append(row.device)
    out = [VariantPick(name=k[0], version=k[1], digest=k[2], profile=k[3], variant=k[4], devices=len(v),
                       examples=sorted(v)[:10]) for k, v in picks.items()]
    return sorted(out, key=lambda p: (p.name, p.version, p.profile, -p.devices, p.variant))


async def api_upload_capture(request: web.Request) -> web.Response:
    """One captured sample from a device (``.npz`` body, token with the ``capture`` scope), checked and kept."""
    cap = request.app[CapturesKey]
    limit = min(_MAX_CAPTURE_BYTES, request.app[PolicyKey].max_upload_bytes)
    if request.content_type != "application/octet-stream":
        raise web.HTTPUnsupportedMediaType(text=f"send the sample as application/octet-stream, got "
                                                f"{request.content_type[:60]!r}")
    if request.content_length is not None and request.content_length > limit:
        return _error(413, f"sample of {request.content_length} bytes is over the {limit}-byte limit", close=True)
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 20):
        size += len(chunk)
        if size > limit:
            return _error(413, f"sample is over the {limit}-byte limit", close=True)
        chunks.append(chunk)
    device, sample_id = request.query.get("device", ""), request.query.get("id", "")
    stored = await _run(cap.add, request.app[FleetKey], request.match_info["model"], request.match_info["version"],
                        device, sample_id, b"".join(chunks))
    return _json(CaptureStored(stored=stored), 201 if stored else 200)


async def api_captures(request: web.Request) -> web.Response:
    """Captured samples held, per model, version and device (``?model=`` one model)."""
    cap = request.app[CapturesKey]
    rows = await _run(cap.summaries, request.app[FleetKey], request.query.get("model"))
    return _json(CaptureList(captures=[CaptureRow(model=r.model, version=r.version, device=r.device, samples=r.samples,
                                                  bytes=r.bytes, first=r.first, last=r.last) for r in rows],
                             evicted=cap.evicted))


async def api_export_captures(request: web.Request) -> web.Response:
    """A model's captured inputs as one ``.npz`` keyed by input name (``package --calibration`` reads it)."""
    limit = int(_num(request, "limit", 10_000, 1, 1e6))
    data, n = await _run(request.app[CapturesKey].export, request.app[FleetKey], request.match_info["model"],
                         request.query.get("version") or None, limit)
    return web.Response(body=data, content_type="application/octet-stream",
                        headers={"X-Edgefleet-Samples": str(n)})


async def api_events(request: web.Request) -> web.Response:
    """Recent events (``since`` is the controller's receive time)."""
    since = _num(request, "since", 0.0, 0.0)
    rows = await _run(request.app[StoreKey].events, request.app[FleetKey], request.query.get("device"), since,
                      int(_num(request, "limit", 200, 1, 5000)))
    with prevalidated():
        return _json(EventList(events=rows))


async def api_ingest(request: web.Request) -> web.Response:
    """This controller's ingest counters and the store's row counts (``?store=0``: without them, since counting rows
    reads whole tables: for a poller that only wants the counters)."""
    ing = request.app[IngestKey]
    with_counts = request.query.get("store") not in ("0", "false")
    counts = await _run(request.app[StoreKey].counts, request.app[FleetKey]) if with_counts else {}
    snap = ing.stats.snapshot()
    return _json(IngestCounters(client_id=ing.client_id, connected=ing.connected, backlog=ing.backlog,
                                received=snap["received"], stored=snap["stored"], duplicates=snap["duplicates"],
                                rejected=[Rejected(**r) for r in snap["rejected"]],
                                rejected_total=snap["rejected_total"], batches=snap["batches"],
                                receipts=snap["receipts"], write_errors=snap["write_errors"], store=counts))


async def api_deployments(request: web.Request) -> web.Response:
    """Deployments, newest first."""
    limit = int(_num(request, "limit", 100, 1, 10_000))
    deps = await _run(request.app[StoreKey].deployments, request.app[FleetKey], limit)
    with prevalidated():
        return _json(DeploymentList(deployments=deps))


async def api_deployment(request: web.Request) -> web.Response:
    """One deployment with every target."""
    dep = await _run(request.app[StoreKey].deployment, request.match_info["id"])
    if dep is None or dep.fleet != request.app[FleetKey]:
        return _error(404, f"no deployment {request.match_info['id'][:64]!r}")
    return _json(dep)


async def _body(request: web.Request) -> bytes:
    """A JSON request body: ``application/json`` only (415), at most ``max_json_bytes`` (413 before reading when
    the length is declared, else cut off at the limit by aiohttp's ``client_max_size``)."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text=f"request body must be application/json, got "
                                                f"{request.content_type[:60]!r}")
    limit = request.app[PolicyKey].max_json_bytes
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length,
                                            text=f"body of {request.content_length} bytes is over the {limit}-byte "
                                                 "limit")
    return await request.read()


async def api_create_deployment(request: web.Request) -> web.Response:
    """Create a deployment (:class:`DeploymentRequest`: bundle ids, a selector, the rollout policy)."""
    req = DeploymentRequest.from_json(await _body(request))
    selector = Selector.parse(req.selectors())
    dep = await _run(request.app[DeployerKey].create, req.bundles, selector, req.policy(), urls=req.urls)
    request.app[HubKey].poke()
    return _json(dep, 201)


async def api_rollback(request: web.Request) -> web.Response:
    """Roll back a deployment's active devices (optionally only ``{"devices": [...]}``)."""
    raw = await _body(request) if request.can_read_body else b""
    req = RollbackRequest.from_json(raw) if raw.strip() else RollbackRequest()
    sent = await _run(request.app[DeployerKey].rollback, request.match_info["id"], req.devices)
    return _json(RollbackSent(deployment=request.match_info["id"], rollback_sent=sent))


async def api_upload_bundle(request: web.Request) -> web.Response:
    """Upload a bundle (raw body, ``application/octet-stream``), streamed to disk and verified with the controller's
    trusted keys before it is kept."""
    library = request.app[DeployerKey].library
    limit = request.app[PolicyKey].max_upload_bytes
    if request.content_type != "application/octet-stream":
        raise web.HTTPUnsupportedMediaType(text=f"send the bundle as application/octet-stream, got "
                                                f"{request.content_type[:60]!r}")
    if request.content_length is not None and request.content_length > limit:
        return _error(413, f"bundle of {request.content_length} bytes is over the {limit}-byte limit "
                           "(fleet serve --max-upload)", close=True)
    fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".efb", dir=library.root)
    try:
        size = 0
        with os.fdopen(fd, "wb") as fh:
            async for chunk in request.content.iter_chunked(1 << 20):
                size += len(chunk)
                if size > limit:
                    return _error(413, f"bundle is over the {limit}-byte limit (fleet serve --max-upload)",
                                  close=True)
                fh.write(chunk)
        if size == 0:
            raise InputError("empty upload: send the bundle file as the request body")
        stored = await _run(library.add, tmp, "uploaded bundle")
    finally:
        Path(tmp).unlink(missing_ok=True)
    return _json(BundleUploaded(**{**stored.to_dict(), "url": f"/bundles/{bundle_filename(stored.sha256)}"}), 201)


def _command_status(store: Store, cmd_id: str) -> CommandStatus | None:
    tc = store.tracked_command(cmd_id)
    if tc is None:
        return None
    reply = store.reply(cmd_id) if tc.replied else None
    state: Literal["pending", "replied", "expired"] = (
        "replied" if reply is not None else ("expired" if time.time() > tc.expires else "pending"))
    c = tc.command
    return CommandStatus(id=c.id, device=tc.device, kind=c.kind, args=c.args, created=tc.created, expires=tc.expires,
                         sent=tc.sent, sends=tc.sends, state=state, reply=reply)


async def api_send_command(request: web.Request) -> web.Response:
    """Send one command to one device (:class:`CommandRequest`); it is resent until answered or expired. 202 with
    its :class:`CommandStatus`."""
    device = check_id("device", request.match_info["device"])
    req = CommandRequest.from_json(await _body(request))
    tok = request[_TOKEN]
    needed = _COMMAND_SCOPES[req.kind]
    if tok is None or not allows(tok.scope, needed):
        raise AuthError(f"a {req.kind} command needs the {needed} scope", 403)
    store, commander = request.app[StoreKey], request.app[CommanderKey]
    if await _run(store.device, request.app[FleetKey], device) is None:
        return _error(404, f"no device {device!r} in fleet {request.app[FleetKey]!r}")
    cmd = commander.new(req.kind, req.args)  # validates the args of this kind
    await _run(commander.send, device, cmd)
    return _json(await _run(_command_status, store, cmd.id), 202)


async def api_command(request: web.Request) -> web.Response:
    """A command sent through the API or by a rollout: its sends, state and reply."""
    st = await _run(_command_status, request.app[StoreKey], request.match_info["id"][:64])
    if st is None:
        return _error(404, f"no command {request.match_info['id'][:64]!r}")
    return _json(st)


async def api_tokens(request: web.Request) -> web.Response:
    """The API tokens (admin): names, scopes, expiry — never a secret."""
    toks = await _run(request.app[StoreKey].tokens)
    return _json(ApiTokenList(tokens=[ApiTokenInfo(id=t.id, name=t.name, scope=t.scope, fleet=t.fleet,
                                                   created=t.created, expires=t.expires) for t in toks]))


async def bundle_file(request: web.Request) -> web.StreamResponse:
    """A stored bundle by content hash, with HTTP Range support (agents resume interrupted downloads)."""
    name = request.match_info["name"]
    if not name.endswith(".efb"):
        return _error(404, "bundles are served as <sha256>.efb")
    path = request.app[DeployerKey].library.path(name[:-4])
    if not path.exists():
        return _error(404, f"no bundle {name[:16]}…")
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream",
                                           "Cache-Control": "public, max-age=31536000, immutable"})


# -- /metrics -------------------------------------------------------------------------------------------------------

def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**kv: Any) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kv.items()) + "}"


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NaN"
    return repr(float(v))


def _count(v: float) -> str:
    """A counter from a floating-point total: an integer while it is exact (below 2^53), else the float."""
    return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


def metrics_text(fleet: str, devices: list[DeviceRow], versions: list[VersionSketch], totals: list[VersionTotal],
                 ingest: dict[str, Any], backlog: int, *, now: float | None = None,
                 stale_after_s: float = 3600.0) -> str:
    """The Prometheus text exposition (format 0.0.4) of the fleet: base units (seconds, bytes, ratios), ``_total``
    counters, summaries with ``quantile`` (plus ``_sum``/``_count`` where a cumulative total exists), HELP and TYPE
    once per family. A device not heard from (no status or telemetry) for ``stale_after_s`` is left out altogether;
    an offline device keeps only its ``edgefleet_device_up`` 0 and last-seen time, no live figures."""
    now = time.time() if now is None else now
    out: list[str] = []

    def family(name: str, kind: str, help_: str) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")

    def s(ms: float | None) -> float | None:
        return None if ms is None else ms / 1000.0

    known = [d for d in devices if d.updated >= now - stale_after_s]
    live = [d for d in known if d.state == "online"]
    family("edgefleet_device_up", "gauge", "1 while the device is online (retained status online and heard from "
           "within the controller's --offline-after), else 0.")
    for d in known:
        out.append(f"edgefleet_device_up{_labels(fleet=fleet, device=d.device, profile=d.profile)} "
                   f"{1 if d.state == 'online' else 0}")
    family("edgefleet_devices", "gauge", "Devices per state (online, offline, unknown) among those heard from within "
           "the controller's --metrics-stale-after.")
    for st in ("online", "offline", "unknown"):
        out.append(f"edgefleet_devices{_labels(fleet=fleet, state=st)} {sum(d.state == st for d in known)}")
    family("edgefleet_device_last_seen_timestamp_seconds", "gauge", "When the controller last stored telemetry "
           "from the device (Unix time).")
    for d in known:
        if d.last_seen:
            out.append(f"edgefleet_device_last_seen_timestamp_seconds{_labels(fleet=fleet, device=d.device)} "
                       f"{_fmt(d.last_seen)}")
    per_model = [(d, m) for d in live for m in d.models]
    family("edgefleet_device_latency_seconds", "summary", "Inference latency quantiles over the device's latest "
           "telemetry window (online devices only).")
    for d, m in per_model:
        for q, val in (("0.5", m.p50), ("0.95", m.p95), ("0.99", m.p99)):
            out.append("edgefleet_device_latency_seconds" + _labels(fleet=fleet, device=d.device, model=m.name,
                       version=m.version, quantile=q) + f" {_fmt(s(val))}")
    family("edgefleet_device_throughput_requests_per_second", "gauge", "Requests per second over the device's "
           "latest telemetry window (online devices only).")
    for d, m in per_model:
        out.append("edgefleet_device_throughput_requests_per_second" + _labels(
            fleet=fleet, device=d.device, model=m.name, version=m.version) + f" {_fmt(m.throughput)}")
    family("edgefleet_device_window_errors", "gauge", "Failed requests in the device's latest telemetry window "
           "(online devices only).")
    for d, m in per_model:
        out.append("edgefleet_device_window_errors" + _labels(fleet=fleet, device=d.device, model=m.name,
                   version=m.version) + f" {m.errors}")
    family("edgefleet_device_process_resident_memory_bytes", "gauge", "Agent process resident memory "
           "(online devices only).")
    for d in live:
        if d.process.rss_bytes is not None:
            out.append(f"edgefleet_device_process_resident_memory_bytes{_labels(fleet=fleet, device=d.device)} "
                       f"{_fmt(d.process.rss_bytes)}")
    family("edgefleet_device_process_cpu_usage_ratio", "gauge", "Agent process CPU use, 1 = one core busy "
           "(online devices only).")
    for d in live:
        if d.process.cpu_percent is not None:
            out.append(f"edgefleet_device_process_cpu_usage_ratio{_labels(fleet=fleet, device=d.device)} "
                       f"{_fmt(d.process.cpu_percent / 100.0)}")
    family("edgefleet_model_latency_seconds", "summary", "Fleet-wide inference latency per model version: quantiles "
           "from merged sketches over the last 5 minutes; _count and _sum over all stored telemetry (retention "
           "lowers them: read as a counter reset).")
    for v in versions:
        sk: DDSketch = v.sketch
        lbl = dict(fleet=fleet, model=v.name, version=v.version)
        for quant in (0.5, 0.9, 0.95, 0.99):
            out.append(f"edgefleet_model_latency_seconds{_labels(**lbl, quantile=quant)} "
                       f"{_fmt(s(sk.quantile(quant)))}")
    tot = sorted(totals, key=lambda t: (t.name, t.version))
    for t in tot:
        lbl = dict(fleet=fleet, model=t.name, version=t.version)
        out.append(f"edgefleet_model_latency_seconds_count{_labels(**lbl)} {_count(t.count)}")
        out.append(f"edgefleet_model_latency_seconds_sum{_labels(**lbl)} {_fmt(t.sum_ms / 1000.0)}")
    family("edgefleet_model_errors_total", "counter", "Failed requests per model version, all stored telemetry.")
    for t in tot:
        out.append(f"edgefleet_model_errors_total{_labels(fleet=fleet, model=t.name, version=t.version)} "
                   f"{_count(t.errors)}")
    family("edgefleet_ingest_received_total", "counter", "MQTT messages this controller received, per channel.")
    for ch, n in sorted(ingest["received"].items()):
        out.append(f"edgefleet_ingest_received_total{_labels(channel=ch)} {n}")
    family("edgefleet_ingest_stored_total", "counter", "New rows this controller stored, per channel.")
    for ch, n in sorted(ingest["stored"].items()):
        out.append(f"edgefleet_ingest_stored_total{_labels(channel=ch)} {n}")
    family("edgefleet_ingest_duplicates_total", "counter", "Replayed messages ignored (de-duplicated), per channel.")
    for ch, n in sorted(ingest["duplicates"].items()):
        out.append(f"edgefleet_ingest_duplicates_total{_labels(channel=ch)} {n}")
    family("edgefleet_ingest_rejected_total", "counter", "Malformed, oversized or unknown-version payloads dropped.")
    for r in ingest["rejected"]:
        out.append(f"edgefleet_ingest_rejected_total{_labels(channel=r['channel'], reason=r['reason'])} {r['count']}")
    family("edgefleet_ingest_receipts_total", "counter", "Receipts published to agents (what of theirs is stored).")
    out.append(f"edgefleet_ingest_receipts_total {ingest.get('receipts', 0)}")
    family("edgefleet_ingest_backlog_messages", "gauge", "Messages received but not yet written.")
    out.append(f"edgefleet_ingest_backlog_messages {backlog}")
    return "\n".join(out) + "\n"


async def metrics(request: web.Request) -> web.Response:
    """Prometheus scrape endpoint."""
    store, fleet, ing = request.app[StoreKey], request.app[FleetKey], request.app[IngestKey]
    stale = request.app[LivenessKey].metrics_stale_after_s

    def build() -> str:
        now = time.time()
        return metrics_text(fleet, store.devices(fleet, full=False), store.version_stats(fleet, now - 300),
                            store.version_totals(fleet), ing.stats.snapshot(), ing.backlog, now=now,
                            stale_after_s=stale)

    resp = await _big(request, await _run(build), "text/plain")
    resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"  # the exposition format's own type
    return resp


# -- server-sent events ---------------------------------------------------------------------------------------------

class _Hub:
    """Polls the store once a second and fans changes out to SSE clients (works with several controllers)."""

    def __init__(self, store: Store, fleet: str, period_s: float = 1.0) -> None:
        self.store = store
        self.fleet = fleet
        self.period_s = period_s
        self.clients: set[asyncio.Queue[tuple[str, str]]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def poke(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        since = time.time()
        dep_sig = ""
        ev_since = since
        sent_events: dict[tuple[str, str, int], float] = {}
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.period_s)
            self._wake.clear()
            if not self.clients:
                since = ev_since = time.time()
                continue
            try:
                now = time.time()
                n, rows = await _run(self.store.devices_json, self.fleet, since - 2.0)
                # Re-read a 2 s overlap: a row committed by another controller just before `since` is not missed.
                since = now
                if n > _SSE_MAX_ROWS:
                    self._send("refresh", json.dumps({"changed": n}))
                elif n:
                    self._send("devices", f'{{"now":{now!r},"devices":{rows}}}')
                deps = await _run(self.store.deployments, self.fleet, 20)
                sig = json.dumps([(d.id, d.state, d.progress, d.updated) for d in deps])
                if sig != dep_sig:
                    dep_sig = sig
                    with prevalidated():
                        self._send("deployments", _encode(DeploymentList(deployments=deps)).decode())
                # Same 2 s overlap as for devices (another controller may commit a little late); what was already
                # sent is skipped by its key.
                evs = await _run(self.store.events, self.fleet, None, ev_since - 2.0, 200)
                fresh: list[EventRow] = [e for e in evs if (e.device, e.boot, e.seq) not in sent_events]
                if fresh:
                    ev_since = max(ev_since, evs[-1].received)
                    sent_events.update({(e.device, e.boot, e.seq): e.received for e in fresh})
                    # Only keys inside the overlap can come again: forget the rest.
                    sent_events = {k: r for k, r in sent_events.items() if r >= ev_since - 2.0}
                    with prevalidated():
                        self._send("events", _encode(EventList(events=fresh)).decode())
            except Exception:
                log.exception("live update poll failed")

    def _send(self, kind: str, data: str) -> None:
        for q in list(self.clients):
            if q.qsize() > 50:  # a stalled browser tab: drop its backlog and tell it to refetch
                while not q.empty():
                    q.get_nowait()
                q.put_nowait(("refresh", "{}"))
            else:
                q.put_nowait((kind, data))


async def stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``devices`` (changed rows), ``refresh``, ``deployments``, ``events``."""
    hub = request.app[HubKey]
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    q: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    hub.clients.add(q)
    hub.poke()
    try:
        await resp.write(b"retry: 2000\n: connected\n\n")
        while True:
            try:
                kind, data = await asyncio.wait_for(q.get(), 15.0)
                await resp.write(f"event: {kind}\ndata: {data}\n\n".encode())
            except asyncio.TimeoutError:
                await resp.write(b": keepalive\n\n")
    except ConnectionResetError:
        pass  # the browser went away
    finally:
        hub.clients.discard(q)
    return resp


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    hub = app[HubKey]
    task = asyncio.create_task(hub.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def make_app(store: Store, fleet: str, deployer: Deployer, ingest: Ingestor, commander: Commander,
             policy: HttpPolicy | None = None, liveness: Liveness | None = None,
             captures: CaptureStore | None = None) -> web.Application:
    """The aiohttp application of one controller."""
    policy = policy or HttpPolicy()
    liveness = liveness or Liveness()
    app = web.Application(middlewares=[_errors, _guard], client_max_size=policy.max_json_bytes)
    app[StoreKey] = store
    app[FleetKey] = fleet
    app[DeployerKey] = deployer
    app[IngestKey] = ingest
    app[CommanderKey] = commander
    app[PolicyKey] = policy
    app[LivenessKey] = liveness
    app[CapturesKey] = captures or CaptureStore(deployer.library.root.parent / "edgefleet-captures")
    app[HubKey] = _Hub(store, fleet)
    app.cleanup_ctx.append(_hub_ctx)
    r = app.router
    r.add_get("/", index)
    r.add_static("/static/", STATIC, append_version=False)
    r.add_get("/api/devices", api_devices)
    r.add_get("/api/devices/{device}", api_device)
    r.add_get("/api/devices/{device}/telemetry", api_telemetry)
    r.add_get("/api/telemetry", api_telemetry)
    r.add_get("/api/versions", api_versions)
    r.add_get("/api/events", api_events)
    r.add_get("/api/variants", api_variants)
    r.add_get("/api/captures", api_captures)
    r.add_post("/api/captures/{model}/{version}", api_upload_capture)
    r.add_get("/api/captures/{model}/export", api_export_captures)
    r.add_get("/api/ingest", api_ingest)
    r.add_get("/api/deployments", api_deployments)
    r.add_post("/api/deployments", api_create_deployment)
    r.add_get("/api/deployments/{id}", api_deployment)
    r.add_post("/api/deployments/{id}/rollback", api_rollback)
    r.add_post("/api/bundles", api_upload_bundle)
    r.add_post("/api/devices/{device}/commands", api_send_command)
    r.add_get("/api/commands/{id}", api_command)
    r.add_get("/api/tokens", api_tokens)
    r.add_get("/api/stream", stream)
    r.add_get("/bundles/{name}", bundle_file)
    r.add_get("/metrics", metrics)
    return app
