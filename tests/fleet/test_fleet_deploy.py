"""Deployments end to end: refusals, per-profile bundle choice, a canary that halts and rolls back by itself."""

from __future__ import annotations

import json
import math
import time

import pytest
from _fleet_util import wait_until
from click.testing import CliRunner
from edgefleet.fleet.canary import DeviceWindows, canary_count, choose_canaries, judge
from edgefleet.fleet.rollout import Selector
from edgefleet.fleet.simulate import Simulator, make_devices
from edgefleet.sdk.cli import cli
from edgefleet.sdk.errors import InputError
from edgefleet.sdk.protocol import DeviceRow, RolloutPolicy, TelemetryWindow
from edgefleet.sdk.sketch import DDSketch

pytestmark = pytest.mark.mosquitto


@pytest.fixture
def fleet(controller_factory, mosquitto, fleet_id):
    """A controller and 10 simulated x86 devices plus 2 Raspberry Pis, sending telemetry every 0.1 s."""
    ctl = controller_factory()
    devs = make_devices(10, prefix="x", profiles=["x86-cpu"], model="testmodel", tags=["lab"])
    devs += make_devices(2, prefix="pi", profiles=["raspberry-pi-5"], model="testmodel")
    sim = Simulator(mosquitto.url, fleet_id, devs, interval_s=0.1, per_window=40, slow={"2.0.0": 2.0},
                    client_prefix=f"{fleet_id}-sim")
    sim.start()
    sim.run_telemetry(duration_s=120)
    wait_until(lambda: len([d for d in ctl.store.devices(fleet_id) if d.models]) == 12, what="12 devices reporting")
    yield ctl, sim
    sim.stop()


def _deploy(ctl, bundle, *to: str, extra: tuple[str, ...] = ()) -> object:
    return CliRunner().invoke(cli, ["deploy", str(bundle), *[a for t in to for a in ("--to", t)], "--controller",
                                    ctl.url, "--json", *extra])


def test_deploy_refuses_a_selector_matching_nothing(fleet, mlp_model, make_bundle) -> None:
    ctl, sim = fleet
    res = _deploy(ctl, make_bundle(mlp_model), "tag:nonexistent")
    assert res.exit_code == 1
    assert "selector tag:nonexistent matches no device (12 known" in res.output
    assert ctl.store.deployments(ctl.config.fleet) == [] and sim.commands == []


def test_deploy_refuses_bundles_whose_targets_no_selected_device_has(fleet, mlp_model, make_bundle) -> None:
    ctl, sim = fleet
    res = _deploy(ctl, make_bundle(mlp_model, target="jetson-orin"), "tag:lab")
    assert res.exit_code == 1
    assert "no selected device has the target of any bundle (bundles for jetson-orin; selected profiles: x86-cpu)" \
        in res.output
    assert sim.commands == []


def test_deploy_of_a_release_to_a_mixed_fleet_reports_absent_targets_and_gives_each_target_its_canaries(
        fleet, mlp_model, make_bundle) -> None:
    ctl, _sim = fleet
    time.sleep(1.0)
    release = [make_bundle(mlp_model, version="1.5.0", target=t, filename=f"m-{t}.efb")
               for t in ("x86-cpu", "raspberry-pi-5", "jetson-orin")]
    res = CliRunner().invoke(cli, ["deploy", *map(str, release), "--to", "all", "--controller", ctl.url,
                                   "--canary", "10%", "--min-canary-devices", "2", "--seed", "7", "--observe", "1",
                                   "--min-samples", "100", "--max-p95-regression", "50%", "--max-error-increase", "5%",
                                   "--wait"])
    assert res.exit_code == 0, res.output
    assert "no selected device has target jetson-orin: testmodel 1.5.0 is not sent" in res.output
    dep = ctl.store.deployment(ctl.store.deployments(ctl.config.fleet)[0].id)
    assert dep.state == "completed" and dep.decision.policy.seed == 7
    canaries = {t.device: t.profile for t in dep.targets if t.phase == "canary"}
    # 10% of 10 x86 devices is 1, raised to 2; the two Pis: one canary, one control
    assert sorted(canaries.values()) == ["raspberry-pi-5", "x86-cpu", "x86-cpu"], canaries
    assert {v.bundle for v in dep.decision.canary} == {"testmodel 1.5.0 (x86-cpu)", "testmodel 1.5.0 (raspberry-pi-5)"}
    by_dev = {t.device: t for t in dep.targets}
    assert all(t.state == "active" for t in dep.targets), [(t.device, t.state) for t in dep.targets]
    assert by_dev["pi-0001"].sha256 != by_dev["x-0001"].sha256  # each profile's own bundle
    # the same seed draws the same canaries again
    assert set(canaries) == choose_canaries({"x86-cpu": [f"x-{i:04d}" for i in range(10)],
                                             "raspberry-pi-5": ["pi-0000", "pi-0001"]}, 10, 2, 7)


