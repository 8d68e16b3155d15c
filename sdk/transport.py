"""The one MQTT client setup of edgefleet: agent, controller, ``fleet top`` and the simulator connect through it.

paho-mqtt 2.x, MQTT 5, ``CallbackAPIVersion.VERSION2``. What every connection gets the same way:

* **Where and who** — :class:`MqttOptions`: ``mqtt://`` or ``mqtts://`` URL, TLS with a CA file (default: the
  system CAs) and a client certificate and key (mTLS), username and password (also from a file, never needed on a
  command line). The same options on every command that connects (``--mqtt-url``, ``--ca-file``, ``--cert-file``,
  ``--key-file``, ``--username``, ``--password-file``) and the same ``[mqtt]`` section in a config file.
* **Sessions** — a persistent session (``clean_start=False``, an MQTT 5 Session Expiry Interval) for the agent and
  the controller, so QoS 1 messages sent while they are away are queued for them; a clean one for ``fleet top``.
* **Last Will** — set before the first connect, kept for every reconnect.
* **Subscriptions** — declared once, sent again on every CONNACK (a broker that lost the session lost them too);
  shared subscriptions (``$share/<group>/...``) are plain filters to the transport.
* **Reconnect** — its own network thread with exponential backoff, half fixed and half random, so a fleet that
  lost its broker does not reconnect in lock-step.
* **Acknowledgements** — optional manual acks (a message is acknowledged after the application stored it) and an
  ack barrier (an UNSUBSCRIBE round trip proves the broker processed every ack sent before it).
* **Reads** — paho reads each packet's fixed header a byte at a time, one ``recv`` system call per byte;
  :class:`BufferedClient` reads up to ``read_buffer_bytes`` (64 KiB) per call and hands paho slices of it, so a
  controller draining thousands of small PUBLISH packets a second makes a few large reads instead of three small ones
  per packet (bench/results/fleet.md).

Foreign errors are translated here, once: :class:`~edgefleet.sdk.errors.TransportError` for the broker,
:class:`~edgefleet.sdk.errors.ConfigError` for options.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from .errors import ConfigError, TransportError

__all__ = ["MQTT_KEYS", "BufferedClient", "Incoming", "MqttOptions", "MqttTransport", "Will", "backoff_delay",
           "publish_properties"]

log = logging.getLogger("edgefleet.transport")

MQTT_KEYS = frozenset({"url", "ca_file", "cert_file", "key_file", "username", "password", "password_file",
                       "keepalive_s", "session_expiry_s", "reconnect_min_s", "reconnect_max_s", "client_id"})
"""The keys of an ``[mqtt]`` config section (docs/agent.md, docs/fleet.md)."""


def publish_properties(*, response_topic: str = "", correlation: bytes = b"",
                       content_type: str = "") -> Properties:
    """MQTT 5 PUBLISH properties (response topic, correlation data, content type) for :meth:`MqttTransport.publish`."""
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho's Properties has no annotations
    if response_topic:
        p.ResponseTopic = response_topic
    if correlation:
        p.CorrelationData = correlation
    if content_type:
        p.ContentType = content_type
    return p


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random | None = None) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): min(hi, lo·2^n), half fixed and half random."""
    cap = min(hi, lo * float(2 ** min(attempt, 30)))
    return cap / 2 + (rng or random).uniform(0, cap / 2)


