"""Installs in-process against a real store and real ORT sessions: every refusal names its step, the old bundle keeps
serving, the store holds only what the pointers name, and downloads resume with HTTP Range."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _agent_util import sha_size
from edgefleet.agent.installer import Installer, InstallError
from edgefleet.agent.registry import Registry
from edgefleet.agent.store import Store
from edgefleet.sdk.errors import ConfigError
from edgefleet.sdk.keys import generate_keypair
from edgefleet.sdk.testing import build_test_bundle
from edgefleet.sdk.validation import save_validation

X = np.ones((2, 16), np.float32)


@pytest.fixture
def installer(tmp_path: Path, trusted) -> Installer:
    return Installer(Store(tmp_path / "data"), Registry(), trusted, targets=("x86-cpu",))


def _install(inst: Installer, bundle: Path, url: str | None = None):
    sha, size = sha_size(bundle)
    return inst.install(url or bundle.as_uri(), sha, size)


def _serving(inst: Installer) -> str:
    model = inst.registry.get("testmodel")
    assert model is not None
    assert model.run({"x": X})["probs"].shape == (2, 4)
    return model.version


def _store_dirs(inst: Installer) -> set[str]:
    return {p.name for p in inst.store.bundles.iterdir()}


def test_install_then_upgrade_keeps_previous_and_rollback_swaps(installer: Installer, make_bundle, mlp_model) -> None:
    r1 = _install(installer, make_bundle(mlp_model, version="1.0.0", filename="v1.efb"))
    assert r1.providers == ["CPUExecutionProvider"] and r1.selftest["ok"]
    assert (installer.store.cache_dir(r1.digest)).parent == installer.store.caches
    b2 = make_bundle(mlp_model, version="2.0.0", filename="v2.efb")
    r2 = _install(installer, b2)
    assert _serving(installer) == "2.0.0"
    assert r2.previous == r1.digest
    assert _store_dirs(installer) == {r1.digest, r2.digest}
    ptrs = json.loads((installer.store.state / "pointers.json").read_text())["models"]["testmodel"]
    assert ptrs == {"active": r2.digest, "previous": r1.digest}
    back = installer.rollback("testmodel")
    assert back.digest == r1.digest and _serving(installer) == "1.0.0"
    # forward again to the bundle kept as previous: its directory is reused after its files are re-hashed
    (installer.store.path(r2.digest) / "report.json").write_text("{}")
    with pytest.raises(InstallError) as err:
        _install(installer, b2)
    assert err.value.step == "session" and err.value.code == "bundle.integrity"
    assert _serving(installer) == "1.0.0"
    r3 = _install(installer, make_bundle(mlp_model, version="3.0.0", filename="v3.efb"))
    # only active + previous are kept
    assert _store_dirs(installer) == {r3.digest, r1.digest}
    assert not list(installer.store.downloads.iterdir())


def test_same_bundle_twice_is_already_active(installer: Installer, make_bundle, mlp_model) -> None:
    b = make_bundle(mlp_model)
    _install(installer, b)
    again = _install(installer, b)
    assert again.already_active and _serving(installer) == "1.0.0"


def test_bad_signature_refused_at_verify_old_still_serving(installer: Installer, make_bundle, mlp_model,
                                                           tmp_path: Path) -> None:
    _install(installer, make_bundle(mlp_model, filename="good.efb"))
    other = generate_keypair(tmp_path / "other.key")
    bad = build_test_bundle(mlp_model, tmp_path / "bad.efb", other, version="9.0.0")
    with pytest.raises(InstallError) as err:
        _install(installer, bad)
    assert err.value.step == "verify" and err.value.code == "bundle.signature"
    assert "untrusted key" in str(err.value)
    assert _serving(installer) == "1.0.0"
    assert len(_store_dirs(installer)) == 1 and not list(installer.store.downloads.iterdir())


def test_failing_selftest_refused_old_still_serving(installer: Installer, make_bundle, mlp_model,
                                                   tmp_path: Path) -> None:
    good = _install(installer, make_bundle(mlp_model, filename="good.efb"))
    # A validation set whose reference outputs are wrong: the device's outputs cannot match them.
    rng = np.random.default_rng(1)
    samples = [({"x": rng.standard_normal((1, 16)).astype(np.float32)},
                {"probs": np.full((1, 4), 0.9, np.float32)}) for _ in range(2)]
    save_validation(tmp_path / "wrong.npz", samples)
    bad = make_bundle(mlp_model, version="2.0.0", filename="bad.efb",
                      extra_files={"validation.npz": tmp_path / "wrong.npz"})
    with pytest.raises(InstallError) as err:
        _install(installer, bad)
    assert err.value.step == "selftest" and err.value.code == "selftest"
    assert "max abs error" in str(err.value)
    assert _serving(installer) == "1.0.0"
    assert _store_dirs(installer) == {good.digest}


def test_other_target_refused_at_compatibility(installer: Installer, make_bundle, mlp_model) -> None:
    with pytest.raises(InstallError) as err:
        _install(installer, make_bundle(mlp_model, target="jetson-orin"))
    assert err.value.step == "compatibility" and err.value.code == "bundle.compat"
    assert "jetson-orin" in str(err.value) and "x86-cpu" in str(err.value)
    assert installer.registry.get("testmodel") is None and not _store_dirs(installer)


def test_missing_provider_refused_at_compatibility(installer: Installer, make_bundle, mlp_model) -> None:
    from edgefleet.sdk.bundle import ProviderConfig

    b = make_bundle(mlp_model, providers=(ProviderConfig("TensorrtExecutionProvider"),
                                          ProviderConfig("CPUExecutionProvider")))
    with pytest.raises(InstallError) as err:
        _install(installer, b)
    assert err.value.step == "compatibility" and "TensorrtExecutionProvider" in str(err.value)


def test_wrong_sha_or_size_refused_at_download(installer: Installer, make_bundle, mlp_model) -> None:
    b = make_bundle(mlp_model)
    sha, size = sha_size(b)
    with pytest.raises(InstallError) as err:
        installer.install(b.as_uri(), "0" * 64, size)
    assert err.value.step == "download" and "sha256" in str(err.value)
    with pytest.raises(InstallError) as err:
        installer.install(b.as_uri(), sha, size - 10)
    assert err.value.step == "download" and "announced" in str(err.value)


def test_http_download_resumes_with_range_after_a_cut(installer: Installer, make_bundle, mlp_model,
                                                      bundle_server) -> None:
    b = make_bundle(mlp_model, filename="resume.efb")
    sha, size = sha_size(b)
    server = bundle_server(cut_after=size // 3)
    with pytest.raises(InstallError) as err:
        installer.install(server.url("resume.efb"), sha, size)
    assert err.value.step == "download" and "interrupted" in str(err.value)
    part = installer.store.download_path(sha)
    assert part.stat().st_size == size // 3
    res = installer.install(server.url("resume.efb"), sha, size)
    assert res.version == "1.0.0" and _serving(installer) == "1.0.0"
    assert server.requests[-1]["range"] == f"bytes={size // 3}-"


def test_http_server_sending_more_than_announced_is_cut(installer: Installer, make_bundle, mlp_model,
                                                        bundle_server) -> None:
    b = make_bundle(mlp_model, filename="big.efb")
    sha, size = sha_size(b)
    server = bundle_server()
    with pytest.raises(InstallError) as err:
        installer.install(server.url("big.efb"), sha, size // 2)
    assert err.value.step == "download" and "announce" in str(err.value)
    assert not installer.store.download_path(sha).exists()


def test_store_recover_removes_staging_and_unreferenced(tmp_path: Path, installer: Installer, make_bundle,
                                                        mlp_model) -> None:
    r = _install(installer, make_bundle(mlp_model))
    store = installer.store
    (store.bundles / ".staging-abc-123").mkdir()
    (store.bundles / ("f" * 64)).mkdir()
    (store.downloads / ("e" * 64 + ".part")).write_bytes(b"x")
    (store.state / ".pointers.json.123.tmp").write_text("{}")
    with pytest.raises(ConfigError, match="in use by another running agent"):
        Store(store.root)
    store.close()  # the "restart": the old process is gone
    report = Store(store.root).recover()
    assert _store_dirs(installer) == {r.digest}
    assert "f" * 64 in report["removed"] and not list(store.downloads.iterdir())
    assert not list(store.state.glob(".*.tmp"))


def test_rollback_and_remove_of_unknown_models_name_the_step(installer: Installer, make_bundle, mlp_model) -> None:
    with pytest.raises(InstallError) as err:
        installer.rollback("testmodel")
    assert (err.value.step, err.value.code) == ("rollback", "not_found") and "not installed" in str(err.value)
    _install(installer, make_bundle(mlp_model))
    with pytest.raises(InstallError) as err:
        installer.rollback("testmodel")
    assert "no previous bundle" in str(err.value)
    with pytest.raises(InstallError) as err:
        installer.remove("other")
    assert (err.value.step, err.value.code) == ("remove", "not_found")
    digest = installer.remove("testmodel")
    assert installer.registry.get("testmodel") is None
    assert digest not in _store_dirs(installer) and not _store_dirs(installer)
    assert installer.store.pointers() == {}


def test_restart_serves_previous_when_active_bundle_was_tampered(installer: Installer, make_bundle, mlp_model,
                                                                 trusted) -> None:
    r1 = _install(installer, make_bundle(mlp_model, version="1.0.0", filename="v1.efb"))
    r2 = _install(installer, make_bundle(mlp_model, version="2.0.0", filename="v2.efb"))
    (installer.store.path(r2.digest) / "model" / "model.onnx").write_bytes(b"garbage")
    installer.store.close()
    fresh = Installer(Store(installer.store.root), Registry(), trusted, targets=("x86-cpu",))
    problems = fresh.load_all()
    assert [(n, d) for n, d, _ in problems] == [("testmodel", r2.digest)]
    assert "differs from the manifest" in problems[0][2]
    assert _serving(fresh) == "1.0.0"
    assert fresh.store.pointers()["testmodel"].active == r1.digest


def test_two_models_serve_side_by_side_and_upgrade_independently(installer: Installer, make_bundle,
                                                                 mlp_model) -> None:
    a1 = _install(installer, make_bundle(mlp_model, name="alpha", version="1.0.0", filename="a1.efb"))
    b1 = _install(installer, make_bundle(mlp_model, name="beta", version="1.0.0", filename="b1.efb"))
    a2 = _install(installer, make_bundle(mlp_model, name="alpha", version="2.0.0", filename="a2.efb"))
    assert [n for n, _ in installer.registry.items()] == ["alpha", "beta"]
    ptrs = installer.store.pointers()
    assert (ptrs["alpha"].active, ptrs["alpha"].previous) == (a2.digest, a1.digest)
    assert (ptrs["beta"].active, ptrs["beta"].previous) == (b1.digest, None)
    assert _store_dirs(installer) == {a1.digest, a2.digest, b1.digest}
    beta = installer.registry.get("beta")
    assert beta is not None and beta.run({"x": X})["probs"].shape == (2, 4)


def test_https_download_checks_the_server_certificate(tmp_path: Path, trusted, make_bundle, mlp_model,
                                                      bundle_server) -> None:
    from tests.helpers import make_tls_files

    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    tls = make_tls_files(tls_dir)
    b = make_bundle(mlp_model, filename="tls.efb")
    sha, size = sha_size(b)
    server = bundle_server(tls=tls)
    url = server.url("tls.efb")
    assert url.startswith("https://")
    plain = Installer(Store(tmp_path / "a"), Registry(), trusted, targets=("x86-cpu",))
    with pytest.raises(InstallError) as err:
        plain.install(url, sha, size)  # system CAs do not know the test CA
    assert err.value.step == "download" and "CERTIFICATE_VERIFY_FAILED" in str(err.value)
    pinned = Installer(Store(tmp_path / "b"), Registry(), trusted, targets=("x86-cpu",), ca_file=str(tls["ca"]))
    assert pinned.install(url, sha, size).version == "1.0.0"


def test_trickling_download_stops_at_the_deadline_and_resumes_later(tmp_path: Path, trusted, make_bundle, mlp_model,
                                                                    bundle_server) -> None:
    b = make_bundle(mlp_model, filename="slow.efb")
    sha, size = sha_size(b)
    server = bundle_server(rate=size / 4.0)  # ~4 s for the whole file
    impatient = Installer(Store(tmp_path / "d"), Registry(), trusted, targets=("x86-cpu",), download_max_s=1.0)
    with pytest.raises(InstallError) as err:
        impatient.install(server.url("slow.efb"), sha, size)
    assert err.value.step == "download" and "too slow" in str(err.value)
    got = impatient.store.download_path(sha).stat().st_size
    assert 0 < got < size
    server.rate = None
    assert impatient.install(server.url("slow.efb"), sha, size).version == "1.0.0"
    assert server.requests[-1]["range"] == f"bytes={got}-"


def test_downloads_hold_at_most_one_partial_and_failures_other_than_a_cut_delete_it(
        installer: Installer, make_bundle, mlp_model, bundle_server) -> None:
    a = make_bundle(mlp_model, version="1.0.0", filename="a.efb")
    b = make_bundle(mlp_model, version="2.0.0", filename="b.efb")
    sha_a, size_a = sha_size(a)
    server = bundle_server(cut_after=size_a // 2)
    with pytest.raises(InstallError):
        installer.install(server.url("a.efb"), sha_a, size_a)
    assert installer.store.download_path(sha_a).exists()  # a cut keeps the partial for resume
    res = _install(installer, b)  # another bundle: its download removes a's partial first
    assert res.version == "2.0.0" and not list(installer.store.downloads.iterdir())
    _, size_b = sha_size(b)
    with pytest.raises(InstallError) as err:  # a wrong hash: the partial goes
        installer.install(server.url("b.efb"), "0" * 64, size_b)
    assert err.value.step == "download" and not list(installer.store.downloads.iterdir())


def test_free_space_check_counts_the_reserve_and_names_it(tmp_path: Path, trusted, make_bundle, mlp_model) -> None:
    """The space check against the real filesystem: a reserve larger than the free space refuses every install at
    the download step, before anything is written, and says which setting to change."""
    import shutil

    free = shutil.disk_usage(tmp_path).free
    inst = Installer(Store(tmp_path / "data", reserve_bytes=free + (1 << 30)), Registry(), trusted,
                     targets=("x86-cpu",))
    with pytest.raises(InstallError) as err:
        _install(inst, make_bundle(mlp_model))
    assert (err.value.step, err.value.code) == ("download", "storage.full")
    assert "storage.reserve_bytes" in str(err.value)
    assert not list(inst.store.downloads.iterdir()) and not _store_dirs(inst)


def test_a_canary_install_splits_traffic_with_the_previous_version_until_its_deadline(
        installer: Installer, make_bundle, mlp_model) -> None:
    import time

    _install(installer, make_bundle(mlp_model, version="1.0.0", filename="v1.efb"))
    b2 = make_bundle(mlp_model, version="2.0.0", filename="v2.efb")
    sha, size = sha_size(b2)
    installer.install(b2.as_uri(), sha, size, split_pct=25.0, split_s=0.8)
    reg = installer.registry
    picks = [reg.pick("testmodel") for _ in range(400)]
    assert {m.version for m in picks} == {"1.0.0", "2.0.0"}
    assert sum(m.version == "1.0.0" for m in picks) == 100  # a running share, not a coin: exactly 25%
    assert all(m.run({"x": X})["probs"].shape == (2, 4) for m in (picks[0], picks[3]))  # both sessions serve
    assert reg.pick("testmodel", "1.0.0").version == "1.0.0" and reg.pick("testmodel", "2.0.0").version == "2.0.0"
    assert [m.version for m in reg.split_models()] == ["1.0.0"]  # its windows go into telemetry too
    assert reg.get("testmodel").version == "2.0.0"  # what the device serves (status, metadata) is the new one
    time.sleep(0.9)
    assert {reg.pick("testmodel").version for _ in range(20)} == {"2.0.0"} and reg.split_models() == []
    assert [r.model.version for r in reg.take_retired()] == ["1.0.0"]  # its last window is kept

    # a rollback ends a split at once: the previous version serves alone
    b3 = make_bundle(mlp_model, version="3.0.0", filename="v3.efb")
    sha, size = sha_size(b3)
    installer.install(b3.as_uri(), sha, size, split_pct=50.0, split_s=60.0)
    assert {reg.pick("testmodel").version for _ in range(4)} == {"2.0.0", "3.0.0"}
    installer.rollback("testmodel")
    assert {reg.pick("testmodel").version for _ in range(10)} == {"2.0.0"} and reg.split_models() == []
