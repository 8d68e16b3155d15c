"""package(): real ORT sessions on test-built and real shipped models; bundles verify, load, run and self-test."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from edgefleet.devices.profile import get_profile
from edgefleet.packager import PackageOptions, package
from edgefleet.packager.planning import offline_level
from edgefleet.sdk.bundle import META_FIXED_SHAPES, META_MEASUREMENT, extract_bundle, verify_bundle
from edgefleet.sdk.cli import cli
from edgefleet.sdk.errors import AccuracyBudgetError, ConfigError, InputError
from edgefleet.sdk.runtime import Model
from edgefleet.sdk.timing import TimingPolicy
from packager_models import shipped_model

QUICK = TimingPolicy(min_rounds=3, max_rounds=9, budget_s=5.0)
FAST = PackageOptions(timing=QUICK)
NO_TIMING = PackageOptions(measure=False)


def _open(bundle: Path, trusted, tmp_path: Path) -> Model:
    dest = tmp_path / f"x-{bundle.stem}"
    extract_bundle(bundle, trusted, dest)
    return Model.open(dest, trusted, cache_dir=tmp_path / "cache")


def _bundle_model(bundle: Path) -> onnx.ModelProto:
    with tarfile.open(bundle) as tf:
        data = tf.extractfile("model/model.onnx").read()  # type: ignore[union-attr]
    return onnx.load_from_string(data)


def test_package_x86_cpu_bundle_verifies_loads_and_passes_self_test(convnet, photos, signing_key, trusted, tmp_path):
    [res] = package(convnet, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path / "out", calibration=photos[:8],
                    validation=photos[8:], options=FAST)
    assert res.path == tmp_path / "out" / "convnet-1.0.0-x86-cpu-vnni.efb"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [res.path.name]
    vm = verify_bundle(res.path, trusted)
    assert vm.manifest.target == "x86-cpu-vnni" and vm.manifest.validation.samples == 8
    assert vm.manifest.metadata[META_MEASUREMENT] == "measured"
    model = _open(res.path, trusted, tmp_path)
    report = model.self_test()
    assert report.ok, report.to_dict()
    assert model.placement.serving == ("CPUExecutionProvider",)
    rep = res.report
    assert rep["selftest_here"]["ok"]  # the packager ran the bundle's own self-test before writing it out
    chosen = next(c for c in rep["candidates"] if c["name"] == rep["chosen"]["name"])
    assert chosen["within_budget"] and vm.manifest.precision == chosen["precision"]
    assert {c["name"] for c in rep["candidates"]} >= {"int8-static", "fp32"}
    # never a loser: anything but FP32 ships only when it is faster than FP32 with confidence (the whole interval)
    if chosen["name"] != "fp32":
        assert chosen["speed"]["ci"][1] < 1.0, chosen["speed"]
    assert rep["timing"]["reference"].endswith("/fp32") and rep["measured_here"] is True
    assert rep["data"]["calibration_samples"] == 8 and rep["data"]["validation_samples"] == 36


def test_package_report_is_in_the_bundle_and_matches(convnet, photos, signing_key, trusted, tmp_path):
    [res] = package(convnet, ["x86-cpu"], key=signing_key, out_dir=tmp_path, calibration=photos[:8], options=FAST)
    with tarfile.open(res.path) as tf:
        inside = json.loads(tf.extractfile("report.json").read())  # type: ignore[union-attr]
    assert inside["chosen"] == res.report["chosen"]
    assert [s["step"] for s in inside["base_steps"]] == ["check", "optimize"]
    assert inside["sizes"]["original"] == convnet.stat().st_size
    assert all("latency_ms" in c and "accuracy" in c for c in inside["candidates"])


def test_package_picks_int8_when_it_fits(convnet, photos, signing_key, trusted, tmp_path):
    [res] = package(convnet, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path, calibration=photos[:8],
                    validation=photos[8:], precision="int8", options=FAST)
    assert res.manifest.precision == "int8"
    ops = {n.op_type for n in _bundle_model(res.path).graph.node}
    assert ops & {"QLinearConv", "DequantizeLinear", "QuantizeLinear"}, ops
    assert _open(res.path, trusted, tmp_path).self_test().ok


def test_package_auto_without_timing_never_ships_an_untimed_int8(convnet, photos, signing_key, tmp_path):
    [res] = package(convnet, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path, calibration=photos[:8],
                    validation=photos[8:], options=NO_TIMING)
    assert res.manifest.precision == "fp32"
    assert [c["name"] for c in res.report["candidates"]] == ["fp32"]
    assert any("never ships an untimed int8" in n for n in res.report["notes"])
    assert all(c["speed"] is None for c in res.report["candidates"])


def test_package_auto_leaves_lossy_candidates_out_with_too_few_validation_samples(convnet, photos, signing_key,
                                                                                  tmp_path):
    [res] = package(convnet, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path, calibration=photos[:8],
                    validation=photos[8:16], options=FAST)
    assert res.manifest.precision == "fp32"
    assert [c["name"] for c in res.report["candidates"]] == ["fp32"]
    note = next(n for n in res.report["notes"] if "auto left out" in n)
    assert "8 validation sample(s), at least 32 needed" in note


def test_package_auto_falls_back_to_fp32_when_int8_is_over_budget(convnet, photos, signing_key, trusted, tmp_path):
    [res] = package(convnet, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path, calibration=photos[:8],
                    validation=photos[8:], budget=["cosine=0.9999999"], options=FAST)
    assert res.manifest.precision == "fp32"
    int8 = [c for c in res.report["candidates"] if c["precision"] == "int8"]
    assert int8 and not any(c["within_budget"] for c in int8)


def test_package_refuses_int8_when_budget_too_tight_listing_every_candidate(convnet, photos, signing_key, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(AccuracyBudgetError) as err:
        package(convnet, ["x86-cpu-vnni"], key=signing_key, out_dir=out, calibration=photos[:8],
                validation=photos[8:], precision="int8", budget=["cosine=0.9999999"], options=NO_TIMING)
    msg = str(err.value)
    assert "no candidate within the accuracy budget" in msg and "cosine >= 0.9999999" in msg
    assert "int8-static: OVER budget" in msg and "int8-static-excl" in msg  # nodes excluded before giving up
    assert list(out.iterdir()) == []


def test_package_static_int8_without_calibration_is_refused(convnet, signing_key, tmp_path):
    with pytest.raises(ConfigError, match="static INT8 for x86-cpu-vnni needs calibration data"):
        package(convnet, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path / "out", precision="int8")
    assert list((tmp_path / "out").iterdir()) == []


def test_package_unknown_target_is_refused(convnet, signing_key, tmp_path):
    with pytest.raises(ConfigError, match="unknown target 'toaster'"):
        package(convnet, ["toaster"], key=signing_key, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_package_writes_nothing_when_a_later_target_fails(convnet, photos, signing_key, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="apple-silicon does not support precision 'int8'"):
        package(convnet, ["x86-cpu-vnni", "apple-silicon"], key=signing_key, out_dir=out, calibration=photos[:8],
                precision="int8", options=NO_TIMING)
    assert list(out.iterdir()) == []


def test_package_wrong_calibration_shape_is_refused(convnet, signing_key, tmp_path):
    bad = [{"image": np.zeros((1, 3, 32, 32), np.float32)} for _ in range(8)]
    with pytest.raises(InputError, match="dim 2 must be 64"):
        package(convnet, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path / "out", calibration=bad)


def test_package_too_few_calibration_samples_is_refused(convnet, photos, signing_key, tmp_path):
    with pytest.raises(InputError, match="at least 8 needed"):
        package(convnet, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path / "out", calibration=photos[:3])


def test_package_without_key_is_refused(convnet, tmp_path):
    with pytest.raises(ConfigError, match="no signing key"):
        package(convnet, ["x86-cpu-vnni"], key=None, out_dir=tmp_path / "out")


def test_package_nvidia_gpu_bundle_built_not_run(convnet, photos, signing_key, trusted, tmp_path):
    # the single-variant bundle (--single); the multi-variant default is in test_package_variants.py
    [res] = package(convnet, ["nvidia-gpu"], key=signing_key, out_dir=tmp_path, calibration=photos[:8],
                    validation=photos[8:], variants=False)
    m = verify_bundle(res.path, trusted).manifest
    assert [p.name for p in m.providers] == ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                             "CPUExecutionProvider"]
    trt = dict(m.providers[0].options)
    assert m.precision == "fp16" and trt["trt_fp16_enable"] == "True"
    assert trt["trt_engine_cache_path"] == "{cache_dir}/trt" and trt["trt_timing_cache_enable"] == "True"
    assert trt["trt_profile_min_shapes"] == "image:1x3x64x64"
    assert trt["trt_profile_opt_shapes"] == "image:1x3x64x64"
    assert trt["trt_profile_max_shapes"] == "image:8x3x64x64"
    # FP16 on TensorRT is a builder flag: the weights in the bundle stay FP32
    weights = {i.data_type for i in _bundle_model(res.path).graph.initializer if i.name.endswith(".w")}
    assert weights == {onnx.TensorProto.FLOAT}
    assert m.session.graph_optimization_level == "basic"
    # unmeasured: labelled so in the manifest, only the conservative precisions were candidates (no untimed INT8)
    assert m.metadata[META_MEASUREMENT] == "unmeasured" and res.report["measurement"] == "unmeasured"
    assert "TensorrtExecutionProvider is not in this ONNX Runtime" in res.report["not_measured"][0]
    assert {c["name"] for c in res.report["candidates"]} == {"fp16", "fp32"}
    fp16 = next(c for c in res.report["candidates"] if c["name"] == "fp16")
    assert fp16["accuracy_on"].startswith("CPU EP stand-in") and fp16["within_budget"]
    tol = m.validation.tolerances["probs"]  # type: ignore[union-attr]
    assert tol.kind and "stand-in" in tol.kind


def test_package_jetson_orin_int8_bundle_built_not_run_is_symmetric_s8s8(convnet, photos, signing_key, trusted,
                                                                          tmp_path):
    [res] = package(convnet, ["jetson-orin"], key=signing_key, out_dir=tmp_path, calibration=photos[:8],
                    validation=photos[8:], precision="int8", variants=False)
    m = verify_bundle(res.path, trusted).manifest
    assert m.precision == "int8" and m.providers[0].name == "TensorrtExecutionProvider"
    model = _bundle_model(res.path)
    zero_points = {n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert zero_points
    # TensorRT takes only symmetric signed INT8: every activation zero point is an int8 zero
    assert all(inits[z].dtype == np.int8 and not inits[z].any() for z in zero_points)


def test_package_apple_silicon_bundle_built_not_run_is_fp16_with_fp32_io(convnet, photos, signing_key, trusted,
                                                                       tmp_path):
    [res] = package(convnet, ["apple-silicon"], key=signing_key, out_dir=tmp_path, validation=photos[8:],
                    variants=False)
    m = verify_bundle(res.path, trusted).manifest
    assert m.precision == "fp16" and m.providers[0].name == "CoreMLExecutionProvider"
    assert dict(m.providers[0].options)["ModelFormat"] == "MLProgram"
    assert m.inputs[0].dtype == "float32" and m.outputs[0].dtype == "float32"
    weights = {i.data_type for i in _bundle_model(res.path).graph.initializer if i.name.endswith(".w")}
    assert weights == {onnx.TensorProto.FLOAT16}


def test_package_transformer_is_fused_and_tries_dynamic_int8_first(encoder, encoder_data, signing_key, trusted,
                                                                    tmp_path):
    import onnxruntime as ort

    [res] = package(encoder, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path, calibration=encoder_data[:8],
                    validation=encoder_data[8:], options=FAST)
    fuse = next(s for s in res.report["base_steps"] if s["step"] == "fuse_transformer")
    assert fuse["notes"]["fused"]["Attention"] == 2
    assert res.report["candidates"][0]["name"] == "int8-dynamic"
    major, minor = ort.__version__.split(".")[:2]
    assert res.manifest.min_ort_version == f"{major}.{minor}.0"  # contrib ops: needs an ORT as new as the builder's
    assert _open(res.path, trusted, tmp_path).self_test().ok


def test_offline_level_is_layout_only_for_the_hosts_own_cpu_class():
    vnni, avx2, ov = get_profile("x86-cpu-vnni"), get_profile("x86-cpu"), get_profile("intel-openvino-cpu")
    assert offline_level(vnni, "x86-cpu-vnni")[0] == "all"
    level, why = offline_level(avx2, "x86-cpu-vnni")
    assert level == "extended" and "tied to the build host's ISA" in why
    assert offline_level(ov, "x86-cpu-vnni")[0] == "basic"


def test_package_magika_real_model_keeps_top1(signing_key, trusted, tmp_path):
    from packager_models import magika_samples

    data = magika_samples(12)
    [res] = package(shipped_model("magika"), ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path, name="magika",
                    calibration=data[:8], validation=data[8:], options=FAST)
    assert res.path.name == "magika-1.0.0-x86-cpu-vnni.efb"
    chosen = next(c for c in res.report["candidates"] if c["name"] == res.report["chosen"]["name"])
    assert chosen["accuracy"]["outputs"][0]["top1"] == 1.0
    assert _open(res.path, trusted, tmp_path).self_test().ok


def test_package_silero_vad_real_model_runs_and_self_tests(signing_key, trusted, tmp_path):
    from packager_models import silero_samples

    data = silero_samples(10)
    [res] = package(shipped_model("silero-vad"), ["x86-cpu"], key=signing_key, out_dir=tmp_path, name="silero-vad",
                    calibration=data[:8], validation=data[8:], options=FAST)
    m = _open(res.path, trusted, tmp_path)
    assert [t.name for t in m.manifest.inputs] == ["input", "state", "sr"]
    assert m.self_test().ok


def test_package_magika_int8_falls_back_to_dynamic_when_static_collapses(signing_key, trusted, tmp_path):
    """Static QDQ collapses Magika's byte-token model (cosine ~0.05, measured); weight-only MatMul INT8 keeps it."""
    from packager_models import magika_samples

    data = magika_samples(12)
    [res] = package(shipped_model("magika"), ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path, name="magika",
                    calibration=data[:8], validation=data[8:], precision="int8", options=FAST)
    cands = {c["name"]: c for c in res.report["candidates"]}
    assert res.manifest.precision == "int8" and res.report["chosen"]["name"] == "int8-dynamic"
    assert cands["int8-static"]["accuracy"]["ok"] is False
    assert cands["int8-dynamic"]["accuracy"]["outputs"][0]["top1"] == 1.0
    ops = {n.op_type for n in _bundle_model(res.path).graph.node}
    assert "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops, ops
    assert _open(res.path, trusted, tmp_path).self_test().ok