def test_deploy_refuses_an_untrusted_bundle_before_sending_anything(fleet, mlp_model, tmp_path) -> None:
    ctl, sim = fleet
    from edgefleet.sdk.keys import generate_keypair
    from edgefleet.sdk.testing import build_test_bundle

    other = build_test_bundle(mlp_model, tmp_path / "rogue.efb", generate_keypair(tmp_path / "rogue.key"))
    res = _deploy(ctl, other, "all")
    assert res.exit_code == 1 and "controller refused (422): uploaded bundle: signed by untrusted key" in res.output
    assert sim.commands == []


def test_deploy_gives_each_device_its_profiles_bundle_and_lists_the_rest(fleet, mlp_model, make_bundle) -> None:
    ctl, sim = fleet
    res = _deploy(ctl, make_bundle(mlp_model, version="1.1.0"), "all", extra=("--wait",))
    assert res.exit_code == 0, res.output
    dep = json.loads(res.output)
    assert dep["state"] == "completed", dep
    by_dev = {t["device"]: t for t in dep["targets"]}
    assert {d for d, t in by_dev.items() if t["state"] == "active"} == {f"x-{i:04d}" for i in range(10)}
    assert by_dev["pi-0000"]["state"] == "skipped"
    assert by_dev["pi-0000"]["reason"] == "no bundle for profile raspberry-pi-5"
    assert by_dev["x-0003"]["previous_version"] == "1.0.0" and by_dev["x-0003"]["version"] == "1.1.0"
    deploys = [c for c in sim.commands if c["kind"] == "deploy"]
    assert sorted(c["device"] for c in deploys) == [f"x-{i:04d}" for i in range(10)]
    # The command carries the bundle's URL, sha256 and size, and the URL serves exactly those bytes.
    import hashlib
    import urllib.request

    args = deploys[0]["args"]
    with urllib.request.urlopen(args["url"]) as r:
        data = r.read()
    assert len(data) == args["size"] and hashlib.sha256(data).hexdigest() == args["sha256"]
    wait_until(lambda: all(sim.devices[f"x-{i:04d}"].version == "1.1.0" for i in range(10)), what="devices on 1.1.0")


def test_canary_rollout_halts_and_rolls_back_on_p95_regression(fleet, mlp_model, make_bundle) -> None:
    ctl, sim = fleet
    time.sleep(1.0)  # baseline telemetry on 1.0.0 for every device
    slow = make_bundle(mlp_model, version="2.0.0")  # the simulator runs 2.0.0 twice as slow
    res = _deploy(ctl, slow, "profile:x86-cpu", extra=("--canary", "20%", "--observe", "1.5", "--min-samples", "200",
                                                       "--wait"))
    assert res.exit_code == 3, res.output  # halted
    dep = json.loads(res.output)
    assert dep["state"] == "halted", dep
    assert "regressed over the +20% limit" in dep["message"], dep["message"]
    (verdict,) = dep["decision"]["canary"]
    assert verdict["proceed"] is False and verdict["outcome"] == "halt"
    assert verdict["ratio_low"] > 1.2 and verdict["canary_p95"] > 1.5 * verdict["baseline_p95"]
    canaries = [t for t in dep["targets"] if t["phase"] == "canary"]
    rest = [t for t in dep["targets"] if t["phase"] == "rest"]
    assert len(canaries) == 3 and len(rest) == 7  # ceil(20% of 10) = 2, raised to the 3 the verdict needs
    assert verdict["devices"] == 3 and verdict["controls"] == 7
    # The rest never got the bundle; the canaries got it, then a rollback, and run 1.0.0 again.
    deployed_to = {c["device"] for c in sim.commands if c["kind"] == "deploy"}
    assert deployed_to == {t["device"] for t in canaries}
    wait_until(lambda: all(t.state == "rolled-back" for t in ctl.store.deployment(dep["id"]).targets
                           if t.phase == "canary"), what="canaries rolled back")
    assert all(sim.devices[t["device"]].version == "1.0.0" for t in canaries)
    # No device is left pending: the ones never sent to say why.
    assert all(t.state == "skipped" and t.reason == "not sent: the deployment halted"
               for t in ctl.store.deployment(dep["id"]).targets if t.phase == "rest")
    shown = CliRunner().invoke(cli, ["deployments", "show", dep["id"], "--controller", ctl.url])
    assert shown.exit_code == 0 and "halted" in shown.output and "rolled-back" in shown.output
    assert "verdict halt: testmodel 2.0.0 (x86-cpu): p95 x" in shown.output


