"""PyTorch input and the native Core ML path: exported to ONNX for every target; apple-silicon bundles also carry an
FP16 .mlpackage whose spec is checked here (built, not run: Core ML runs only on macOS)."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from edgefleet.packager import PackageOptions, package
from edgefleet.sdk.bundle import extract_bundle, verify_bundle
from edgefleet.sdk.errors import ConfigError
from edgefleet.sdk.runtime import Model

torch = pytest.importorskip("torch")
pytest.importorskip("coremltools")

FACTORY = "packager_models:torch_classifier"
SHAPE = {"image": (1, 3, 64, 64)}
NO_TIMING = PackageOptions(measure=False)


def test_package_pytorch_apple_silicon_bundle_carries_fp16_mlpackage_built_not_run(photos, signing_key, trusted,
                                                                                    tmp_path):
    apple, cpu = package(FACTORY, ["apple-silicon", "x86-cpu-vnni"], key=signing_key, out_dir=tmp_path,
                         validation=photos[:4], input_shapes=SHAPE, options=NO_TIMING)
    m = verify_bundle(apple.path, trusted).manifest
    assert m.metadata["coreml_package"] == "coreml/model.mlpackage"
    assert "coreml/model.mlpackage/Manifest.json" in m.files
    assert any(n.startswith("coreml/model.mlpackage/Data/") and n.endswith("model.mlmodel") for n in m.files)
    spec = apple.report["coreml"]
    assert spec["format"] == "mlprogram" and spec["inputs"] == {"image": [1, 3, 64, 64]}
    assert spec["fp32_io"] is True and spec["fp16_tensor_types"] > 0 and spec["run"].startswith("not run")
    assert apple.report["source"]["pytorch"] == FACTORY
    # other targets get the exported ONNX only
    assert not any(n.startswith("coreml/") for n in verify_bundle(cpu.path, trusted).manifest.files)


def test_package_torchscript_file_is_exported_and_matches_torch(photos, signing_key, trusted, tmp_path):
    from packager_models import torch_classifier

    net = torch_classifier()
    pt = tmp_path / "classifier.pt"
    torch.jit.trace(net, torch.zeros(1, 3, 64, 64)).save(str(pt))
    [res] = package(pt, ["x86-cpu-vnni"], key=signing_key, out_dir=tmp_path / "out", validation=photos[:4],
                    input_shapes=["image=1x3x64x64"], precision="fp32", options=NO_TIMING)
    assert res.path.name == "classifier-1.0.0-x86-cpu-vnni.efb"
    dest = tmp_path / "x"
    extract_bundle(res.path, trusted, dest)
    model = Model.open(dest, trusted, cache_dir=tmp_path / "cache")
    got = model.run({"image": photos[0]["image"]})
    want = net(torch.from_numpy(photos[0]["image"])).detach().numpy()
    np.testing.assert_allclose(next(iter(got.values())), want, atol=1e-5)
    with tarfile.open(res.path) as tf:
        report = json.loads(tf.extractfile("report.json").read())  # type: ignore[union-attr]
    assert report["source"]["input_shapes"] == {"image": [1, 3, 64, 64]}


def test_package_pytorch_without_input_shapes_is_refused(signing_key, tmp_path):
    with pytest.raises(ConfigError, match="needs its input shapes"):
        package(FACTORY, ["apple-silicon"], key=signing_key, out_dir=tmp_path)
