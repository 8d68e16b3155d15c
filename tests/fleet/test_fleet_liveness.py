"""Offline is a state: a Last Will, or silence longer than --offline-after, turns a device offline with a stored
``device.offline`` event; a birth or renewed telemetry brings it back with ``device.online`` (both backends)."""

from __future__ import annotations

import json
import urllib.request

from _fleet_util import wait_until
from edgefleet.fleet.simulate import Simulator, make_devices
from edgefleet.fleet.store import LIVENESS_BOOT, Batch


def _liveness(ctl, fleet: str, device: str) -> list[tuple[str, str]]:
    return [(e.kind, e.data["reason"]) for e in ctl.store.events(fleet, device=device) if e.boot == LIVENESS_BOOT]


def _api_events(ctl, device: str) -> list[dict]:
    req = urllib.request.Request(f"{ctl.url}/api/events?device={device}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return [e for e in json.load(r)["events"] if e["kind"].startswith("device.")]


def test_liveness_last_will_marks_device_offline_with_event(controller_factory, mosquitto, fleet_id) -> None:
    ctl = controller_factory(offline_after_s=60.0)
    dead, alive = make_devices(2, prefix="lw")
    sims = [Simulator(mosquitto.url, fleet_id, [d], interval_s=0.2, client_prefix=f"{fleet_id}-{d.device}")
            for d in (dead, alive)]
    for s in sims:
        s.start()
        s.publish_round()
        s.flush()
    wait_until(lambda: all(ctl.store.device(fleet_id, d.device) is not None and
                           ctl.store.device(fleet_id, d.device).state == "online" for d in (dead, alive)),
               what="both devices online")
    sims[0].stop(graceful=False)  # no DISCONNECT: the broker publishes the Last Will (retained offline)
    wait_until(lambda: ctl.store.device(fleet_id, dead.device).state == "offline", 60, what="the will stored")
    assert _liveness(ctl, fleet_id, dead.device) == [("device.offline", "status")]
    assert _liveness(ctl, fleet_id, alive.device) == []  # first appearance is no event
    ev = _api_events(ctl, dead.device)
    assert [(e["kind"], e["level"], e["data"]["boot"]) for e in ev] == [("device.offline", "warning", dead.boot)]
    # The device comes back (a new process: new boot, birth status): online again, with its event.
    again = make_devices(1, prefix="lw")[0]  # the same device id, a new boot
    assert again.device == dead.device
    back = Simulator(mosquitto.url, fleet_id, [again], interval_s=0.2, client_prefix=f"{fleet_id}-back")
    back.start()
    try:
        wait_until(lambda: ctl.store.device(fleet_id, dead.device).state == "online", 60, what="the birth stored")
        assert _liveness(ctl, fleet_id, dead.device) == [("device.offline", "status"), ("device.online", "status")]
    finally:
        back.stop()
        sims[1].stop()


def test_liveness_silence_marks_offline_and_telemetry_brings_it_back(controller_factory, mosquitto,
                                                                     fleet_id) -> None:
    ctl = controller_factory(offline_after_s=1.5)
    devs = make_devices(2, prefix="quiet")
    sim = Simulator(mosquitto.url, fleet_id, devs, interval_s=0.2, client_prefix=f"{fleet_id}-sim")
    sim.start()
    try:
        sim.publish_round()
        sim.flush()
        wait_until(lambda: ctl.store.counts(fleet_id)["telemetry"] == 2, what="telemetry stored")
        # Connections stay up (no will) but nothing is published: silence longer than offline_after_s.
        wait_until(lambda: all(ctl.store.device(fleet_id, d.device).state == "offline" for d in devs), 60,
                   what="both devices marked offline by silence")
        for d in devs:
            (kind, reason), = _liveness(ctl, fleet_id, d.device)
            assert (kind, reason) == ("device.offline", "silence")
            ev = next(e for e in ctl.store.events(fleet_id, device=d.device) if e.boot == LIVENESS_BOOT)
            assert ev.data["quiet_s"] >= 1.5
        sim.publish_round()
        sim.flush()
        wait_until(lambda: all(ctl.store.device(fleet_id, d.device).state == "online" for d in devs), 60,
                   what="telemetry again brings them online")
        assert _liveness(ctl, fleet_id, devs[0].device) == [("device.offline", "silence"),
                                                             ("device.online", "telemetry")]
    finally:
        sim.stop(graceful=False)


def test_liveness_telemetry_after_a_will_does_not_revive(controller_factory, fleet_id) -> None:
    """Telemetry sent before a Last Will can be stored after it (same batch, other subscription): it must not bring
    the device back; only silence-offline devices are revived by telemetry."""
    from edgefleet.sdk.protocol import Status, Telemetry

    ctl = controller_factory(offline_after_s=600.0)
    store = ctl.store
    b = Batch(fleet_id)
    b.statuses.append(Status(device="d1", state="online", boot="bA", ts=b.received))
    store.write(b)
    b = Batch(fleet_id)
    b.statuses.append(Status(device="d1", state="offline", boot="bA", ts=b.received))
    b.telemetry.append(Telemetry(device="d1", boot="bA", seq=1, interval_s=1.0, models=[]))
    store.write(b)
    assert store.device(fleet_id, "d1").state == "offline"
    assert _liveness(ctl, fleet_id, "d1") == [("device.offline", "status")]
    # An agent cannot forge a liveness event: the controller's boot is refused on the events channel.
    from edgefleet.sdk.protocol import Event
    b = Batch(fleet_id)
    b.events.append(Event(device="d1", boot=LIVENESS_BOOT, seq=1, kind="device.online", message="forged",
                          data={"reason": "silence"}))
    store.write(b)
    assert _liveness(ctl, fleet_id, "d1") == [("device.offline", "status")]


def test_liveness_mark_silent_from_two_stores_at_once_marks_each_device_once(store_url, fleet_id) -> None:
    """Two controllers (two store connections on one SQLite file or one PostgreSQL database) checking silence at
    the same moment: every silent device is marked once and has exactly one device.offline event."""
    import threading
    import time

    from edgefleet.fleet.store import open_store
    from edgefleet.sdk.protocol import Status

    a, b = open_store(store_url), open_store(store_url)
    try:
        old = time.time() - 100
        a.write(Batch(fleet_id, received=old, statuses=[Status(device=f"s{i:03d}", state="online", boot="b", ts=old)
                                                        for i in range(200)]))
        got: dict[str, list[str]] = {}
        go = threading.Barrier(2)

        def check(name: str, store) -> None:
            go.wait()
            got[name] = store.mark_silent(fleet_id, time.time() - 50, time.time())

        threads = [threading.Thread(target=check, args=(n, s)) for n, s in (("a", a), ("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(got["a"] + got["b"]) == [f"s{i:03d}" for i in range(200)]
        events = [e for e in a.events(fleet_id, limit=1000) if e.boot == LIVENESS_BOOT]
        assert len(events) == 200 and {e.device for e in events} == set(got["a"] + got["b"])
        assert all(d.state == "offline" for d in a.devices(fleet_id))
    finally:
        a.close()
        b.close()
