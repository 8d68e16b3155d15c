"""The local inference API: the Open Inference Protocol (KServe v2) REST as Triton and OVMS serve it, and /metrics.

KServe v2: server live/ready/metadata, model ready/metadata, ``infer`` (JSON and the binary tensor extension both
ways, BYTES tensors, classification). Triton's extensions: ``model_configuration`` (``/config``, derived from the
bundle manifest), ``model_repository`` (index/load/unload over the installed bundles; control endpoints are local-only
or need ``api.admin_token_file``'s bearer token, and refuse browser requests), ``statistics`` (``/stats``),
``logging`` (``/v2/logging``: the agent's log level). Shared memory and trace answer 400 with the reason. gzip/deflate
request bodies and responses (``Content-Encoding`` / ``Accept-Encoding``). Prometheus ``/metrics`` on the same port.

Limits, each from ``[api]`` and each counted when it refuses something (``edgefleet_http_limit_rejections_total``):
connections, head and body read timeouts and sizes (:mod:`.httpd`); ``max_requests`` inference/load requests at once
(503 with ``Retry-After``); ``max_inflight_bytes`` of request bodies and decoded JSON tensors held at once (requests
wait for room within their deadline; a request that could never fit gets 413); ``request_timeout_s`` per request
(504; a run that ignores ``terminate`` is abandoned and its session recycled, :mod:`.serving`).

Client mistakes are 4xx with ``{"error": "..."}``; only a failure inside ONNX Runtime is a 500.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.sdk.errors import ConfigError, EdgefleetError, ModelError

from . import kserve
from .config import ApiConfig
from .httpd import HttpError, HttpServer, Limits, Request, Response, json_response
from .metrics import HTTP_LIMITS, Exposition, ModelStats, Stats, model_families, process_families
from .registry import Registry
from .serving import Runner

if TYPE_CHECKING:
    from edgefleet.sdk.runtime import Model

    from .repository import Repository

__all__ = ["KSERVE_DATATYPES", "ApiServer", "HttpError", "ListenError"]

log = logging.getLogger("edgefleet.agent.api")

KSERVE_DATATYPES = kserve.KSERVE_DATATYPES
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository",
              "model_repository(unload_dependents)", "statistics", "logging"]
# json.loads + np.asarray of 1M values peaked at 37 (0.5), 44 (ints) and 53 (random floats) bytes per value
_JSON_BYTES_PER_VALUE = 56
_SMALL_BODY = 1 << 16


class ListenError(ConfigError):
    """The API cannot listen on its address (port busy, address not local, no permission)."""

    code = "config.listen"


class _Budget:
    """Requests in progress and the body/decode bytes they hold, both capped."""

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        self._cond = threading.Condition()

    def enter(self) -> bool:
        with self._cond:
            if self.requests >= self.max_requests:
                return False
            self.requests += 1
            return True

    def leave(self) -> None:
        with self._cond:
            self.requests -= 1

    def reserve(self, n: int, deadline: float) -> bool:
        """Hold ``n`` bytes, waiting for room until ``deadline``; False if none came."""
        with self._cond:
            while self.bytes + n > self.max_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self.bytes += n
            return True

    def release(self, n: int) -> None:
        if n:
            with self._cond:
                self.bytes -= n
                self._cond.notify_all()


def _is_loopback(peer: Any) -> bool:
    try:
        ip = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except (ValueError, IndexError, TypeError):
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _failure_reason(status: int) -> str:
    return {503: "UNAVAILABLE", 504: "TIMEOUT"}.get(status, "REJECTED" if status < 500 else "BACKEND")



class ApiServer:
    """The local API: KServe v2 + Triton extensions + /metrics, on one port, in background threads."""

    def __init__(self, host: str, port: int, registry: Registry, max_body: int | None = None, *,
                 config: ApiConfig | None = None, repository: Repository | None = None,
                 on_event: Callable[[str, str, Mapping[str, Any]], None] | None = None,
                 status: Callable[[], Mapping[str, Any]] | None = None, device: str = "",
                 capture: Any = None) -> None:
        cfg = config or ApiConfig()
        if max_body is not None:
            cfg = replace(cfg, max_body_bytes=max_body, max_inflight_bytes=max(cfg.max_inflight_bytes, max_body))
        self.cfg = cfg
        self.registry = registry
        self.repository = repository
        self.device = device
        self.capture = capture  # agent/capture.py CaptureRing, or None (capture off)
        self._status = status
        self.stats = Stats()
        self.started = time.time()
        self._lock = threading.Lock()
        self.rejections = dict.fromkeys(HTTP_LIMITS, 0)
        self.responses: dict[int, int] = {}
        self.budget = _Budget(cfg.max_requests, cfg.max_inflight_bytes)
        self.token = Path(cfg.admin_token_file).read_text(encoding="utf-8").strip() if cfg.admin_token_file else ""
        self.runner = Runner(registry, instances=cfg.instances, terminate_grace_s=cfg.terminate_grace_s,
                             reopen=repository.reopen if repository is not None else None, on_event=on_event)
        limits = Limits(max_connections=cfg.max_connections, max_body_bytes=cfg.max_body_bytes,
                        header_timeout_s=cfg.header_timeout_s, body_timeout_s=cfg.body_timeout_s,
                        idle_timeout_s=cfg.idle_timeout_s)
        try:
            self.http = HttpServer(host, port, self._handle, limits, on_rejection=self._count_rejection)
        except OSError as exc:
            self.runner.stop()
            raise ListenError(f"api.listen: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self.http.port)

    @property
    def host(self) -> str:
        """The bound host."""
        return str(self.http.host)

    def start(self) -> None:
        """Serve in the background."""
        self.http.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop accepting, let requests in progress finish (up to ``timeout``), close; True if all did."""
        done = self.http.stop(timeout)
        self.runner.stop()
        return done

    # -- counters -----------------------------------------------------------------------------------------------------

    def _count_rejection(self, limit: str) -> None:
        with self._lock:
            self.rejections[limit] = self.rejections.get(limit, 0) + 1

    # -- routing ------------------------------------------------------------------------------------------------------

    def _handle(self, req: Request) -> Response:
        try:
            resp = self._route(req)
        except HttpError as exc:
            with self._lock:
                self.responses[exc.status] = self.responses.get(exc.status, 0) + 1
            raise
        with self._lock:
            self.responses[resp.status] = self.responses.get(resp.status, 0) + 1
        return resp

    def _route(self, req: Request) -> Response:
        seg = req.segments
        method = "GET" if req.method == "HEAD" else req.method
        if seg == ["metrics"]:
            self._methods(method, "GET")
            return Response(200, self.metrics_text().encode("utf-8"), content_type=Exposition.CONTENT_TYPE,
                            compressible=True)
        if not seg or seg[0] != "v2":
            raise HttpError(404, f"no route {req.path[:200]!r}: this is the Open Inference Protocol under /v2, and "
                                 "Prometheus metrics under /metrics")
        rest = seg[1:]
        if rest == []:
            self._methods(method, "GET")
            from edgefleet.sdk import __version__

            return json_response({"name": "edgefleet-agent", "version": __version__, "extensions": EXTENSIONS})
        if rest == ["health", "live"]:
            self._methods(method, "GET")
            return json_response({"live": True})
        if rest == ["health", "ready"]:
            self._methods(method, "GET")
            ready = self.registry.ready.is_set() and not self.http.stopping
            return json_response({"ready": ready}, 200 if ready else 503)
        if rest == ["models", "stats"]:
            self._methods(method, "GET")
            return self._stats(None, None)
        if rest[:1] == ["models"] and len(rest) >= 2:
            return self._model_route(req, method, rest[1], rest[2:])
        if rest == ["repository", "index"]:
            self._methods(method, "POST")
            return self._repo_index(req)
        if rest[:2] == ["repository", "models"] and len(rest) == 4 and rest[3] in ("load", "unload"):
            self._methods(method, "POST")
            return self._repo_control(req, rest[2], rest[3])
        if rest == ["logging"]:
            self._methods(method, "GET", "POST")
            return self._logging(req, method)
        if rest == ["trace", "setting"]:
            self._methods(method, "GET", "POST")
            raise HttpError(400, "the trace extension is not supported by the edgefleet agent; per-model timings are "
                                 "in /v2/models/stats and /metrics")
        if rest[:1] in (["systemsharedmemory"], ["cudasharedmemory"]):
            kind = "CUDA" if rest[0] == "cudasharedmemory" else "system"
            raise HttpError(400, f"the {kind} shared-memory extension is not supported by the edgefleet agent: send "
                                 "tensors in the request body (the binary tensor extension avoids JSON encoding)")
        raise HttpError(404, f"no route {req.path[:200]!r}")

    @staticmethod
    def _methods(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise HttpError(405, f"method {method} is not allowed here (use {' or '.join(allowed)})",
                            [("Allow", ", ".join((*allowed, "HEAD") if "GET" in allowed else allowed))])

    def _model_route(self, req: Request, method: str, name: str, tail: list[str]) -> Response:
        version = None
        if tail[:1] == ["versions"]:
            if len(tail) < 2:
                raise HttpError(404, f"no route {req.path[:200]!r}: a version follows /versions/")
            version, tail = tail[1], tail[2:]
        if tail == ["stats"]:
            self._methods(method, "GET")
            return self._stats(name, version)
        if tail == ["trace", "setting"]:
            self._methods(method, "GET", "POST")
            raise HttpError(400, "the trace extension is not supported by the edgefleet agent; per-model timings are "
                                 "in /v2/models/stats and /metrics")
        if tail not in ([], ["ready"], ["config"], ["infer"]):
            raise HttpError(404, f"no route {req.path[:200]!r}")
        if tail == ["infer"]:
            self._methods(method, "POST")
            picked = self.registry.pick(name, version)  # a canary's traffic split (agent/registry.py)
            return self._infer(req, picked if picked is not None and (version is None or picked.version == version)
                               else self._model(name, version))
        model = self._model(name, version)
        self._methods(method, "GET")
        if tail == ["ready"]:
            why = self.runner.available(name, model)
            if why is not None:
                raise HttpError(400, why)
            return json_response({"name": model.name, "version": model.version, "ready": True})
        if tail == ["config"]:
            return json_response(kserve.model_config(model, self.cfg.instances))
        return json_response(kserve.model_metadata(model))

    def _model(self, name: str, version: str | None) -> Model:
        model = self.registry.get(name)
        if model is None:
            served = [n for n, _ in self.registry.items()]
            raise HttpError(404, f"unknown model {name!r}; serving {served}")
        if version is not None and version != model.version:
            raise HttpError(404, f"model {name!r} version {version!r} is not served (serving {model.version})")
        return model

    # -- inference ----------------------------------------------------------------------------------------------------

    def _infer(self, req: Request, model: Model) -> Response:
        cfg = self.cfg
        stats = self.stats.get(model.name, model.version)
        stats.begin()
        if not self.budget.enter():
            self._count_rejection("requests")
            stats.failure("UNAVAILABLE", 0)
            raise HttpError(503, f"{cfg.max_requests} requests are in progress (api.max_requests); retry later",
                            [("Retry-After", "1")])
        held = [0]
        try:
            return self._infer_held(req, model, stats, held)
        finally:
            # every buffer of the request is gone by now (the body too): only then is its room given back
            req.discard_body()
            self.budget.release(held[0])
            self.budget.leave()

    def _infer_held(self, req: Request, model: Model, stats: ModelStats, held: list[int]) -> Response:
        cfg = self.cfg
        t0 = time.perf_counter_ns()
        try:
            declared = req.content_length
            if declared is not None and declared > cfg.max_body_bytes:
                req.read_body()  # refuses with 413 before reading a byte of it, and counts it
            # A chunked or compressed body's size is known only once read: hold the cap for it meanwhile.
            need = cfg.max_body_bytes if declared is None or "content-encoding" in req.headers else declared
            if not self._reserve(need, time.monotonic() + cfg.request_timeout_s, "request body"):
                raise HttpError(503, f"no room for a {need}-byte body within the request deadline: "
                                     f"{cfg.max_inflight_bytes} bytes of requests are in progress "
                                     "(api.max_inflight_bytes); retry later", [("Retry-After", "1")])
            held[0] = need
            body = req.read_body()
            if len(body) < held[0]:
                self.budget.release(held[0] - len(body))
                held[0] = len(body)
            # The deadline runs from the whole body received (a slow upload is body_timeout_s's business).
            deadline = time.monotonic() + cfg.request_timeout_s
            hl_s = req.header("inference-header-content-length")
            if hl_s is not None and not (hl_s.isascii() and hl_s.isdigit()):
                raise HttpError(400, f"Inference-Header-Content-Length must be an integer, got {hl_s[:40]!r}")
            hl = int(hl_s) if hl_s is not None else None
            t0 = time.perf_counter_ns()
            # Decoding JSON tensors costs far more than their text: room for it before json.loads.
            head_len = hl if hl is not None and hl <= len(body) else len(body)
            extra = body.count(b",", 0, head_len) * _JSON_BYTES_PER_VALUE if head_len > _SMALL_BODY else 0
            if extra:
                if held[0] + extra > cfg.max_inflight_bytes:
                    self._count_rejection("memory")
                    raise HttpError(413, f"JSON tensors of about {extra // _JSON_BYTES_PER_VALUE} values need about "
                                         f"{(held[0] + extra) >> 20} MiB to decode, over api.max_inflight_bytes "
                                         f"({cfg.max_inflight_bytes >> 20} MiB): send them with the binary tensor "
                                         "extension (tritonclient's default)")
                if not self._reserve(extra, deadline, "JSON decoding"):
                    raise HttpError(503, "no room to decode the JSON tensors within the request deadline "
                                         "(api.max_inflight_bytes); retry later", [("Retry-After", "1")])
                held[0] += extra
            decoded = kserve.decode_request(model, body, hl)
            del body
            if decoded.timeout_us is not None:  # the client's own deadline (tritonclient's timeout=, in µs)
                deadline = min(deadline, time.monotonic() + decoded.timeout_us / 1e6)
            t_in = time.perf_counter_ns()
            try:
                outputs, queue_ns, infer_ns = self.runner.run(model.name, model, decoded.inputs, deadline, req)
            except EdgefleetError as exc:
                if isinstance(exc, (HttpError, ModelError)):
                    raise
                raise HttpError(400, str(exc)) from None  # InputError: dtype, rank or dims
            if self.capture is not None:
                self.capture.offer(model.name, model.version, decoded.inputs, outputs)
            t_out = time.perf_counter_ns()
            payload, header_len = kserve.encode_response(model, outputs, decoded)
            t_end = time.perf_counter_ns()
        except HttpError as exc:
            if exc.status == 504:
                self._count_rejection("deadline")
            stats.failure(_failure_reason(exc.status), time.perf_counter_ns() - t0)
            raise
        except ModelError as exc:
            stats.failure("BACKEND", time.perf_counter_ns() - t0)
            raise HttpError(500, str(exc)) from None
        stats.success(queue_ns, t_in - t0, infer_ns, t_end - t_out, t_end - t0)
        if header_len is None:
            return Response(200, payload, compressible=True)
        return Response(200, payload, content_type="application/octet-stream", compressible=True,
                        headers=[("Inference-Header-Content-Length", str(header_len))])

    def _reserve(self, n: int, deadline: float, what: str) -> bool:
        if n > self.cfg.max_inflight_bytes:
            self._count_rejection("memory")
            raise HttpError(413, f"{what} of {n} bytes is over api.max_inflight_bytes ({self.cfg.max_inflight_bytes})")
        if self.budget.reserve(n, deadline):
            return True
        self._count_rejection("memory")
        return False

    # -- statistics and metrics ---------------------------------------------------------------------------------------

    def _keep_stats(self) -> None:
        keep = {(n, m.version) for n, m in self.registry.items()}
        if self.repository is not None:
            keep |= {(e["name"], e["version"]) for e in self.repository.index()}
        self.stats.prune(keep)

    def _stats(self, name: str | None, version: str | None) -> Response:
        self._keep_stats()
        if name is not None and self.registry.get(name) is None and not self.stats.select(name):
            raise HttpError(404, f"unknown model {name!r}; serving {[n for n, _ in self.registry.items()]}")
        for n, m in self.registry.items():  # served models appear even before their first request
            if (name is None or n == name) and (version is None or m.version == version):
                self.stats.get(n, m.version)
        found = self.stats.select(name, version)
        if version is not None and not found:
            raise HttpError(404, f"no statistics for model {name!r} version {version!r}")
        return json_response({"model_stats": [st.to_triton() for st in found]})

    def metrics_text(self) -> str:
        """The Prometheus exposition of the agent."""
        from edgefleet.sdk import __version__

        self._keep_stats()
        served = self.registry.items()
        for n, m in served:
            self.stats.get(n, m.version)
        out = Exposition()
        out.family("edgefleet_agent_info", "gauge", "The agent: version and device id (value 1).",
                   [({"version": __version__, "device": self.device}, 1)])
        out.family("edgefleet_agent_start_time_seconds", "gauge", "Unix time the agent's API started.", self.started)
        ready = [({"model": n, "version": m.version}, 0 if self.runner.available(n, m) else 1) for n, m in served]
        if self.repository is not None:
            ready += [({"model": e["name"], "version": e["version"]}, 0) for e in self.repository.index()
                      if e["state"] != "READY"]
        out.family("edgefleet_model_ready", "gauge",
                   "1 if the model version serves requests; 0 if installed but not serving (unloaded, previous "
                   "bundle, hung).", ready)
        model_families(out, self.stats.select())
        hung = self.runner.hung_runs()
        names = sorted({n for n, _ in served} | set(hung) | set(self.runner.recycles))
        out.family("edgefleet_model_hung_runs", "gauge",
                   "Runs still inside ONNX Runtime after their deadline and terminate (their sessions abandoned).",
                   [({"model": n}, hung.get(n, 0)) for n in names])
        out.family("edgefleet_model_session_recycles_total", "counter",
                   "Sessions replaced by a fresh one because a run did not stop after terminate.",
                   [({"model": n}, self.runner.recycles.get(n, 0)) for n in names])
        with self._lock:
            rejections = dict(self.rejections)
            responses = dict(self.responses)
        out.family("edgefleet_http_limit_rejections_total", "counter",
                   "Requests or connections refused by an API limit: connections (api.max_connections), requests "
                   "(api.max_requests), memory (api.max_inflight_bytes), body_size (api.max_body_bytes), "
                   "header_size, header_timeout, body_timeout, deadline (api.request_timeout_s).",
                   [({"limit": k}, v) for k, v in sorted(rejections.items())])
        out.family("edgefleet_http_responses_total", "counter", "HTTP responses by status code.",
                   [({"code": str(k)}, v) for k, v in sorted(responses.items())])
        out.family("edgefleet_http_connections", "gauge", "Open client connections.", self.http.connections)
        out.family("edgefleet_http_connections_total", "counter", "Client connections accepted.", self.http.accepted)
        out.family("edgefleet_http_requests_in_progress", "gauge", "Inference and load requests in progress.",
                   self.budget.requests)
        out.family("edgefleet_http_inflight_bytes", "gauge",
                   "Bytes of request bodies and JSON decoding held by requests in progress.", self.budget.bytes)
        if self._status is not None:
            self._outbox_families(out, self._status())
        process_families(out)
        return out.text()

    @staticmethod
    def _outbox_families(out: Exposition, s: Mapping[str, Any]) -> None:
        if "spool" in s:
            out.family("edgefleet_outbox_telemetry_records", "gauge",
                       "Telemetry records waiting in the outbox for the broker.", s["spool"])
        if "unconfirmed" in s:
            out.family("edgefleet_outbox_unconfirmed_records", "gauge",
                       "Records the broker has and no controller receipt has named yet.", s["unconfirmed"])
        if "dropped_total" in s:
            out.family("edgefleet_outbox_dropped_records_total", "counter",
                       "Telemetry records dropped from a full outbox (telemetry.spool_max_records).",
                       s["dropped_total"])
        if "resent_total" in s:
            out.family("edgefleet_outbox_resent_records_total", "counter",
                       "Records sent again because a later receipt skipped them.", s["resent_total"])
        if "mqtt_connected" in s:
            out.family("edgefleet_mqtt_connected", "gauge", "1 while connected to the MQTT broker.",
                       1 if s["mqtt_connected"] else 0)

    # -- model repository ---------------------------------------------------------------------------------------------

    def _admin(self, req: Request, what: str) -> None:
        """Control endpoints: never from a web page; local-only unless a token is configured, then the token."""
        site = (req.header("sec-fetch-site") or "none").lower()
        if req.header("origin") is not None or site not in ("none", "same-origin"):
            raise HttpError(403, f"{what} refuses requests from web pages (Origin / Sec-Fetch-Site present): "
                                 "cross-site requests could otherwise drive it from a browser on this device")
        if self.token:
            auth = req.header("authorization") or ""
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                raise HttpError(401, f"{what} needs 'Authorization: Bearer <token>' with the token in "
                                     "api.admin_token_file", [("WWW-Authenticate", 'Bearer realm="edgefleet-agent"')])
        elif not _is_loopback(req.peer):
            raise HttpError(403, f"{what} is local-only: {req.peer[0]} is not a loopback address (set "
                                 "api.admin_token_file to allow it with a bearer token)")

    def _small_json(self, req: Request, what: str) -> dict[str, Any]:
        body = req.read_body(_SMALL_BODY)
        if not body.strip():
            return {}
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeError, RecursionError) as exc:
            raise HttpError(400, f"{what}: body is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(obj, dict):
            raise HttpError(400, f"{what}: body must be a JSON object")
        return obj

    def _repository(self) -> Repository:
        if self.repository is None:
            raise HttpError(400, "this API has no model repository attached (models are served as given)")
        return self.repository

    def _repo_index(self, req: Request) -> Response:
        obj = self._small_json(req, "repository index")
        ready = obj.get("ready", False)
        if not isinstance(ready, bool):
            raise HttpError(400, f"repository index: 'ready' must be true or false, got {ready!r}")
        if self.repository is None:
            entries = [{"name": n, "version": m.version, "state": "READY", "reason": ""}
                       for n, m in self.registry.items()]
        else:
            entries = self.repository.index(ready)
        return json_response(entries)

    def _repo_control(self, req: Request, name: str, action: str) -> Response:
        self._admin(req, f"repository {action}")
        obj = self._small_json(req, f"repository {action}")
        params = obj.get("parameters") or {}
        if not isinstance(params, dict):
            raise HttpError(400, f"repository {action}: parameters must be an object")
        repo = self._repository()
        if action == "unload":
            unknown = sorted(set(params) - {"unload_dependents"})
            if unknown:
                raise HttpError(400, f"repository unload: unknown parameter(s) {unknown}")
            repo.unload(name)
            return json_response({})
        if "config" in params or any(k.startswith("file:") for k in params):
            raise HttpError(400, "repository load: a model configuration or files in the request are not accepted: "
                                 "this agent loads only bundles installed through signed deployments")
        if params:
            raise HttpError(400, f"repository load: unknown parameter(s) {sorted(params)}")
        if not self.budget.enter():
            self._count_rejection("requests")
            raise HttpError(503, f"{self.cfg.max_requests} requests are in progress (api.max_requests); retry later",
                            [("Retry-After", "1")])
        try:
            repo.load(name)
        finally:
            self.budget.leave()
        return json_response({})

    # -- logging extension --------------------------------------------------------------------------------------------

    @staticmethod
    def _log_settings() -> dict[str, Any]:
        level = logging.getLogger().getEffectiveLevel()
        return {"log_file": "", "log_info": level <= logging.INFO, "log_warnings": level <= logging.WARNING,
                "log_errors": level <= logging.ERROR, "log_verbose_level": 1 if level <= logging.DEBUG else 0,
                "log_format": "default"}

    def _logging(self, req: Request, method: str) -> Response:
        if method == "GET":
            return json_response(self._log_settings())
        self._admin(req, "logging")
        obj = self._small_json(req, "logging")
        cur = self._log_settings()
        unknown = sorted(set(obj) - set(cur))
        if unknown:
            raise HttpError(400, f"logging: unknown setting(s) {unknown}; settings are {sorted(cur)}")
        if obj.get("log_file", "") != "":
            raise HttpError(400, "logging: log_file cannot be set over HTTP: the agent writes JSON lines to stderr "
                                 "(journald under systemd)")
        if obj.get("log_format", "default") != "default":
            raise HttpError(400, "logging: log_format is 'default' only: the agent's lines are JSON with ISO 8601 "
                                 "UTC timestamps")
        for key in ("log_info", "log_warnings", "log_errors"):
            if key in obj and not isinstance(obj[key], bool):
                raise HttpError(400, f"logging: {key} must be true or false, got {obj[key]!r}")
        verbose = obj.get("log_verbose_level", cur["log_verbose_level"])
        if not isinstance(verbose, int) or isinstance(verbose, bool) or verbose < 0:
            raise HttpError(400, f"logging: log_verbose_level must be an integer >= 0, got {verbose!r}")
        new = {**cur, **obj, "log_verbose_level": verbose}
        # The agent's log level is a threshold: each kind enabled needs the more severe ones enabled too.
        if (new["log_info"] and not new["log_warnings"]) or (new["log_warnings"] and not new["log_errors"]):
            raise HttpError(400, "logging: the agent logs from a threshold level up: log_info needs log_warnings, and "
                                 "log_warnings needs log_errors")
        level = (logging.DEBUG if verbose > 0 else logging.INFO if new["log_info"] else
                 logging.WARNING if new["log_warnings"] else logging.ERROR if new["log_errors"] else logging.CRITICAL)
        logging.getLogger().setLevel(level)
        log.warning("log level changed through the API", extra={"level": logging.getLevelName(level).lower()})
        return json_response(self._log_settings())
