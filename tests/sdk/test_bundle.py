"""Bundle format v1: sign → verify → extract → open → run on built and real models; every tamper case refused."""

from __future__ import annotations

import gzip
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from bundle_tools import Member, manifest_of, member, read_members, replace_data, resign, shipped, write_members
from edgefleet.sdk.bundle import (
    BundleLimits,
    Manifest,
    canonical_json,
    extract_bundle,
    read_installed,
    read_manifest,
    verify_bundle,
    version_key,
)
from edgefleet.sdk.errors import (
    BundleError,
    BundleFormatError,
    BundleIntegrityError,
    BundleSignatureError,
    UnsafeArchiveError,
)
from edgefleet.sdk.keys import PrivateKey, TrustedKeys, generate_keypair
from edgefleet.sdk.runtime import Model

MODEL = "model/model.onnx"


def _assert_nothing_extracted(dest: Path) -> None:
    assert not dest.exists(), f"{dest} was created"
    parent = dest.parent
    if parent.exists():
        assert not [p.name for p in parent.iterdir() if p.name.startswith(".staging-")], "staging dir left behind"


# -- the happy path -------------------------------------------------------------------------------------------------

def test_bundle_roundtrip_opens_runs_and_benchmarks_when_mlp(mlp_model, make_bundle, trusted, tmp_path: Path) -> None:
    path = make_bundle(mlp_model, name="mlp", version="1.2.0")
    vm = verify_bundle(path, trusted)
    assert vm.manifest.name == "mlp" and vm.manifest.version == "1.2.0"
    assert set(vm.manifest.files) == {MODEL, "validation.npz", "report.json"}
    assert vm.manifest.files[MODEL].size == mlp_model.stat().st_size
    dest = tmp_path / "store" / vm.digest
    assert extract_bundle(path, trusted, dest).digest == vm.digest
    assert (dest / MODEL).read_bytes() == mlp_model.read_bytes()
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".staging-")]
    model = Model.open(dest, trusted, cache_dir=tmp_path / "cache")
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    out = model.run({"x": x})
    assert out["probs"].shape == (5, 4)
    np.testing.assert_allclose(out["probs"].sum(axis=1), 1.0, atol=1e-5)
    assert model.self_test().ok
    b = model.benchmark(30)
    assert b.runs == 30 and 0 < b.min_ms <= b.p50_ms <= b.p95_ms <= b.p99_ms
    assert b.throughput > 0 and b.session_ms > 0 and b.first_run_ms > 0


def test_bundle_roundtrip_runs_when_real_magika_model(make_bundle, trusted, tmp_path: Path) -> None:
    src = shipped("magika")
    path = make_bundle(src, name="magika", target="x86-cpu-vnni")
    vm = verify_bundle(path, trusted)
    (inp,) = vm.manifest.inputs
    assert (inp.name, inp.dtype, inp.shape[1:]) == ("bytes", "int32", (2048,))
    dest = tmp_path / "store" / vm.digest
    extract_bundle(path, trusted, dest)
    model = Model.open(dest, trusted, cache_dir=tmp_path / "cache")
    feed = {"bytes": np.random.default_rng(0).integers(0, 256, (2, 2048)).astype(np.int32)}
    probs = model.run(feed)["target_label"]
    assert probs.shape == (2, 214)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    rep = model.self_test()
    assert rep.ok and rep.samples == 2, rep.to_dict()
    assert model.benchmark(5).p50_ms > 0


