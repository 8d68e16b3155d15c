"""Multi-variant bundles chosen on the device, in-process against a real store and real ORT sessions: every variant
is self-tested, a variant that fails (wrong outputs, a provider this runtime lacks) is never pinned, the passing ones
are timed and the fastest pinned; the choice is persisted, reused at start, and made again when the environment
(ONNX Runtime, providers, profile, CPU) changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _agent_util import sha_size
from edgefleet.agent.installer import Installer, InstallError
from edgefleet.agent.registry import Registry
from edgefleet.agent.store import Store
from edgefleet.agent.variants import CHOICE_FILE
from edgefleet.sdk.bundle import ProviderConfig, SessionConfig
from edgefleet.sdk.runtime import ort_info
from edgefleet.sdk.testing import VariantSpec, build_test_variant_bundle

from tests.conftest import make_mlp

X = np.ones((2, 16), np.float32)
OV = "OpenVINOExecutionProvider"


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    d = tmp_path / "models"
    d.mkdir()
    # "broken": same graph, other weights: a real model whose outputs are wrong against the reference
    return {"good": make_mlp(d / "good.onnx"), "broken": make_mlp(d / "broken.onnx", seed=7)}


def _variants(models: dict[str, Path]) -> list[VariantSpec]:
    return [
        VariantSpec("fp32", models["good"]),
        VariantSpec("broken", models["broken"], precision="int8"),
        VariantSpec("fp32-basic", models["good"], session=SessionConfig(graph_optimization_level="basic",
                                                                        intra_op_num_threads=1)),
        VariantSpec("openvino", models["good"], providers=(ProviderConfig(OV, {"device_type": "CPU"}),)),
    ]


def _installer(root: Path, trusted, host: dict | None = None) -> Installer:
    return Installer(Store(root), Registry(), trusted, targets=("x86-cpu",), variant_budget_s=3.0, host=host)


def _install(inst: Installer, bundle: Path):
    sha, size = sha_size(bundle)
    return inst.install(bundle.as_uri(), sha, size)


def test_variant_install_pins_a_passing_variant_never_the_broken_one(tmp_path: Path, trusted, signing_key,
                                                                     models) -> None:
    bundle = build_test_variant_bundle(models["good"], _variants(models), tmp_path / "v.efb", signing_key)
    # identical model files are stored once: three variants run good.onnx, one runs broken.onnx
    from edgefleet.sdk.bundle import read_manifest
    m = read_manifest(bundle, trusted).manifest
    assert len([f for f in m.files if f.startswith("model/")]) == 2
    inst = _installer(tmp_path / "data", trusted)
    res = _install(inst, bundle)
    rows = {r["variant"]: r for r in res.variants["table"]}
    assert list(rows) == ["fp32", "broken", "fp32-basic", "openvino"]
    assert rows["broken"]["passed"] is False and rows["broken"]["error"].startswith("selftest")
    assert rows["openvino"]["passed"] is (OV in ort_info().providers)
    assert rows["fp32"]["passed"] and rows["fp32-basic"]["passed"]
    assert rows["fp32"]["providers"] == ["CPUExecutionProvider"]
    timed = [r for r in rows.values() if r["passed"]]
    assert all(r["p50_ms"] > 0 and r["ratio"] > 0 for r in timed)
    assert res.variant in {n for n, r in rows.items() if r["passed"]}
    assert [n for n, r in rows.items() if r["pinned"]] == [res.variant]
    # the pinned one is the fastest measured (lowest median ratio) when that is faster than the first passing variant
    # with confidence; otherwise the data cannot decide and the first passing one (the packager's pick) stays
    fastest = min(timed, key=lambda r: r["ratio"])["variant"]
    if res.variant != fastest:
        assert res.variant == "fp32" and "not faster with 95% confidence" in res.variants["why"]
    served = inst.registry.get("testmodel")
    assert served is not None and served.variant == res.variant
    assert served.run({"x": X})["probs"].shape == (2, 4)
    saved = json.loads((inst.store.cache_dir(res.digest) / CHOICE_FILE).read_text())
    assert saved["variant"] == res.variant and saved["env"]["ort"] == ort_info().version


def test_variant_choice_reused_at_start_and_made_again_when_the_hardware_changes(tmp_path: Path, trusted,
                                                                                 signing_key, models) -> None:
    bundle = build_test_variant_bundle(models["good"], _variants(models), tmp_path / "v.efb", signing_key)
    root = tmp_path / "data"
    inst = _installer(root, trusted)
    first = _install(inst, bundle)
    choice_file = inst.store.cache_dir(first.digest) / CHOICE_FILE
    before = choice_file.read_text()
    inst.store.close()  # the "restart": the old process is gone
    # a restart in the same environment: the persisted choice is opened, nothing is timed again
    again = _installer(root, trusted)
    assert again.load_all() == []
    assert again.registry.get("testmodel").variant == first.variant  # type: ignore[union-attr]
    assert choice_file.read_text() == before
    again.store.close()
    # the same data dir on another CPU: chosen again, and the new environment persisted
    moved = _installer(root, trusted, host={"cpu_model": "Some Other CPU @ 2.0GHz", "arch": "x86_64"})
    assert moved.load_all() == []
    after = json.loads(choice_file.read_text())
    assert after["env"]["cpu"] == "Some Other CPU @ 2.0GHz"
    assert after["variant"] in {"fp32", "fp32-basic", "openvino"}
    assert moved.registry.get("testmodel").variant == after["variant"]  # type: ignore[union-attr]


def test_variant_bundle_with_no_passing_variant_fails_selftest_and_old_keeps_serving(
        tmp_path: Path, trusted, signing_key, models, make_bundle) -> None:
    inst = _installer(tmp_path / "data", trusted)
    _install(inst, make_bundle(models["good"], version="1.0.0", filename="v1.efb"))
    bad = build_test_variant_bundle(models["good"], [VariantSpec("a", models["broken"]),
                                                     VariantSpec("b", models["broken"], session=SessionConfig(
                                                         graph_optimization_level="basic"))],
                                    tmp_path / "bad.efb", signing_key, version="2.0.0")
    with pytest.raises(InstallError) as err:
        _install(inst, bad)
    assert err.value.step == "selftest" and "no variant passed" in str(err.value)
    served = inst.registry.get("testmodel")
    assert served is not None and served.version == "1.0.0" and served.variant is None
    assert {p.name for p in inst.store.bundles.iterdir()} == {inst.store.pointers()["testmodel"].active}