def test_canary_rollout_proceeds_when_latency_holds_and_rollback_command_reverts(fleet, mlp_model, make_bundle) -> None:
    ctl, sim = fleet
    time.sleep(1.0)
    res = CliRunner().invoke(
        cli, ["deploy", str(make_bundle(mlp_model, version="1.2.0")), "--to", "tag:lab", "--controller", ctl.url,
              "--canary", "30%", "--observe", "1", "--min-samples", "100", "--wait"])
    assert res.exit_code == 0, res.output
    assert "observing testmodel 1.2.0 (x86-cpu):" in res.stderr  # progress while waiting
    assert "verdict proceed: testmodel 1.2.0 (x86-cpu): p95 x" in res.output and "completed" in res.output
    dep = ctl.store.deployments(ctl.config.fleet)[0]
    assert dep.state == "completed" and dep.progress == {"active": 10}
    assert dep.decision.canary[0].proceed is True and dep.decision.canary[0].ratio_high <= 1.2
    listed = CliRunner().invoke(cli, ["deployments", "list", "--controller", ctl.url])
    assert dep.id in listed.output and "completed" in listed.output
    rb = CliRunner().invoke(cli, ["rollback", dep.id, "--device", "x-0005", "--controller", ctl.url])
    assert rb.exit_code == 0 and "rollback sent to 1 device(s): x-0005" in rb.output
    wait_until(lambda: sim.devices["x-0005"].version == "1.0.0", what="x-0005 back on 1.0.0")
    wait_until(lambda: {t.device: t.state for t in ctl.store.deployment(dep.id).targets}["x-0005"]
               == "rolled-back", what="x-0005 rolled-back in the store")


def test_a_first_deployment_whose_canary_gets_no_traffic_halts_and_removes_it(controller_factory, mosquitto,
                                                                                fleet_id, mlp_model,
                                                                                make_bundle) -> None:
    ctl = controller_factory()
    devs = make_devices(4, prefix="n", profiles=["x86-cpu"], model="other")
    sim = Simulator(mosquitto.url, fleet_id, devs, interval_s=0.1, per_window=0, client_prefix=f"{fleet_id}-sim")
    sim.start()
    try:
        sim.run_telemetry(duration_s=60)
        wait_until(lambda: len(ctl.store.devices(fleet_id)) == 4, what="4 devices")
        res = _deploy(ctl, make_bundle(mlp_model, version="1.0.0"), "all",
                      extra=("--canary", "25%", "--min-canary-devices", "1", "--observe", "0.5", "--wait"))
        assert res.exit_code == 3, res.output
        dep = json.loads(res.output)
        (v,) = dep["decision"]["canary"]
        assert v["outcome"] == "cannot-judge" and "cannot judge after" in v["reason"], v
        (canary,) = [t for t in dep["targets"] if t["phase"] == "canary"]
        assert canary["previous_version"] == ""
        removes = [c for c in sim.commands if c["kind"] == "remove"]
        assert [c["device"] for c in removes] == [canary["device"]] and removes[0]["args"] == {"name": "testmodel"}
        wait_until(lambda: {t.device: t.state for t in ctl.store.deployment(dep["id"]).targets}[canary["device"]]
                   == "rolled-back", what="the canary's first version removed")
        assert {t.state for t in ctl.store.deployment(dep["id"]).targets if t.phase == "rest"} == {"skipped"}
    finally:
        sim.stop()