def test_package_options_every_field_is_honoured_and_read_back_from_the_bundle(convnet, photos, signing_key,
                                                                              trusted, tmp_path):
    """One options object end to end: every field set away from its default, then read back from the bundle."""
    from dataclasses import fields

    from edgefleet.packager import Budget

    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "calib.npz", image=np.stack([s["image"] for s in photos[:10]]))
    np.savez(data / "val.npz", image=np.stack([s["image"] for s in photos[10:30]]))
    opts = PackageOptions(
        precision="fp32", budget=Budget(min_cosine=0.995), name="options-test", version="2.0.0", model_type=None,
        calibration=str(data / "calib.npz"), validation=str(data / "val.npz"), input_shapes={"image": (1, 3, 64, 64)},
        profiles_dirs=(), output_kinds={"probs": "classifier"}, measure=False, runtime_python=(),
        discover_runtimes=False, threads=1, time_budget_s=120.0, timing=QUICK, compare_cpu=False, tie_margin=0.05,
        min_calibration_samples=9, min_validation_samples=20, bundle_samples=3, calibration_memory_mb=512,
        mixed_precision_rounds=1, mixed_precision_s=30.0, trt_max_batch=4, variants=False)
    defaults = PackageOptions()
    unset = [f.name for f in fields(opts) if getattr(opts, f.name) == getattr(defaults, f.name)
             and f.name not in ("model_type", "profiles_dirs", "runtime_python")]
    assert unset == [], f"set every field away from its default: {unset}"
    [res] = package(convnet, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path / "out", options=opts)
    m = verify_bundle(res.path, trusted).manifest
    assert (m.name, m.version, m.precision) == ("options-test", "2.0.0", "fp32")
    assert m.session.intra_op_num_threads == 1
    assert m.variants == ()  # variants=False: one variant even where the target's runtime is unreachable
    assert m.validation.samples == 3  # type: ignore[union-attr]
    assert m.validation.tolerances["probs"].min_cosine == 0.995  # type: ignore[union-attr]
    with tarfile.open(res.path) as tf:
        inside = json.loads(tf.extractfile("report.json").read())  # type: ignore[union-attr]
    assert inside["options"] == json.loads(json.dumps(opts.to_dict()))
    assert inside["output_kinds"] == {"probs": "classifier"}
    assert inside["data"]["calibration_samples"] == 10 and inside["data"]["validation_samples"] == 20
    assert inside["threads"]["bundle"] == 1 and inside["threads"]["timed_at"] is None  # measure=False
    # input_shapes: the bundle's model takes only the fixed shape, and the manifest says so
    assert [t.shape for t in m.inputs] == [(1, 3, 64, 64)] and m.outputs[0].shape[0] == 1
    assert m.metadata[META_FIXED_SHAPES] == "image=1x3x64x64"
    assert [s["step"] for s in inside["base_steps"]][:2] == ["check", "fix_shapes"]
    pub = tmp_path / "signer.pub"
    pub.write_bytes(signing_key.public.to_pem())
    shown = CliRunner().invoke(cli, ["bundle", "inspect", str(res.path), "--trust", str(pub)])
    assert "input    image: float32 [1, 3, 64, 64]  (fixed at packaging: --input-shape)" in shown.output, shown.output
    model = _open(res.path, trusted, tmp_path)
    assert model.self_test().ok
    with pytest.raises(InputError, match="dim 0 is 2, model expects 1"):
        model.run({"image": np.concatenate([photos[0]["image"]] * 2)})


