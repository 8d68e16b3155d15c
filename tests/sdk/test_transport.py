"""The one MQTT transport's buffered reads, against a real Mosquitto: whatever the buffer size, every packet arrives
whole, once and in order, including those left in the buffer when the socket has nothing more to say."""

from __future__ import annotations

import random
import threading
import time

import pytest
from edgefleet.sdk.transport import BufferedClient, Incoming, MqttOptions, MqttTransport

pytestmark = [pytest.mark.mosquitto]


@pytest.mark.parametrize("read_buffer_bytes", [1, 7, 65536])
def test_buffered_reads_deliver_every_message_whole_and_in_order(mosquitto, read_buffer_bytes: int) -> None:
    got: list[tuple[str, bytes]] = []
    done = threading.Event()
    rng = random.Random(read_buffer_bytes)
    # Sizes around the 1- and 2-byte remaining-length boundaries, and one larger than the buffer many times over.
    sent = [(f"t/{read_buffer_bytes}/{i}", rng.randbytes(rng.choice([0, 1, 100, 127, 128, 3000, 16383, 16384])))
            for i in range(600)]
    sent.insert(300, (f"t/{read_buffer_bytes}/big", rng.randbytes(300_000)))

    def on_message(msg: Incoming) -> None:
        got.append((msg.topic, msg.payload))
        if len(got) == len(sent):
            done.set()

    opts = MqttOptions.parse(mosquitto.url)
    sub = MqttTransport(opts, f"buf-sub-{read_buffer_bytes}", clean_start=True, session_expiry_s=0,
                        subscriptions=[(f"t/{read_buffer_bytes}/#", 1)], read_buffer_bytes=read_buffer_bytes,
                        on_message=on_message).start()
    pub = MqttTransport(opts, f"buf-pub-{read_buffer_bytes}", clean_start=True, session_expiry_s=0,
                        max_inflight=1000).start()
    try:
        sub.wait_ready(10)
        pub.wait_ready(10)
        assert isinstance(sub.client, BufferedClient)
        infos = [pub.publish(t, p) for t, p in sent]
        for info in infos:
            assert info is not None
            info.wait_for_publish(30)
        assert done.wait(60), f"{len(got)} of {len(sent)} messages arrived"
        time.sleep(0.2)  # nothing more may come
        assert got == sent
    finally:
        sub.stop()
        pub.stop()


def test_buffered_client_refuses_an_empty_buffer() -> None:
    with pytest.raises(ValueError, match="read_buffer_bytes must be >= 1, got 0"):
        MqttTransport(MqttOptions.parse("mqtt://127.0.0.1:1"), "x", read_buffer_bytes=0)


def test_corked_publishes_leave_together_in_order_and_each_completes(mosquitto) -> None:
    got: dict[str, list[bytes]] = {"t/cork/q0": [], "t/cork/q1": []}
    want = 400

    def on_message(msg: Incoming) -> None:
        got[msg.topic].append(msg.payload)

    opts = MqttOptions.parse(mosquitto.url)
    sub = MqttTransport(opts, "cork-sub", clean_start=True, session_expiry_s=0, subscriptions=[("t/cork/#", 1)],
                        on_message=on_message).start()
    pub = MqttTransport(opts, "cork-pub", clean_start=True, session_expiry_s=0, max_inflight=1000).start()
    try:
        sub.wait_ready(10)
        pub.wait_ready(10)
        with pub.corked():
            infos = [pub.publish(f"t/cork/q{i % 2}", str(i).encode(), qos=i % 2) for i in range(2 * want)]
            # nothing has been written yet: queued for the network thread, which is woken when the block ends
            assert all(info is not None and not info.is_published() for info in infos[::2])
        for info in infos:
            assert info is not None
            info.wait_for_publish(30)  # QoS 0 ones complete once written, QoS 1 ones on their PUBACK
        deadline = time.monotonic() + 30
        while sum(map(len, got.values())) < 2 * want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got["t/cork/q0"] == [str(i).encode() for i in range(0, 2 * want, 2)]
        assert got["t/cork/q1"] == [str(i).encode() for i in range(1, 2 * want, 2)]
    finally:
        sub.stop()
        pub.stop()
