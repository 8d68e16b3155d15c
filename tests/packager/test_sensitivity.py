"""Per-node sensitivity: INT8 that collapses a detector's class scores is rescued by keeping one node in float."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet.packager import PackageOptions, package
from edgefleet.packager.sensitivity import rank_nodes, with_data_movement_successors
from edgefleet.packager.steps import make_plan, run_plan
from edgefleet.sdk.bundle import verify_bundle
from edgefleet.sdk.validation import save_validation

NO_TIMING = PackageOptions(measure=False)


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from packager_models import make_detector

    return make_detector(tmp_path_factory.mktemp("det") / "detector.onnx")


def test_rank_nodes_puts_the_concat_that_mixes_scales_first(detector, photos, tmp_path):
    save_validation(tmp_path / "c.npz", [(s, {}) for s in photos[:8]])
    base, _ = run_plan(detector, tmp_path / "b", make_plan([("check", {}), ("optimize", {"level": "basic"})]))
    q, _ = run_plan(base, tmp_path / "q", make_plan([("quantize_static", {"calibration": str(tmp_path / "c.npz")})]))
    ranked = rank_nodes(base, q, photos[8:10], tmp_path / "s")
    assert ranked[0][0] == "concat" and ranked[0][1] > 0.5


def test_excluding_a_node_takes_its_data_movement_successors_along(detector):
    assert with_data_movement_successors(detector, ["concat"]) == ["concat", "flatten"]
    assert with_data_movement_successors(detector, ["backbone0"]) == ["backbone0"]


def test_package_rescues_int8_by_excluding_the_most_sensitive_node(detector, photos, signing_key, trusted, tmp_path):
    [res] = package(detector, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path, calibration=photos[:8],
                    validation=photos[8:], precision="int8", options=NO_TIMING)
    cands = {c["name"]: c for c in res.report["candidates"]}
    plain = cands["int8-static"]["accuracy"]["outputs"][0]
    assert plain["cosine"] > 0.999 and plain["collapsed_channels"]  # high cosine, collapsed class scores
    chosen = cands[res.report["chosen"]["name"]]
    assert chosen["name"].startswith("int8-static-excl") and chosen["within_budget"]
    assert "concat, flatten" in chosen["why"]  # the Concat that mixes scales, and the Reshape it feeds
    assert verify_bundle(res.path, trusted).manifest.precision == "int8"


def test_package_yolov8n_int8_keeps_class_scores_by_excluding_its_final_concat(signing_key, tmp_path):
    from packager_models import nudenet_model, photo_samples

    model = nudenet_model()
    if model is None:
        pytest.skip("nudenet (ships the YOLOv8n 320n.onnx) is not installed: pip install --no-deps nudenet")
    data = photo_samples(10, 320, name="images")
    [res] = package(model, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path, calibration=data[:8],
                    validation=data[8:], precision="int8", options=NO_TIMING)
    assert res.report["chosen"]["name"].startswith("int8-static-excl")
    failing = next(c for c in res.report["candidates"] if c["name"] == "int8-static")
    assert any("collapsed" in f for f in failing["accuracy"]["failures"])
