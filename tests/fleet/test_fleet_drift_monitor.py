"""The controller's drift check on a real store (SQLite, and PostgreSQL where it says so) with telemetry as agents
send it: a device is judged against its bundle's reference distribution and against the rest of the fleet on its
version; each comparison raises one event, stored under the controller's own boot."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from edgefleet.fleet.drift import DRIFT_BOOT, DriftMonitor
from edgefleet.fleet.store import open_store
from edgefleet.fleet.store.base import Batch
from edgefleet.sdk.outputs import META_OUTPUT_REFERENCE, META_OUTPUT_STAT, OutputStat, reference_quantiles
from edgefleet.sdk.protocol import ModelWindow, OutputWindow, Telemetry
from edgefleet.sdk.sketch import DDSketch
from edgefleet.sdk.testing import build_test_bundle

FLEET = "lab"


def _records(device: str, lo: float, hi: float, now: float, seed: int, windows: int = 12,
             per: int = 40) -> list[Telemetry]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(windows):
        lat, conf = DDSketch(), DDSketch()
        for _ in range(per):
            lat.add(float(rng.uniform(1.0, 2.0)))
            conf.add(float(rng.uniform(lo, hi)))
        out.append(Telemetry(device=device, boot="b1", seq=i + 1, interval_s=1.0, ts=now - windows + i, models=[
            ModelWindow(name="testmodel", version="1.0.0", count=per, errors=0, providers=["CPUExecutionProvider"],
                        sketch=lat.to_wire(), output=OutputWindow(output="probs", stat="top1",
                                                                  sketch=conf.to_wire()))]))
    return out


def _monitor(tmp_path: Path, mlp_model: Path, signing_key, trusted, store) -> tuple[DriftMonitor, list]:
    import json

    ref = reference_quantiles(list(np.random.default_rng(0).uniform(0.5, 0.9, 2000)))
    meta = {META_OUTPUT_STAT: OutputStat("probs", "top1").to_json(),
            META_OUTPUT_REFERENCE: json.dumps({"q": ref, "n": 2000})}
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    build_test_bundle(mlp_model, bundles / "b.efb", signing_key, metadata=meta)
    emitted: list = []

    def emit(events: list) -> None:
        emitted.extend(events)
        store.write(Batch(FLEET, controller_events=events))

    return DriftMonitor(store, FLEET, bundles, trusted, min_values=200, window_s=600.0, emit=emit), emitted


def test_a_device_is_judged_against_the_reference_and_against_the_fleet(tmp_path, store_url, mlp_model,
                                                                        signing_key, trusted) -> None:
    store = open_store(store_url)  # SQLite and PostgreSQL
    now = time.time()
    recs = [r for i in range(4) for r in _records(f"ok-{i}", 0.5, 0.9, now, seed=i)]
    recs += _records("odd", 0.1, 0.4, now, seed=9)  # a camera knocked out of alignment
    store.write(Batch(FLEET, telemetry=recs))
    mon, emitted = _monitor(tmp_path, mlp_model, signing_key, trusted, store)
    findings = mon.check(now)
    by = {(f.device, f.against): f for f in findings}
    assert by[("odd", "reference")].drifted and by[("odd", "fleet")].drifted
    assert not any(f.drifted for f in findings if f.device != "odd")
    assert {(e.device, e.data["against"]) for e in emitted} == {("odd", "reference"), ("odd", "fleet")}
    mon.check(now + 1)  # the same state again: no second event
    stored = [e for e in store.events(FLEET, None, 0.0, 100) if e.kind == "drift"]
    assert len(stored) == 2 and all(e.boot == DRIFT_BOOT and e.level == "warning" for e in stored)
    store.close()


def test_a_whole_version_shifted_drifts_from_the_reference_not_from_the_fleet(tmp_path, mlp_model, signing_key,
                                                                             trusted) -> None:
    store = open_store(str(tmp_path / "fleet.db"))
    now = time.time()
    store.write(Batch(FLEET, telemetry=[r for i in range(5) for r in _records(f"d-{i}", 0.1, 0.4, now, seed=i)]))
    mon, emitted = _monitor(tmp_path, mlp_model, signing_key, trusted, store)
    findings = mon.check(now)
    assert all(f.drifted for f in findings if f.against == "reference")
    assert not any(f.drifted for f in findings if f.against == "fleet")
    assert {e.data["against"] for e in emitted} == {"reference"} and len(emitted) == 5
    store.close()


def test_an_agent_cannot_store_an_event_under_the_controllers_drift_boot(store_url) -> None:
    from edgefleet.sdk.protocol import Event

    store = open_store(store_url)
    forged = Event(device="d", boot=DRIFT_BOOT, seq=1, kind="drift", level="warning", message="forged", data={})
    store.write(Batch(FLEET, events=[forged]))
    assert not store.events(FLEET, None, 0.0, 10)
    store.close()