@dataclass(frozen=True)
class MqttOptions:
    """How to reach and authenticate to the broker: the same for every edgefleet process that connects."""

    url: str = "mqtt://127.0.0.1:1883"
    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password: str = field(default="", repr=False)
    keepalive_s: int = 30
    session_expiry_s: int = 3600
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    client_id: str = ""

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<options>", base: Path | None = None,
                     defaults: MqttOptions | None = None) -> MqttOptions:
        """Validate an ``[mqtt]`` section (or CLI options): every error names ``source`` and the key.

        Relative paths are relative to ``base`` (the config file's directory). ``password_file`` is read here: its
        first line is the password, so it never sits in a config file or on a command line.
        """
        d = defaults or cls()
        unknown = sorted(set(data) - MQTT_KEYS)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(f'mqtt.{k}' for k in unknown)}; "
                              f"[mqtt] takes {', '.join(sorted(MQTT_KEYS))}")

        def err(key: str, reason: str) -> ConfigError:
            return ConfigError(f"{source}: mqtt.{key}: {reason}")

        def text(key: str, default: str) -> str:
            v = data.get(key, default)
            if v is None:
                return default
            if not isinstance(v, str):
                raise err(key, f"must be a string, got {v!r}")
            return v

        def num(key: str, default: float, lo: float, hi: float, integer: bool = False) -> Any:
            v = data.get(key, default)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok:
                raise err(key, f"must be {'an integer' if integer else 'a number'}, got {v!r}")
            if not lo <= v <= hi:
                raise err(key, f"must be in {lo:g}..{hi:g}, got {v!r}")
            return int(v) if integer else float(v)

        url = text("url", d.url)
        try:
            parts = urlsplit(url if "://" in url else f"mqtt://{url}")
            if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
                raise err("url", f"scheme must be mqtt:// or mqtts://, got {url!r}")
            tls = parts.scheme in ("mqtts", "ssl")
            port = parts.port or (8883 if tls else 1883)
            host = parts.hostname
        except ValueError as exc:  # a bad port, "mqtt://[::1" ...
            raise err("url", f"{exc} in {url!r}") from None
        if not host:
            raise err("url", f"no host in {url!r}")
        paths: dict[str, str] = {}
        for key in ("ca_file", "cert_file", "key_file", "password_file"):
            value = text(key, "" if key == "password_file" else getattr(d, key))
            if value:
                p = Path(os.path.expanduser(value))
                p = p if p.is_absolute() or base is None else (base / p).resolve()
                try:
                    exists = p.is_file()
                except (OSError, ValueError) as exc:  # a NUL byte, a name over NAME_MAX
                    raise err(key, str(exc)) from None
                if not exists:
                    raise err(key, f"file {p} does not exist")
                paths[key] = str(p)
        if (paths.get("ca_file") or paths.get("cert_file")) and not tls:
            raise err("url", "ca_file/cert_file/key_file are set but the URL is not mqtts://")
        if bool(paths.get("cert_file")) != bool(paths.get("key_file")):
            raise err("cert_file", "cert_file and key_file go together (client certificate authentication)")
        password = text("password", "") or unquote(parts.password or "") or d.password
        if paths.get("password_file"):
            if text("password", ""):
                raise err("password_file", "give password or password_file, not both")
            try:
                lines = Path(paths["password_file"]).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeError) as exc:
                raise err("password_file", f"cannot read {paths['password_file']}: {exc}") from None
            password = lines[0] if lines else ""
        lo = num("reconnect_min_s", d.reconnect_min_s, 0.01, 3600)
        hi = num("reconnect_max_s", d.reconnect_max_s, 0.01, 3600)
        if hi < lo:
            raise err("reconnect_max_s", f"must be >= reconnect_min_s ({lo:g}), got {hi:g}")
        client_id = text("client_id", d.client_id)
        if client_id and (len(client_id) > 128 or any(c in client_id for c in "+#/")):
            raise err("client_id", f"must be at most 128 characters without + # /, got {client_id[:40]!r}")
        return cls(url=url, host=host, port=port, tls=tls, ca_file=paths.get("ca_file", ""),
                   cert_file=paths.get("cert_file", ""), key_file=paths.get("key_file", ""),
                   username=text("username", "") or unquote(parts.username or "") or d.username, password=password,
                   keepalive_s=num("keepalive_s", d.keepalive_s, 1, 65535, integer=True),
                   session_expiry_s=num("session_expiry_s", d.session_expiry_s, 0, 0xFFFFFFFF, integer=True),
                   reconnect_min_s=lo, reconnect_max_s=hi, client_id=client_id)

    @classmethod
    def parse(cls, url: str, **keys: Any) -> MqttOptions:
        """Options from a URL and keyword keys of the ``[mqtt]`` section (``ca_file=...``); ConfigError if bad."""
        return cls.from_mapping({"url": url, **{k: v for k, v in keys.items() if v not in (None, "")}},
                                "<options>", Path.cwd())

    def with_(self, **changes: Any) -> MqttOptions:
        """A copy with some fields changed (a role's own session expiry, client id ...)."""
        return replace(self, **changes)


_PUBLISH, _PUBACK, _DISCONNECT = 0x30, 0x40, 0xE0  # MQTT control packet types (high nibble)


