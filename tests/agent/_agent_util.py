"""Agent test helpers: agent subprocesses, an MQTT watcher/controller, an HTTP bundle server with Range support."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
FLEET = "testfleet"


def sha_size(path: Path) -> tuple[str, int]:
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), len(data)


def write_config(path: Path, *, device: str, broker_url: str, data_dir: Path, trusted: Path, keepalive: int = 5,
                 interval: float = 0.5, api: str = "127.0.0.1:0", profile: str = "x86-cpu", extra: str = "",
                 tags: tuple[str, ...] = (), require_signed: bool = False) -> Path:
    """An agent.toml as an operator would write it (unsigned commands allowed unless ``require_signed``: the
    Watcher sends plain commands; tests/hardening/test_signed_commands.py covers the signed default)."""
    path.write_text(f"""
[agent]
device = "{device}"
fleet = "{FLEET}"
data_dir = "{data_dir}"
trusted_keys = ["{trusted}"]
profile = "{profile}"
log_level = "info"
tags = {json.dumps(list(tags))}

[mqtt]
url = "{broker_url}"
keepalive_s = {keepalive}
reconnect_min_s = 0.1
reconnect_max_s = 1.0

[telemetry]
interval_s = {interval}

[api]
listen = "{api}"
{extra}
[commands]
require_signed = {str(require_signed).lower()}
""")
    return path


class AgentProc:
    """``edgefleet agent run --config ...`` as a real subprocess."""

    def __init__(self, config: Path, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.data_dir = data_dir
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"{data_dir.name}.log"

    def start(self, env: dict[str, str] | None = None, wait: bool = True) -> AgentProc:
        runtime = self.data_dir / "state" / "runtime.json"
        runtime.unlink(missing_ok=True)
        # A failpoint applies to the start it is given to, never to later restarts.
        full_env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_AGENT_FAILPOINT"}
        full_env.update({**self.env, **(env or {})})
        self._logfh = open(self.log, "ab")
        self.proc = subprocess.Popen([EDGEFLEET, "agent", "run", "--config", str(self.config)], env=full_env,
                                     stdout=self._logfh, stderr=self._logfh)
        if wait:
            wait_until(lambda: runtime.exists() or self._dead(), 30, what="agent start")
            if self._dead():
                pytest.fail(f"agent exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
        return self

    def _dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    @property
    def api(self) -> str:
        info = json.loads((self.data_dir / "state" / "runtime.json").read_text())
        return info["api"]

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def terminate(self, timeout: float = 30) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        finally:
            self._logfh.close()
        return code

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


class Watcher:
    """A controller-side MQTT 5 client: records everything a device publishes, sends commands."""

    def __init__(self, broker: Any, device: str, client_id: str | None = None, persistent: bool = False,
                 channels: tuple[str, ...] = ("status", "telemetry", "events", "reply")) -> None:
        import paho.mqtt.client as mqtt
        from edgefleet.sdk import protocol
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.protocol = protocol
        self.device = device
        self.messages: dict[str, list[Any]] = {c: [] for c in channels}
        self._seen_online = False
        self.cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"watch-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.channels = channels
        self.connected = threading.Event()

        def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
            for ch in channels:
                c.subscribe(protocol.topic(FLEET, device, ch), qos=1)
            self.connected.set()

        def on_message(c: Any, u: Any, msg: Any) -> None:
            channel = msg.topic.rsplit("/", 1)[-1]
            with self.cond:
                self.messages.setdefault(channel, []).append(msg)
                self.cond.notify_all()

        self.client.on_connect = on_connect
        self.client.on_message = on_message
        self.client.on_disconnect = lambda *a: self.connected.clear()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600 if persistent else 0
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect(broker.host, broker.port, keepalive=5, clean_start=not persistent, properties=props)
        self.client.loop_start()
        if not self.connected.wait(10):
            pytest.fail("watcher could not connect")
        time.sleep(0.1)  # let the SUBACKs come back

    def payloads(self, channel: str) -> list[dict[str, Any]]:
        with self.cond:
            return [json.loads(m.payload) for m in self.messages.get(channel, [])]

    def wait_for(self, channel: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for m in self.messages.get(channel, []):
                    obj = json.loads(m.payload)
                    if pred(obj):
                        return obj
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [json.loads(m.payload) for m in self.messages.get(channel, [])][-5:]
                    pytest.fail(f"no matching message on {channel} within {timeout} s; last: {got}")
                self.cond.wait(left)

    def replies(self, cmd_id: str) -> list[dict[str, Any]]:
        return [r for r in self.payloads("reply") if r.get("id") == cmd_id]

    def wait_reply(self, cmd_id: str, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_for("reply", lambda r: r.get("id") == cmd_id, timeout)

    def send(self, kind: str, args: dict[str, Any] | None = None, cmd_id: str | None = None,
             correlation: bytes | None = None) -> str:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._await_subscribed()
        cmd = self.protocol.command(kind, args or {}, cmd_id=cmd_id)
        props = Properties(PacketTypes.PUBLISH)
        if correlation:
            props.CorrelationData = correlation
        info = self.client.publish(self.protocol.topic(FLEET, self.device, "cmd"), cmd.to_json(), qos=1,
                                   properties=props)
        info.wait_for_publish(10)
        return cmd.id

    def send_raw(self, payload: bytes) -> None:
        self._await_subscribed()
        self.client.publish(self.protocol.topic(FLEET, self.device, "cmd"), payload, qos=1).wait_for_publish(10)

    def _await_subscribed(self, timeout: float = 30.0) -> None:
        """Before the first command: wait (at most ``timeout``, never failing) for the device's ``online`` birth.

        A command published before a freshly started agent has subscribed is lost (no session holds it yet). The
        agent subscribes before it publishes its birth on the same connection and the broker handles both in order,
        so once the birth is seen the command topic is subscribed. Later restarts keep the persistent session."""
        if self._seen_online or "status" not in self.messages:
            return
        deadline = time.monotonic() + timeout
        with self.cond:
            while not any(json.loads(m.payload).get("state") == "online" for m in self.messages["status"]):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self.cond.wait(left)
        self._seen_online = True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class BundleServer:
    """Serves files over HTTP with Range support; can cut the first response after N bytes or throttle."""

    def __init__(self, root: Path, cut_after: int | None = None, rate: float | None = None,
                 tls: dict[str, Path] | None = None) -> None:
        self.root = root
        self.cut_after = cut_after
        self.rate = rate
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = outer.root / self.path.lstrip("/").split("?")[0]
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                rng = self.headers.get("Range")
                outer.requests.append({"path": self.path, "range": rng})
                start = 0
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = outer.cut_after
                if cut is not None:
                    outer.cut_after = None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if outer.rate:
                    step = max(1, int(outer.rate / 20))
                    for i in range(0, len(body), step):
                        self.wfile.write(body[i:i + step])
                        time.sleep(0.05)
                else:
                    self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls["server_cert"], tls["server_key"])
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def http_json(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
              timeout: float = 10) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def magika_model() -> Path:
    """magika's pretrained ONNX model from its PyPI package (same lookup as tests/conftest.py shipped_model)."""
    import importlib.util

    spec = importlib.util.find_spec("magika")
    if spec is None or not spec.origin:
        pytest.skip("magika is not installed (make installs it with --no-deps)")
    found = sorted(Path(spec.origin).parent.glob("models/*/model.onnx"))
    if not found:
        pytest.skip("magika ships no models/*/model.onnx")
    return found[-1]
