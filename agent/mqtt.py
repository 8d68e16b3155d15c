"""The agent's MQTT link: paho-mqtt 2.x, MQTT 5, a persistent session, Last Will and retained birth.

* Last Will: retained ``status`` = offline, set before every connect, so a dead device shows offline within 1.5×
  keepalive (the broker's keepalive timeout).
* Birth: on every CONNACK a retained ``status`` = online with the device description.
* Persistent session: ``clean_start=False`` and a Session Expiry Interval, with a stable client id, so QoS 1
  commands sent while the device is offline are queued by the broker and delivered on reconnect.
* Reconnect: our own network loop, with exponential backoff and jitter (half fixed, half random) so a fleet that
  lost its broker does not reconnect in lock-step.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from edgefleet.sdk import protocol
from edgefleet.sdk.errors import ConfigError, ProtocolError
from edgefleet.sdk.protocol import Description, Receipt, Status
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import BrokerConfig

__all__ = ["MqttLink", "backoff_delay"]

log = logging.getLogger("edgefleet.agent.mqtt")


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random | None = None) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): min(hi, lo·2^n), half fixed and half random."""
    cap = min(hi, lo * (2 ** min(attempt, 30)))
    return cap / 2 + (rng or random).uniform(0, cap / 2)


class MqttLink:
    """One MQTT connection for one device: status, command subscription, publishing."""

    def __init__(self, broker: BrokerConfig, fleet: str, device: str, boot: str, *,
                 describe: Callable[[], Description], on_command: Callable[[paho.MQTTMessage], None],
                 on_connected: Callable[[bool], None] | None = None,
                 on_published: Callable[[], None] | None = None,
                 on_receipt: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.broker = broker
        self.fleet = fleet
        self.device = device
        self.boot = boot
        self.describe = describe
        self.on_command = on_command
        self.on_connected = on_connected or (lambda up: None)
        self.on_published = on_published or (lambda: None)
        self.on_receipt = on_receipt
        self._bad_receipts = 0
        self.connected = threading.Event()
        self.connects = 0
        self._stop = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        client_id = broker.client_id or f"edgefleet-{fleet}-{device}"
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        # We send the PUBACK of a command ourselves, after it is journaled: a command that could not be stored is
        # redelivered by the broker instead of being lost.
        c.manual_ack_set(True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        if broker.username:
            c.username_pw_set(broker.username, broker.password or None)
        if broker.tls:
            try:
                c.tls_set(ca_certs=broker.ca_file or None, certfile=broker.cert_file or None,
                          keyfile=broker.key_file or None)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise ConfigError(f"mqtt.ca_file/cert_file/key_file: cannot set up TLS: {exc}") from exc
        # The will goes in the CONNECT packet: set it before connecting (and it stays for every reconnect).
        offline = Status(device=device, state="offline", boot=boot, reason="connection lost").to_json()
        c.will_set(self.topic("status"), offline, qos=1, retain=True)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = broker.session_expiry_s
        c.connect_async(broker.host, broker.port, keepalive=broker.keepalive_s, clean_start=False, properties=props)
        self.client = c

    def topic(self, channel: str) -> str:
        """This device's topic for ``channel``."""
        return protocol.topic(self.fleet, self.device, channel)

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (and keep reconnecting)."""
        self._thread.start()

    def stop(self, reason: str = "shutdown", timeout: float = 3.0) -> None:
        """Publish a retained offline status, disconnect cleanly (no will) and stop the network thread."""
        self._closing = True
        if self.connected.is_set():
            payload = Status(device=self.device, state="offline", boot=self.boot, reason=reason).to_json()
            info = self.client.publish(self.topic("status"), payload, qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                log.warning("offline status not acknowledged", extra={"error": str(exc)})
            self.client.disconnect()
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                self.client.reconnect()
            except (OSError, ValueError) as exc:
                delay = backoff_delay(attempt, self.broker.reconnect_min_s, self.broker.reconnect_max_s)
                log.warning("broker unreachable", extra={"broker": self.broker.url, "error": str(exc),
                                                         "retry_in_s": round(delay, 2)})
                attempt += 1
                self._stop.wait(delay)
                continue
            connects = self.connects
            while not self._stop.is_set():
                # publishes from other threads wake paho's select through its socket pair: a long timeout is free
                rc = self.client.loop(timeout=1.0)
                if rc != paho.MQTT_ERR_SUCCESS:
                    break
            if self._stop.is_set():
                break
            attempt = 0 if self.connects > connects else attempt + 1
            delay = backoff_delay(attempt, self.broker.reconnect_min_s, self.broker.reconnect_max_s)
            log.warning("connection lost", extra={"broker": self.broker.url, "retry_in_s": round(delay, 2)})
            self._stop.wait(delay)

    # -- publishing ---------------------------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, props: dict[str, Any] | None = None, *,
                retain: bool = False) -> paho.MQTTMessageInfo | None:
        """Publish at QoS 1; paho's message info, or None when not connected (the caller keeps the message)."""
        if not self.connected.is_set():
            return None
        p = Properties(PacketTypes.PUBLISH)
        p.ContentType = "application/json"
        if props and props.get("correlation"):
            p.CorrelationData = bytes.fromhex(props["correlation"])
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=p)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            return None
        # NO_CONN still queues a QoS 1 message inside paho, which sends it after reconnecting: keep tracking it.
        return info

    # -- callbacks (paho network thread) ------------------------------------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the connection", extra={"reason": str(reason)})
            return
        self.connects += 1
        subs = [(self.topic("cmd"), 1)]
        if self.on_receipt is not None:
            subs.append((self.topic("receipt"), 1))
        client.subscribe(subs)
        client.publish(self.topic("status"), self._birth(), qos=1, retain=True)
        self.connected.set()
        log.info("connected", extra={"broker": self.broker.url, "session_present": bool(flags.session_present)})
        self.on_connected(True)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        if not self._closing:
            log.warning("disconnected", extra={"reason": str(reason)})
        self.on_connected(False)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if message.topic == self.topic("receipt"):
            self._receipt(message)
            client.ack(message.mid, message.qos)  # a lost receipt costs a resend, never a message
            return
        try:
            self.on_command(message)
        except Exception:
            # Not acknowledged: the broker delivers it again after the next reconnect.
            log.exception("command could not be journaled", extra={"topic": message.topic})
            return
        client.ack(message.mid, message.qos)

    def _receipt(self, message: paho.MQTTMessage) -> None:
        try:
            parsed = Receipt.from_json(message.payload)
            if parsed.device != self.device:
                raise ProtocolError(f"receipt is for device {parsed.device!r}, not {self.device!r}")
        except ProtocolError as exc:
            self._bad_receipts += 1
            if self._bad_receipts <= 3:  # a broken or hostile controller must not flood the log
                log.warning("ignored a malformed receipt", extra={"error": str(exc)})
            return
        if self.on_receipt is not None:
            self.on_receipt(parsed.to_dict())

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker refused a message", extra={"mid": mid, "reason": str(reason)})
        self.on_published()

    def republish_status(self) -> None:
        """Publish the birth message again (the description changed: a model was installed or removed)."""
        if self.connected.is_set():
            self.client.publish(self.topic("status"), self._birth(), qos=1, retain=True)

    def _birth(self) -> bytes:
        return Status(device=self.device, state="online", boot=self.boot, description=self.describe()).to_json()