class BufferedClient(paho.Client):
    """paho's client with buffered socket reads and corked, joined writes.

    Reads: one ``recv`` of up to ``read_buffer_bytes`` serves many packets.

    paho asks the socket for 1 byte (packet type), 1 byte at a time (remaining length), then the rest of the packet:
    three system calls or more per message. Here a read takes whatever the kernel holds (up to the buffer size) and
    later reads are served from it. paho only reads when ``select`` says the socket is readable, so
    :meth:`loop_read` keeps going while the buffer holds bytes: nothing received waits for more data to arrive.
    The buffer belongs to one connection: closing the socket drops it (a reconnect starts clean).

    Writes: paho writes every packet with its own ``send`` and, from a thread other than the network thread, also
    wakes that thread through a socket pair — two system calls per acknowledgement or receipt. In a
    :meth:`corked` block packets are only queued; on leaving it the network thread is woken once and writes them
    joined into few ``send`` calls. Writes are serialised (paho's are not).
    """

    def __init__(self, *args: Any, read_buffer_bytes: int = 65536, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # first: paho's __del__ needs its own attributes even after a refusal
        self._read_size = read_buffer_bytes
        self._rbuf = b""
        self._rpos = 0
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._merged: list[tuple[dict[str, Any], list[paho.MQTTMessageInfo]]] = []
        self.notify_qos0 = True  # call on_publish for QoS 0 messages once written (paho does; a transport may not)
        if read_buffer_bytes < 1:
            raise ValueError(f"read_buffer_bytes must be >= 1, got {read_buffer_bytes}")

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos < len(self._rbuf):
            end = min(self._rpos + bufsize, len(self._rbuf))
            out = self._rbuf[self._rpos:end]
            self._rpos = end
            return out
        data: bytes = super()._sock_recv(max(bufsize, self._read_size))  # BlockingIOError: nothing to read
        if len(data) <= bufsize:
            return data
        self._rbuf, self._rpos = data, bufsize
        return data[:bufsize]

    def loop_read(self, max_packets: int = 1) -> paho.MQTTErrorCode:
        """Read packets as paho does, then go on until the buffer is empty (``select`` cannot see it)."""
        rc = super().loop_read(max_packets)
        while rc == paho.MQTT_ERR_SUCCESS and self._sock is not None and self._rpos < len(self._rbuf):
            rc = super().loop_read(max_packets)
        return rc

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0
        super()._sock_close()
        self._drop_merged()

    # -- writes: corked queueing and one send for many small packets -------------------------------------------------

    @contextmanager
    def corked(self) -> Iterator[None]:
        """Within the block, packets this thread queues (acks, publishes) are not written at once: on leaving it, one
        wake-up has the network thread write them together, joined into as few ``send`` calls as fit 64 KiB."""
        if self._local.__dict__.get("corked"):
            yield  # nested: the outer block wakes the network thread
            return
        self._local.corked, self._local.pending = True, False
        try:
            yield
        finally:
            self._local.corked = False
            if self._local.pending and self._sockpairW is not None:
                try:
                    self._sockpairW.send(b"0")  # what paho's own _packet_queue sends to break out of select()
                except BlockingIOError:
                    pass  # the pipe is full of wake-ups already

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: paho.MQTTMessageInfo | None = None) -> paho.MQTTErrorCode:
        if not self._local.__dict__.get("corked"):
            return super()._packet_queue(command, packet, mid, qos, info)
        self._out_packet.append({"command": command, "mid": mid, "qos": qos, "pos": 0, "to_process": len(packet),
                                 "packet": packet, "info": info})
        self._local.pending = True
        return paho.MQTT_ERR_SUCCESS

    def loop_write(self) -> paho.MQTTErrorCode:
        """paho's, one thread at a time: paho writes from whichever thread queued a packet, and a partial write
        interleaved with another thread's would corrupt the stream."""
        with self._write_lock:
            return super().loop_write()

    def _packet_write(self) -> paho.MQTTErrorCode:
        out = self._out_packet
        if len(out) > 1 and out[0]["pos"] == 0:
            # Consecutive whole packets that need nothing once written (acks, QoS > 0 publishes) and QoS 0 publishes
            # (whose completion is signalled below) become one packet: one send() instead of one each.
            parts: list[Any] = []
            size = 0
            while out and size < self._read_size:
                head = out[0]
                if head["pos"] != 0 or head["command"] & 0xF0 == _DISCONNECT:
                    break
                parts.append(out.popleft())
                size += len(head["packet"])
            if len(parts) > 1:
                done = [p["info"] for p in parts
                        if p["command"] & 0xF0 == _PUBLISH and p["qos"] == 0 and p["info"] is not None]
                merged = {"command": _PUBACK, "mid": 0, "qos": 1, "pos": 0, "to_process": size,
                          "packet": b"".join(p["packet"] for p in parts), "info": None}
                out.appendleft(merged)  # type: ignore[arg-type]  # paho's _OutPacket TypedDict
                if done:
                    self._merged.append((merged, done))
            else:
                out.extendleft(reversed(parts))
        rc = super()._packet_write()
        if self._merged:
            self._complete_merged()
        return rc

    def _complete_merged(self) -> None:
        still = []
        for merged, infos in self._merged:
            if merged["to_process"] > 0:
                still.append((merged, infos))
                continue
            for info in infos:
                info._set_as_published()
                callback: Any = self.on_publish  # paho types it as the union of its v1 and v2 signatures
                if self.notify_qos0 and callback is not None:
                    callback(self, self._userdata, info.mid, ReasonCode(PacketTypes.PUBACK),
                             Properties(PacketTypes.PUBACK))  # type: ignore[no-untyped-call]
        self._merged = still

    def _drop_merged(self) -> None:
        # As paho does for QoS 0 packets still queued when the connection goes: wait_for_publish() must not hang.
        for _merged, infos in self._merged:
            for info in infos:
                info.rc = paho.MQTT_ERR_CONN_LOST
                info._set_as_published()
        self._merged = []


