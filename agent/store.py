"""The on-device bundle store: content-addressed bundle directories and one atomic pointer file.

Layout under the data dir::

    store/<digest>/            an extracted, verified bundle (digest = sha256 of its signed manifest)
    store/.staging-*           extraction in progress (extract_bundle renames it to store/<digest> when complete)
    cache/<digest>/            provider caches (OpenVINO blobs, TensorRT engines) built at install time
    downloads/<sha256>.part    a download in progress, kept for HTTP Range resume (at most one: a new download
                               removes any other)
    state/pointers.json        {"models": {name: {"active": digest, "previous": digest | null}}}
    state/ballast              space the agent frees for its own writes when the disk fills (agent/storage.py)

The pointer file is the only thing that decides what serves. It is replaced with write-temp + fsync + rename +
fsync-dir, so after a crash at any instant it names either the old or the new bundle, never a mix. Anything in
``store/`` it does not name (an extraction finished just before a kill, staging leftovers) is garbage, removed by
:meth:`Store.recover` at start-up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.sdk._fs import fsync_dir
from edgefleet.sdk.errors import ConfigError

from .failpoints import failpoint
from .storage import Storage, is_disk_full

__all__ = ["Pointer", "Store"]

log = logging.getLogger("edgefleet.agent.store")


@dataclass(frozen=True)
class Pointer:
    """Which bundle serves a model name, and the one to roll back to."""

    active: str
    previous: str | None = None


class Store:
    """Bundle directories by digest plus the atomic active/previous pointers."""

    def __init__(self, data_dir: str | os.PathLike[str], *, reserve_bytes: int = 64 << 20,
                 ballast_bytes: int = 8 << 20) -> None:
        self.root = Path(data_dir)
        self.bundles = self.root / "store"
        self.caches = self.root / "cache"
        self.downloads = self.root / "downloads"
        self.state = self.root / "state"
        self._pointer_file = self.state / "pointers.json"
        self._lock = threading.Lock()
        for d in (self.bundles, self.caches, self.downloads, self.state):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"agent.data_dir: cannot create {d}: {exc.strerror or exc}") from exc
        self._lock_fd = self._lock_data_dir()
        self.storage = Storage(self.root, reserve_bytes=reserve_bytes, ballast_bytes=ballast_bytes)
        self._pointers = self._read()

    def _lock_data_dir(self) -> int:
        # Two agents on one data dir would interleave installs and pointer writes: the second one refuses to start.
        fd = os.open(self.state / "agent.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - not POSIX
            return fd
        except OSError:
            os.close(fd)
            raise ConfigError(f"agent.data_dir: {self.root} is in use by another running agent") from None
        return fd

    def close(self) -> None:
        """Release the data dir lock (the process exiting releases it too)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- pointers -----------------------------------------------------------------------------------------------------

    def _read(self) -> dict[str, Pointer]:
        try:
            data = json.loads(self._pointer_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Only written atomically, so this means outside damage: refuse to guess what should serve.
            raise ConfigError(f"{self._pointer_file} is unreadable ({exc}); move it away to start with an empty "
                              "store") from exc
        models = data.get("models", {}) if isinstance(data, dict) else {}
        return {name: Pointer(p["active"], p.get("previous")) for name, p in models.items()
                if isinstance(p, dict) and isinstance(p.get("active"), str)}

    def _write(self, pointers: dict[str, Pointer], op: str = "activate") -> None:
        models = {n: {"active": p.active, "previous": p.previous} for n, p in sorted(pointers.items())}
        data = (json.dumps({"v": 1, "models": models}, indent=1) + "\n").encode("utf-8")
        self.storage.ensure_headroom("pointer file")
        try:
            _atomic_write(self._pointer_file, data, op)
        except OSError as exc:
            # The old file is intact (atomic write): on a full disk free the ballast and try once more, else the
            # caller fails and what served keeps serving.
            if not (is_disk_full(exc) and self.storage.release_ballast(f"pointer file: {exc}")):
                raise
            _atomic_write(self._pointer_file, data, op)
        self._pointers = pointers

    def pointers(self) -> dict[str, Pointer]:
        """A copy of the current pointers by model name."""
        with self._lock:
            return dict(self._pointers)

    def activate(self, name: str, digest: str) -> Pointer:
        """Make ``digest`` serve ``name``; the bundle that served before becomes ``previous`` (one atomic write)."""
        with self._lock:
            pointers = dict(self._pointers)
            old = pointers.get(name)
            if old is not None and old.active == digest:
                return old
            new = Pointer(digest, old.active if old else None)
            pointers[name] = new
            self._write(pointers)
            return new

    def rollback(self, name: str) -> Pointer:
        """Swap active and previous for ``name`` (so a second rollback goes forward again)."""
        with self._lock:
            pointers = dict(self._pointers)
            old = pointers.get(name)
            if old is None or old.previous is None:
                raise KeyError(name)
            new = Pointer(old.previous, old.active)
            pointers[name] = new
            self._write(pointers, "rollback")
            return new

    def remove(self, name: str) -> Pointer:
        """Forget ``name``: nothing serves it any more (its directories go at the next :meth:`collect`)."""
        with self._lock:
            pointers = dict(self._pointers)
            old = pointers.pop(name)
            self._write(pointers, "remove")
            return old

    # -- directories --------------------------------------------------------------------------------------------------

    def path(self, digest: str) -> Path:
        """Directory of an installed bundle."""
        return self.bundles / digest

    def cache_dir(self, digest: str) -> Path:
        """Provider cache directory of a bundle (filled when its session is first created, at install)."""
        return self.caches / digest

    def download_path(self, sha256: str) -> Path:
        """Where a bundle file with this sha256 is downloaded to (kept across restarts for resume)."""
        return self.downloads / f"{sha256}.part"

    def prepare_download(self, sha256: str, size: int) -> int:
        """Make room for downloading a ``size``-byte bundle: remove every other partial download, then check that the
        rest of the archive and its unpacked files (at most the archive's size: bundles are uncompressed tars) fit
        with the reserve left free. Returns the bytes already downloaded (resumed); StorageFullError otherwise."""
        keep = self.download_path(sha256)
        for f in self.downloads.iterdir():
            if f != keep:
                f.unlink(missing_ok=True)
        have = keep.stat().st_size if keep.exists() else 0
        if have > size:
            keep.unlink()
            have = 0
        self.storage.require(size - have + size, f"a {size}-byte bundle (download and unpack)")
        return have

    def persisted_digests(self) -> set[str]:
        """Digests the pointer file on disk names (what a restart would serve), whatever this process believes."""
        try:
            return {d for p in self._read().values() for d in (p.active, p.previous) if d}
        except ConfigError:
            return self.referenced()

    def referenced(self) -> set[str]:
        """Digests the pointers name (active or previous)."""
        with self._lock:
            return {d for p in self._pointers.values() for d in (p.active, p.previous) if d}

    def collect(self, keep: set[str] | None = None) -> list[str]:
        """Remove bundle and cache directories no pointer names (plus staging leftovers); returns what went."""
        keep = self.referenced() | (keep or set())
        removed = []
        for parent in (self.bundles, self.caches):
            for entry in parent.iterdir():
                if entry.name in keep:
                    continue
                removed.append(entry.name)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
            fsync_dir(parent)
        return sorted(set(removed))

    def recover(self, keep_downloads: Iterable[str] = ()) -> dict[str, Any]:
        """Start-up clean-up after a crash: staging, unreferenced bundles, temp files, stale downloads."""
        removed = self.collect()
        keep = set(keep_downloads)
        stale = []
        for f in self.downloads.iterdir():
            if f.name.removesuffix(".part") not in keep:
                stale.append(f.name)
                f.unlink(missing_ok=True)
        for f in self.state.glob(".*.tmp"):
            f.unlink(missing_ok=True)
        if removed or stale:
            log.info("store recovered", extra={"removed": removed, "stale_downloads": stale})
        return {"removed": removed, "stale_downloads": stale}


def _atomic_write(target: Path, data: bytes, op: str) -> None:
    """write temp → fsync → rename → fsync dir (as sdk._fs.atomic_write_bytes), with a failpoint at each step."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    failpoint(f"{op}:tmp-open")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        failpoint(f"{op}:tmp-write")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        failpoint(f"{op}:tmp-fsync")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    failpoint(f"{op}:rename")
    os.replace(tmp, target)
    failpoint(f"{op}:dir-fsync")
    fsync_dir(target.parent)
