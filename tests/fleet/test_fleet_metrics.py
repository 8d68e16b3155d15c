"""The controller's /metrics as Prometheus wants it: ``promtool check metrics`` prints nothing against a live
controller fed by simulated devices (one killed: offline, one gone quiet past --metrics-stale-after: dropped), and
every metric the Grafana dashboard in docs/grafana/ queries exists there."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from _fleet_util import wait_until
from edgefleet.fleet.simulate import Simulator, make_devices

from tests._prometheus import DASHBOARD, Prometheus, dashboard_exprs, metric_names, promtool_check_rules

pytestmark = pytest.mark.mosquitto


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """SQLite only: /metrics is built from the store interface, which test_fleet_liveness runs on both backends."""
    return str(tmp_path / "fleet.db")


def scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return r.read().decode()


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of every sample line."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def sample_names(text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def promtool_check(text: str) -> subprocess.CompletedProcess[bytes]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make system-deps installs Debian's prometheus package)")
    return subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)


@pytest.fixture
def live_fleet(controller_factory, mosquitto, fleet_id, publisher):
    """A controller with three simulated devices sending telemetry, one more killed (its Last Will: offline), and
    one malformed payload refused."""
    ctl = controller_factory(offline_after_s=60.0, metrics_stale_after_s=3600.0)
    alive = Simulator(mosquitto.url, fleet_id, make_devices(3, prefix="m", profiles=["x86-cpu", "jetson-orin"]),
                      interval_s=0.1, client_prefix=f"{fleet_id}-alive")
    dead = Simulator(mosquitto.url, fleet_id, make_devices(1, prefix="gone"), interval_s=0.1,
                     client_prefix=f"{fleet_id}-dead")
    for s in (alive, dead):
        s.start()
        s.run_telemetry(rounds=3).join(30)
        s.flush()
    wait_until(lambda: ctl.store.counts(fleet_id)["telemetry"] == 12, what="12 telemetry rows")
    publisher.publish(f"edgefleet/v1/{fleet_id}/m-0000/telemetry", b"not json")
    publisher.flush()
    wait_until(lambda: ctl.ingest.stats.rejected, what="the malformed payload refused")
    dead.stop(graceful=False)
    wait_until(lambda: ctl.store.device(fleet_id, "gone-0000").state == "offline", 60, what="the Last Will")
    yield ctl
    alive.stop()


def test_metrics_pass_promtool_on_a_live_controller(live_fleet, fleet_id) -> None:
    text = scrape(live_fleet.url)
    proc = promtool_check(text)
    assert proc.returncode == 0 and proc.stdout == b"" and proc.stderr == b"", (proc.stdout, proc.stderr, text)
    s = samples(text)
    assert s[f'edgefleet_device_up{{fleet="{fleet_id}",device="gone-0000",profile="x86-cpu"}}'] == 0
    assert s[f'edgefleet_device_up{{fleet="{fleet_id}",device="m-0000",profile="x86-cpu"}}'] == 1
    assert s[f'edgefleet_devices{{fleet="{fleet_id}",state="online"}}'] == 3
    assert s[f'edgefleet_devices{{fleet="{fleet_id}",state="offline"}}'] == 1
    # The dead device's last figures are not live: no latency, throughput or process series for it.
    assert not [k for k in s if 'device="gone-0000"' in k and not k.startswith(("edgefleet_device_up",
                                                                                 "edgefleet_device_last_seen"))]
    p95 = s[f'edgefleet_device_latency_seconds{{fleet="{fleet_id}",device="m-0000",model="detector",'
            'version="1.0.0",quantile="0.95"}']
    assert 0.0005 < p95 < 1.0  # the simulator's latencies are milliseconds: exported in seconds
    # Fleet-wide summary: quantiles, plus a cumulative count and sum of every stored request.
    lbl = f'fleet="{fleet_id}",model="detector",version="1.0.0"'
    count = s[f"edgefleet_model_latency_seconds_count{{{lbl}}}"]
    assert count > 0 and 0 < s[f"edgefleet_model_latency_seconds_sum{{{lbl}}}"] / count < 1
    assert not re.search(r"_ms\b|_ms\{", text)
    # Every family once, HELP before TYPE before its samples.
    types = re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)
    assert len(types) == len({n for n, _ in types})
    assert all(k == "counter" for n, k in types if n.endswith("_total"))


def test_metrics_drop_devices_unseen_longer_than_stale_after(controller_factory, mosquitto, fleet_id) -> None:
    ctl = controller_factory(offline_after_s=0.5, metrics_stale_after_s=2.0)
    sim = Simulator(mosquitto.url, fleet_id, make_devices(1, prefix="stale"), interval_s=0.1,
                    client_prefix=f"{fleet_id}-stale")
    sim.start()
    sim.publish_round()
    sim.flush()
    wait_until(lambda: 'device="stale-0000"' in scrape(ctl.url), what="the device in /metrics")
    sim.stop(graceful=False)
    # Offline first (still exported with up 0), then gone from every family once it is stale.
    wait_until(lambda: 'device="stale-0000"' not in scrape(ctl.url), 60, what="the stale device dropped")
    text = scrape(ctl.url)
    assert promtool_check(text).stdout == b""
    assert f'edgefleet_devices{{fleet="{fleet_id}",state="offline"}} 0' in text


def test_grafana_dashboard_is_valid_and_queries_only_controller_metrics_that_exist(live_fleet) -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    queries = dashboard_exprs(agent=False)
    assert len(queries) >= 6
    for title, exprs in queries.items():
        assert exprs and all(exprs), f"panel {title!r} has no query"
    have = sample_names(scrape(live_fleet.url))
    used = metric_names([e for exprs in queries.values() for e in exprs])
    assert used, "no edgefleet metric found in the controller panels"
    missing = sorted(used - have)
    assert not missing, f"the dashboard queries metrics the controller does not export: {missing}"


def test_grafana_dashboard_queries_parse_and_return_series_from_a_real_prometheus(live_fleet, tmp_path) -> None:
    """Every query of the dashboard parses (``promtool check rules``: Prometheus's own PromQL parser), and every
    controller panel's query returns series from a real Prometheus server scraping the live controller each second."""
    every = [e for agent in (False, True) for exprs in dashboard_exprs(agent).values() for e in exprs]
    checked = promtool_check_rules(every, tmp_path)
    assert checked.returncode == 0 and "SUCCESS" in checked.stdout, (checked.stdout, checked.stderr)
    prom = Prometheus(tmp_path, {"edgefleet-controller": live_fleet.url.removeprefix("http://")})
    try:
        prom.wait_scraped(3)
        bad = prom.run_dashboard(dashboard_exprs(agent=False), "edgefleet-agent")
    finally:
        prom.stop()
    assert not bad, bad


ALERTS = DASHBOARD.parents[1] / "prometheus" / "edgefleet-alerts.yml"


def alert_rule_metrics(agent: bool) -> set[str]:
    """Metric names in the shipped alerting rules: the fleet group (controller) or the agent group."""
    fleet_part, _, agent_part = ALERTS.read_text().partition("- name: edgefleet-agent")
    return metric_names([agent_part if agent else fleet_part])


def test_alerting_rules_pass_promtool_and_their_unit_tests(tmp_path) -> None:
    """docs/prometheus/edgefleet-alerts.yml: valid rules (promtool check rules), and each alert fires when it
    should and not before (promtool test rules on edgefleet-alerts.test.yml: offline device, a fifth of the fleet
    offline, refused messages, backlog, failing inference)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make system-deps installs Debian's prometheus package)")
    checked = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and "SUCCESS: 5 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", ALERTS.with_name("edgefleet-alerts.test.yml").name],
                            capture_output=True, text=True, timeout=60, cwd=ALERTS.parent)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_alerting_rules_use_only_metrics_a_live_controller_exports(live_fleet) -> None:
    have = sample_names(scrape(live_fleet.url))
    used = alert_rule_metrics(agent=False)
    assert used and not used - have, sorted(used - have)
