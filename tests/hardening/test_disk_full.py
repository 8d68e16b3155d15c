"""A full disk on a real small filesystem (a size-limited tmpfs, mounted by the test; we run as root here), never a
mock: oversize bundles refused before a byte is written, downloads stopped at the free-space reserve or at ENOSPC
with the partial deleted, unpacking refused when the disk filled after the download, and a real agent process
(real Mosquitto) on a disk filled to the last byte: it reports the failed deploy (so the deployment ends failed, not
"downloading"), keeps publishing telemetry, keeps serving its model, restarts (SIGTERM and SIGKILL) on the full
disk, and installs again once there is room.

Where ``mount -t tmpfs`` is not allowed the tmpfs tests skip and say so; the RLIMIT_FSIZE test (a subprocess whose
file-size limit makes writes fail with EFBIG) runs everywhere and covers the write-failure path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _agents import BundleServer, Watcher, http_json, make_agent, serving_version, sha_size, wait_until
from _hardening_util import fill_disk, mount_small_filesystem, tree_snapshot, unmount
from edgefleet.agent.installer import Installer, InstallError
from edgefleet.agent.registry import Registry
from edgefleet.agent.store import Store
from edgefleet.sdk.testing import build_test_bundle

from tests.helpers import free_port

MIB = 1 << 20
X = np.ones((2, 16), np.float32)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``small_disk(size)``: a fresh tmpfs of ``size`` bytes (skips where mounting is not allowed)."""
    mounted: list[Path] = []

    def make(size: int) -> Path:
        path = tmp_path / f"disk{len(mounted)}"
        why = mount_small_filesystem(path, size)
        if why is not None:
            pytest.skip(f"cannot mount a size-limited tmpfs here ({why}); test_rlimit_fsize_* covers write failures")
        mounted.append(path)
        return path

    yield make
    for p in mounted:
        unmount(p)


def _blob_bundle(mlp: Path, out: Path, key: Any, version: str, blob_bytes: int) -> Path:
    """A signed bundle carrying ``blob_bytes`` of random data besides the model (incompressible, as weights are)."""
    blob = out.with_suffix(".blob")
    blob.write_bytes(os.urandom(blob_bytes))
    return build_test_bundle(mlp, out, key, version=version, extra_files={"model/blob.bin": blob})


def _installer(root: Path, trusted: Any, reserve: int, **kw: Any) -> Installer:
    return Installer(Store(root, reserve_bytes=reserve, ballast_bytes=0), Registry(), trusted, targets=("x86-cpu",),
                     **kw)


def _install(inst: Installer, bundle: Path, url: str | None = None) -> Any:
    sha, size = sha_size(bundle)
    return inst.install(url or bundle.as_uri(), sha, size)


def _serving(inst: Installer, version: str) -> None:
    model = inst.registry.get("testmodel")
    assert model is not None and model.version == version
    assert model.run({"x": X})["probs"].shape == (2, 4)


def test_oversize_bundle_is_refused_before_a_byte_is_written(small_disk, tmp_path: Path, signing_key, trusted,
                                                             mlp_model: Path, figures: Any) -> None:
    disk = small_disk(32 * MIB)
    inst = _installer(disk / "data", trusted, reserve=4 * MIB)
    _install(inst, build_test_bundle(mlp_model, tmp_path / "v1.efb", signing_key, version="1.0.0"))
    big = _blob_bundle(mlp_model, tmp_path / "v2.efb", signing_key, "2.0.0", 20 * MIB)
    before, free = tree_snapshot(disk), shutil.disk_usage(disk).free
    with pytest.raises(InstallError) as err:
        _install(inst, big)
    assert (err.value.code, err.value.step) == ("storage.full", "download"), str(err.value)
    assert "storage.reserve_bytes" in str(err.value)
    assert tree_snapshot(disk) == before and shutil.disk_usage(disk).free == free
    _serving(inst, "1.0.0")
    figures.add("disk_full", "oversize_refused_before_download", {"bundle_bytes": big.stat().st_size,
                                                                  "free_bytes": free, "message": str(err.value)})


