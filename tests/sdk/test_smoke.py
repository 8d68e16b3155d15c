from pathlib import Path

import numpy as np
from edgefleet.sdk.bundle import extract_bundle, verify_bundle
from edgefleet.sdk.runtime import Model


def test_bundle_roundtrip_runs_on_cpu(mlp_model, make_bundle, trusted, tmp_path: Path) -> None:
    path = make_bundle(mlp_model)
    vm = verify_bundle(path, trusted)
    dest = tmp_path / "store" / vm.digest
    extract_bundle(path, trusted, dest)
    model = Model.open(dest, trusted, cache_dir=tmp_path / "cache")
    assert model.placement.serving == ("CPUExecutionProvider",)
    out = model.run({"x": np.ones((3, 16), np.float32)})
    assert out["probs"].shape == (3, 4)
    assert np.allclose(out["probs"].sum(axis=1), 1.0, atol=1e-5)
    rep = model.self_test()
    assert rep.ok, rep.to_dict()
    b = model.benchmark(20)
    assert b.runs == 20 and b.p50_ms > 0
    prof = model.profile(3)
    assert any(k.startswith("MatMul") for k in prof)