def _silero_samples(n: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    t = np.arange(512, dtype=np.float32) / 16000
    return [
        {"input": (0.5 * np.sin(2 * np.pi * 220 * (i + 1) * t)
                   + 0.01 * rng.standard_normal(512)).astype(np.float32)[None],
         "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, dtype=np.int64)}
        for i in range(n)
    ]


def test_bundle_roundtrip_runs_with_state_inputs_when_real_silero_vad_model(
    make_bundle, trusted, tmp_path: Path
) -> None:
    path = make_bundle(shipped("silero-vad"), name="silero-vad", samples=_silero_samples())
    vm = verify_bundle(path, trusted)
    specs = {t.name: t for t in vm.manifest.inputs}
    assert specs["state"].dtype == "float32" and specs["state"].shape[0] == 2 and specs["state"].shape[2] == 128
    assert specs["sr"].dtype == "int64" and specs["sr"].shape == ()
    dest = tmp_path / "store" / vm.digest
    extract_bundle(path, trusted, dest)
    model = Model.open(dest, trusted, cache_dir=tmp_path / "cache")
    feed = _silero_samples(1)[0]
    for _ in range(3):  # the recurrent state goes round: the output state feeds the next call
        out = model.run(feed)
        assert out["output"].shape == (1, 1) and 0.0 <= float(out["output"][0, 0]) <= 1.0
        assert out["stateN"].shape == (2, 1, 128)
        feed = {**feed, "state": out["stateN"]}
    assert model.self_test().ok
    assert model.benchmark(5, inputs=_silero_samples(1)[0]).runs == 5
    assert model.recorder.take(now=1e9).count == 3


def test_manifest_roundtrips_through_dict_and_canonical_json(mlp_model, make_bundle, trusted) -> None:
    vm = verify_bundle(make_bundle(mlp_model), trusted)
    again = Manifest.from_dict(json.loads(vm.raw))
    assert again == vm.manifest
    assert canonical_json(again.to_dict()) == vm.raw


def test_read_manifest_reads_only_the_signed_header(mlp_model, make_bundle, trusted) -> None:
    path = make_bundle(mlp_model)
    members = read_members(path)
    broken = write_members(path.with_name("broken.efb"), replace_data(members, MODEL, b"x" * members[2][0].size))
    # The header is intact, so inspect works; only verify sees the changed model.
    assert read_manifest(broken, trusted).manifest.name == "testmodel"
    with pytest.raises(BundleIntegrityError, match="sha256"):
        verify_bundle(broken, trusted)


def test_read_installed_refuses_a_file_changed_after_install(mlp_model, make_bundle, trusted, tmp_path: Path) -> None:
    path = make_bundle(mlp_model)
    dest = tmp_path / "store" / "b"
    extract_bundle(path, trusted, dest)
    data = bytearray((dest / MODEL).read_bytes())
    data[-1] ^= 0xFF
    (dest / MODEL).write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"model/model\.onnx"):
        read_installed(dest, trusted)
    with pytest.raises(BundleIntegrityError):
        Model.open(dest, trusted)
    assert read_installed(dest, trusted, verify_files=False).manifest.name == "testmodel"


def test_extract_bundle_refuses_when_destination_exists(mlp_model, make_bundle, trusted, tmp_path: Path) -> None:
    dest = tmp_path / "store" / "b"
    dest.mkdir(parents=True)
    with pytest.raises(BundleError, match="already exists"):
        extract_bundle(make_bundle(mlp_model), trusted, dest)
    assert list(dest.iterdir()) == []


def test_version_key_orders_numeric_parts_as_numbers() -> None:
    assert version_key("1.10.0") > version_key("1.9.2")
    assert version_key("2024.05-rc1") < version_key("2024.06")
    assert sorted(["1.2", "1.10", "1.9"], key=version_key) == ["1.2", "1.9", "1.10"]
    assert version_key("1.16") == version_key("1.16.0") < version_key("1.16.3")
    assert version_key("1.16.3+cu118") > version_key("1.16.3")
    assert version_key("0") == ((0, 0),)


# -- tamper cases ---------------------------------------------------------------------------------------------------
# Each builds a hostile archive from a good bundle; verify and extract must both refuse it with its own error type and
# a message naming what is wrong, and extraction must leave nothing behind.

Case = Callable[[list[Member], PrivateKey, Path], "tuple[Path, BundleLimits] | Path"]


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x01
    return bytes(b)


def _model_byte_flipped(m: list[Member], key: PrivateKey, out: Path) -> Path:
    data = dict((i.name, d) for i, d in m)[MODEL]
    return write_members(out, replace_data(m, MODEL, _flip(data, len(data) // 2)))


def _manifest_byte_flipped(m: list[Member], key: PrivateKey, out: Path) -> Path:
    raw = m[0][1]
    at = raw.index(b'"testmodel"') + 1  # still valid JSON, different name: only the signature can tell
    return write_members(out, [member("manifest.json", raw[:at] + b"T" + raw[at + 1:]), *m[1:]])


def _signed_by_untrusted_key(m: list[Member], key: PrivateKey, out: Path) -> Path:
    other = generate_keypair(out.parent / "other.key")
    return write_members(out, resign(m, other))


def _wrong_key_claims_trusted_id(m: list[Member], key: PrivateKey, out: Path) -> Path:
    other = generate_keypair(out.parent / "other.key")
    rec = other.sign(m[0][1])
    rec["keyid"] = key.public.key_id  # claims to be the trusted key, signed by another
    return write_members(out, [m[0], member("signatures.json", canonical_json([rec])), *m[2:]])


def _missing_signature(m: list[Member], key: PrivateKey, out: Path) -> Path:
    return write_members(out, [m[0], member("signatures.json", b"[]"), *m[2:]])


def _missing_file(m: list[Member], key: PrivateKey, out: Path) -> Path:
    return write_members(out, [x for x in m if x[0].name != "report.json"])


def _unlisted_file(m: list[Member], key: PrivateKey, out: Path) -> Path:
    return write_members(out, [*m, member("extra.bin", b"not in the manifest")])


def _dotdot_member(m: list[Member], key: PrivateKey, out: Path) -> Path:
    return write_members(out, [*m[:2], member("../evil.onnx", b"x"), *m[2:]])


def _dotdot_inside_member(m: list[Member], key: PrivateKey, out: Path) -> Path:
    return write_members(out, [*m[:2], member("model/../../evil", b"x"), *m[2:]])


def _dotdot_listed_in_signed_manifest(m: list[Member], key: PrivateKey, out: Path) -> Path:
    def mutate(d: dict) -> None:
        d["files"]["../evil"] = d["files"].pop("report.json")
        d["report"] = None
    return write_members(out, resign(m, key, mutate))


def _absolute_member(m: list[Member], key: PrivateKey, out: Path) -> Path:
    return write_members(out, [*m[:2], member("/tmp/evil.onnx", b"x"), *m[2:]])


def _symlink_member(m: list[Member], key: PrivateKey, out: Path) -> Path:
    rest = [x for x in m[2:] if x[0].name != MODEL]
    return write_members(out, [*m[:2], member(MODEL, kind=tarfile.SYMTYPE, linkname="/etc/passwd"), *rest])


def _hardlink_member(m: list[Member], key: PrivateKey, out: Path) -> Path:
    rest = [x for x in m[2:] if x[0].name != "report.json"]
    return write_members(out, [*m[:2], *rest, member("report.json", kind=tarfile.LNKTYPE, linkname=MODEL)])


def _fifo_member(m: list[Member], key: PrivateKey, out: Path) -> Path:
    rest = [x for x in m[2:] if x[0].name != "report.json"]
    return write_members(out, [*m[:2], *rest, member("report.json", kind=tarfile.FIFOTYPE)])


def _size_differs(m: list[Member], key: PrivateKey, out: Path) -> Path:
    data = dict((i.name, d) for i, d in m)["report.json"]
    return write_members(out, replace_data(m, "report.json", data + b" " * 4096))


def _over_file_cap(m: list[Member], key: PrivateKey, out: Path) -> tuple[Path, BundleLimits]:
    return write_members(out, m), BundleLimits(max_file_bytes=1024)


def _over_total_cap(m: list[Member], key: PrivateKey, out: Path) -> tuple[Path, BundleLimits]:
    return write_members(out, m), BundleLimits(max_total_bytes=2048)


def _over_member_cap(m: list[Member], key: PrivateKey, out: Path) -> tuple[Path, BundleLimits]:
    return write_members(out, m), BundleLimits(max_members=2)


def _duplicate_member(m: list[Member], key: PrivateKey, out: Path) -> Path:
    report = next(x for x in m if x[0].name == "report.json")
    return write_members(out, [*m, report])


def _second_manifest_member(m: list[Member], key: PrivateKey, out: Path) -> Path:
    return write_members(out, [*m, m[0]])


def _non_canonical_manifest(m: list[Member], key: PrivateKey, out: Path) -> Path:
    pretty = json.dumps(manifest_of(m), indent=2, sort_keys=True).encode()
    return write_members(out, resign(m, key, raw=pretty))


def _truncated_archive(m: list[Member], key: PrivateKey, out: Path) -> Path:
    full = write_members(out.with_name("full.efb"), m).read_bytes()
    model_at = full.index(dict((i.name, d) for i, d in m)[MODEL][:64])
    out.write_bytes(full[: model_at + 1000])
    return out


def _truncated_in_header(m: list[Member], key: PrivateKey, out: Path) -> Path:
    out.write_bytes(write_members(out.with_name("full.efb"), m).read_bytes()[:700])
    return out


def _gzipped_tar(m: list[Member], key: PrivateKey, out: Path) -> Path:
    out.write_bytes(gzip.compress(write_members(out.with_name("plain.efb"), m).read_bytes()))
    return out


def _signatures_first(m: list[Member], key: PrivateKey, out: Path) -> Path:
    return write_members(out, [m[1], m[0], *m[2:]])


def _payload_first(m: list[Member], key: PrivateKey, out: Path) -> Path:
    return write_members(out, [*m[2:], *m[:2]])


def _not_a_tar(m: list[Member], key: PrivateKey, out: Path) -> Path:
    out.write_bytes(b"PK\x03\x04 this is a zip, not a bundle" * 40)
    return out


def _unknown_manifest_field(m: list[Member], key: PrivateKey, out: Path) -> Path:
    return write_members(out, resign(m, key, lambda d: d.update(evil=True)))


def _metadata_not_strings(m: list[Member], key: PrivateKey, out: Path) -> Path:
    return write_members(out, resign(m, key, lambda d: d.update(metadata={"epochs": 3})))


def _manifest_with_infinity(m: list[Member], key: PrivateKey, out: Path) -> Path:
    raw = m[0][1].replace(b'"max_abs":0.0001', b'"max_abs":Infinity')
    assert raw != m[0][1]
    return write_members(out, resign(m, key, raw=raw))


def _reserved_name_in_other_case(m: list[Member], key: PrivateKey, out: Path) -> Path:
    def mutate(d: dict) -> None:
        d["files"]["Manifest.JSON"] = d["files"].pop("report.json")
        d["report"] = None
    data = dict((i.name, x) for i, x in m)["report.json"]
    rest = [x for x in m[2:] if x[0].name != "report.json"]
    return write_members(out, resign([*m[:2], *rest, member("Manifest.JSON", data)], key, mutate))


def _file_is_also_a_directory(m: list[Member], key: PrivateKey, out: Path) -> Path:
    def mutate(d: dict) -> None:
        d["files"]["model"] = d["files"].pop("report.json")
        d["report"] = None
    data = dict((i.name, x) for i, x in m)["report.json"]
    rest = [x for x in m[2:] if x[0].name != "report.json"]
    return write_members(out, resign([*m[:2], member("model", data), *rest], key, mutate))


def _schema_version_2(m: list[Member], key: PrivateKey, out: Path) -> Path:
    return write_members(out, resign(m, key, lambda d: d.update(schema_version=2)))


CASES: dict[str, tuple[Case, type[BundleError], str]] = {
    "model_byte_flipped": (_model_byte_flipped, BundleIntegrityError, "'model/model.onnx' sha256"),
    "manifest_byte_flipped": (_manifest_byte_flipped, BundleSignatureError, "does not match the manifest"),
    "signed_by_untrusted_key": (_signed_by_untrusted_key, BundleSignatureError, "untrusted key"),
    "wrong_key_claims_trusted_id": (_wrong_key_claims_trusted_id, BundleSignatureError, "does not match"),
    "missing_signature": (_missing_signature, BundleSignatureError, "not signed"),
    "missing_file": (_missing_file, BundleIntegrityError, "missing: report.json"),
    "unlisted_file": (_unlisted_file, BundleIntegrityError, "'extra.bin' is not listed"),
    "dotdot_member": (_dotdot_member, UnsafeArchiveError, "'../evil.onnx'"),
    "dotdot_inside_member": (_dotdot_inside_member, UnsafeArchiveError, "'model/../../evil'"),
    "dotdot_in_signed_manifest": (_dotdot_listed_in_signed_manifest, UnsafeArchiveError, "'../evil'"),
    "absolute_member": (_absolute_member, UnsafeArchiveError, "absolute path '/tmp/evil.onnx'"),
    "symlink_member": (_symlink_member, UnsafeArchiveError, "'model/model.onnx' is a symlink"),
    "hardlink_member": (_hardlink_member, UnsafeArchiveError, "'report.json' is a hardlink"),
    "fifo_member": (_fifo_member, UnsafeArchiveError, "'report.json' is a special file"),
    "size_differs_from_manifest": (_size_differs, BundleIntegrityError, "'report.json' is 4"),
    "over_file_cap": (_over_file_cap, UnsafeArchiveError, "per-file cap of 1024"),
    "over_total_cap": (_over_total_cap, UnsafeArchiveError, "over the cap of 2048"),
    "over_member_cap": (_over_member_cap, UnsafeArchiveError, "3 files listed, over the cap of 2"),
    "duplicate_member": (_duplicate_member, UnsafeArchiveError, "duplicate member 'report.json'"),
    "second_manifest_member": (_second_manifest_member, UnsafeArchiveError, "duplicate member 'manifest.json'"),
    "non_canonical_manifest": (_non_canonical_manifest, BundleFormatError, "not in canonical form"),
    "truncated_archive": (_truncated_archive, BundleFormatError, "truncated"),
    "truncated_in_header": (_truncated_in_header, BundleFormatError, "manifest.json"),
    "gzipped_tar": (_gzipped_tar, BundleFormatError, "uncompressed tar expected"),
    "signatures_first": (_signatures_first, BundleFormatError,
                         "'manifest.json' expected here, found 'signatures.json'"),
    "payload_first": (_payload_first, BundleFormatError, "'manifest.json' expected here"),
    "not_a_tar": (_not_a_tar, BundleFormatError, "not a bundle"),
    "unknown_manifest_field": (_unknown_manifest_field, BundleFormatError, "unknown field(s) ['evil']"),
    "schema_version_2": (_schema_version_2, BundleFormatError, "schema_version 2 is not supported"),
    "metadata_not_strings": (_metadata_not_strings, BundleFormatError, "metadata must map strings to strings"),
    "manifest_with_infinity": (_manifest_with_infinity, BundleFormatError, "Infinity is not valid JSON"),
    "reserved_name_in_other_case": (_reserved_name_in_other_case, BundleFormatError, "reserved name 'Manifest.JSON'"),
    "file_is_also_a_directory": (_file_is_also_a_directory, BundleFormatError,
                                 "file 'model' is also the directory of 'model/model.onnx'"),
}


@pytest.fixture(scope="module")
def good_members(tmp_path_factory: pytest.TempPathFactory, signing_key, mlp_model) -> list[Member]:
    from edgefleet.sdk.testing import build_test_bundle

    path = build_test_bundle(mlp_model, tmp_path_factory.mktemp("good") / "good.efb", signing_key)
    members = read_members(path)
    assert [i.name for i, _ in members] == ["manifest.json", "signatures.json", "model/model.onnx", "report.json",
                                           "validation.npz"]
    return members


@pytest.mark.parametrize("case", sorted(CASES))
def test_bundle_tamper_is_refused_with_its_error_and_nothing_extracted(
    case: str, good_members: list[Member], signing_key, trusted: TrustedKeys, tmp_path: Path
) -> None:
    build, error, fragment = CASES[case]
    made = build(list(good_members), signing_key, tmp_path / "hostile.efb")
    path, limits = made if isinstance(made, tuple) else (made, BundleLimits())
    with pytest.raises(error) as verified:
        verify_bundle(path, trusted, limits)
    assert type(verified.value) is error, f"{type(verified.value).__name__}: {verified.value}"
    assert fragment in str(verified.value)
    assert str(path) in str(verified.value)  # the message names the file
    dest = tmp_path / "store" / "bundle"
    with pytest.raises(error):
        extract_bundle(path, trusted, dest, limits)
    _assert_nothing_extracted(dest)


def test_bundle_verify_refuses_everything_when_no_keys_are_trusted(mlp_model, make_bundle) -> None:
    with pytest.raises(BundleSignatureError, match="no trusted keys"):
        verify_bundle(make_bundle(mlp_model), TrustedKeys())


def test_bundle_error_codes_are_distinct_per_failure_kind() -> None:
    codes = {e.code for e in (BundleFormatError, BundleSignatureError, BundleIntegrityError, UnsafeArchiveError)}
    assert len(codes) == 4 and all(c.startswith("bundle.") for c in codes)


@pytest.mark.parametrize("case", ["model_byte_flipped", "symlink_member", "dotdot_member", "size_differs_from_manifest",
                                  "truncated_archive", "missing_file"])
def test_extract_bundle_second_pass_refuses_on_its_own_when_first_pass_is_skipped(
    case: str, good_members: list[Member], signing_key, trusted: TrustedKeys, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: the writing pass repeats every check, so a bundle changed after verification is refused."""
    import edgefleet.sdk.bundle as bundle_mod

    build, error, _ = CASES[case]
    made = build(list(good_members), signing_key, tmp_path / "hostile.efb")
    path = made[0] if isinstance(made, tuple) else made
    monkeypatch.setattr(bundle_mod, "verify_bundle", lambda *a, **k: None)
    dest = tmp_path / "store" / "bundle"
    with pytest.raises(error):
        extract_bundle(path, trusted, dest)
    _assert_nothing_extracted(dest)
    assert not (tmp_path / "evil.onnx").exists() and not (tmp_path / "store" / "evil.onnx").exists()
