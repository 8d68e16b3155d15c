"""Disk space on the device: the free-space reserve installs never eat into, and a ballast file for a full disk.

A device must never be left unable to store its own failure report or to restart because its disk filled up
(issue 18: a signed but oversize bundle filled the disk; the agent could store neither the failure reply nor
telemetry, could not rewrite its runtime state and did not restart). Two mechanisms:

* **Reserve** (``storage.reserve_bytes``): an install checks, before downloading, that the archive and its
  unpacked files fit with this much left over, checks again with the exact unpacked size from the signed manifest,
  and aborts a download (deleting the partial) the moment the free space drops below the reserve. Whatever else
  fills the disk, installs never take the last bytes.
* **Ballast** (``storage.ballast_bytes``): a file of that size, allocated while there is room, that the agent deletes
  the moment the disk is found full (a write failing with ENOSPC / SQLite's "database or disk is full", or less
  than :data:`HEADROOM_BYTES` free before a database write), so the failure report, the journal and telemetry can
  still be written — the "reserved slot". It is re-created once free space is back above reserve + ballast.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

from edgefleet.sdk.errors import EdgefleetError

__all__ = ["HEADROOM_BYTES", "Storage", "StorageFullError", "is_disk_full"]

log = logging.getLogger("edgefleet.agent.storage")

HEADROOM_BYTES = 1 << 20  # below this much free space a database write first releases the ballast
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_REFILL_AFTER_S = 5.0  # between attempts to re-make the ballast (it needs reserve + 2 x ballast free: no thrashing)


class StorageFullError(EdgefleetError):
    """Not enough free disk space on the device for what was asked (an install, a write)."""

    code = "storage.full"


def is_disk_full(exc: BaseException | None) -> bool:
    """True when ``exc`` (or an exception it was raised from) is the disk or a quota being full."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, StorageFullError):
            return True
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            if code == 13 or "disk is full" in str(exc):  # SQLITE_FULL
                return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


class Storage:
    """Free space of the data dir's filesystem, the reserve and the ballast file."""

    def __init__(self, root: str | os.PathLike[str], *, reserve_bytes: int = 64 << 20,
                 ballast_bytes: int = 8 << 20) -> None:
        if reserve_bytes < 0 or ballast_bytes < 0:
            raise ValueError(f"reserve_bytes and ballast_bytes must be >= 0, got {reserve_bytes}, {ballast_bytes}")
        self.root = Path(root)
        self.reserve_bytes = reserve_bytes
        self.ballast_bytes = ballast_bytes
        self.ballast = self.root / "state" / "ballast"
        self.full_events = 0  # times the disk was found full (ballast released or a write refused)
        self._lock = threading.Lock()
        self._next_refill = 0.0

    def free(self) -> int:
        """Bytes free for this process on the data dir's filesystem (statvfs f_bavail)."""
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return 0

    def has_ballast(self) -> bool:
        """Whether the ballast file is in place."""
        try:
            return self.ballast.stat().st_size >= self.ballast_bytes > 0
        except OSError:
            return False

    def require(self, need: int, what: str) -> None:
        """Raise StorageFullError unless ``need`` bytes fit with ``reserve_bytes`` left free."""
        free = self.free()
        if need + self.reserve_bytes > free:
            raise StorageFullError(f"not enough disk space for {what}: needs {need} bytes plus the reserve of "
                                   f"{self.reserve_bytes} (storage.reserve_bytes), {free} free on {self.root}")

    def above_reserve(self) -> bool:
        """Whether the free space is still at or above the reserve (a download stops when it is not)."""
        return self.free() >= self.reserve_bytes

    def release_ballast(self, why: str) -> bool:
        """Delete the ballast (the disk is full): its space is now there for the agent's own writes."""
        with self._lock:
            if not self.ballast.exists():
                return False
            try:
                self.ballast.unlink()
            except OSError:
                return False
            self.full_events += 1
            self._next_refill = time.monotonic() + _REFILL_AFTER_S
        log.error("disk full: released the ballast so the agent can still store its state and reports",
                  extra={"why": why, "ballast_bytes": self.ballast_bytes, "free": self.free()})
        return True

    def ensure_headroom(self, why: str) -> None:
        """Before a write: if less than HEADROOM_BYTES are free, release the ballast first."""
        if self.ballast_bytes and self.free() < HEADROOM_BYTES:
            self.release_ballast(why)

    def refill(self) -> bool:
        """Allocate the ballast when it is missing and free space allows (reserve + ballast left after it).

        Called at start and periodically; returns whether the ballast is in place.
        """
        if self.ballast_bytes == 0:
            return False
        if self.has_ballast():
            return True
        with self._lock:
            if time.monotonic() < self._next_refill:
                return False
            self._next_refill = time.monotonic() + _REFILL_AFTER_S
            if self.free() < self.reserve_bytes + 2 * self.ballast_bytes:
                return False
            tmp = self.ballast.with_name(".ballast.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    try:
                        os.posix_fallocate(fd, 0, self.ballast_bytes)  # real blocks, not a sparse file
                    except (AttributeError, OSError):
                        block = bytes(1 << 20)
                        left = self.ballast_bytes
                        while left > 0:
                            left -= os.write(fd, block[: min(left, len(block))])
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.ballast)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                log.warning("could not allocate the disk ballast", extra={"error": str(exc)})
                return False
        return True

    def status(self) -> dict[str, int | bool]:
        """For telemetry: free bytes, the reserve, whether the ballast is in place, how often the disk was full."""
        return {"free_bytes": self.free(), "reserve_bytes": self.reserve_bytes,
                "ballast": self.has_ballast(), "full_events": self.full_events}
