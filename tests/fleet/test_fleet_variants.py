"""A multi-variant bundle deployed to a real agent (``edgefleet agent run`` subprocess) over a real Mosquitto: the
agent self-tests every variant, never pins the broken one, reports the whole table in its deploy event, and the
controller shows the pinned variant per device and per device class (``GET /api/variants``)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from _fleet_util import Agent, wait_until
from click.testing import CliRunner
from edgefleet.sdk.bundle import SessionConfig
from edgefleet.sdk.cli import cli
from edgefleet.sdk.testing import VariantSpec, build_test_variant_bundle

from tests.conftest import make_mlp, make_padded_mlp

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """SQLite only: the device side is what this tests; the controller tests cover both backends."""
    return str(tmp_path / "fleet.db")


def test_real_agent_pins_a_passing_variant_and_the_controller_shows_it(controller_factory, mosquitto, fleet_id,
                                                                       trust_file, signing_key, tmp_path) -> None:
    good = make_mlp(tmp_path / "good.onnx")
    padded = make_padded_mlp(good, tmp_path / "padded.onnx")
    broken = make_mlp(tmp_path / "broken.onnx", seed=9)
    bundle = build_test_variant_bundle(good, [
        VariantSpec("padded", padded, session=SessionConfig(graph_optimization_level="disabled")),
        VariantSpec("fp32", good),
        VariantSpec("broken", broken, precision="int8"),
    ], tmp_path / "v.efb", signing_key)
    ctl = controller_factory()
    agent = Agent(tmp_path, "var-0", mosquitto.url, fleet_id, trust_file)
    try:
        wait_until(lambda: getattr(ctl.store.device(fleet_id, "var-0"), "state", None) == "online", 60,
                   what="agent online")
        res = CliRunner().invoke(cli, ["deploy", str(bundle), "--to", "all", "--controller", ctl.url, "--json",
                                       "--wait"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["state"] == "completed"

        def deploy_event() -> dict | None:
            for e in ctl.store.events(fleet_id, "var-0", 0.0, 200):
                if e.kind == "deploy" and e.data.get("variants"):
                    return dict(e.data)
            return None
        wait_until(deploy_event, 30, what="the deploy event with the variant table")
        data = deploy_event()
        assert data is not None
        rows = {r["variant"]: r for r in data["variants"]["table"]}
        assert list(rows) == ["padded", "fp32", "broken"]
        assert rows["broken"]["passed"] is False and not rows["broken"]["pinned"]
        assert rows["padded"]["passed"] and rows["fp32"]["passed"]
        pinned = data["variant"]
        assert pinned in ("padded", "fp32") and rows[pinned]["pinned"]
        fastest = min(("padded", "fp32"), key=lambda n: rows[n]["ratio"])
        if pinned != fastest:  # the data could not decide: the first passing variant stays
            assert pinned == "padded" and "not faster with 95% confidence" in data["variants"]["why"]
        assert all(rows[n]["providers"] == ["CPUExecutionProvider"] for n in ("padded", "fp32"))

        def shown() -> bool:
            d = ctl.store.device(fleet_id, "var-0")
            return d is not None and d.description is not None and any(
                m.variant == pinned for m in d.description.models)
        wait_until(shown, 30, what="the status description naming the pinned variant")
        with urllib.request.urlopen(f"{ctl.url}/api/variants?name=testmodel") as r:
            picks = json.loads(r.read())["variants"]
        assert picks == [{"name": "testmodel", "version": "1.0.0", "digest": data["digest"], "profile": "x86-cpu",
                          "variant": pinned, "devices": 1, "examples": ["var-0"]}]
        with urllib.request.urlopen(f"{ctl.url}/api/devices/var-0") as r:
            dev = json.loads(r.read())
        assert dev["description"]["models"][0]["variant"] == pinned
    finally:
        agent.stop()
