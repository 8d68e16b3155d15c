"""The agent's HTTP/1.1 server: h11 does the framing, one thread per connection, every wait and size bounded.

h11 (python-hyper's HTTP/1.1 state machine, the one under httpx/httpcore and uvicorn) parses request heads and bodies
(Content-Length and chunked), tracks keep-alive and refuses malformed or ambiguous framing. This module does the
socket I/O around it, with limits (:class:`Limits`) an operator sets in ``[api]``:

- **connections**: at most ``max_connections``; at the cap the longest-idle keep-alive connection is closed for the
  new one, and if none is idle the new one gets a 503 with ``Retry-After`` and is closed.
- **head**: once its first byte arrives a request head must be complete within ``header_timeout_s`` (the clock is not
  reset by each byte: a client trickling a byte every few seconds is cut off with 408), and fit ``max_header_bytes``
  (431 over it).
- **body**: read only when the handler asks (:meth:`Request.read_body`), within ``body_timeout_s`` (408), counted
  while it streams: a declared length over the cap is refused before a byte of it is read, a chunked or compressed
  body as soon as it passes the cap (413). gzip/deflate request bodies are decoded with the cap on the decoded size.
- **idle** keep-alive connections are closed after ``idle_timeout_s``; a client that does not read its response is
  dropped after ``write_timeout_s``.
- **after an error** the connection is kept only when the unread rest of the request body is small enough to read and
  discard (``drain_bytes``); otherwise the response says ``Connection: close`` and the connection is closed. The next
  request is never parsed from a previous body's leftover bytes.

Handlers return a :class:`Response` or raise :class:`HttpError`; anything else raised is a logged 500. Responses marked
compressible are compressed when the client's ``Accept-Encoding`` asks for gzip or deflate.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote

import h11
from edgefleet.sdk.errors import EdgefleetError

__all__ = ["HttpError", "HttpServer", "Limits", "Request", "Response", "json_response"]

log = logging.getLogger("edgefleet.agent.http")

_RECV = 64 << 10  # under glibc's mmap threshold: per-thread heaps reuse the chunks instead of growing
_ONE_WRITE = 64 << 10  # responses up to this size go out in one send (with TCP_NODELAY: one segment train)


@dataclass(frozen=True)
class Limits:
    """What one client may cost the server (see the module docstring)."""

    max_connections: int = 64
    max_header_bytes: int = 16 << 10
    max_body_bytes: int = 64 << 20
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 30.0
    write_timeout_s: float = 30.0
    drain_bytes: int = 1 << 20


class HttpError(EdgefleetError):
    """A request refused with an HTTP status; the body is ``{"error": message}``."""

    code = "http"

    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = (),
                 close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.headers = list(headers)
        self.close = close


@dataclass
class Response:
    """A complete response (bodies are small enough to hold: the API's outputs are bounded by its inputs)."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False
    # Compressed when the client's Accept-Encoding asks. Off by default: as Triton does, only inference responses
    # (and /metrics) are — tritonclient's asyncio client advertises gzip for every call but decodes only those.
    compressible: bool = False


def json_response(obj: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Response:
    """``obj`` as compact JSON."""
    return Response(status, json.dumps(obj, separators=(",", ":")).encode("utf-8"), headers=list(headers))


def _error_response(status: int, message: str, headers: Iterable[tuple[str, str]] = (), close: bool = False
                    ) -> Response:
    r = json_response({"error": message}, status, headers)
    r.close = close
    return r


class _Closed(Exception):
    """The peer went away, or the connection must be dropped without a response."""


class _Conn:
    """One client connection: its socket, its h11 state machine and its place in the connection table."""

    __slots__ = ("aborted", "busy", "h11", "idle_since", "peer", "send_lock", "sock")

    def __init__(self, sock: socket.socket, peer: Any, limits: Limits) -> None:
        self.sock = sock
        self.peer = peer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.busy = False
        self.idle_since = time.monotonic()
        self.send_lock = threading.Lock()
        self.aborted = False

    def recv(self, deadline: float) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        return self.sock.recv(_RECV)

    def sendall(self, chunks: list[bytes], timeout: float) -> None:
        self.sock.settimeout(timeout)  # since Python 3.5 the timeout bounds the whole sendall
        if sum(len(c) for c in chunks) <= _ONE_WRITE:
            self.sock.sendall(b"".join(chunks))
        else:
            for c in chunks:
                self.sock.sendall(c)

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Request:
    """One request whose head has arrived; the body is read on demand (:meth:`read_body`)."""

    def __init__(self, server: HttpServer, conn: _Conn, event: h11.Request) -> None:
        self._server = server
        self._conn = conn
        self.received_ns = time.perf_counter_ns()
        self.method = event.method.decode("ascii", "replace")
        self.target = event.target.decode("ascii", "replace")
        raw_path, _, raw_query = self.target.partition("?")
        self.path = raw_path
        # Split before unquoting: "/v2/models/a%2Fb" names the model "a/b", not a longer path.
        self.segments = [unquote(s, errors="replace") for s in raw_path.split("/") if s]
        self.query = parse_qs(raw_query, keep_blank_values=True)
        headers: dict[str, str] = {}
        for k, v in event.headers:
            name = k.decode("ascii", "replace")  # h11 lower-cases names
            value = v.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.headers = headers
        self.peer = conn.peer
        self.http_version = event.http_version.decode("ascii", "replace")
        self._body: bytes | bytearray | None = None

    @property
    def content_length(self) -> int | None:
        """The declared body length (h11 has checked it is one valid integer), None for chunked."""
        v = self.headers.get("content-length")
        return int(v) if v is not None else None

    @property
    def has_body(self) -> bool:
        """True if the request declares a body (a non-zero length or chunked)."""
        return self.content_length != 0 and ("content-length" in self.headers or "transfer-encoding" in self.headers)

    def header(self, name: str, default: str | None = None) -> str | None:
        """A request header by case-insensitive name."""
        return self.headers.get(name.lower(), default)

    def read_body(self, limit: int | None = None) -> bytes | bytearray:
        """The whole body, decoded (gzip/deflate), at most ``limit`` bytes (default ``max_body_bytes``): 413 over it,
        408 if it does not arrive within ``body_timeout_s``, 415 for an unknown ``Content-Encoding``.

        A body of declared length is read into one buffer of that size (never twice its size in memory).
        """
        if self._body is not None:
            return self._body
        limits = self._server.limits
        cap = limits.max_body_bytes if limit is None else min(limit, limits.max_body_bytes)
        declared = self.content_length
        encoding = (self.headers.get("content-encoding") or "identity").strip().lower()
        if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
            raise HttpError(415, f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none)")
        if declared is not None and declared > cap:
            self._server.count_rejection("body_size")
            raise HttpError(413, f"body of {declared} bytes is over the {cap}-byte limit (api.max_body_bytes)",
                            close=True)
        decoder = _Decoder(encoding, cap)
        conn = self._conn
        if conn.h11.client_is_waiting_for_100_continue:
            self._send_raw(conn.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
        deadline = time.monotonic() + limits.body_timeout_s
        whole = bytearray(declared) if declared is not None and encoding == "identity" else None
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpError(exc.error_status_hint, f"malformed request body: {exc}", close=True) from None
            if event is h11.NEED_DATA:
                try:
                    data = conn.recv(deadline)
                except TimeoutError:
                    self._server.count_rejection("body_timeout")
                    raise HttpError(408, f"request body not received within {limits.body_timeout_s:g} s "
                                         f"(api.body_timeout_s)", close=True) from None
                except OSError as exc:
                    raise _Closed from exc
                if not data:
                    raise HttpError(400, f"connection closed after {size} bytes of the body", close=True)
                conn.h11.receive_data(data)
            elif isinstance(event, h11.Data):
                if whole is not None:  # h11 never hands over more than the declared length
                    whole[size:size + len(event.data)] = event.data
                    size += len(event.data)
                    continue
                chunk = decoder.feed(bytes(event.data))
                size += len(chunk)
                if size > cap:
                    self._server.count_rejection("body_size")
                    raise HttpError(413, f"body is over the {cap}-byte limit (api.max_body_bytes)"
                                         + (" once decoded" if encoding != "identity" else ""), close=True)
                parts.append(chunk)
            elif isinstance(event, h11.EndOfMessage):
                if whole is not None:
                    self._body = whole
                    return whole
                tail = decoder.finish()
                if size + len(tail) > cap:
                    self._server.count_rejection("body_size")
                    raise HttpError(413, f"body is over the {cap}-byte limit (api.max_body_bytes) once decoded",
                                    close=True)
                parts.append(tail)
                break
            else:  # ConnectionClosed mid-body
                raise HttpError(400, "connection closed before the body ended", close=True)
        self._body = parts[0] if len(parts) == 1 else b"".join(parts)
        return self._body

    def discard_body(self) -> None:
        """Drop the body read so far (its memory goes back before the request's budget does)."""
        self._body = None

    def abort(self, status: int, message: str) -> bool:
        """Answer from another thread (a deadline watchdog) while the handler is stuck, then close the connection.

        Returns False if the handler already answered. The handler's own response, if it ever comes, is dropped.
        """
        conn = self._conn
        with conn.send_lock:
            if conn.aborted or conn.h11.our_state is not h11.SEND_RESPONSE:
                return False
            conn.aborted = True
            # The h11 state machine belongs to the stuck handler thread: this one-off response is built by a
            # fresh one, and the connection is closed right after it, so nothing can follow it on the wire.
            try:
                conn.sendall([_canned(status, message, self._server.server_header)], 1.0)
            except OSError:
                pass
            conn.shutdown()
            return True

    def _send_raw(self, data: bytes | None) -> None:
        if data:
            try:
                self._conn.sendall([data], self._server.limits.write_timeout_s)
            except OSError as exc:
                raise _Closed from exc


class _Decoder:
    """Streams a gzip/deflate body into at most ``cap`` decoded bytes (a small compressed body can expand 1000x)."""

    def __init__(self, encoding: str, cap: int) -> None:
        self.encoding = encoding
        self.cap = cap
        self.out = 0
        self.z: Any = None
        if encoding in ("gzip", "x-gzip"):
            self.z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self.z = None  # zlib (RFC 1950) or raw deflate: decided by the first bytes

    def feed(self, data: bytes) -> bytes:
        if self.encoding == "identity":
            return data
        if self.z is None:
            # "deflate" means the zlib format (RFC 9110); some clients send a raw deflate stream
            raw = not (len(data) >= 2 and (data[0] & 0x0F) == 8 and ((data[0] << 8) | data[1]) % 31 == 0)
            self.z = zlib.decompressobj(-zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
        try:
            # max_length: never inflate more than one byte past the cap, whatever the ratio
            out: bytes = self.z.decompress(self.z.unconsumed_tail + data, self.cap - self.out + 1)
        except zlib.error as exc:
            raise HttpError(400, f"body is not valid {self.encoding} data: {exc}", close=True) from None
        self.out += len(out)
        return out

    def finish(self) -> bytes:
        if self.encoding == "identity":
            return b""
        if self.z is None:
            raise HttpError(400, f"empty {self.encoding} body", close=True)
        if self.z.unconsumed_tail:
            tail: bytes = self.z.unconsumed_tail[:1]  # more output than the cap allows: the caller sees it over
            return tail
        if not self.z.eof:
            raise HttpError(400, f"{self.encoding} body is truncated", close=True)
        return b""


def _canned(status: int, message: str, server: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A complete ``Connection: close`` error response, framed by its own h11 state machine."""
    body = json.dumps({"error": message}).encode()
    h = h11.Connection(h11.SERVER)
    h.receive_data(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n")
    h.next_event()
    return b"".join([
        h.send(h11.Response(status_code=status, reason=_reason(status), headers=[
            ("Server", server), ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
            *headers, ("Connection", "close")])) or b"",
        h.send(h11.Data(data=body)) or b"", h.send(h11.EndOfMessage()) or b""])


def _accepts(accept_encoding: str | None) -> str | None:
    """The response encoding to use for an Accept-Encoding header: gzip or deflate (q > 0), else None."""
    if not accept_encoding:
        return None
    best, best_q = None, 0.0
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k.strip() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if name in ("gzip", "x-gzip", "deflate") and q > best_q:
            best, best_q = ("gzip" if name != "deflate" else "deflate"), q
    return best


def compress(body: bytes, encoding: str) -> bytes:
    """gzip or zlib-wrapped deflate (what "Content-Encoding: deflate" means), level 1: devices have slow cores."""
    if encoding == "gzip":
        z = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    else:
        z = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS)
    return z.compress(body) + z.flush()


Handler = Callable[[Request], Response]


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


class HttpServer:
    """Listens on (host, port) and serves ``handler`` with the :class:`Limits`; :meth:`start` runs it in threads."""

    def __init__(self, host: str, port: int, handler: Handler, limits: Limits, name: str = "edgefleet-agent",
                 on_rejection: Callable[[str], None] | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(min(limits.max_connections, 128))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.handler = handler
        self.limits = limits
        self.server_header = name
        self.host, self.port = sock.getsockname()[:2]
        self.stopping = False
        self._on_rejection = on_rejection or (lambda reason: None)
        self._lock = threading.Condition()
        self._conns: set[_Conn] = set()
        self._busy = 0
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept_loop, name="api-accept", daemon=True)

    # -- counters the API exports ------------------------------------------------------------------------------------

    def count_rejection(self, reason: str) -> None:
        """Tell the owner a limit refused something (exported as a counter)."""
        self._on_rejection(reason)

    @property
    def connections(self) -> int:
        """Open client connections."""
        with self._lock:
            return len(self._conns)

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Accept connections in a background thread."""
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Stop accepting; let requests in progress finish (up to ``timeout``); close idle connections.

        Returns True if no request was still in progress.
        """
        self.stopping = True
        wake = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        try:  # wake the blocking accept()
            socket.create_connection((wake, self.port), timeout=0.5).close()
        except OSError:
            pass
        self._thread.join(5)
        self._sock.close()
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._busy > 0 and time.monotonic() < deadline:
                self._lock.wait(deadline - time.monotonic())
            done = self._busy == 0
            conns = [c for c in self._conns if not c.busy]
        for c in conns:
            c.shutdown()
        return done

    # -- accept -------------------------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self.stopping:
            try:
                sock, peer = self._sock.accept()
            except OSError:
                if self.stopping:
                    return
                time.sleep(0.05)  # EMFILE and friends: do not spin
                continue
            if self.stopping:
                sock.close()
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, peer, self.limits)
            with self._lock:
                if len(self._conns) >= self.limits.max_connections:
                    idle = [c for c in self._conns if not c.busy]
                    if not idle:
                        self._reject(sock)
                        continue
                    victim = min(idle, key=lambda c: c.idle_since)
                    self._conns.discard(victim)  # its thread ends when the shutdown wakes its recv
                    victim.shutdown()
                self._conns.add(conn)
                self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), name="api-conn", daemon=True).start()

    def _reject(self, sock: socket.socket) -> None:
        self.count_rejection("connections")
        data = _canned(503, f"too many connections (api.max_connections = {self.limits.max_connections}); retry "
                            "later", self.server_header, [("Retry-After", "1")])
        # No thread is spent on this client: one non-blocking write of a fixed response, then the socket is closed.
        try:
            sock.setblocking(False)
            sock.send(data)
            try:  # what the client already sent: read it so close() sends FIN, not RST
                while sock.recv(65536):
                    pass
            except OSError:
                pass
        except OSError:
            pass
        finally:
            sock.close()

    # -- one connection -----------------------------------------------------------------------------------------------

    def _serve(self, conn: _Conn) -> None:
        try:
            while True:
                req = self._read_head(conn)
                if req is None:
                    return
                with self._lock:
                    conn.busy = True
                    self._busy += 1
                try:
                    resp = self._dispatch(req)
                    if not self._respond(conn, req, resp):
                        if conn.h11.their_state is h11.SEND_BODY and not conn.aborted:
                            self._linger(conn)
                        return
                finally:
                    with self._lock:
                        conn.busy = False
                        conn.idle_since = time.monotonic()
                        self._busy -= 1
                        self._lock.notify_all()
                if not self._next_cycle(conn):
                    return
        except _Closed:
            pass
        except Exception:
            log.exception("HTTP connection failed")
        finally:
            conn.shutdown()
            try:
                conn.sock.close()
            except OSError:
                pass
            with self._lock:
                self._conns.discard(conn)

    def _read_head(self, conn: _Conn) -> Request | None:
        """The next request head, or None when the client closed or stayed idle too long."""
        limits = self.limits
        idle_deadline = time.monotonic() + limits.idle_timeout_s
        head_deadline = time.monotonic() + limits.header_timeout_s if conn.h11.trailing_data[0] else None
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:
                    self.count_rejection("header_size")
                    msg = f"request head is over {limits.max_header_bytes} bytes"
                else:
                    msg = f"malformed request: {exc}"
                self._respond_error_and_close(conn, exc.error_status_hint, msg)
                return None
            if isinstance(event, h11.Request):
                # h11 bounds a head that arrives in pieces; one that arrives whole is measured here
                size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if size > limits.max_header_bytes:
                    self.count_rejection("header_size")
                    self._respond_error_and_close(conn, 431, f"request head is over {limits.max_header_bytes} bytes")
                    return None
                names = {k for k, _ in event.headers}
                if b"transfer-encoding" in names and b"content-length" in names:
                    # RFC 9112 6.1: ambiguous framing (request smuggling through proxies); refused, not guessed
                    self._respond_error_and_close(conn, 400, "a request may not carry both Content-Length and "
                                                             "Transfer-Encoding")
                    return None
                return Request(self, conn, event)
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            # NEED_DATA
            try:
                data = conn.recv(head_deadline if head_deadline is not None else idle_deadline)
            except TimeoutError:
                if head_deadline is not None:
                    self.count_rejection("header_timeout")
                    self._respond_error_and_close(conn, 408, f"request head not received within "
                                                             f"{limits.header_timeout_s:g} s (api.header_timeout_s)")
                return None
            except OSError:
                return None
            if head_deadline is None:
                head_deadline = time.monotonic() + limits.header_timeout_s
            conn.h11.receive_data(data)

    def _dispatch(self, req: Request) -> Response:
        try:
            return self.handler(req)
        except HttpError as exc:
            return _error_response(exc.status, str(exc), exc.headers, exc.close)
        except _Closed:
            raise
        except Exception as exc:
            log.exception("HTTP handler failed", extra={"path": req.path[:200]})
            return _error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    def _respond(self, conn: _Conn, req: Request, resp: Response) -> bool:
        """Send ``resp``; False if the connection must close now."""
        h = conn.h11
        # Keep the connection only if what is left of the request body can be read and thrown away cheaply.
        close = resp.close or self.stopping
        try:  # what of the body already arrived (all of it, for a body of length 0) is read and discarded now
            while h.their_state is h11.SEND_BODY and not close:
                event = h.next_event()
                if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                    break
        except h11.RemoteProtocolError:
            close = True
        if h.their_state is h11.SEND_BODY:
            declared = req.content_length
            if declared is None or declared > self.limits.drain_bytes:
                close = True
        headers = [("Server", self.server_header), ("Content-Type", resp.content_type)]
        body = resp.body
        encoding = _accepts(req.headers.get("accept-encoding")) if body and resp.compressible else None
        if encoding is not None:
            body = compress(body, encoding)
            headers.append(("Content-Encoding", encoding))
            headers.append(("Vary", "Accept-Encoding"))
        headers.append(("Content-Length", str(len(body))))
        headers.extend(resp.headers)
        if close:
            headers.append(("Connection", "close"))
        with conn.send_lock:
            if conn.aborted:
                return False
            try:
                chunks = h.send_with_data_passthrough(h11.Response(
                    status_code=resp.status, headers=headers, reason=_reason(resp.status))) or []
                if body and req.method != "HEAD":
                    chunks += h.send_with_data_passthrough(h11.Data(data=body)) or []
                chunks += h.send_with_data_passthrough(h11.EndOfMessage()) or []
            except h11.LocalProtocolError:
                log.exception("HTTP response framing failed")
                return False
            try:
                conn.sendall(chunks, self.limits.write_timeout_s)
            except OSError:
                return False
        return not close

    def _linger(self, conn: _Conn) -> None:
        """Closing on a client still sending its body: half-close, then read and drop what keeps arriving for a
        moment, so the kernel does not answer it with a reset that can destroy the response before the client reads
        it (nginx's lingering close). Bounded: 2 s in all, 0.2 s of silence."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                conn.sock.settimeout(0.2)
                if not conn.sock.recv(_RECV):
                    break
        except OSError:
            pass

    def _next_cycle(self, conn: _Conn) -> bool:
        """Read and discard what is left of the request body, then get ready for the next request."""
        h = conn.h11
        if h.our_state is h11.MUST_CLOSE or h.their_state in (h11.MUST_CLOSE, h11.CLOSED):
            return False
        deadline = time.monotonic() + min(self.limits.body_timeout_s, 5.0)
        drained = 0
        while h.their_state is h11.SEND_BODY:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError:
                return False
            if event is h11.NEED_DATA:
                try:
                    data = conn.recv(deadline)
                except (TimeoutError, OSError):
                    return False
                if not data:
                    return False
                h.receive_data(data)
            elif isinstance(event, h11.Data):
                drained += len(event.data)
                if drained > self.limits.drain_bytes:
                    return False
            elif isinstance(event, h11.ConnectionClosed):
                return False
        if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
            return False
        try:
            h.start_next_cycle()
        except h11.LocalProtocolError:
            return False
        return True

    def _respond_error_and_close(self, conn: _Conn, status: int, message: str) -> None:
        with conn.send_lock:
            try:
                conn.sendall([_canned(status, message, self.server_header)], 1.0)
            except OSError:
                return
        self._linger(conn)  # the client may still be sending (a trickled head): let it read the answer