def test_selector_parsing_and_matching() -> None:
    dev = DeviceRow(device="cam-1", state="online", boot="", profile="jetson-orin", tags=["lobby", "eu"], last_seen=0,
                    models=[], telemetry_ts=0, process={}, updated=0)
    assert Selector.parse(["cam-1"]).matches(dev)
    assert Selector.parse(["tag:eu"]).matches(dev)
    assert Selector.parse(["profile:x86-cpu,profile:jetson-orin"]).matches(dev)
    assert not Selector.parse(["tag:us", "cam-2"]).matches(dev)
    with pytest.raises(InputError, match="use a device id, tag:NAME, profile:NAME or all"):
        Selector.parse(["zone:eu"])
    with pytest.raises(InputError, match="empty selector"):
        Selector.parse([" , "])


def _windows(device: str, median: float, n: int, t0: float, *, per: int = 50, errors: int = 0, seed: int = 0,
             version: str = "1") -> list[TelemetryWindow]:
    """``n`` one-second windows of ``per`` log-normal latencies around ``median`` ms."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sk = DDSketch()
        for x in rng.lognormal(np.log(median), 0.3, per):
            sk.add(float(x))
        out.append(TelemetryWindow(device=device, boot="b", seq=i + 1, ts=t0 + i + 1.0, name="m", version=version,
                                   count=per, errors=errors, interval_s=1.0, p50=None, p95=None, p99=None,
                                   providers=[], sketch=sk.to_wire()))
    return out


def _fleet(factors: dict[str, float], controls: int = 0, *, errors: int = 0) -> tuple[list, list]:
    cans = [DeviceWindows(d, _windows(d, 5.0 + i, 60, 0.0, seed=i),
                          _windows(d, (5.0 + i) * f, 40, 100.0, seed=100 + i, errors=errors))
            for i, (d, f) in enumerate(factors.items())]
    ctls = [DeviceWindows(f"c{i}", _windows(f"c{i}", 6.0, 60, 0.0, seed=200 + i),
                          _windows(f"c{i}", 6.0, 40, 100.0, seed=300 + i)) for i in range(controls)]
    return cans, ctls


POLICY = RolloutPolicy(max_p95_regression=0.2, max_error_increase=0.01, observe_s=30, min_samples=200)


def test_verdict_proceeds_when_the_p95_holds_and_halts_when_it_regresses() -> None:
    same = judge("b", *_fleet({"a": 1.0, "b": 1.0, "c": 1.0}, 3), POLICY, elapsed_s=40, final=False, first=False)
    assert same.outcome == "proceed" and same.ratio_low < 1.0 < same.ratio_high <= 1.2, same
    assert same.devices == 3 and same.controls == 3 and "within the +20% limit" in same.reason
    slow = judge("b", *_fleet({"a": 1.4, "b": 1.4, "c": 1.4}), POLICY, elapsed_s=40, final=False, first=False)
    assert slow.outcome == "halt" and slow.ratio_low > 1.2 and "regressed over the +20% limit" in slow.reason
    # too early: never proceeds before observe_s, and never on too few requests
    early = judge("b", *_fleet({"a": 1.0, "b": 1.0, "c": 1.0}), POLICY, elapsed_s=10, final=False, first=False)
    assert early.outcome == "observing"
    few = RolloutPolicy(min_samples=10_000, observe_s=30)
    assert judge("b", *_fleet({"a": 1.0}), few, elapsed_s=90, final=True, first=False).outcome == "cannot-judge"


def _busy_host(factor: float, seed: int, *, split: bool) -> tuple[list, list]:
    """Six devices on one busy host, each switching at random between a fast and a 2x slower state that lasts
    several seconds (as processes moved between a free core and one shared with a CPU hog do), 20 requests/s each.
    Canaries run the new version ``factor`` times slower; with ``split`` half their requests stay on the previous
    version, side by side (each one-second window of a canary then holds 10 requests of each version)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def states(n: int) -> list[float]:
        out: list[float] = []
        while len(out) < n:
            out += [float(rng.choice([1.0, 2.0]))] * int(rng.integers(5, 30))
        return out[:n]

    def window(device: str, ts: float, i: int, median: float, per: int, version: str) -> TelemetryWindow:
        sk = DDSketch()
        for x in rng.lognormal(np.log(median), 0.3, per):
            sk.add(float(x))
        return TelemetryWindow(device=device, boot="b", seq=i, ts=ts, name="m", version=version, count=per, errors=0,
                               interval_s=1.0, p50=None, p95=None, p99=None, providers=[], sketch=sk.to_wire())

    cans, ctls = [], []
    for d in range(6):
        dev = f"d{d}"
        before_s, after_s = states(60), states(30)
        before = [window(dev, 1.0 + i, i, 4.0 * before_s[i], 20, "1") for i in range(60)]
        if d < 3:
            per = 10 if split else 20
            after = [window(dev, 101.0 + i, 100 + i, 4.0 * after_s[i] * factor, per, "2") for i in range(30)]
            beside = [window(dev, 101.0 + i, 200 + i, 4.0 * after_s[i], 10, "1") for i in range(30)] if split else []
            cans.append(DeviceWindows(dev, before, after, beside))
        else:
            ctls.append(DeviceWindows(dev, before, [window(dev, 101.0 + i, 100 + i, 4.0 * after_s[i], 20, "1")
                                                    for i in range(30)]))
    return cans, ctls