def _fill_when(path: Path, trigger: Callable[[], bool], leave: int, done: threading.Event) -> threading.Thread:
    def run() -> None:
        deadline = time.monotonic() + 30
        while not trigger() and time.monotonic() < deadline:
            time.sleep(0.005)
        fill_disk(path, leave)
        done.set()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("reserve", [4 * MIB, 0], ids=["stops-at-reserve", "hits-enospc"])
def test_download_stops_when_the_disk_fills_and_deletes_the_partial(
        small_disk, tmp_path: Path, signing_key, trusted, mlp_model: Path, reserve: int, figures: Any) -> None:
    """Something else fills the disk while a (slow) download runs: with a reserve the download stops as soon as the
    free space falls below it; with none, the write fails with ENOSPC. Either way: storage.full at download, the
    partial deleted, the old bundle serving, and once the space is back the same deploy installs."""
    disk = small_disk(64 * MIB)
    inst = _installer(disk / "data", trusted, reserve=reserve)
    _install(inst, build_test_bundle(mlp_model, tmp_path / "v1.efb", signing_key, version="1.0.0"))
    (tmp_path / "srv").mkdir()
    big = _blob_bundle(mlp_model, tmp_path / "srv" / "v2.efb", signing_key, "2.0.0", 16 * MIB)
    server = BundleServer(big.parent, rate=8 * MIB)  # ~2 s for the whole file
    sha, size = sha_size(big)
    part = inst.store.download_path(sha)
    filled = threading.Event()
    filler = _fill_when(disk / "filler", lambda: part.exists() and part.stat().st_size > MIB, reserve // 2, filled)
    try:
        with pytest.raises(InstallError) as err:
            inst.install(server.url(big.name), sha, size)
        filler.join(30)
        assert filled.is_set()
        assert (err.value.code, err.value.step) == ("storage.full", "download"), str(err.value)
        assert not part.exists() and not list(inst.store.downloads.iterdir()), "partial download left behind"
        _serving(inst, "1.0.0")
        figures.add("disk_full", f"download_{'reserve' if reserve else 'enospc'}", {"message": str(err.value)})
        (disk / "filler").unlink()
        server.rate = None
        assert inst.install(server.url(big.name), sha, size).version == "2.0.0"
        assert not list(inst.store.downloads.iterdir())
    finally:
        server.close()


def test_unpacking_is_refused_when_the_disk_filled_after_the_download(
        small_disk, tmp_path: Path, signing_key, trusted, mlp_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact unpacked size from the signed manifest is checked before extracting: the disk fills between the
    download and the unpack (the real download runs, then the test fills the disk): storage.full at extract, the
    archive and any staging removed."""
    import edgefleet.agent.installer as installer_mod

    disk = small_disk(48 * MIB)
    inst = _installer(disk / "data", trusted, reserve=2 * MIB)
    _install(inst, build_test_bundle(mlp_model, tmp_path / "v1.efb", signing_key, version="1.0.0"))
    big = _blob_bundle(mlp_model, tmp_path / "v2.efb", signing_key, "2.0.0", 8 * MIB)
    real_fetch = installer_mod.fetch

    def fetch_then_fill(*a: Any, **kw: Any) -> Path:
        out = real_fetch(*a, **kw)
        fill_disk(disk / "filler", leave=4 * MIB)  # room for the reserve, not for the 8 MiB unpacked
        return out

    monkeypatch.setattr(installer_mod, "fetch", fetch_then_fill)
    with pytest.raises(InstallError) as err:
        _install(inst, big)
    assert (err.value.code, err.value.step) == ("storage.full", "extract"), str(err.value)
    assert not list(inst.store.downloads.iterdir()) and not list(inst.store.bundles.glob(".staging-*"))
    _serving(inst, "1.0.0")


_RLIMIT_CHILD = r"""
import json, resource, signal, sys
from pathlib import Path
from edgefleet.agent.installer import Installer, InstallError
from edgefleet.agent.registry import Registry
from edgefleet.agent.store import Store
from edgefleet.sdk.keys import TrustedKeys

root, pub, v1, v2, limit = sys.argv[1:6]
inst = Installer(Store(root, reserve_bytes=0, ballast_bytes=0), Registry(), TrustedKeys.from_paths([pub]),
                 targets=("x86-cpu",))
def install(path):
    import hashlib
    data = Path(path).read_bytes()
    return inst.install(Path(path).as_uri(), hashlib.sha256(data).hexdigest(), len(data))
install(v1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
try:
    install(v2)
    out = {"ok": True}
except InstallError as exc:
    out = {"code": exc.code, "step": exc.step, "message": str(exc)}
m = inst.registry.get("testmodel")
import numpy as np
out["serving"] = m.version if m is not None and m.run({"x": np.ones((1, 16), np.float32)}) else None
out["downloads"] = [p.name for p in inst.store.downloads.iterdir()]
out["staging"] = [p.name for p in inst.store.bundles.glob(".staging-*")]
print(json.dumps(out))
"""


def test_rlimit_fsize_write_failure_deletes_the_partial_and_keeps_serving(tmp_path: Path, signing_key,
                                                                          mlp_model: Path) -> None:
    """Runs everywhere (no mount needed): a process whose RLIMIT_FSIZE is below the bundle's size gets EFBIG on the
    download's writes: storage.full at download, no partial, the old bundle still serving."""
    v1 = build_test_bundle(mlp_model, tmp_path / "v1.efb", signing_key, version="1.0.0")
    v2 = _blob_bundle(mlp_model, tmp_path / "v2.efb", signing_key, "2.0.0", 6 * MIB)
    pub = tmp_path / "fleet.pub"
    pub.write_bytes(signing_key.public.to_pem())
    r = subprocess.run([sys.executable, "-c", _RLIMIT_CHILD, str(tmp_path / "data"), str(pub), str(v1), str(v2),
                        str(2 * MIB)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out.get("code"), out.get("step")) == ("storage.full", "download"), out
    assert out["serving"] == "1.0.0" and out["downloads"] == [] and out["staging"] == []


# -- a real agent on a full disk ------------------------------------------------------------------------------------

def _deploy(w: Watcher, bundle: Path, server: BundleServer | None = None) -> dict[str, Any]:
    sha, size = sha_size(bundle)
    url = server.url(bundle.name) if server else bundle.as_uri()
    cid = w.send("deploy", {"url": url, "sha256": sha, "size": size})
    return w.wait_reply(cid, timeout=60)


def _fill_paused(agent: Any, path: Path) -> int:
    """Fill the disk to the last byte while the agent is paused (SIGSTOP), so the agent meets a full disk at its next
    write — not midway through the fill, which would then eat the ballast the agent just freed."""
    import signal

    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        return fill_disk(path)
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)


def _version_at(api: str) -> str | None:
    try:
        status, meta = http_json("GET", f"http://{api}/v2/models/testmodel")
    except OSError:
        return None
    return meta["versions"][0] if status == 200 else None


def _tele_after(w: Watcher, t: float, n: int = 3, timeout: float = 20) -> list[dict[str, Any]]:
    wait_until(lambda: len([r for r in w.payloads("telemetry") if r["ts"] > t]) >= n, timeout,
               what=f"{n} telemetry records after {t}")
    return [r for r in w.payloads("telemetry") if r["ts"] > t]


@pytest.mark.mosquitto
@pytest.mark.timeout(240)
def test_agent_on_a_full_disk_reports_the_failure_keeps_serving_and_restarts(
        small_disk, tmp_path: Path, mosquitto, signing_key, mlp_model: Path, figures: Any) -> None:
    disk = small_disk(80 * MIB)
    pub = tmp_path / "fleet.pub"
    pub.write_bytes(signing_key.public.to_pem())
    api = f"127.0.0.1:{free_port()}"
    agent = make_agent(tmp_path, mosquitto.url, pub, require_signed=False, interval=0.2, api=api,
                       extra="[storage]\nreserve_bytes = 4194304\nballast_bytes = 4194304\n")
    # the data dir on the small disk; config and log outside it (the log must survive the unmount)
    data_dir = disk / agent.data_dir.name
    agent.config.write_text(agent.config.read_text().replace(str(agent.data_dir), str(data_dir)))
    agent.data_dir = data_dir
    w = Watcher(mosquitto, agent.device)
    v1 = build_test_bundle(mlp_model, tmp_path / "v1.efb", signing_key, version="1.0.0")
    v2 = build_test_bundle(mlp_model, tmp_path / "v2.efb", signing_key, version="2.0.0")
    ballast = agent.data_dir / "state" / "ballast"
    fig: dict[str, Any] = {}
    try:
        agent.start()
        w.wait_for("status", lambda st: st["state"] == "online")  # subscribed: commands reach it
        assert _deploy(w, v1)["status"] == "ok"
        wait_until(lambda: ballast.exists(), 10, what="ballast allocated")

        # 1. something else fills the disk to the last byte: the ballast goes, the deploy is refused and answered
        fig["filler_1_bytes"] = _fill_paused(agent, disk / "filler1")
        t_full = time.time()
        reply = _deploy(w, v2)
        assert reply["status"] == "error" and (reply["error"]["code"], reply["error"]["step"]) == (
            "storage.full", "download"), reply
        w.wait_for("events", lambda e: e["kind"] == "deploy" and e["data"].get("code") == "storage.full")
        recs = _tele_after(w, t_full)
        wait_until(lambda: any(r["system"]["storage"]["full_events"] >= 1 for r in w.payloads("telemetry")), 10,
                   what="telemetry reporting the full disk")
        assert serving_version(agent) == "1.0.0"
        fig["after_fill_1"] = {"reply": reply["error"], "telemetry_records": len(recs),
                               "storage": w.payloads("telemetry")[-1]["system"]["storage"]}

        # 2. filled again, with no ballast left: rows the database cannot take are held in memory and still sent
        fig["filler_2_bytes"] = _fill_paused(agent, disk / "filler2")
        t_full2 = time.time()
        reply2 = _deploy(w, v2)
        assert (reply2["status"], reply2["error"]["code"]) == ("error", "storage.full"), reply2
        recs2 = _tele_after(w, t_full2, n=5)
        seqs = [r["seq"] for r in recs2]
        assert len(set(seqs)) == len(seqs), "a telemetry seq repeated"
        assert serving_version(agent) == "1.0.0"
        fig["after_fill_2"] = {"reply": reply2["error"], "telemetry_records": len(recs2),
                               "held": recs2[-1]["system"].get("held"), "free": shutil.disk_usage(disk).free}

        # 3. restarts on the disk filled to the last byte again (what a stop freed is taken too): a clean stop and a
        #    SIGKILL; both times it comes back online, serves v1 and keeps sending telemetry (runtime.json cannot be
        #    written, so the API is found at its fixed port)
        (disk / "filler2").unlink()  # a clean stop with room to spare removes SQLite's -wal and -shm files
        for i, stop in enumerate(("SIGTERM", "SIGKILL")):
            if stop == "SIGTERM":
                assert agent.terminate() == 0
            else:
                agent.kill()
            fill_disk(disk / f"filler-restart{i}")
            assert shutil.disk_usage(disk).free < 64 << 10
            t_restart = time.time()
            agent.start(wait=False)
            w.wait_for("status", lambda s, t=t_restart: s["state"] == "online" and s["ts"] > t, timeout=30)
            wait_until(lambda: _version_at(api) == "1.0.0", 20, what=f"v1 served after {stop} on a full disk")
            _tele_after(w, t_restart, n=3)
        assert any(r.get("msg", "").startswith("disk full: opened the agent database with exclusive locking")
                   for r in agent.logs()), "the restart never needed the full-disk database mode"
        fig["restarts_on_full_disk"] = ("SIGTERM and SIGKILL on a disk with < 64 KiB free: online, served 1.0.0, "
                                        "telemetry flowing, database opened in exclusive mode")
        for f in disk.glob("filler-restart*"):
            f.unlink()

        # 4. space back: held rows stored, ballast re-made, the deploy installs
        (disk / "filler1").unlink()
        assert _deploy(w, v2)["status"] == "ok"
        assert _version_at(api) == "2.0.0"
        wait_until(lambda: ballast.exists(), 20, what="ballast re-made once the disk had room")
        assert not list((agent.data_dir / "downloads").iterdir())
        assert not list((agent.data_dir / "store").glob(".staging-*"))
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.kill()
        w.close()
    replies = w.payloads("reply")
    assert len({r["id"] for r in replies}) == 4  # v1, refused twice, v2: every deploy answered
    figures.add("disk_full", "agent_full_disk", fig)
