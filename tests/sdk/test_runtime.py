"""The runtime: input checks, provider choice without silent fallback, self-test, benchmark and profile.

CUDA and TensorRT cannot run here (no GPU): the tests below prove that asking for them gives a clear error, or a
recorded CPU fallback when allowed. The OpenVINO EP runs for real in ``.venv-openvino`` (tests marked ``openvino``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bundle_tools import shipped
from edgefleet.sdk.bundle import ProviderConfig, SessionConfig, extract_bundle, verify_bundle, write_bundle
from edgefleet.sdk.errors import (
    BundleCompatibilityError,
    InputError,
    ProviderFallbackError,
    ProviderUnavailableError,
    SelfTestError,
)
from edgefleet.sdk.keys import TrustedKeys
from edgefleet.sdk.runtime import Model, make_session_options, ort_info
from edgefleet.sdk.validation import load_validation, save_validation

CUDA = (ProviderConfig("CUDAExecutionProvider", {"device_id": "0"}), ProviderConfig("CPUExecutionProvider"))
OV_CPU = {"device_type": "CPU"}


def _install(path: Path, trusted: TrustedKeys, root: Path) -> Path:
    dest = root / "store" / verify_bundle(path, trusted).digest
    extract_bundle(path, trusted, dest)
    return dest


@pytest.fixture
def mlp(mlp_model, make_bundle, trusted, tmp_path: Path) -> Model:
    return Model.open(_install(make_bundle(mlp_model), trusted, tmp_path), trusted, cache_dir=tmp_path / "cache")


# -- input checks ---------------------------------------------------------------------------------------------------

GOOD = np.zeros((2, 16), np.float32)


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ({}, "missing input(s) ['x']; model inputs are ['x']"),
        ({"x": GOOD, "y": GOOD}, "unknown input(s) ['y']; model inputs are ['x']"),
        ({"X": GOOD}, "missing input(s) ['x']; unknown input(s) ['X']"),
        ({"x": GOOD.astype(np.float64)}, "input 'x': dtype float64 given, model expects float32"),
        ({"x": np.zeros(16, np.float32)}, "input 'x': rank 1 (shape [16]) given, model expects rank 2 ['batch', 16]"),
        ({"x": np.zeros((2, 15), np.float32)}, "input 'x': dim 1 is 15, model expects 16"),
        ({"x": [[0.0] * 16]}, "input 'x': expected a numpy array, got list"),
    ],
    ids=["missing", "extra", "renamed", "dtype", "rank", "fixed_dim", "not_array"],
)
def test_model_run_rejects_bad_inputs_with_clear_message(mlp: Model, feed: dict, message: str) -> None:
    with pytest.raises(InputError) as err:
        mlp.run(feed)
    assert message in str(err.value)
    assert mlp.recorder.total_count == 0  # nothing ran


def test_model_run_accepts_any_size_on_symbolic_dim_and_records_latency(mlp: Model) -> None:
    for batch in (1, 7, 64):
        assert mlp.run({"x": np.zeros((batch, 16), np.float32)})["probs"].shape == (batch, 4)
    snap = mlp.recorder.take(now=1e12)
    assert snap.count == 3 and snap.errors == 0
    p = snap.percentiles()
    assert p["p50"] is not None and p["p50"] > 0
    assert mlp.first_run_ms is not None and mlp.first_run_ms > 0


def test_model_run_matches_bare_ort_session(mlp: Model, mlp_model: Path) -> None:
    import onnxruntime as ort

    x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    bare = ort.InferenceSession(str(mlp_model), make_session_options(mlp.manifest.session),
                                providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(mlp.run({"x": x})["probs"], bare.run(["probs"], {"x": x})[0])


# -- providers ------------------------------------------------------------------------------------------------------

def test_model_open_raises_provider_unavailable_when_cuda_requested_on_this_machine(
    mlp_model, make_bundle, trusted, tmp_path: Path
) -> None:
    if "CUDAExecutionProvider" in ort_info().providers:
        pytest.skip("this machine has CUDA")
    dest = _install(make_bundle(mlp_model, target="nvidia-gpu", providers=CUDA), trusted, tmp_path)
    with pytest.raises(ProviderUnavailableError) as err:
        Model.open(dest, trusted, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "asks for CUDAExecutionProvider" in msg and "nvidia-gpu" in msg and ort_info().version in msg
    assert err.value.code == "provider.unavailable"


def test_model_open_runs_on_cpu_and_records_fallback_when_cuda_requested_with_allow_fallback(
    mlp_model, make_bundle, trusted, tmp_path: Path
) -> None:
    if "CUDAExecutionProvider" in ort_info().providers:
        pytest.skip("this machine has CUDA")
    dest = _install(make_bundle(mlp_model, target="nvidia-gpu", providers=CUDA), trusted, tmp_path)
    model = Model.open(dest, trusted, allow_fallback=True, cache_dir=tmp_path / "cache")
    pl = model.placement
    assert pl.fallback is True
    assert "CUDAExecutionProvider" in pl.reason
    assert pl.requested == ("CPUExecutionProvider",)
    assert pl.serving == ("CPUExecutionProvider",)
    assert pl.to_dict()["fallback"] is True
    assert model.self_test().ok
    assert model.run({"x": GOOD})["probs"].shape == (2, 4)


def test_model_open_raises_provider_unavailable_when_openvino_missing(
    mlp_model, make_bundle, trusted, tmp_path: Path
) -> None:
    if "OpenVINOExecutionProvider" in ort_info().providers:
        pytest.skip("OpenVINO is installed here (see the openvino tests)")
    ov_only = (ProviderConfig("OpenVINOExecutionProvider", OV_CPU),)
    path = make_bundle(mlp_model, target="intel-openvino-cpu", providers=ov_only)
    with pytest.raises(ProviderUnavailableError, match="asks for OpenVINOExecutionProvider"):
        Model.open(_install(path, trusted, tmp_path), trusted)


def test_model_open_raises_compatibility_error_when_min_ort_version_too_high(
    mlp_model, make_bundle, trusted, tmp_path: Path
) -> None:
    dest = _install(make_bundle(mlp_model, min_ort_version="99.0.0"), trusted, tmp_path)
    with pytest.raises(BundleCompatibilityError, match=r"needs ONNX Runtime >= 99\.0\.0, this device has"):
        Model.open(dest, trusted)


def test_model_cpu_placement_is_not_a_fallback(mlp: Model) -> None:
    pl = mlp.placement
    assert pl.fallback is False and pl.reason == ""
    assert pl.serving == ("CPUExecutionProvider",)
    if pl.nodes:  # ORT >= 1.2x records which EP runs each node
        assert set(pl.nodes) == {"CPUExecutionProvider"} and pl.nodes["CPUExecutionProvider"] > 0


def test_session_config_options_reach_the_ort_session(mlp_model, make_bundle, trusted, tmp_path: Path) -> None:
    cfg = SessionConfig(graph_optimization_level="basic", intra_op_num_threads=1,
                        config_entries={"session.use_env_allocators": "0"})
    model = Model.open(_install(make_bundle(mlp_model, session=cfg), trusted, tmp_path), trusted)
    so = model.session.get_session_options()
    assert so.intra_op_num_threads == 1
    assert so.graph_optimization_level.name == "ORT_ENABLE_BASIC"


# -- self-test, benchmark, profile ----------------------------------------------------------------------------------

def _resign_with_perturbed_references(src: Path, trusted: TrustedKeys, key, tmp: Path, delta: float) -> Path:
    """A correctly signed bundle whose reference outputs are ``delta`` away from what the model computes."""
    dest = _install(src, trusted, tmp / "orig")
    vm = verify_bundle(src, trusted)
    samples = load_validation(dest / "validation.npz")
    perturbed = [(ins, {k: v + np.float32(delta) for k, v in outs.items()}) for ins, outs in samples]
    save_validation(tmp / "validation.npz", perturbed)
    files = {n: dest / n for n in vm.manifest.files}
    files["validation.npz"] = tmp / "validation.npz"
    out = tmp / "perturbed.efb"
    from dataclasses import replace

    write_bundle(out, replace(vm.manifest, files={}, created=""), files, key)
    return out


def test_self_test_fails_when_reference_outputs_perturbed_beyond_tolerance(
    mlp_model, make_bundle, trusted, signing_key, tmp_path: Path
) -> None:
    bad = _resign_with_perturbed_references(make_bundle(mlp_model), trusted, signing_key, tmp_path, delta=0.01)
    model = Model.open(_install(bad, trusted, tmp_path / "bad"), trusted)
    rep = model.self_test()
    assert not rep.ok
    assert rep.failures and all(f.name == "probs" for f in rep.failures)
    assert "max abs error 0.01 > 0.0001" in rep.to_dict()["failures"][0]
    assert rep.to_dict()["outputs"]["probs"]["max_abs"] == pytest.approx(0.01, rel=1e-3)


def test_self_test_passes_when_perturbation_within_tolerance(
    mlp_model, make_bundle, trusted, signing_key, tmp_path: Path
) -> None:
    ok = _resign_with_perturbed_references(make_bundle(mlp_model), trusted, signing_key, tmp_path, delta=1e-6)
    assert Model.open(_install(ok, trusted, tmp_path / "ok"), trusted).self_test().ok


def test_self_test_raises_when_bundle_has_no_validation_set(mlp: Model, mlp_model: Path) -> None:
    bare = Model(mlp_model, mlp.manifest)  # no root: nothing to read the validation set from
    with pytest.raises(SelfTestError, match="no validation set"):
        bare.self_test()


def test_benchmark_reports_ordered_percentiles_and_cold_start(mlp: Model) -> None:
    b = mlp.benchmark(50, warmup=2)
    d = b.to_dict()
    assert d["runs"] == 50
    assert 0 < b.min_ms <= b.p50_ms <= b.p95_ms <= b.p99_ms
    assert b.mean_ms > 0 and b.throughput > 0 and b.session_ms > 0 and b.first_run_ms > 0
    with pytest.raises(ValueError, match="runs must be >= 1"):
        mlp.benchmark(0)


def test_profile_returns_time_per_op_type_and_provider(mlp: Model) -> None:
    prof = mlp.profile(runs=3)
    ops = {k.split("@")[0] for k in prof}
    # ORT's 'all' level fuses MatMul+Add+Relu into FusedGemm; the last MatMul and the Softmax stay as they are.
    assert {"MatMul", "Softmax"} <= ops, prof
    assert all(k.endswith("@CPUExecutionProvider") for k in prof)
    assert all(v["ms"] >= 0 and v["calls"] > 0 for v in prof.values())


def test_profile_on_real_model_lists_conv_ops(make_bundle, trusted, tmp_path: Path) -> None:
    model = Model.open(_install(make_bundle(shipped("magika")), trusted, tmp_path), trusted)
    prof = model.profile(runs=2)
    assert len(prof) >= 3
    times = [v["ms"] for v in prof.values()]
    assert times == sorted(times, reverse=True)  # largest first


# -- OpenVINO EP, for real (.venv-openvino) -------------------------------------------------------------------------

@pytest.mark.openvino
def test_openvino_bundle_is_served_by_openvino_ep(mlp_model, make_bundle, trusted, tmp_path: Path) -> None:
    providers = (ProviderConfig("OpenVINOExecutionProvider", {**OV_CPU, "cache_dir": "{cache_dir}/openvino"}),
                 ProviderConfig("CPUExecutionProvider"))
    path = make_bundle(mlp_model, target="intel-openvino-cpu", providers=providers,
                       session=SessionConfig(graph_optimization_level="basic"))
    model = Model.open(_install(path, trusted, tmp_path), trusted, cache_dir=tmp_path / "cache")
    pl = model.placement
    assert pl.serving[0] == "OpenVINOExecutionProvider", pl.to_dict()
    assert pl.fallback is False
    if pl.nodes:
        assert pl.nodes.get("OpenVINOExecutionProvider", 0) > 0
    assert (tmp_path / "cache" / "openvino").is_dir()  # {cache_dir} was filled in and created
    assert model.self_test().ok
    assert model.run({"x": GOOD})["probs"].shape == (2, 4)


@pytest.mark.openvino
def test_openvino_bundle_runs_real_magika_model(make_bundle, trusted, tmp_path: Path) -> None:
    providers = (ProviderConfig("OpenVINOExecutionProvider", OV_CPU), ProviderConfig("CPUExecutionProvider"))
    path = make_bundle(shipped("magika"), target="intel-openvino-cpu", providers=providers,
                       session=SessionConfig(graph_optimization_level="basic"))
    model = Model.open(_install(path, trusted, tmp_path), trusted)
    assert model.placement.serving[0] == "OpenVINOExecutionProvider"
    assert model.self_test().ok
    assert model.benchmark(5).p50_ms > 0


@pytest.mark.openvino
def test_model_open_raises_fallback_when_openvino_precision_fp16_on_cpu_device(
    mlp_model, make_bundle, trusted, tmp_path: Path
) -> None:
    """Measured here: the EP rejects precision=FP16 on the CPU device; ORT quietly serves everything on the CPU EP."""
    providers = (ProviderConfig("OpenVINOExecutionProvider", {**OV_CPU, "precision": "FP16"}),
                 ProviderConfig("CPUExecutionProvider"))
    dest = _install(make_bundle(mlp_model, target="intel-openvino-cpu", providers=providers), trusted, tmp_path)
    with pytest.raises(ProviderFallbackError, match="OpenVINOExecutionProvider") as err:
        Model.open(dest, trusted)
    assert err.value.code == "provider.fallback"
    model = Model.open(dest, trusted, allow_fallback=True)
    assert model.placement.fallback is True
    assert model.placement.serving == ("CPUExecutionProvider",)
    assert "OpenVINOExecutionProvider" in model.placement.reason


@pytest.mark.openvino
def test_model_open_raises_fallback_when_openvino_only_bundle_cannot_create_its_ep(
    mlp_model, make_bundle, trusted, tmp_path: Path
) -> None:
    """Without the CPU EP in the list the runtime sets session.disable_cpu_ep_fallback; ORT then refuses the session."""
    providers = (ProviderConfig("OpenVINOExecutionProvider", {**OV_CPU, "precision": "FP16"}),)
    dest = _install(make_bundle(mlp_model, target="intel-openvino-cpu", providers=providers), trusted, tmp_path)
    with pytest.raises(ProviderFallbackError, match="CPU fallback is disabled"):
        Model.open(dest, trusted)


def _unique_model(path: Path) -> Path:
    """One Unique node: an op the OpenVINO EP does not claim, so ORT assigns it to the CPU EP."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["y"], sorted=1)], "unique",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.openvino