def test_verdict_judges_a_split_canary_against_its_previous_version_beside_it() -> None:
    # Device states that come and go (2x) swamp a 20% gate when canaries are compared with other devices or with
    # their own past; a canary whose previous version serves half its requests meanwhile is compared with it in
    # the same seconds: an identical bundle proceeds and a 30% slower one halts, in each of ten draws.
    policy = RolloutPolicy(max_p95_regression=0.2, max_error_increase=0.05, observe_s=10, min_samples=200)
    split_err, other_err = [], []
    for seed in range(10):
        same = judge("b", *_busy_host(1.0, seed, split=True), policy, elapsed_s=30, final=True, first=False,
                     seed=seed)
        assert same.outcome == "proceed" and "previous version beside" in same.reason, same
        slow = judge("b", *_busy_host(1.3, seed, split=True), policy, elapsed_s=30, final=True, first=False,
                     seed=seed)
        assert not slow.proceed and slow.ratio_low > 1.0, slow
        other = judge("b", *_busy_host(1.0, seed, split=False), policy, elapsed_s=30, final=True, first=False,
                      seed=seed)
        split_err.append(abs(math.log(same.p95_ratio)))
        other_err.append(abs(math.log(other.p95_ratio)))
    # the same host without a split (canaries against controls and their own past): the identical bundle's
    # estimated ratio strays much further from 1
    assert max(split_err) < 0.1 < max(other_err), (split_err, other_err)


def test_verdict_is_not_decided_by_one_device_reporting_invented_latency() -> None:
    # one canary of five claims to be 10x slower: the median of the others decides, and the liar is named
    liar = judge("b", *_fleet({"a": 1.0, "b": 1.0, "c": 10.0, "d": 1.0, "e": 1.0}), POLICY, elapsed_s=40,
                 final=False, first=False)
    assert liar.outcome == "proceed" and any(x.startswith("c: p95 x") for x in liar.excluded), liar
    # one canary of five claims to be fast while the others regress: it cannot push the rollout through
    hider = judge("b", *_fleet({"a": 1.5, "b": 1.5, "c": 0.2, "d": 1.5, "e": 1.5}), POLICY, elapsed_s=40,
                  final=False, first=False)
    assert hider.outcome == "halt", hider
    # with two canaries each must pass alone: one regressing blocks the proceed
    two = judge("b", *_fleet({"a": 1.0, "b": 1.6}), POLICY, elapsed_s=90, final=True, first=False)
    assert two.outcome in ("halt", "cannot-judge") and not two.proceed


def test_verdict_on_errors_and_on_a_first_deployment() -> None:
    errs = judge("b", *_fleet({"a": 1.0, "b": 1.0, "c": 1.0}, errors=5), POLICY, elapsed_s=40, final=False,
                 first=False)
    assert errs.outcome == "halt" and "error rate rose" in errs.reason
    # a first deployment: no latency to compare, errors alone decide, with enough requests
    cans = [DeviceWindows(u.device, [], u.after) for u in _fleet({"a": 1.0, "b": 1.0, "c": 1.0})[0]]
    first = judge("b", cans, [], POLICY, elapsed_s=40, final=False, first=True)
    assert first.outcome == "proceed" and first.p95_ratio is None and "first deployment" in first.reason
    assert judge("b", cans[:1], [], RolloutPolicy(min_samples=5000), elapsed_s=90, final=True,
                 first=True).outcome == "cannot-judge"


