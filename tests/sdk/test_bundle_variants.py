"""Manifest ``variants``: parsed and checked like the rest of the manifest, left out when unset (so single-variant
bundles stay readable by agents in the field), and each variant opens as its own session with its own self-test."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from edgefleet.sdk.bundle import Manifest, SessionConfig, extract_bundle, read_manifest
from edgefleet.sdk.errors import BundleCompatibilityError, BundleFormatError
from edgefleet.sdk.runtime import Model
from edgefleet.sdk.testing import VariantSpec, build_test_bundle, build_test_variant_bundle


def _bundle(mlp_model: Path, tmp_path: Path, signing_key) -> Path:
    return build_test_variant_bundle(mlp_model, [
        VariantSpec("fast", mlp_model),
        VariantSpec("basic", mlp_model, session=SessionConfig(graph_optimization_level="basic")),
    ], tmp_path / "v.efb", signing_key)


def test_variants_round_trip_and_share_identical_files(mlp_model, tmp_path, signing_key, trusted) -> None:
    m = read_manifest(_bundle(mlp_model, tmp_path, signing_key), trusted).manifest
    assert [v.name for v in m.variants] == ["fast", "basic"]
    assert m.variants[0].model == m.variants[1].model == m.model  # one file, two ways to run it
    assert Manifest.from_dict(m.to_dict()) == m
    one = m.variant("basic")
    assert one.session.graph_optimization_level == "basic" and not one.variants and "variants" not in one.to_dict()
    with pytest.raises(KeyError, match="no variant 'nope'"):
        m.variant("nope")


def test_single_variant_manifest_has_no_variants_key(mlp_model, tmp_path, signing_key, trusted) -> None:
    m = read_manifest(build_test_bundle(mlp_model, tmp_path / "b.efb", signing_key), trusted).manifest
    assert m.variants == () and "variants" not in m.to_dict()


@pytest.mark.parametrize("change, message", [
    (lambda d: d["variants"].pop(), "at least two"),
    (lambda d: d["variants"][1].update(name="fast"), "unique"),
    (lambda d: d["variants"][0].update(precision="int8"), "must be the top-level"),
    (lambda d: d["variants"][1].update(model="model/other.onnx"), "not listed in files"),
    (lambda d: d["variants"][1].update(extra=1), "unknown key"),
    (lambda d: d["variants"][1].pop("validation"), "misses"),
    (lambda d: d["variants"][1]["validation"]["tolerances"].update(nope={"max_abs": 1.0}), "unknown outputs"),
])
def test_bad_variants_are_refused(mlp_model, tmp_path, signing_key, trusted, change, message) -> None:
    d = read_manifest(_bundle(mlp_model, tmp_path, signing_key), trusted).manifest.to_dict()
    change(d)
    with pytest.raises(BundleFormatError, match=message):
        Manifest.from_dict(d)


def test_model_open_runs_the_named_variant(mlp_model, tmp_path, signing_key, trusted) -> None:
    dest = tmp_path / "x"
    extract_bundle(_bundle(mlp_model, tmp_path, signing_key), trusted, dest)
    default = Model.open(dest, trusted, cache_dir=tmp_path / "c0")
    assert default.variant == "fast"
    basic = Model.open(dest, trusted, cache_dir=tmp_path / "c1", variant="basic")
    assert basic.variant == "basic" and basic.manifest.session.graph_optimization_level == "basic"
    assert basic.self_test().ok and default.self_test().ok
    with pytest.raises(BundleCompatibilityError, match="no variant 'gone'"):
        Model.open(dest, trusted, variant="gone")
    assert replace(basic.manifest, variants=()) == basic.manifest


def test_bundle_verify_run_self_tests_every_variant_it_can_run(mlp_model, tmp_path, signing_key) -> None:
    from click.testing import CliRunner
    from edgefleet.sdk.bundle import ProviderConfig
    from edgefleet.sdk.cli import cli

    bundle = build_test_variant_bundle(mlp_model, [
        VariantSpec("gpu", mlp_model, providers=(ProviderConfig("NoSuchExecutionProvider"),)),
        VariantSpec("cpu", mlp_model)], tmp_path / "v.efb", signing_key)
    pub = tmp_path / "k.pub"
    pub.write_bytes(signing_key.public.to_pem())
    res = CliRunner().invoke(cli, ["bundle", "verify", str(bundle), "--trust", str(pub), "--run"])
    assert res.exit_code == 0, res.output
    assert "variant gpu: not run here" in res.output
    assert "variant cpu: self-test OK on CPUExecutionProvider" in res.output
    res = CliRunner().invoke(cli, ["bundle", "inspect", str(bundle), "--trust", str(pub)])
    assert "variant  cpu  precision=fp32  CPUExecutionProvider" in res.output
