"""Per-node sensitivity: INT8 that collapses a detector's class scores is rescued by keeping one node in float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from edgefleet.packager import PackageOptions, package
from edgefleet.packager.sensitivity import rank_nodes, with_data_movement_successors
from edgefleet.packager.steps import make_plan, run_plan
from edgefleet.sdk.bundle import verify_bundle
from edgefleet.sdk.errors import AccuracyBudgetError

NO_TIMING = PackageOptions(measure=False)


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from packager_models import make_detector

    return make_detector(tmp_path_factory.mktemp("det") / "detector.onnx")


def test_rank_nodes_puts_the_concat_that_mixes_scales_first(detector, photos, tmp_path):
    np.savez(tmp_path / "c.npz", image=np.stack([s["image"] for s in photos[:8]]))
    base, _ = run_plan(detector, tmp_path / "b", make_plan([("check", {}), ("optimize", {"level": "basic"})]))
    q, _ = run_plan(base, tmp_path / "q", make_plan([("quantize_static", {"calibration": str(tmp_path / "c.npz")})]))
    ranked = rank_nodes(base, q, photos[8:10], tmp_path / "s")
    assert ranked[0][0] == "concat" and ranked[0][1] > 0.5


def test_excluding_a_node_takes_its_data_movement_successors_along(detector):
    assert with_data_movement_successors(detector, ["concat"]) == ["concat", "flatten"]
    assert with_data_movement_successors(detector, ["backbone0"]) == ["backbone0"]


def test_package_rescues_int8_by_excluding_the_most_sensitive_node(detector, photos, signing_key, trusted, tmp_path):
    # the toy detector's random class head puts many anchors near the threshold, where INT8 noise flips ~7% of
    # them even with the Concat in float: a looser detection budget here, the default one on the real YOLOv8n below
    [res] = package(detector, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path, calibration=photos[:8],
                    validation=photos[8:], precision="int8", options=NO_TIMING, budget=["detection_f1=0.9"])
    cands = {c["name"]: c for c in res.report["candidates"]}
    plain = cands["int8-static"]["accuracy"]["outputs"][0]
    assert plain["cosine"] > 0.999 and plain["collapsed_channels"]  # high cosine, collapsed class scores
    chosen = cands[res.report["chosen"]["name"]]
    assert chosen["name"].startswith("int8-static-excl") and chosen["within_budget"]
    assert "concat, flatten" in chosen["why"]  # the Concat that mixes scales, and the Reshape it feeds
    assert verify_bundle(res.path, trusted).manifest.precision == "int8"


def test_package_yolov8n_int8_excluding_its_final_concat_ends_the_collapse_and_the_gate_still_judges(signing_key,
                                                                                                  tmp_path):
    """Static INT8 collapses YOLOv8n's class scores (the final Concat shares one scale with pixel boxes); keeping the
    Concat in float ends the collapse. On 8 validation photos the gate still finds one class channel off (cosine
    ~0.85) and detections that differ after thresholding, so INT8 is refused: with the 2 samples this test once used,
    it passed."""
    from packager_models import nudenet_model, photo_samples

    model = nudenet_model()
    if model is None:
        pytest.skip("nudenet (ships the YOLOv8n 320n.onnx) is not installed: pip install --no-deps nudenet")
    data = photo_samples(16, 320, name="images")
    try:
        [res] = package(model, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path, calibration=data[:8],
                        validation=data[8:], precision="int8", options=NO_TIMING)
        lines = {c["name"]: c["accuracy"]["failures"] for c in res.report["candidates"] if c["accuracy"]}
    except AccuracyBudgetError as exc:
        lines = {ln.split(":")[0].strip(): [ln] for ln in str(exc).splitlines()[1:]}
    assert any("collapsed" in f for f in lines["int8-static"])
    excl = [n for n in lines if n.startswith("int8-static-excl")]
    assert excl and not any("collapsed" in f for f in lines[excl[0]]), lines[excl[0]]