def test_canary_count_and_choice_rules() -> None:
    assert [canary_count(n, 10, 3) for n in (0, 1, 2, 3, 4, 10, 40, 100)] == [0, 1, 1, 2, 3, 3, 4, 10]
    assert canary_count(10, 0, 3) == 0 and canary_count(10, 100, 3) == 0  # not staged
    devs = {"x86-cpu": [f"d{i}" for i in range(50)], "jetson-orin": ["j0", "j1", "j2", "j3"]}
    a = choose_canaries(devs, 10, 3, seed=1)
    assert a == choose_canaries(devs, 10, 3, seed=1) and a != choose_canaries(devs, 10, 3, seed=2)
    assert len(a & set(devs["x86-cpu"])) == 5 and len(a & set(devs["jetson-orin"])) == 3
    assert a & set(devs["x86-cpu"]) != {f"d{i}" for i in range(5)}  # not the alphabetically first


def test_a_rollout_is_resumed_by_another_controller_when_its_own_stops(controller_factory, mosquitto, fleet_id,
                                                                        mlp_model, make_bundle) -> None:
    a = controller_factory("a", rollout_lease_s=1.5)
    b = controller_factory("b", rollout_lease_s=1.5)  # same store file, same share group
    devs = make_devices(6, prefix="r", profiles=["x86-cpu"], model="testmodel")
    sim = Simulator(mosquitto.url, fleet_id, devs, interval_s=0.1, per_window=40, client_prefix=f"{fleet_id}-sim")
    sim.start()
    try:
        sim.run_telemetry(duration_s=60)
        wait_until(lambda: len([d for d in a.store.devices(fleet_id) if d.models]) == 6, what="6 reporting")
        time.sleep(1.0)
        sha = a.library.add(make_bundle(mlp_model, version="1.3.0")).sha256
        b.library.add(a.library.path(sha))  # each controller serves from its own bundle directory
        dep = a.deployer.create([sha], Selector.parse(["all"]), RolloutPolicy(canary_pct=34, observe_s=3,
                                                                                min_samples=50))
        assert dep.owner == a.config.client_id
        wait_until(lambda: a.store.deployment(dep.id).state == "observing", what="canaries observed")
        a.deployer.stop()  # controller a goes away mid-rollout
        wait_until(lambda: b.store.deployment(dep.id).state == "completed", timeout_s=40,
                   what="controller b finishing the rollout")
        final = b.store.deployment(dep.id)
        assert final.owner == b.config.client_id
        assert final.progress == {"active": 6}
        # Each device got exactly one deploy command: nothing was sent twice by the takeover.
        deploys = [c["device"] for c in sim.commands if c["kind"] == "deploy"]
        assert sorted(deploys) == sorted(d.device for d in devs)
    finally:
        sim.stop()


def test_rolling_back_a_whole_deployment_stops_its_rollout(fleet, mlp_model, make_bundle) -> None:
    ctl, sim = fleet
    time.sleep(0.5)
    sha = ctl.library.add(make_bundle(mlp_model, version="1.4.0")).sha256
    dep = ctl.deployer.create([sha], Selector.parse(["tag:lab"]),
                              RolloutPolicy(canary_pct=20, observe_s=30, min_samples=50))
    wait_until(lambda: ctl.store.deployment(dep.id).state == "observing", what="canaries observed")
    res = CliRunner().invoke(cli, ["rollback", dep.id, "--controller", ctl.url])
    assert res.exit_code == 0 and "rollback sent to 3 device(s)" in res.output, res.output
    ctl.deployer.wait(dep.id, 10)  # the rollout thread gives up at its next lease renewal
    assert not ctl.deployer._threads[dep.id].is_alive()
    wait_until(lambda: all(t.state in ("rolled-back", "skipped") for t in ctl.store.deployment(dep.id).targets
                           if t.phase != "none"), what="canaries rolled back, the rest untouched")
    final = ctl.store.deployment(dep.id)
    assert final.state == "rolled-back" and final.progress == {"rolled-back": 3, "skipped": 7}
    assert len([c for c in sim.commands if c["kind"] == "deploy"]) == 3


