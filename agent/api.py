"""Local inference over the Open Inference Protocol (KServe v2) REST, with the binary tensor extension.

Endpoints: ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``, ``GET /v2/models/{name}[/versions/{v}]``,
``GET /v2/models/{name}[/versions/{v}]/ready``, ``POST /v2/models/{name}[/versions/{v}]/infer``. Tensors come as JSON
``data`` or, with the binary extension (``Inference-Header-Content-Length``), as raw little-endian bytes after the
JSON header; outputs are returned as binary when the request asks (``binary_data`` per output, or
``binary_data_output``), which is what tritonclient does by default.

Client mistakes are 4xx with ``{"error": "..."}``: unknown route or model 404, wrong method 405, missing length 411,
body over ``api.max_body_bytes`` 413, malformed JSON, wrong datatype or shape 400. Only a failure inside ONNX Runtime
is a 500. Stdlib only (``ThreadingHTTPServer``): one thread per connection, ORT runs outside the GIL.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import numpy as np
from edgefleet.sdk.errors import EdgefleetError, InputError, ModelError

from .registry import Registry

if TYPE_CHECKING:
    from edgefleet.sdk.runtime import Model

__all__ = ["KSERVE_DATATYPES", "ApiServer", "HttpError"]

log = logging.getLogger("edgefleet.agent.api")

KSERVE_DATATYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64", "int8": "INT8",
    "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16", "float32": "FP32", "float64": "FP64",
    "bfloat16": "BF16", "string": "BYTES",
}
_NUMPY = {v: k for k, v in KSERVE_DATATYPES.items() if k not in ("bfloat16", "string")}
_MAX_DIMS = 16


class HttpError(EdgefleetError):
    """A request the API refuses, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _dims(shape: tuple[Any, ...]) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def _tensor_meta(t: Any) -> dict[str, Any]:
    return {"name": t.name, "datatype": KSERVE_DATATYPES[t.dtype], "shape": _dims(t.shape)}


def model_metadata(model: Model) -> dict[str, Any]:
    """The KServe model metadata of a served model."""
    m = model.manifest
    return {
        "name": m.name, "versions": [m.version], "platform": "onnxruntime_onnx",
        "inputs": [_tensor_meta(t) for t in m.inputs],
        "outputs": [_tensor_meta(t) for t in m.outputs],
        "parameters": {"target": m.target, "digest": model.digest, "providers": list(model.placement.serving)},
    }


