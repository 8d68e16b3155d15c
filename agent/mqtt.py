"""The agent's MQTT link on the one sdk transport: persistent session, Last Will, retained birth, commands, receipts.

* Last Will: retained ``status`` = offline, set before every connect, so a dead device shows offline within 1.5×
  keepalive (the broker's keepalive timeout).
* Birth: on every CONNACK a retained ``status`` = online with the device description.
* Persistent session: ``clean_start=False`` and a Session Expiry Interval, with a stable client id, so QoS 1
  commands sent while the device is offline are queued by the broker and delivered on reconnect.
* Reconnect, TLS, credentials: :class:`edgefleet.sdk.transport.MqttTransport` (the same setup as the controller's).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from edgefleet.sdk import protocol
from edgefleet.sdk.errors import ProtocolError
from edgefleet.sdk.protocol import Description, Receipt, Status
from edgefleet.sdk.transport import Incoming, MqttOptions, MqttTransport, Will, backoff_delay, publish_properties

__all__ = ["MqttLink", "backoff_delay"]

log = logging.getLogger("edgefleet.agent.mqtt")


class MqttLink:
    """One MQTT connection for one device: status, command subscription, publishing."""

    def __init__(self, broker: MqttOptions, fleet: str, device: str, boot: str, *,
                 describe: Callable[[], Description], on_command: Callable[[Incoming], None],
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
        subs = [(self.topic("cmd"), 1)] + ([(self.topic("receipt"), 1)] if on_receipt is not None else [])
        offline = Status(device=device, state="offline", boot=boot, reason="connection lost").to_json()
        # We send the PUBACK of a command ourselves, after it is journaled: a command that could not be stored is
        # redelivered by the broker instead of being lost.
        self.transport = MqttTransport(
            broker, broker.client_id or f"edgefleet-{fleet}-{device}", clean_start=False,
            will=Will(self.topic("status"), offline), manual_ack=True, subscriptions=subs,
            on_message=self._on_message, on_connect=self._on_connect, on_disconnect=self._on_disconnect,
            on_publish=lambda mid: self.on_published())
        self.client = self.transport.client

    @property
    def connected(self) -> threading.Event:
        """Set while connected (CONNACK received, not yet disconnected)."""
        return self.transport.connected

    @property
    def connects(self) -> int:
        """Successful connections so far."""
        return self.transport.connects

    def topic(self, channel: str) -> str:
        """This device's topic for ``channel``."""
        return protocol.topic(self.fleet, self.device, channel)

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (and keep reconnecting)."""
        self.transport.start()

    def stop(self, reason: str = "shutdown", timeout: float = 3.0) -> None:
        """Publish a retained offline status, disconnect cleanly (no will) and stop the network thread."""
        offline = Status(device=self.device, state="offline", boot=self.boot, reason=reason).to_json()
        self.transport.stop(final=(self.topic("status"), offline), timeout_s=timeout)

    # -- publishing ---------------------------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, props: dict[str, Any] | None = None, *,
                retain: bool = False) -> Any:
        """Publish at QoS 1; paho's message info, or None when not connected (the caller keeps the message)."""
        if not self.connected.is_set():
            return None
        corr = bytes.fromhex(props["correlation"]) if props and props.get("correlation") else b""
        p = publish_properties(content_type="application/json", correlation=corr)
        return self.transport.publish(topic, payload, retain=retain, properties=p)

    def republish_status(self) -> None:
        """Publish the birth message again (the description changed: a model was installed or removed)."""
        if self.connected.is_set():
            self.transport.publish(self.topic("status"), self._birth(), retain=True)

    def _birth(self) -> bytes:
        return Status(device=self.device, state="online", boot=self.boot, description=self.describe()).to_json()

    # -- callbacks (network thread) -------------------------------------------------------------------------------

    def _on_connect(self, session_present: bool) -> None:
        self.transport.publish(self.topic("status"), self._birth(), retain=True)
        log.info("connected", extra={"broker": str(self.broker), "session_present": session_present})
        self.on_connected(True)

    def _on_disconnect(self) -> None:
        self.on_connected(False)

    def _on_message(self, message: Incoming) -> None:
        if message.topic == self.topic("receipt"):
            self._receipt(message)
            self.transport.ack(message.mid, message.qos)  # a lost receipt costs a resend, never a message
            return
        try:
            self.on_command(message)
        except Exception:
            # Not acknowledged: the broker delivers it again after the next reconnect.
            log.exception("command could not be journaled", extra={"topic": message.topic})
            return
        self.transport.ack(message.mid, message.qos)

    def _receipt(self, message: Any) -> None:
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
