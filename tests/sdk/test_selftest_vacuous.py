"""The device self-test refuses a validation set that could not fail, and compares decisions (integer outputs,
argmax) exactly. Runs on ONNX Runtime 1.16.3 too (``make test-ort-oldest``)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from edgefleet.sdk.bundle import (
    Manifest,
    ProviderConfig,
    SessionConfig,
    TensorSpec,
    Tolerance,
    ValidationSpec,
    extract_bundle,
    read_manifest,
    write_bundle,
)
from edgefleet.sdk.errors import SelfTestError
from edgefleet.sdk.runtime import Model
from edgefleet.sdk.validation import save_validation
from onnx import TensorProto, helper, numpy_helper


@pytest.fixture(scope="module")
def labeller(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLP with two outputs: float probabilities and an int64 label (ArgMax)."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"], name="mm"),
             helper.make_node("Softmax", ["logits"], ["probs"], name="sm", axis=-1),
             helper.make_node("ArgMax", ["logits"], ["label"], name="am", axis=-1, keepdims=0)]
    graph = helper.make_graph(nodes, "labeller", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 5]),
                               helper.make_tensor_value_info("label", TensorProto.INT64, [1])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    path = tmp_path_factory.mktemp("labeller") / "model.onnx"
    onnx.save(model, str(path))
    return path


def _refs(model: Path, n: int = 3) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        x = rng.standard_normal((1, 8)).astype(np.float32)
        probs, label = sess.run(["probs", "label"], {"x": x})
        out.append(({"x": x}, {"probs": probs, "label": label}))
    return out


def _bundle(model: Path, samples, tolerances: dict[str, Tolerance], key, where: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "model.onnx").write_bytes(model.read_bytes())
        save_validation(t / "validation.npz", samples)
        (t / "report.json").write_text(json.dumps({}))
        manifest = Manifest(
            name="labeller", version="1.0.0", target="x86-cpu", precision="fp32", model="model/model.onnx",
            providers=(ProviderConfig("CPUExecutionProvider"),), session=SessionConfig(),
            inputs=(TensorSpec("x", "float32", (1, 8)),),
            outputs=(TensorSpec("probs", "float32", (1, 5)), TensorSpec("label", "int64", (1,))),
            files={}, validation=ValidationSpec("validation.npz", len(samples), tolerances), report="report.json")
        out = where / "b.efb"
        write_bundle(out, manifest, {"model/model.onnx": t / "model.onnx", "validation.npz": t / "validation.npz",
                                     "report.json": t / "report.json"}, key)
    return out


def _open(bundle: Path, trusted, tmp_path: Path) -> Model:
    dest = tmp_path / "installed"
    extract_bundle(bundle, trusted, dest)
    return Model.open(dest, trusted, cache_dir=tmp_path / "cache")


GOOD = {"probs": Tolerance(max_abs=1e-4, min_cosine=0.999)}


def test_selftest_passes_when_the_set_is_sound(labeller, signing_key, trusted, tmp_path):
    m = _open(_bundle(labeller, _refs(labeller), GOOD, signing_key, tmp_path), trusted, tmp_path)
    assert m.self_test().ok


def test_selftest_compares_integer_outputs_exactly_even_without_a_tolerance(labeller, signing_key, trusted,
                                                                            tmp_path):
    samples = _refs(labeller)
    samples[1][1]["label"] = (samples[1][1]["label"] + 1) % 5  # the reference's decision differs from the model's
    report = _open(_bundle(labeller, samples, GOOD, signing_key, tmp_path), trusted, tmp_path).self_test()
    assert not report.ok
    assert any(c.name == "label" and "compared exactly" in c.reason for c in report.failures)


def test_selftest_refuses_nan_in_reference(labeller, signing_key, trusted, tmp_path):
    samples = _refs(labeller)
    samples[0][1]["probs"][0, 2] = np.nan
    with pytest.raises(SelfTestError, match="reference of output 'probs' holds NaN"):
        _open(_bundle(labeller, samples, GOOD, signing_key, tmp_path), trusted, tmp_path).self_test()


def test_selftest_refuses_empty_tolerance_table(labeller, signing_key, trusted, tmp_path):
    with pytest.raises(SelfTestError, match="no tolerances"):
        _open(_bundle(labeller, _refs(labeller), {}, signing_key, tmp_path), trusted, tmp_path).self_test()


def test_selftest_refuses_a_float_output_without_tolerance(labeller, signing_key, trusted, tmp_path):
    samples = _refs(labeller)
    m = _open(_bundle(labeller, samples, GOOD, signing_key, tmp_path), trusted, tmp_path)
    # the same set, but the float output's tolerance removed: only the int label would be compared
    from edgefleet.sdk.validation import check_self_test_set

    with pytest.raises(SelfTestError, match="float output 'probs' has no tolerance"):
        check_self_test_set(samples, {"label": Tolerance(max_abs=0.0)}, {"probs": "float32", "label": "int64"})
    assert m.self_test().ok


def test_selftest_refuses_a_tolerance_an_all_zero_output_would_pass(labeller, signing_key, trusted, tmp_path):
    loose = {"probs": Tolerance(max_abs=10.0, min_cosine=-1.0)}
    with pytest.raises(SelfTestError, match="would pass an all-zero output"):
        _open(_bundle(labeller, _refs(labeller), loose, signing_key, tmp_path), trusted, tmp_path).self_test()


def test_selftest_refuses_references_without_signal(labeller, signing_key, trusted, tmp_path):
    samples = [(i, {"probs": np.zeros_like(o["probs"]), "label": np.zeros_like(o["label"])})
               for i, o in _refs(labeller)]
    with pytest.raises(SelfTestError, match="every reference output is zero"):
        _open(_bundle(labeller, samples, GOOD, signing_key, tmp_path), trusted, tmp_path).self_test()


def test_selftest_argmax_agreement_tolerance_fails_a_changed_decision(labeller, signing_key, trusted, tmp_path):
    samples = _refs(labeller)
    # swap the top two classes of one reference: tiny in max-abs terms when they are close, a different decision
    p = samples[2][1]["probs"]
    order = np.argsort(p[0])[::-1]
    p[0, order[0]], p[0, order[1]] = p[0, order[1]], p[0, order[0]]
    tol = {"probs": Tolerance(max_abs=1.0, min_cosine=0.0, min_argmax_agreement=1.0)}
    bundle = _bundle(labeller, samples, tol, signing_key, tmp_path)
    report = _open(bundle, trusted, tmp_path).self_test()
    assert any("argmax agreement" in c.reason for c in report.failures)


def test_tolerance_fields_added_later_are_left_out_when_unset(labeller, signing_key, trusted, tmp_path):
    bundle = _bundle(labeller, _refs(labeller), GOOD, signing_key, tmp_path)
    raw = json.loads(read_manifest(bundle, trusted).raw)
    # exactly the v1 keys: an agent already in the field (which refuses unknown keys) still reads this bundle
    assert set(raw["validation"]["tolerances"]["probs"]) == {"max_abs", "min_cosine", "min_channel_cosine",
                                                             "channel_floor"}
    tol = {"probs": Tolerance(max_abs=1e-4, min_argmax_agreement=0.99, kind="measured on CPU x2")}
    bundle2 = _bundle(labeller, _refs(labeller), tol, signing_key, tmp_path / "b2" if (tmp_path / "b2").mkdir()
                      is None else tmp_path)
    got = read_manifest(bundle2, trusted).manifest.validation.tolerances["probs"]  # type: ignore[union-attr]
    assert got.min_argmax_agreement == 0.99 and got.kind == "measured on CPU x2"


def test_selftest_judges_a_near_zero_reference_sample_by_error_not_cosine():
    """A sample whose reference is ~0 everywhere (1% of the output's scale over the set) has no direction: another
    runtime's tiny deviation gives cosine 0 there, which must not fail the self-test; a real error still does."""
    from edgefleet.sdk.validation import check_outputs

    tol = {"m": Tolerance(max_abs=0.01, min_cosine=0.99)}
    ref = {"m": np.full((1, 4), 1e-6, np.float32)}
    ok = check_outputs({"m": np.array([[0.0, 2e-5, 0.0, 0.0]], np.float32)}, ref, tol, scales={"m": 1.0})
    assert ok[0].ok and ok[0].cosine < 0.99
    bad = check_outputs({"m": np.array([[0.0, 0.5, 0.0, 0.0]], np.float32)}, ref, tol, scales={"m": 1.0})
    assert not bad[0].ok and "max abs error" in bad[0].reason
    # without the set's scale (an old caller) the cosine is judged as before
    assert not check_outputs({"m": np.array([[0.0, 2e-5, 0.0, 0.0]], np.float32)}, ref, tol)[0].ok