def test_model_open_raises_fallback_when_openvino_is_assigned_zero_nodes(make_bundle, trusted, tmp_path: Path) -> None:
    providers = (ProviderConfig("OpenVINOExecutionProvider", OV_CPU), ProviderConfig("CPUExecutionProvider"))
    src = _unique_model(tmp_path / "unique.onnx")
    dest = _install(make_bundle(src, target="intel-openvino-cpu", providers=providers), trusted, tmp_path)
    with pytest.raises(ProviderFallbackError, match=r"runs 0 of 1 nodes \(CPUExecutionProvider: 1\)"):
        Model.open(dest, trusted)
    model = Model.open(dest, trusted, allow_fallback=True)
    assert model.placement.registered[0] == "OpenVINOExecutionProvider"  # registered, yet serving nothing
    assert model.placement.serving == ("CPUExecutionProvider",)
    out = model.run({"x": np.array([3, 1, 3, 2, 1, 3], np.float32)})
    np.testing.assert_array_equal(out["y"], [1, 2, 3])


# -- ORT failures are ModelErrors -----------------------------------------------------------------------------------

def test_model_run_translates_ort_failure_and_counts_error(make_bundle, trusted, tmp_path: Path) -> None:
    from edgefleet.sdk.errors import ModelError

    samples = [{"input": np.zeros((1, 512), np.float32), "state": np.zeros((2, 1, 128), np.float32),
                "sr": np.array(16000, np.int64)}]
    model = Model.open(_install(make_bundle(shipped("silero-vad"), samples=samples), trusted, tmp_path), trusted)
    bad = {**samples[0], "state": np.zeros((2, 3, 128), np.float32)}  # passes the manifest check, not the graph
    with pytest.raises(ModelError, match="inference failed"):
        model.run(bad)
    snap = model.recorder.take(now=1e12)
    assert (snap.count, snap.errors) == (0, 1)


