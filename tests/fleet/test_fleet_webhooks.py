"""Webhooks on real parts: a real store (both backends) and a real HTTP endpoint (http.server in a thread) that
receives what the rules match, once each; an endpoint that is down gets the notification on a later poll."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from edgefleet.fleet.drift import DRIFT_BOOT
from edgefleet.fleet.store import open_store
from edgefleet.fleet.store.base import Batch
from edgefleet.fleet.webhooks import WebhookConfig, WebhookNotifier
from edgefleet.sdk.protocol import Event

from tests.helpers import free_port

FLEET = "lab"


class Receiver:
    """A plain HTTP server that records every JSON body POSTed to it."""

    def __init__(self, port: int | None = None) -> None:
        self.bodies: list[dict] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", "0"))
                outer.bodies.append(json.loads(self.rfile.read(n)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.port = port or free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), H)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _events() -> tuple[list[Event], list[Event]]:
    agent = [Event(device="cam-1", boot="b1", seq=1, kind="deploy", level="error", message="deploy failed at selftest"),
             Event(device="cam-1", boot="b1", seq=2, kind="load", level="info", message="fine")]
    controller = [Event(device="cam-2", boot=DRIFT_BOOT, seq=10, kind="drift", level="warning",
                        message="testmodel 1.0.0: top1 distribution 0.6 from the reference", data={"against": "fleet"})]
    return agent, controller


def test_rules_fire_once_each_to_a_real_endpoint(store_url: str, tmp_path: Path) -> None:
    store = open_store(store_url)
    rx = Receiver().start()
    try:
        hook = WebhookNotifier(store, FLEET, WebhookConfig(rx.url, interval_s=0.1))
        hook.since = 0.0
        agent, controller = _events()
        store.write(Batch(FLEET, events=agent, controller_events=controller))
        assert hook.poll_once() == 2
        assert hook.poll_once() == 0  # nothing new: nothing sent twice
        by_rule = {b["rule"]: b for b in rx.bodies}
        assert set(by_rule) == {"errors", "drift"}
        assert by_rule["drift"]["event"]["device"] == "cam-2" and "cam-2: drift" in by_rule["drift"]["text"]
        assert by_rule["errors"]["event"]["message"] == "deploy failed at selftest"
        only = WebhookNotifier(store, FLEET, WebhookConfig(rx.url, rules=("drift",)))
        only.since = 0.0
        assert only.poll_once() == 1
    finally:
        rx.stop()
        store.close()


def test_an_endpoint_that_is_down_gets_the_notification_later(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "fleet.db"))
    port = free_port()
    hook = WebhookNotifier(store, FLEET, WebhookConfig(f"http://127.0.0.1:{port}/hook", timeout_s=2.0))
    hook.since = 0.0
    agent, controller = _events()
    store.write(Batch(FLEET, events=agent, controller_events=controller))
    assert hook.poll_once() == 0 and hook.counts["failed"] == 1  # nobody listens yet
    real = Receiver(port).start()
    try:
        assert hook.poll_once() == 2 and {b["rule"] for b in real.bodies} == {"errors", "drift"}
    finally:
        real.stop()
        store.close()


def test_webhook_config_is_checked() -> None:
    with pytest.raises(ValueError, match="http"):
        WebhookConfig("ftp://x")
    with pytest.raises(ValueError, match="unknown webhook rule"):
        WebhookConfig("http://x", rules=("nope",))
