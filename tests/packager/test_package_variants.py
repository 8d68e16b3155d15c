"""Multi-variant bundles from package(): every verified candidate ships, each with its own tolerances, identical
files stored once; real ORT sessions open and self-test every variant as a device would."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from edgefleet.packager import PackageOptions, package
from edgefleet.sdk.bundle import extract_bundle, verify_bundle
from edgefleet.sdk.outputs import OutputStat, reference_from_metadata
from edgefleet.sdk.runtime import Model
from edgefleet.sdk.timing import TimingPolicy

FAST = PackageOptions(timing=TimingPolicy(min_rounds=3, max_rounds=9, budget_s=5.0))


def _model_members(bundle: Path) -> dict[str, int]:
    with tarfile.open(bundle) as tf:
        return {m.name: m.size for m in tf.getmembers() if m.name.startswith("model/")}


def test_package_variants_on_cpu_target_ships_every_verified_candidate_and_each_self_tests(
        convnet, photos, signing_key, trusted, tmp_path):
    [res] = package(convnet, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path / "out", calibration=photos[:8],
                    validation=photos[8:], options=FAST, variants=True)
    m = verify_bundle(res.path, trusted).manifest
    names = [v.name for v in m.variants]
    ok = [c["name"] for c in res.report["candidates"] if c["within_budget"]]
    assert len(names) >= 2 and set(names) == set(ok) and names[0] == res.report["chosen"]["name"]
    first = m.variants[0]
    assert (first.model, first.precision, first.validation) == (m.model, m.precision, m.validation)
    # the output statistic for drift, from the classifier's kind, and its reference over the validation data
    assert OutputStat.from_metadata(m.metadata) == OutputStat("probs", "top1", softmax=False)
    q, n = reference_from_metadata(m.metadata)  # type: ignore[misc]
    assert n == 36 and 0.0 < q[0] <= q[-1] <= 1.0
    # each variant has its own tolerances, from its own outputs
    assert res.report["variant_tolerances"].keys() == set(names)
    assert res.report["selftest_here"]["ok"] and set(res.report["selftest_here"]["variants"]) == set(names)
    dest = tmp_path / "x"
    extract_bundle(res.path, trusted, dest)
    for v in m.variants:
        model = Model.open(dest, trusted, cache_dir=tmp_path / "cache" / v.name, variant=v.name)
        assert model.variant == v.name and model.manifest.precision == v.precision
        assert model.self_test().ok
        assert model.placement.serving == ("CPUExecutionProvider",)


def test_package_unmeasured_target_defaults_to_variants_sharing_identical_files(convnet, photos, signing_key,
                                                                                trusted, tmp_path):
    [res] = package(convnet, ["nvidia-gpu"], key=signing_key, out_dir=tmp_path / "v", calibration=photos[:8],
                    validation=photos[8:])
    m = verify_bundle(res.path, trusted).manifest
    names = [v.name for v in m.variants]
    # the conservative choice first (what a device that cannot choose runs), then the others verified here
    assert names[0] == "fp16" and {"fp32", "int8-static", "cpu-fp32"} <= set(names)
    assert res.report["variants"]["asked"] is None and res.report["variants"]["built"] is True
    by_name = {v.name: v for v in m.variants}
    # TensorRT FP16 is a builder flag on the FP32 weights, and the CPU EP runs that same FP32 file: stored once
    assert by_name["fp16"].model == by_name["fp32"].model == by_name["cpu-fp32"].model
    assert [p.name for p in by_name["cpu-fp32"].providers] == ["CPUExecutionProvider"]
    assert by_name["int8-static"].model != by_name["fp32"].model
    members = _model_members(res.path)
    assert len(members) == 2
    # the bundle does not grow by the full model per variant
    single = package(convnet, ["nvidia-gpu"], key=signing_key, out_dir=tmp_path / "s", calibration=photos[:8],
                     validation=photos[8:], variants=False)[0]
    assert not verify_bundle(single.path, trusted).manifest.variants
    assert sum(members.values()) < 2 * sum(_model_members(single.path).values())


@pytest.mark.openvino
def test_package_openvino_variants_each_self_test_on_the_openvino_ep(convnet, photos, signing_key, trusted,
                                                                     tmp_path):
    """Run in .venv-openvino (make test-openvino): every variant is verified and self-tested on the real EP."""
    from edgefleet.sdk.runtime import ort_info

    if "OpenVINOExecutionProvider" not in ort_info().providers:
        pytest.skip("needs onnxruntime-openvino (make test runs it in .venv-openvino)")
    [res] = package(convnet, ["intel-openvino-cpu"], key=signing_key, out_dir=tmp_path / "out",
                    calibration=photos[:8], validation=photos[8:], options=FAST, variants=True)
    m = verify_bundle(res.path, trusted).manifest
    names = [v.name for v in m.variants]
    assert len(names) >= 2 and res.report["selftest_here"]["ok"]
    dest = tmp_path / "x"
    extract_bundle(res.path, trusted, dest)
    for v in m.variants:
        model = Model.open(dest, trusted, cache_dir=tmp_path / "cache" / v.name, variant=v.name)
        assert model.placement.serving[0] == v.providers[0].name  # the EP the variant asked for really runs
        assert model.self_test().ok
