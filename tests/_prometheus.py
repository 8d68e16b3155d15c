"""A real Prometheus server (Debian's ``prometheus`` package) scraping live edgefleet processes, for the tests that
run the Grafana dashboard's queries: its PromQL must parse and return series, not only name metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, wait_until

__all__ = ["DASHBOARD", "Prometheus", "dashboard_exprs", "metric_names", "promtool_check_rules"]

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "edgefleet.json"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def dashboard_exprs(agent: bool) -> dict[str, list[str]]:
    """Panel title -> PromQL of the dashboard's agent panels (rows titled "Agent ...") or controller panels."""
    dash = json.loads(DASHBOARD.read_text())
    out: dict[str, list[str]] = {}
    row = ""
    for p in dash["panels"]:
        if p["type"] == "row":
            row = p["title"]
        elif row.startswith("Agent") == agent:
            out[p["title"]] = [t["expr"] for t in p.get("targets", [])]
    return out


def _substitute(expr: str, job: str) -> str:
    """Grafana's template variables as the dashboard's defaults resolve them (All fleets; the agent job)."""
    return expr.replace("$fleet", ".*").replace("$agent_job", job)


def promtool_check_rules(exprs: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    """``promtool check rules`` on every expression as a recording rule: PromQL syntax checked by Prometheus's own
    parser, no server needed."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make system-deps installs Debian's prometheus package)")
    rules = ["groups:", "  - name: grafana", "    rules:"]
    for i, e in enumerate(exprs):
        rules += [f"      - record: dashboard:q{i}", f"        expr: {json.dumps(_substitute(e, 'edgefleet-agent'))}"]
    path = tmp / "dashboard-rules.yml"
    path.write_text("\n".join(rules) + "\n")
    return subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)


class Prometheus:
    """``prometheus`` scraping ``targets`` (job name -> host:port) every second, with its own data directory."""

    def __init__(self, tmp: Path, targets: dict[str, str]) -> None:
        if not Path(PROMETHEUS).exists():
            pytest.skip("the Prometheus server is not installed (Debian: apt-get install prometheus)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = ["global: {scrape_interval: 1s, evaluation_interval: 1s}", "scrape_configs:"]
        for job, target in targets.items():
            conf += [f"  - job_name: {job}", "    static_configs:", f"      - targets: ['{target}']"]
        (tmp / "prometheus.yml").write_text("\n".join(conf) + "\n")
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                                      f"--storage.tsdb.path={tmp / 'prom-data'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.jobs = list(targets)

    def query(self, expr: str) -> dict[str, Any]:
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=30) as r:
            return json.loads(r.read())

    def wait_scraped(self, scrapes: int = 3, timeout: float = 90.0) -> None:
        """Until every job is up and has been scraped ``scrapes`` times (rate() needs two samples)."""
        def ready() -> bool:
            try:
                for job in self.jobs:
                    res = self.query(f'count_over_time(up{{job="{job}"}}[5m])')["data"]["result"]
                    if not res or float(res[0]["value"][1]) < scrapes:
                        return False
                    if self.query(f'up{{job="{job}"}}')["data"]["result"][0]["value"][1] != "1":
                        return False
                return True
            except (OSError, KeyError, IndexError, ValueError):
                return False
        wait_until(ready, timeout, what=f"Prometheus scraping {self.jobs} {scrapes} times")

    def run_dashboard(self, exprs: dict[str, list[str]], job: str) -> dict[str, str]:
        """Each expression as Grafana would send it; title -> why it failed (an error, or no series)."""
        bad = {}
        for title, qs in exprs.items():
            for e in qs:
                res = self.query(_substitute(e, job))
                if res.get("status") != "success":
                    bad[title] = f"{e}: {res.get('error')}"
                elif not res["data"]["result"]:
                    bad[title] = f"{e}: no series"
        return bad

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def metric_names(exprs: list[str]) -> set[str]:
    """Metric names in PromQL expressions (edgefleet_* and the standard process_* names)."""
    return {m for e in exprs for m in re.findall(r"\b((?:edgefleet|process)_[a-z0-9_]+)\b", e)}
