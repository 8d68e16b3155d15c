"""Sampled inference capture: opt-in per model, bounded on the device, uploaded to the controller over HTTP.

Off unless ``capture.models`` names a model. For those, a ``capture.rate`` share of the local API's successful
requests is kept: the request path only draws a random number and, when kept, puts the request's input arrays (and,
with ``capture.outputs``, its outputs) into a bounded queue (``capture.max_pending``; a full queue drops the sample and
counts it). A writer thread stores each sample as one ``.npz`` (``allow_pickle`` never needed: numeric arrays only)
under ``<data_dir>/captures/<model>/<version>/``, written to a temp file and renamed. The ring is bounded by
``capture.max_bytes``: before a write, the oldest samples go (counted as evicted) until the new one fits; and a
sample that would leave less than ``storage.reserve_bytes`` free is dropped (counted), so capture never fills the
disk. An uploader thread sends the samples oldest first to ``capture.upload_url`` (the controller,
``POST /api/captures/<model>/<version>?device=&id=``, bearer token from ``capture.token_file``; any URL that speaks
the same is fine) and deletes each once the controller has stored it; a sample id is sent again until it is
acknowledged, and the controller keeps one copy per (device, id): an interrupted upload resumes with the sample it
stopped at. Nothing is ever sent over MQTT, nor anywhere but ``upload_url``.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import random
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CaptureConfig", "CaptureRing", "Uploader"]

log = logging.getLogger("edgefleet.agent.capture")


@dataclass(frozen=True)
class CaptureConfig:
    """The ``[capture]`` section: which models, how often, how much, and where to upload."""

    models: tuple[str, ...] = ()
    rate: float = 0.01
    max_bytes: int = 64 << 20
    outputs: bool = False
    max_pending: int = 64
    upload_url: str = ""
    token_file: str = ""
    upload_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"capture.rate must be in [0, 1], got {self.rate!r}")
        if self.max_bytes < 1 or self.max_pending < 1 or not self.upload_interval_s > 0:
            raise ValueError("capture.max_bytes and capture.max_pending must be >= 1, upload_interval_s > 0")
        if self.upload_url and not self.upload_url.startswith(("http://", "https://")):
            raise ValueError(f"capture.upload_url must be http(s)://, got {self.upload_url[:80]!r}")


class CaptureRing:
    """The bounded on-device store of captured samples, fed from the request path through a bounded queue."""

    def __init__(self, root: Path, cfg: CaptureConfig, storage: Any = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.storage = storage
        self._models = frozenset(cfg.models)
        self._queue: queue.Queue[tuple[str, str, dict[str, Any]] | None] = queue.Queue(cfg.max_pending)
        self._lock = threading.Lock()
        self._n = 0
        self.counts = {"sampled": 0, "written": 0, "dropped_queue": 0, "dropped_storage": 0, "evicted": 0,
                       "uploaded": 0, "upload_errors": 0, "upload_refused": 0}
        self._files: list[tuple[str, int]] = []  # (relative path, size), oldest first
        for f in sorted(self.root.glob("*/*/*.npz"), key=lambda p: p.name):
            self._files.append((f.relative_to(self.root).as_posix(), f.stat().st_size))
        for tmp in self.root.glob("*/*/.*.tmp"):
            tmp.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._write_loop, name="capture-writer", daemon=True)
        self._thread.start()

    def wants(self, model: str) -> bool:
        """Whether this model is captured at all (opt-in)."""
        return model in self._models

    def offer(self, model: str, version: str, inputs: Mapping[str, Any],
              outputs: Mapping[str, Any] | None = None) -> None:
        """Called after every successful request: keep a ``rate`` share of them (never blocks, never raises)."""
        if model not in self._models or random.random() >= self.cfg.rate:
            return
        import numpy as np

        # No copy: the local API decodes fresh arrays for every request and ORT returns fresh outputs, and nothing
        # writes to them after the response; the queue holds references until the writer has stored them (its
        # memory is bounded by max_pending samples).
        sample = {f"in/{k}": np.asarray(v) for k, v in inputs.items()}
        if self.cfg.outputs and outputs is not None:
            sample.update({f"out/{k}": np.asarray(v) for k, v in outputs.items()})
        try:
            self._queue.put_nowait((model, version, sample))
            full = False
        except queue.Full:
            full = True
        with self._lock:
            self.counts["sampled"] += 1
            self.counts["dropped_queue"] += full

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._write(*item)
            except Exception:
                log.exception("capture write failed")

    def _write(self, model: str, version: str, sample: dict[str, Any]) -> None:
        import numpy as np

        buf = io.BytesIO()
        np.savez(buf, **sample)
        data = buf.getvalue()
        if len(data) > self.cfg.max_bytes:
            self.counts["dropped_storage"] += 1
            return
        if self.storage is not None:
            try:
                self.storage.require(len(data), "a captured sample")
            except Exception:  # noqa: BLE001 - StorageFullError: the disk's reserve comes first
                self.counts["dropped_storage"] += 1
                return
        with self._lock:
            while self._files and sum(s for _, s in self._files) + len(data) > self.cfg.max_bytes:
                rel, _ = self._files.pop(0)
                (self.root / rel).unlink(missing_ok=True)
                self.counts["evicted"] += 1
            self._n += 1
            name = f"{time.time_ns():020d}-{self._n:06d}.npz"
        d = self.root / _safe(model) / _safe(version)
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=d)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, d / name)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            self.counts["dropped_storage"] += 1
            return
        with self._lock:
            self._files.append(((d / name).relative_to(self.root).as_posix(), len(data)))
        self.counts["written"] += 1

    def pending(self) -> list[tuple[str, int]]:
        """Stored samples, oldest first: (path relative to the ring, size)."""
        with self._lock:
            return list(self._files)

    def remove(self, rel: str) -> None:
        """Forget a sample (uploaded)."""
        with self._lock:
            self._files = [(r, s) for r, s in self._files if r != rel]
        (self.root / rel).unlink(missing_ok=True)

    def status(self) -> dict[str, int]:
        """Counters and the ring's size, for logs and tests."""
        with self._lock:
            return {**self.counts, "files": len(self._files), "bytes": sum(s for _, s in self._files)}

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until the queue is written (tests, shutdown)."""
        end = time.monotonic() + timeout_s
        while not self._queue.empty() and time.monotonic() < end:
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop the writer (what is queued is written first)."""
        self._queue.put(None)
        self._thread.join(10.0)


