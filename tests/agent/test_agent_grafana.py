"""The Grafana dashboard's agent panels (docs/grafana/edgefleet.json, rows titled "Agent ...") query only metrics a
live agent serving a model exports on its own /metrics (the controller's panels: tests/fleet/test_fleet_metrics.py)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from test_api_tritonclient import X, agent_with_model  # noqa: F401 - the fixture, shared

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "edgefleet.json"


def test_grafana_agent_panels_query_only_metrics_a_live_agent_exports(agent_with_model) -> None:  # noqa: F811
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

    dash = json.loads(DASHBOARD.read_text())
    row, exprs = "", []
    for p in dash["panels"]:
        if p["type"] == "row":
            row = p["title"]
        elif row.startswith("Agent"):
            exprs += [t["expr"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:edgefleet|process)_[a-z0-9_]+)\b", e)}
    assert len(exprs) >= 4 and used
    missing = sorted(used - have)
    assert not missing, f"the dashboard's agent panels query metrics the agent does not export: {missing}"