@dataclass(frozen=True)
class Will:
    """A Last Will: published by the broker when the connection is lost without a DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Incoming:
    """One message delivered to this client."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    properties: Any  # paho Properties (response topic, correlation data)


class MqttTransport:
    """One MQTT 5 connection with its own network thread (reconnects with backoff until :meth:`stop`).

    Callbacks run on the network thread and must be quick: ``on_message(Incoming)``; ``on_connect(session_present)``
    after each CONNACK (subscriptions are sent just before it); ``on_disconnect()``; ``on_publish(mid)`` on each
    PUBACK. ``ready`` is set once the subscriptions of the current connection are acknowledged.
    """

    def __init__(self, options: MqttOptions, client_id: str, *, clean_start: bool = False,
                 session_expiry_s: int | None = None, will: Will | None = None, manual_ack: bool = False,
                 subscriptions: Sequence[tuple[str, int]] = (), max_inflight: int | None = None,
                 read_buffer_bytes: int = 65536,
                 on_message: Callable[[Incoming], None] | None = None,
                 on_connect: Callable[[bool], None] | None = None,
                 on_disconnect: Callable[[], None] | None = None,
                 on_publish: Callable[[int], None] | None = None) -> None:
        self.options = options
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.on_message = on_message
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.on_publish = on_publish
        self.connected = threading.Event()
        self.ready = threading.Event()
        self.connects = 0
        self.refused: str = ""  # the broker's last CONNACK or SUBACK refusal, for error messages
        self._stop = threading.Event()
        self._disconnected = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        c = BufferedClient(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                           manual_ack=manual_ack, read_buffer_bytes=read_buffer_bytes)
        if options.username:
            c.username_pw_set(options.username, options.password or None)
        if options.tls:
            try:
                c.tls_set(ca_certs=options.ca_file or None, certfile=options.cert_file or None,
                          keyfile=options.key_file or None)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ConfigError(f"mqtt.ca_file/cert_file/key_file: cannot set up TLS: {exc}") from exc
        if will is not None:
            # The will goes in the CONNECT packet: set before connecting, it stays for every reconnect.
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        if max_inflight is not None:
            c.max_inflight_messages_set(max_inflight)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.notify_qos0 = on_publish is not None  # QoS 0 has no PUBACK to log: only a caller's callback wants it
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho: no annotations
        props.SessionExpiryInterval = options.session_expiry_s if session_expiry_s is None else session_expiry_s
        c.connect_async(options.host, options.port, keepalive=options.keepalive_s, clean_start=clean_start,
                        properties=props)
        self.client = c

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> MqttTransport:
        """Connect in the background (and keep reconnecting); returns self."""
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.client_id}"[:60], daemon=True)
        self._thread.start()
        return self

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until connected and subscribed, or raise TransportError naming the broker (and its refusal)."""
        if not self.ready.wait(timeout_s):
            why = f": {self.refused}" if self.refused else ""
            raise TransportError(f"could not connect to the MQTT broker at {self.options} within {timeout_s:g} s"
                                 f"{why}")

    def stop(self, final: tuple[str, bytes] | None = None, timeout_s: float = 3.0, *,
             end_session: bool = False) -> None:
        """Publish ``final`` (topic, payload: a retained status) if connected, disconnect cleanly (the broker
        discards the will), and stop the network thread. ``end_session``: also end the persistent session at once
        (an MQTT 5 DISCONNECT with Session Expiry Interval 0), so nothing is queued for a client that is gone."""
        self._closing = True
        if self.connected.is_set():
            if final is not None:
                info = self.client.publish(final[0], final[1], qos=1, retain=True)
                try:
                    info.wait_for_publish(timeout_s)
                except (RuntimeError, ValueError) as exc:
                    log.warning("last message not acknowledged", extra={"error": str(exc)})
            props = None
            if end_session:
                props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]  # paho: no annotations
                props.SessionExpiryInterval = 0
            self._disconnected.clear()
            self.client.disconnect(properties=props)
            self._disconnected.wait(timeout_s)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s + 2)

    def kill(self) -> None:
        """Drop the connection without a DISCONNECT (as a crash or a cut cable would): the broker publishes the
        will. For tests and the simulator."""
        self._closing = True
        self._stop.set()
        self.client._sock_close()  # paho has no public "close without DISCONNECT"
        if self._thread is not None:
            self._thread.join(5)

    def unacknowledged(self) -> int:
        """Messages handed to paho that the broker has not acknowledged yet (0: everything published arrived)."""
        return len(self.client._out_messages)  # paho keeps them here until the PUBACK; no public accessor

    def _run(self) -> None:
        o = self.options
        attempt = 0
        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                self.client.reconnect()
            except (OSError, ValueError) as exc:
                delay = backoff_delay(attempt, o.reconnect_min_s, o.reconnect_max_s)
                # Before the first connection, a command waiting in wait_ready() says it in one line when it gives
                # up: its first 30 s of retries are logged at INFO (-v), not as a warning per attempt.
                log.log(logging.WARNING if self.connects or time.monotonic() - t0 > 30 else logging.INFO,
                        "broker unreachable", extra={"broker": str(o), "error": str(exc),
                                                     "retry_in_s": round(delay, 2)})
                attempt += 1
                self._stop.wait(delay)
                continue
            connects = self.connects
            while not self._stop.is_set():
                # publishes from other threads wake paho's select through its socket pair: a long timeout is free
                if self.client.loop(timeout=1.0) != paho.MQTT_ERR_SUCCESS:
                    break
            if self._stop.is_set():
                break
            attempt = 0 if self.connects > connects else attempt + 1
            delay = backoff_delay(attempt, o.reconnect_min_s, o.reconnect_max_s)
            if not self._closing:
                log.warning("connection lost", extra={"broker": str(o), "retry_in_s": round(delay, 2)})
            self._stop.wait(delay)

    # -- publishing and acknowledging -----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                properties: Properties | None = None) -> paho.MQTTMessageInfo | None:
        """Publish; paho's message info, or None when paho refused it (its queue is full).

        While disconnected paho queues a QoS 1 message (``MQTT_ERR_NO_CONN``) and sends it after reconnecting: its
        info is returned so the caller can follow it.
        """
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            return None
        return info

    @contextmanager
    def corked(self) -> Iterator[None]:
        """Acks and publishes made in the block go out together when it ends (:meth:`BufferedClient.corked`)."""
        with self.client.corked():
            yield

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a message (with ``manual_ack``: after the application has kept it)."""
        if qos > 0:
            self.client.ack(mid, qos)

    def ack_barrier(self, fleet_topic: str, timeout_s: float) -> bool:
        """Wait until the broker has processed every ack sent so far; False on timeout.

        Closing the socket while the broker still sends us messages makes TCP reset the connection, and the broker
        may drop our last acks unread. A broker handles a client's packets in order, so the reply to an UNSUBSCRIBE
        (of a filter never subscribed: no side effect) proves the acks before it were processed.
        """
        if not self.ready.is_set():
            return True
        done = threading.Event()
        self.client.on_unsubscribe = lambda *args: done.set()
        self.client.unsubscribe(fleet_topic)
        return done.wait(timeout_s)

    # -- paho callbacks (network thread) --------------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self.refused = f"the broker refused the connection: {reason}"
            log.error("broker refused the connection", extra={"broker": str(self.options), "reason": str(reason)})
            return
        self.connects += 1
        self.refused = ""
        if self.subscriptions:
            client.subscribe([(f, SubscribeOptions(qos=q)) for f, q in self.subscriptions])
        else:
            self.ready.set()
        self.connected.set()
        if self.on_connect is not None:
            self.on_connect(bool(flags.session_present))

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        bad = [str(rc) for rc in reason_codes if rc.is_failure]
        if bad:
            self.refused = f"the broker refused subscriptions: {', '.join(bad)}"
            log.error("broker refused subscriptions", extra={"broker": str(self.options), "reasons": bad})
            return
        self.ready.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        self.ready.clear()
        self._disconnected.set()
        if not self._closing:
            log.warning("disconnected", extra={"broker": str(self.options), "reason": str(reason)})
        if self.on_disconnect is not None:
            self.on_disconnect()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if self.on_message is not None:
            self.on_message(Incoming(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), msg.mid,
                                     getattr(msg, "properties", None)))

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker refused a message", extra={"mid": mid, "reason": str(reason)})
        if self.on_publish is not None:
            self.on_publish(mid)