def _safe(part: str) -> str:
    """A model or version as a directory name (ids are [A-Za-z0-9_.+-]; anything else is replaced)."""
    s = "".join(c if c.isalnum() or c in "_.+-" else "_" for c in part)[:64]
    return s if s not in ("", ".", "..") else "_"


class Uploader:
    """Sends the ring's samples to the controller, oldest first, every ``upload_interval_s``."""

    def __init__(self, ring: CaptureRing, device: str, ca_file: str = "", timeout_s: float = 30.0) -> None:
        self.ring = ring
        self.device = device
        self.timeout_s = timeout_s
        self.token = Path(ring.cfg.token_file).read_text(encoding="utf-8").strip() if ring.cfg.token_file else ""
        self._ctx = None
        if ca_file:
            import ssl

            self._ctx = ssl.create_default_context(cafile=ca_file)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="capture-upload", daemon=True)

    def start(self) -> Uploader:
        """Start the upload thread."""
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.ring.cfg.upload_interval_s):
            self.upload_once()

    def upload_once(self) -> int:
        """Upload what is stored now, oldest first; stops at the first failure (tried again next round)."""
        sent = 0
        base = self.ring.cfg.upload_url.rstrip("/")
        for rel, _size in self.ring.pending():
            model, version, fname = rel.split("/")
            q = urllib.parse.urlencode({"device": self.device, "id": fname.removesuffix(".npz")})
            url = f"{base}/api/captures/{urllib.parse.quote(model)}/{urllib.parse.quote(version)}?{q}"
            try:
                data = (self.ring.root / rel).read_bytes()
            except OSError:
                self.ring.remove(rel)
                continue
            req = urllib.request.Request(url, data=data, method="POST",
                                         headers={"Content-Type": "application/octet-stream",
                                                  **({"Authorization": f"Bearer {self.token}"} if self.token else {})})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s, context=self._ctx) as r:
                    r.read()
            except urllib.error.HTTPError as exc:
                if 400 <= exc.code < 500 and exc.code not in (401, 403, 408, 429):
                    # the controller refuses this sample for good (malformed, too large): it would never pass
                    log.warning("capture sample refused by the controller; dropped",
                                extra={"sample": rel, "status": exc.code})
                    self.ring.remove(rel)
                    self.ring.counts["upload_refused"] += 1
                    continue
                self.ring.counts["upload_errors"] += 1
                log.warning("capture upload failed; retried later", extra={"url": url[:200], "error": str(exc)})
                break
            except (urllib.error.URLError, OSError) as exc:
                self.ring.counts["upload_errors"] += 1
                log.warning("capture upload failed; retried later", extra={"url": url[:200], "error": str(exc)})
                break
            self.ring.remove(rel)
            self.ring.counts["uploaded"] += 1
            sent += 1
        return sent

    def stop(self) -> None:
        """Stop uploading (a sample in flight finishes)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout_s + 1)