def test_package_input_shape_refuses_data_of_another_shape_in_one_line(convnet, photos, signing_key, tmp_path):
    with pytest.raises(InputError, match=r"input 'image' has shape \[1, 3, 64, 64\], model expects \[2, 3, 64, 64\] "
                                         r"\(dim 0 must be 2\)") as err:
        package(convnet, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path, validation=photos[:20],
                input_shapes=["image=2,3,64,64"], options=NO_TIMING)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_package_options_overrides_apply_only_what_is_given(convnet, photos, signing_key, trusted, tmp_path):
    opts = PackageOptions(precision="fp32", version="2.0.0", measure=False)
    [res] = package(convnet, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path, options=opts,
                    validation=photos[8:20])
    assert (res.manifest.precision, res.manifest.version) == ("fp32", "2.0.0")
    with pytest.raises(ConfigError, match="unknown packaging option"):
        package(convnet, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path, latency_rounds=3)


def test_package_gate_refuses_collapsed_int8_from_degenerate_calibration(signing_key, photos, tmp_path):
    """Tiny, degenerate data: calibrated on black images, the detector's INT8 class scores stop following the input.
    Asked for INT8 explicitly with only 4 validation photos, the gate still refuses it (and auto ships FP32)."""
    from packager_models import make_detector

    det = make_detector(tmp_path / "detector.onnx")
    black = [{"image": np.zeros_like(photos[0]["image"])} for _ in range(8)]
    with pytest.raises(AccuracyBudgetError) as err:
        package(det, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path / "o", calibration=black,
                validation=photos[8:12], precision="int8", options=PackageOptions(measure=False,
                                                                                  mixed_precision_rounds=0))
    msg = str(err.value)
    assert "int8-static: OVER budget" in msg and "collapsed" in msg
    [res] = package(det, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path / "o2", calibration=black,
                    validation=photos[8:12], options=FAST)
    assert res.manifest.precision == "fp32"


def test_package_int8_asked_for_fails_the_target_when_no_int8_can_be_built(convnet, photos, signing_key, tmp_path):
    with pytest.raises(AccuracyBudgetError, match="no candidate within the accuracy budget"):
        package(convnet, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path / "o", calibration=photos[:8],
                validation=photos[8:], precision="int8", budget=["cosine=1.0"],
                options=PackageOptions(measure=False, mixed_precision_rounds=0))
    assert list((tmp_path / "o").iterdir()) == []


def test_package_streams_calibration_from_a_folder_within_a_memory_budget(convnet, photos, signing_key, tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    for i, s in enumerate(photos[:12]):
        np.savez(folder / f"{i:03d}.npz", **s)
    [res] = package(convnet, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path / "o", calibration=folder,
                    validation=photos[12:], precision="int8", calibration_memory_mb=64,
                    options=PackageOptions(measure=False))
    step = next(s for c in res.report["candidates"] if c["name"] == res.report["chosen"]["name"]
                for s in c["steps"] if s["step"] == "quantize_static")
    assert step["notes"]["max_intermediate_outputs"] >= 1
    assert res.report["data"]["calibration_samples"] == 12