def test_model_open_raises_model_error_when_signed_model_is_not_onnx(
    mlp_model, make_bundle, trusted, signing_key, tmp_path: Path
) -> None:
    from dataclasses import replace

    from edgefleet.sdk.errors import ModelError

    good = make_bundle(mlp_model)
    dest = _install(good, trusted, tmp_path / "good")
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07this is not a protobuf model" * 10)
    vm = verify_bundle(good, trusted)
    files = {n: dest / n for n in vm.manifest.files} | {"model/model.onnx": tmp_path / "garbage.onnx"}
    out = tmp_path / "garbage.efb"
    write_bundle(out, replace(vm.manifest, files={}), files, signing_key)
    with pytest.raises(ModelError, match="cannot create an ONNX Runtime session"):
        Model.open(_install(out, trusted, tmp_path / "bad"), trusted)


def test_self_test_raises_when_sample_count_differs_from_manifest(
    mlp_model, make_bundle, trusted, signing_key, tmp_path: Path
) -> None:
    from dataclasses import replace

    good = make_bundle(mlp_model)
    dest = _install(good, trusted, tmp_path / "good")
    vm = verify_bundle(good, trusted)
    assert vm.manifest.validation is not None
    wrong = replace(vm.manifest, files={}, validation=replace(vm.manifest.validation, samples=5))
    out = tmp_path / "wrong.efb"
    write_bundle(out, wrong, {n: dest / n for n in vm.manifest.files}, signing_key)
    model = Model.open(_install(out, trusted, tmp_path / "wrong"), trusted)
    with pytest.raises(SelfTestError, match="validation set has 2 samples, manifest says 5"):
        model.self_test()


def test_model_run_from_many_threads_gives_right_outputs_and_counts_every_call(mlp: Model) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    feeds = [rng.standard_normal((3, 16)).astype(np.float32) for _ in range(8)]
    expected = [mlp.run({"x": x})["probs"] for x in feeds]
    mlp.recorder.take(now=0.0)

    def work(i: int) -> bool:
        return all(np.array_equal(mlp.run({"x": feeds[(i + k) % 8]})["probs"], expected[(i + k) % 8])
                   for k in range(100))

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(work, range(8)))
    assert mlp.recorder.take(now=1.0).count == 800