def _decode_inputs(model: Model, req: dict[str, Any], binary: memoryview) -> dict[str, np.ndarray]:
    specs = {t.name: t for t in model.manifest.inputs}
    items = req.get("inputs")
    if not isinstance(items, list) or not items:
        raise HttpError(400, "request needs a non-empty 'inputs' list")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise HttpError(400, f"inputs[{i}] must be an object")
        name = item.get("name")
        if not isinstance(name, str) or name not in specs:
            raise HttpError(400, f"inputs[{i}]: unknown input {name!r}; model {model.name} takes {sorted(specs)}")
        if name in out:
            raise HttpError(400, f"input {name!r} given twice")
        spec = specs[name]
        expected = KSERVE_DATATYPES[spec.dtype]
        datatype = item.get("datatype")
        if datatype != expected:
            raise HttpError(400, f"input {name!r}: datatype {datatype!r} given, model expects {expected}")
        if expected not in _NUMPY:
            raise HttpError(400, f"input {name!r}: datatype {expected} is not supported by this API")
        shape = item.get("shape")
        if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise HttpError(400, f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        dtype = np.dtype(_NUMPY[expected])
        count = math.prod(shape)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise HttpError(400, f"input {name!r}: parameters must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise HttpError(400, f"input {name!r}: binary_data_size {size!r} exceeds the {len(binary) - offset} "
                                     f"binary bytes left in the body")
            if size != count * dtype.itemsize:
                raise HttpError(400, f"input {name!r}: {size} binary bytes for shape {shape} of {expected} "
                                     f"(needs {count * dtype.itemsize})")
            arr = np.frombuffer(binary[offset:offset + size], dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
            offset += size
        else:
            if "data" not in item:
                raise HttpError(400, f"input {name!r}: needs 'data' or parameters.binary_data_size")
            try:
                arr = np.asarray(item["data"], dtype=dtype)
            except (ValueError, TypeError, OverflowError) as exc:
                raise HttpError(400, f"input {name!r}: data is not a list of {expected} values: {exc}") from None
            if arr.size != count:
                raise HttpError(400, f"input {name!r}: {arr.size} values given for shape {shape} ({count} needed)")
        out[name] = arr.reshape(shape)
    if offset != len(binary):
        raise HttpError(400, f"{len(binary) - offset} binary bytes after the inputs are not claimed by any input")
    return out


def _requested_outputs(model: Model, req: dict[str, Any]) -> list[tuple[str, bool]]:
    params = req.get("parameters") or {}
    default_binary = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    names = [t.name for t in model.manifest.outputs]
    wanted = req.get("outputs")
    if wanted is None:
        return [(n, default_binary) for n in names]
    if not isinstance(wanted, list):
        raise HttpError(400, "'outputs' must be a list")
    out = []
    for i, o in enumerate(wanted):
        if not isinstance(o, dict) or o.get("name") not in names:
            got = o.get("name") if isinstance(o, dict) else o
            raise HttpError(400, f"outputs[{i}]: unknown output {got!r}; model {model.name} has {names}")
        p = o.get("parameters") or {}
        out.append((o["name"], bool(p.get("binary_data", default_binary)) if isinstance(p, dict) else default_binary))
    return out


def infer(model: Model, body: bytes, header_length: int | None) -> tuple[bytes, dict[str, str]]:
    """Run one inference request; returns the response body and extra headers."""
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise HttpError(400, f"Inference-Header-Content-Length {header_length} is outside the "
                                 f"{len(body)}-byte body")
        head, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        head, binary = body, memoryview(b"")
    try:
        req = json.loads(head)
    except (ValueError, UnicodeError, RecursionError) as exc:  # RecursionError: "[[[[..." nested past the stack
        raise HttpError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(req, dict):
        raise HttpError(400, "request body must be a JSON object")
    inputs = _decode_inputs(model, req, binary)
    outputs = _requested_outputs(model, req)
    try:
        results = model.run(inputs)
    except InputError as exc:
        raise HttpError(400, str(exc)) from None
    resp: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": []}
    if isinstance(req.get("id"), str):
        resp["id"] = req["id"]
    blobs: list[bytes] = []
    for name, binary_out in outputs:
        arr = results[name]
        entry: dict[str, Any] = {"name": name, "datatype": KSERVE_DATATYPES.get(str(arr.dtype), "BYTES"),
                                 "shape": list(arr.shape)}
        if binary_out:
            raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.ravel().tolist()
        resp["outputs"].append(entry)
    head_bytes = json.dumps(resp, separators=(",", ":")).encode("utf-8")
    if not blobs:
        return head_bytes, {}
    return b"".join([head_bytes, *blobs]), {"Inference-Header-Content-Length": str(len(head_bytes))}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgefleet-agent"
    server: _Server
    # A client that stalls mid-request (or keeps an idle keep-alive connection) must not hold a thread forever.
    timeout = 30.0

    def setup(self) -> None:
        super().setup()
        # One write per response plus TCP_NODELAY: no Nagle/delayed-ACK stalls on small responses.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format % args)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        lines = [f"{self.protocol_version} {status} {self.responses.get(status, ('',))[0]}",
                 f"Server: {self.server_version}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if self.close_connection or self.server.stopping:
            lines.append("Connection: close")
            self.close_connection = True
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head + body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode("utf-8"))

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _route(self) -> tuple[list[str], Model | None]:
        parts = [p for p in self.path.split("?", 1)[0].split("/") if p]
        if not parts or parts[0] != "v2":
            raise HttpError(404, f"no route {self.path!r}; this is the Open Inference Protocol under /v2")
        if len(parts) >= 3 and parts[1] == "models":
            name = parts[2]
            model = self.server.registry.get(name)
            rest = parts[3:]
            if len(rest) >= 2 and rest[0] == "versions":
                if model is not None and rest[1] != model.version:
                    raise HttpError(404, f"model {name!r} version {rest[1]!r} is not served (serving {model.version})")
                rest = rest[2:]
            if model is None:
                served = [n for n, _ in self.server.registry.items()]
                raise HttpError(404, f"unknown model {name!r}; serving {served}")
            return ["models", *rest], model
        return parts[1:], None

    def do_GET(self) -> None:
        self.server.begin()
        try:
            route, model = self._route()
            if route == [] :
                from edgefleet.sdk import __version__

                self._json(200, {"name": "edgefleet-agent", "version": __version__,
                                 "extensions": ["binary_tensor_data"]})
            elif route == ["health", "live"]:
                self._json(200, {"live": True})
            elif route == ["health", "ready"]:
                ready = self.server.registry.ready.is_set() and not self.server.stopping
                self._json(200 if ready else 503, {"ready": ready})
            elif route == ["models"] and model is not None:
                self._json(200, model_metadata(model))
            elif route == ["models", "ready"] and model is not None:
                self._json(200, {"name": model.name, "ready": True})
            elif route[-1:] == ["infer"]:
                raise HttpError(405, "infer takes POST")
            else:
                raise HttpError(404, f"no route {self.path!r}")
        except HttpError as exc:
            self._error(exc.status, str(exc))
        finally:
            self.server.end()

    def do_POST(self) -> None:
        self.server.begin()
        try:
            route, model = self._route()
            if route != ["models", "infer"] or model is None:
                raise HttpError(405 if route in ([], ["health", "live"], ["health", "ready"]) else 404,
                                f"no POST route {self.path!r}")
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                raise HttpError(411, "chunked bodies are not supported: send Content-Length")
            length_s = self.headers.get("Content-Length")
            if length_s is None or not (length_s.isascii() and length_s.isdigit()):  # "²".isdigit() is True
                self.close_connection = True
                raise HttpError(411, "Content-Length is required")
            length = int(length_s)
            if length > self.server.max_body:
                # Not reading the body: the connection can't be reused.
                self.close_connection = True
                raise HttpError(413, f"body of {length} bytes is over the {self.server.max_body}-byte limit "
                                     f"(api.max_body_bytes)")
            try:
                body = self.rfile.read(length)
            except TimeoutError:
                self.close_connection = True
                raise HttpError(408, f"body not received within {self.timeout:g} s") from None
            if len(body) != length:
                self.close_connection = True
                raise HttpError(400, f"body ended after {len(body)} of {length} bytes")
            hl = self.headers.get("Inference-Header-Content-Length")
            if hl is not None and not (hl.isascii() and hl.isdigit()):
                raise HttpError(400, f"Inference-Header-Content-Length must be an integer, got {hl!r}")
            resp, headers = infer(model, body, int(hl) if hl is not None else None)
            self._send(200, resp, headers)
        except HttpError as exc:
            self._error(exc.status, str(exc))
        except ModelError as exc:
            self._error(500, str(exc))
        finally:
            self.server.end()

    def _not_allowed(self) -> None:
        self.close_connection = True
        self._error(405, f"method {self.command} is not allowed")

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _not_allowed  # not http.server's 501 for client input


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], registry: Registry, max_body: int) -> None:
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6  # api.listen = "[::1]:8080"
        super().__init__(addr, _Handler)
        self.registry = registry
        self.max_body = max_body
        self.stopping = False
        self._cond = threading.Condition()
        self._inflight = 0
        self._conns: set[socket.socket] = set()

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._cond:
            (self._conns.add if add else self._conns.discard)(conn)

    def begin(self) -> None:
        with self._cond:
            self._inflight += 1

    def end(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until no request is in flight, then close idle keep-alive connections."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._inflight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            done = self._inflight == 0
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return done


class ApiServer:
    """The local API in a background thread."""

    def __init__(self, host: str, port: int, registry: Registry, max_body: int) -> None:
        try:
            self._server = _Server((host, port), registry, max_body)
        except OSError as exc:
            from edgefleet.sdk.errors import ConfigError

            raise ConfigError(f"api.listen: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="api", daemon=True)

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        """The bound host."""
        return str(self._server.server_address[0])

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop accepting, let in-flight requests finish (up to ``timeout``), close the socket; True if all did."""
        self._server.stopping = True
        stopper = threading.Thread(target=self._server.shutdown, name="api-stop")
        stopper.start()
        try:
            # wake the accept loop now instead of at its next poll (poll_interval is long to keep idle CPU low)
            socket.create_connection((self.host, self.port), timeout=0.5).close()
        except OSError:
            pass
        stopper.join()
        done = self._server.drain(timeout)
        self._server.server_close()
        return done
