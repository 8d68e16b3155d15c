"""The published contract holds on the wire: what a real agent and controller exchange through a real Mosquitto, and
what the controller's HTTP API answers, validates against the committed JSON Schemas (sdk/schemas/, with the
``jsonschema`` library) and parses with the protocol model."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from _fleet_util import Agent, infer_load, wait_until
from click.testing import CliRunner
from edgefleet.sdk import protocol
from edgefleet.sdk.cli import cli
from paho.mqtt.enums import CallbackAPIVersion

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra")

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

SCHEMAS = Path(__file__).resolve().parents[2] / "sdk" / "schemas"


def _validator(name: str) -> Any:
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    return jsonschema.Draft202012Validator(schema)


class Capture:
    """Every message on the fleet's topics, as the broker delivers them (a plain wildcard subscriber)."""

    def __init__(self, broker_port: int, fleet: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{fleet}-capture", protocol=mqtt.MQTTv5)
        ready = threading.Event()
        self.client.on_connect = lambda c, *a: c.subscribe(f"edgefleet/v1/{fleet}/#", qos=1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker_port)
        self.client.loop_start()
        assert ready.wait(10), "capture subscriber did not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def channels(self) -> set[str]:
        with self._lock:
            return {t.split("/")[4] for t, _, _ in self.messages}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_every_payload_a_live_agent_and_controller_exchange_validates_against_the_schemas(
        controller_factory, mosquitto, fleet_id, trust_file, mlp_model, make_bundle, tmp_path) -> None:
    cap = Capture(mosquitto.port, fleet_id)
    ctl = controller_factory()
    agent = Agent(tmp_path, "contract-0", mosquitto.url, fleet_id, trust_file)
    stop = threading.Event()
    try:
        wait_until(lambda: getattr(ctl.store.device(fleet_id, "contract-0"), "state", None) == "online", 60,
                   what="agent online")
        res = CliRunner().invoke(cli, ["deploy", str(make_bundle(mlp_model, version="1.0.0")), "--to", "all",
                                       "--controller", ctl.url, "--json", "--wait"])
        assert res.exit_code == 0, res.output
        load = threading.Thread(target=infer_load, args=([agent.api], stop, 30.0), daemon=True)
        load.start()
        wait_until(lambda: any(m.count for d in ctl.store.devices(fleet_id) for m in d.models), 30,
                   what="telemetry with requests")
        rb = CliRunner().invoke(cli, ["rollback", json.loads(res.output)["id"], "--controller", ctl.url])
        assert rb.exit_code == 0, rb.output
        wait_until(lambda: {"status", "telemetry", "events", "cmd", "reply", "receipt"} <= cap.channels(), 30,
                   what=f"every channel on the wire (so far {sorted(cap.channels())})")
        wait_until(lambda: sum(t.endswith("/reply") for t, _, _ in cap.messages) >= 2, 30,
                   what="the replies to the deploy and the rollback")
        stop.set()
    finally:
        stop.set()
        agent.stop()
    wait_until(lambda: any(t.endswith("/status") and b"offline" in p for t, p, _ in cap.messages), 30,
               what="the agent's offline status")
    wait_until(lambda: getattr(ctl.store.device(fleet_id, "contract-0"), "state", None) == "offline", 30,
               what="the offline status stored")
    time.sleep(1.0)  # the agent's last records and the controller's receipts
    cap.close()
    api = {  # every HTTP body the controller serves, next to the schema it is published under
        "api-device-list": "/api/devices?full=1", "api-device": "/api/devices/contract-0",
        "api-windows": "/api/telemetry?limit=50", "api-versions": "/api/versions", "api-events": "/api/events",
        "api-ingest": "/api/ingest", "api-deployment-list": "/api/deployments",
        "api-deployment": f"/api/deployments/{json.loads(res.output)['id']}",
    }
    bodies = {name: json.loads(urllib.request.urlopen(ctl.url + path, timeout=10).read())
              for name, path in api.items()}
    compact = json.loads(urllib.request.urlopen(ctl.url + "/api/devices", timeout=10).read())

    seen: dict[str, int] = {}
    for topic_name, payload, _retained in cap.messages:
        if not payload:
            continue  # an empty retained payload clears a topic: not a message
        channel = protocol.parse_topic(topic_name).channel
        obj = json.loads(payload)
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(channel).iter_errors(obj)]
        assert errors == [], (channel, errors, payload[:300])
        protocol.decode(channel, payload)  # and the model reads it
        seen[channel] = seen.get(channel, 0) + 1
    assert set(seen) == {"status", "telemetry", "events", "cmd", "reply", "receipt"}, seen
    assert seen["cmd"] >= 2 and seen["reply"] >= 2  # deploy and rollback, each answered

    for name, body in bodies.items():
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(name).iter_errors(body)]
        assert errors == [], (name, errors)
    # The compact device list is built by SQLite, not by the model: it must still match the published rows.
    compact_rows = {"fleet": compact["fleet"], "now": compact["now"], "total": compact["total"],
                    "devices": compact["devices"]}
    assert [e.message for e in _validator("api-device-list").iter_errors(compact_rows)] == []
    # Same rows, field for field (SQLite prints reals with 15 significant digits: equal to 1e-12).
    by_sql = [protocol.DeviceRow.from_dict(d).to_dict() for d in compact["devices"]]
    by_model = [protocol.DeviceRow.from_dict({k: v for k, v in d.items() if k not in ("description", "status_ts")})
                .to_dict() for d in bodies["api-device-list"]["devices"]]
    assert _close(by_sql, by_model), (by_sql, by_model)


def _close(a: Any, b: Any) -> bool:
    """Equal, with floats equal to a relative 1e-12."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-12)
    return bool(a == b)