def test_devices_fetch_bundles_from_the_url_a_deployment_names_and_refuse_other_bytes(
        fleet, mlp_model, make_bundle, static_server, tmp_path) -> None:
    """Bundles from anywhere: the deploy command carries a plain static HTTP server's URL (+ sha256 and size of the
    copy the controller verified); devices fetch it there, and bytes that are not that bundle are refused."""
    import shutil

    ctl, sim = fleet
    time.sleep(0.5)
    x86 = make_bundle(mlp_model, version="1.5.0", filename="x86.efb")
    pi = make_bundle(mlp_model, version="1.5.0", target="raspberry-pi-5", filename="pi.efb")
    (static_server.root / "cdn").mkdir()
    shutil.copy(x86, static_server.root / "cdn" / "model-x86-cpu-1.5.0.efb")
    # The Pis' URL serves other bytes (the x86 bundle): a wrong or compromised mirror.
    shutil.copy(x86, static_server.root / "cdn" / "model-raspberry-pi-5-1.5.0.efb")
    x86_url = static_server.url("cdn/model-x86-cpu-1.5.0.efb")
    pi_url = static_server.url("cdn/model-raspberry-pi-5-1.5.0.efb")
    res = _deploy(ctl, x86, "all", extra=("--url", x86_url, "--url", pi_url))
    assert res.exit_code == 2 and "one --url per bundle" in res.output  # refused before anything is uploaded
    res = CliRunner().invoke(cli, ["deploy", str(x86), str(pi), "--url", x86_url, "--url", pi_url, "--to", "all",
                                   "--controller", ctl.url, "--json", "--wait", "--wait-timeout", "60"])
    assert res.exit_code == 4, res.output  # completed with failures
    dep = json.loads(res.output)
    assert {b["target"]: b["url"] for b in dep["bundles"]} == {"x86-cpu": x86_url, "raspberry-pi-5": pi_url}
    assert dep["state"] == "completed-with-failures", dep
    states = {t["device"]: (t["state"], t["reason"]) for t in dep["targets"]}
    assert all(st == "active" for d, (st, _) in states.items() if d.startswith("x-")), states
    assert all(st == "failed" and "sha256" in why for d, (st, why) in states.items() if d.startswith("pi-")), states
    deploys = [c for c in sim.commands if c["kind"] == "deploy"]
    assert len(deploys) == 12
    assert {c["args"]["url"] for c in deploys} == {x86_url, pi_url}  # nothing from the controller's /bundles
    served = static_server.requests()
    assert served.count(("/cdn/model-x86-cpu-1.5.0.efb", 200)) == 10
    assert served.count(("/cdn/model-raspberry-pi-5-1.5.0.efb", 200)) == 2


def test_a_controller_with_a_bundle_mirror_sends_devices_there(controller_factory, mosquitto, fleet_id, mlp_model,
                                                               make_bundle, static_server) -> None:
    """``--bundle-base-url``: a mirror of the bundle directory (<sha256>.efb, e.g. synced to object storage)."""
    import shutil

    ctl = controller_factory("mirrored", bundle_base_url=static_server.url("bundles/"))
    sim = Simulator(mosquitto.url, fleet_id, make_devices(3, prefix="m", profiles=["x86-cpu"], model="testmodel"),
                    interval_s=0.2, client_prefix=f"{fleet_id}-sim")
    sim.start()
    try:
        wait_until(lambda: len(ctl.store.devices(fleet_id)) == 3, what="3 devices known")
        info = ctl.library.add(make_bundle(mlp_model, version="1.6.0"))
        (static_server.root / "bundles").mkdir()
        shutil.copy(ctl.library.path(info.sha256), static_server.root / "bundles" / f"{info.sha256}.efb")
        dep = ctl.deployer.create([info.sha256], Selector.parse(["all"]), RolloutPolicy())
        wait_until(lambda: ctl.store.deployment(dep.id).state == "completed", 30, what="the rollout")
        assert ctl.store.deployment(dep.id).progress == {"active": 3}
        assert {c["args"]["url"] for c in sim.commands} == {static_server.url(f"bundles/{info.sha256}.efb")}
        assert static_server.requests().count((f"/bundles/{info.sha256}.efb", 200)) == 3
    finally:
        sim.stop()
