"""paho-mqtt 2.x client setup shared by the controller, ``fleet top`` and the simulator (MQTT 5, VERSION2 callbacks)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from edgefleet.sdk.errors import ConfigError, TransportError
from edgefleet.sdk.protocol import Command, topic
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["BrokerURL", "command_properties", "make_client", "parse_broker_url", "publish_command", "wait_connected"]


@dataclass(frozen=True)
class BrokerURL:
    """Where the broker is: ``mqtt://[user:pass@]host[:1883]`` or ``mqtts://...[:8883]`` (TLS)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerURL:
    """Parse a broker URL, or raise ConfigError saying what is wrong with it."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(f"broker URL must start with mqtt:// or mqtts://, got {url!r}")
    if not parts.hostname:
        raise ConfigError(f"broker URL has no host: {url!r}")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigError(f"broker URL has an invalid port: {url!r}") from exc
    return BrokerURL(parts.hostname, port, tls, unquote(parts.username) if parts.username else None,
                     unquote(parts.password) if parts.password else None)


def make_client(url: str | BrokerURL, client_id: str, *, manual_ack: bool = False) -> mqtt.Client:
    """An MQTT 5 paho client for ``url`` (not yet connected), with credentials and TLS from the URL."""
    b = url if isinstance(url, BrokerURL) else parse_broker_url(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=manual_ack)
    if b.username:
        client.username_pw_set(b.username, b.password)
    if b.tls:
        client.tls_set()
    # Reconnects back off up to 30 s so a restarting broker is not hammered by a whole fleet of controllers.
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


def session_properties(expiry_s: int) -> Properties:
    """CONNECT properties for a persistent session that the broker keeps for ``expiry_s`` after a disconnect."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry_s
    return props


def command_properties(fleet: str, device: str, cmd_id: str) -> Properties:
    """PUBLISH properties of a command: the reply topic and the command id as MQTT 5 correlation data."""
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = topic(fleet, device, "reply")
    props.CorrelationData = cmd_id.encode()
    return props


def publish_command(client: mqtt.Client, fleet: str, device: str, cmd: Command) -> None:
    """Publish one command (QoS 1, not retained); the device's persistent session queues it while it is offline."""
    info = client.publish(topic(fleet, device, "cmd"), cmd.to_json(), qos=1, retain=False,
                          properties=command_properties(fleet, device, cmd.id))
    if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
        raise TransportError(f"publishing command {cmd.id} to {device} failed: {mqtt.error_string(info.rc)}")


def wait_connected(event: threading.Event, url: str | BrokerURL, timeout_s: float) -> None:
    """Wait for a connection flag set by on_connect, or raise TransportError naming the broker."""
    if not event.wait(timeout_s):
        raise TransportError(f"could not connect to the MQTT broker at {url} within {timeout_s:g} s")
