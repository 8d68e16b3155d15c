"""The Grafana dashboard's agent panels (docs/grafana/edgefleet.json, rows titled "Agent ...") query only metrics a
live agent serving a model exports on its own /metrics, and return series from a real Prometheus scraping it (the
controller's panels: tests/fleet/test_fleet_metrics.py)."""

from __future__ import annotations

import re
import urllib.request

import pytest
from test_api_tritonclient import X, agent_with_model  # noqa: F401 - the fixture, shared

from tests._prometheus import DASHBOARD, Prometheus, dashboard_exprs, metric_names

pytestmark = pytest.mark.mosquitto


def test_grafana_agent_panels_query_only_metrics_a_live_agent_exports(agent_with_model, tmp_path) -> None:  # noqa: F811
    import tritonclient.http as httpclient

    agent, _ = agent_with_model
    client = httpclient.InferenceServerClient(url=agent.api)
    inp = httpclient.InferInput("x", list(X.shape), "FP32")
    inp.set_data_from_numpy(X)
    client.infer("testmodel", [inp])
    try:  # one refused request, so the failure counter has a sample as it would in production
        client.infer("testmodel", [httpclient.InferInput("y", [1], "FP32")])
    except Exception:  # noqa: BLE001 - the refusal is the point
        pass
    client.close()
    text = urllib.request.urlopen(f"http://{agent.api}/metrics", timeout=10).read().decode()
    have = {re.split(r"[{ ]", ln, maxsplit=1)[0] for ln in text.splitlines() if ln and not ln.startswith("#")}

    exprs = [e for qs in dashboard_exprs(agent=True).values() for e in qs]
    used = metric_names(exprs)
    assert len(exprs) >= 4 and used
    missing = sorted(used - have)
    assert not missing, f"the dashboard's agent panels query metrics the agent does not export: {missing}"
    # The shipped alerting rules' agent group too (docs/prometheus/edgefleet-alerts.yml).
    rules = (DASHBOARD.parents[1] / "prometheus" / "edgefleet-alerts.yml").read_text()
    alert_metrics = metric_names([rules.partition("- name: edgefleet-agent")[2]])
    assert alert_metrics and not alert_metrics - have, sorted(alert_metrics - have)
    # And a real Prometheus scraping this agent gets series for every agent panel's query.
    prom = Prometheus(tmp_path, {"edgefleet-agent": agent.api})
    try:
        prom.wait_scraped(3)
        bad = prom.run_dashboard(dashboard_exprs(agent=True), "edgefleet-agent")
    finally:
        prom.stop()
    assert not bad, bad
