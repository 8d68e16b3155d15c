"""Fetch a bundle file by URL (http, https, file) with resume, a hard size cap, a free-space floor and a sha256 check.

The partial file lives at a stable path per sha256, so a download cut by a network drop or a kill continues where it
stopped (HTTP ``Range: bytes=N-``); a server that ignores Range (200 instead of 206) is read from the start again.
Reading stops the moment a server sends more than the announced size, and writing stops the moment the free space
on the data dir's filesystem drops below the reserve (``storage.reserve_bytes``) or a write fails because the disk
is full: a wrong, hostile or oversize bundle cannot fill the disk. Only an interrupted transfer (connection dropped,
too slow) keeps its partial, for the next deploy of the same bundle to resume; every other failure deletes it.
"""

from __future__ import annotations

import http.client
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlsplit

from edgefleet.sdk._fs import sha256_file
from edgefleet.sdk.errors import TransportError

from .storage import Storage, StorageFullError, is_disk_full

__all__ = ["DownloadInterrupted", "fetch"]

log = logging.getLogger("edgefleet.agent.download")
_CHUNK = 1 << 16
_SPACE_CHECK_BYTES = 4 << 20  # how often (in bytes written) the free space is checked against the reserve


class DownloadInterrupted(TransportError):
    """The transfer stopped before the end (connection dropped, too slow): the partial file is kept for resume."""


def fetch(url: str, dest: Path, size: int, sha256: str, *, timeout_s: float = 30.0, ca_file: str = "",
          max_s: float = 3600.0, progress: Callable[[int], None] | None = None,
          storage: Storage | None = None) -> Path:
    """Download ``url`` to ``dest`` (resuming a partial one), check its size and sha256.

    ``timeout_s`` bounds each read, ``max_s`` the whole transfer (a server trickling bytes cannot hold the command
    worker forever; what arrived is kept for the next attempt). With ``storage``, writing stops below its reserve.
    Raises :class:`DownloadInterrupted` (partial kept), :class:`TransportError` or :class:`StorageFullError`
    (partial deleted).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        have = dest.stat().st_size if dest.exists() else 0
        if have > size:
            dest.unlink()
            have = 0
        scheme = urlsplit(url).scheme
        if have < size:
            if scheme == "file":
                _copy_file(url, dest, size, storage)
            elif scheme in ("http", "https"):
                _http(url, dest, have, size, timeout_s, ca_file, progress, time.monotonic() + max_s, storage)
            else:
                raise TransportError(f"unsupported URL scheme {scheme!r} (http, https and file are supported)")
        got = dest.stat().st_size
        if got != size:
            raise TransportError(f"{url}: got {got} bytes, the command announced {size}")
        digest = sha256_file(dest)[0]
        if digest != sha256:
            raise TransportError(f"{url}: sha256 {digest[:12]}… differs from the announced {sha256[:12]}…")
    except DownloadInterrupted:
        raise
    except BaseException as exc:
        # A partial from a failed transfer must not fill the disk, nor poison the next resume.
        dest.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            if is_disk_full(exc):
                raise StorageFullError(f"disk full while downloading {url} to {dest}: {exc.strerror or exc}") from exc
            raise TransportError(f"cannot write {dest}: {exc.strerror or exc}") from exc
        raise
    return dest


class _Writer:
    """Appends to the partial file with the hard cap and the free-space floor."""

    def __init__(self, fh: IO[bytes], url: str, written: int, size: int, storage: Storage | None) -> None:
        self.fh = fh
        self.url = url
        self.written = written
        self.size = size
        self.storage = storage
        self._next_check = written

    def write(self, chunk: bytes) -> None:
        if self.written + len(chunk) > self.size:
            raise TransportError(f"{self.url}: server sent more than the announced {self.size} bytes")
        if self.storage is not None and self.written >= self._next_check:
            self._next_check = self.written + _SPACE_CHECK_BYTES
            if not self.storage.above_reserve():
                raise StorageFullError(f"stopped downloading {self.url} at {self.written} of {self.size} bytes: free "
                                       f"space on {self.storage.root} fell below the reserve "
                                       f"({self.storage.reserve_bytes} bytes, storage.reserve_bytes)")
        self.fh.write(chunk)
        self.written += len(chunk)


def _copy_file(url: str, dest: Path, size: int, storage: Storage | None) -> None:
    src = Path(unquote(urlsplit(url).path))
    try:
        fi = open(src, "rb")
    except OSError as exc:
        raise TransportError(f"cannot read {src}: {exc.strerror or exc}") from exc
    with fi, open(dest, "wb") as fo:
        if os.fstat(fi.fileno()).st_size > size:
            raise TransportError(f"{src} is {os.fstat(fi.fileno()).st_size} bytes, over the announced {size}")
        w = _Writer(fo, url, 0, size, storage)
        while True:
            try:
                chunk = fi.read(_CHUNK)
            except OSError as exc:
                raise TransportError(f"cannot read {src}: {exc.strerror or exc}") from exc
            if not chunk:
                break
            w.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())


def _http(url: str, dest: Path, have: int, size: int, timeout_s: float, ca_file: str,
          progress: Callable[[int], None] | None, deadline: float, storage: Storage | None) -> None:
    headers = {"User-Agent": "edgefleet-agent"}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    ctx = None
    if url.startswith("https"):
        # The system's CAs (object storage, a CDN) and, added to them, install.ca_file (a fleet's own CA): a bundle
        # may come from any server, since its size, sha256 and signature are checked here anyway.
        ctx = ssl.create_default_context()
        if ca_file:
            ctx.load_verify_locations(cafile=ca_file)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout_s, context=ctx)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # Our partial is already complete (or longer than the file): verify what we have.
            return
        raise TransportError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransportError(f"{url}: {reason}") from exc
    with resp:
        if resp.status == 206 and have:
            mode, written = "ab", have
            log.info("resuming download", extra={"url": url, "offset": have})
        else:
            mode, written = "wb", 0
        length = resp.headers.get("Content-Length")
        expected = written + int(length) if length is not None and length.isdigit() else None
        if expected is not None and expected > size:
            raise TransportError(f"{url}: server announces {expected} bytes, the command said {size}")
        with open(dest, mode) as fh:
            w = _Writer(fh, url, written, size, storage)
            while True:
                try:
                    # read1: whatever has arrived (up to the cap), so a slow link still makes resumable progress
                    chunk = resp.read1(min(_CHUNK, size - w.written + 1))
                except (OSError, http.client.HTTPException) as exc:
                    fh.flush()
                    raise DownloadInterrupted(f"{url}: download interrupted at {w.written} of {size} bytes: "
                                              f"{exc}") from exc
                if not chunk:
                    break
                w.write(chunk)
                if progress is not None:
                    progress(w.written)
                if time.monotonic() > deadline:
                    fh.flush()
                    raise DownloadInterrupted(f"{url}: download too slow: {w.written} of {size} bytes within "
                                              "install.download_max_s; the next deploy resumes from here")
            fh.flush()
            os.fsync(fh.fileno())
        if expected is not None and w.written < expected:
            # The connection closed early: keep the partial for the next attempt's Range request.
            raise DownloadInterrupted(f"{url}: download interrupted at {w.written} of {expected} bytes")
