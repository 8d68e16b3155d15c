"""Fetch a bundle file by URL (http, https, file) with resume, a hard size cap and a sha256 check.

The partial file lives at a stable path per sha256, so a download cut by a network drop or a kill continues where it
stopped (HTTP ``Range: bytes=N-``); a server that ignores Range (200 instead of 206) is read from the start again.
Reading stops the moment a server sends more than the announced size: a wrong or hostile URL cannot fill the disk.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from edgefleet.sdk._fs import sha256_file
from edgefleet.sdk.errors import TransportError

__all__ = ["fetch"]

log = logging.getLogger("edgefleet.agent.download")
_CHUNK = 1 << 16


class _Interrupted(TransportError):
    """The server closed the connection before the end: the partial file is kept."""


def fetch(url: str, dest: Path, size: int, sha256: str, *, timeout_s: float = 30.0, ca_file: str = "",
          max_s: float = 3600.0, progress: Callable[[int], None] | None = None) -> Path:
    """Download ``url`` to ``dest`` (resuming a partial one), check its size and sha256; TransportError otherwise.

    ``timeout_s`` bounds each read, ``max_s`` the whole transfer (a server trickling bytes cannot hold the command
    worker forever; what arrived is kept for the next attempt).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = dest.stat().st_size if dest.exists() else 0
    if have > size:
        dest.unlink()
        have = 0
    scheme = urlsplit(url).scheme
    if have < size:
        if scheme == "file":
            _copy_file(url, dest, size)
        elif scheme in ("http", "https"):
            _http(url, dest, have, size, timeout_s, ca_file, progress, time.monotonic() + max_s)
        else:
            raise TransportError(f"unsupported URL scheme {scheme!r} (http, https and file are supported)")
    got = dest.stat().st_size
    if got != size:
        raise TransportError(f"{url}: got {got} bytes, the command announced {size}")
    digest = sha256_file(dest)[0]
    if digest != sha256:
        # A partial from an earlier, different file would poison every resume: start over next time.
        dest.unlink(missing_ok=True)
        raise TransportError(f"{url}: sha256 {digest[:12]}… differs from the announced {sha256[:12]}…")
    return dest


def _copy_file(url: str, dest: Path, size: int) -> None:
    src = Path(unquote(urlsplit(url).path))
    try:
        st = src.stat()
        if st.st_size > size:
            raise TransportError(f"{src} is {st.st_size} bytes, over the announced {size}")
        with open(src, "rb") as fi, open(dest, "wb") as fo:
            shutil.copyfileobj(fi, fo, _CHUNK)
            fo.flush()
            os.fsync(fo.fileno())
    except OSError as exc:
        raise TransportError(f"cannot read {src}: {exc.strerror or exc}") from exc


def _http(url: str, dest: Path, have: int, size: int, timeout_s: float, ca_file: str,
          progress: Callable[[int], None] | None, deadline: float) -> None:
    headers = {"User-Agent": "edgefleet-agent"}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    ctx = ssl.create_default_context(cafile=ca_file or None) if url.startswith("https") else None
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
        try:
            with open(dest, mode) as fh:
                while True:
                    # read1: whatever has arrived (up to the cap), so a slow link still makes resumable progress
                    chunk = resp.read1(min(_CHUNK, size - written + 1))
                    if not chunk:
                        break
                    written += len(chunk)
                    if written > size:
                        raise TransportError(f"{url}: server sent more than the announced {size} bytes")
                    fh.write(chunk)
                    if progress is not None:
                        progress(written)
                    if time.monotonic() > deadline:
                        fh.flush()
                        raise _Interrupted(f"{url}: download too slow: {written} of {size} bytes within "
                                           "install.download_max_s; the next deploy resumes from here")
                fh.flush()
                os.fsync(fh.fileno())
            if expected is not None and written < expected:
                # The connection closed early: keep the partial for the next attempt's Range request.
                raise _Interrupted(f"{url}: download interrupted at {written} of {expected} bytes")
        except _Interrupted:
            raise
        except TransportError:
            dest.unlink(missing_ok=True)
            raise
        except (OSError, http.client.HTTPException) as exc:
            # A dropped connection keeps the partial for the next attempt's Range request.
            raise TransportError(f"{url}: download interrupted at {written} of {size} bytes: {exc}") from exc
