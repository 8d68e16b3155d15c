"""Captured inference inputs on the controller: stored per model, version and device, exported as calibration data.

Agents upload samples (``agent/capture.py``), one ``.npz`` each, with ``POST /api/captures/<model>/<version>?device=
&id=`` (a token with the ``capture`` scope). Each is checked before it is kept: an ``.npz`` that numpy reads with
``allow_pickle=False``, whose members are ``in/<input>`` (and optionally ``out/<output>``) numeric arrays, within
the upload cap. Stored as ``<captures_dir>/<fleet>/<model>/<version>/<device>/<id>.npz`` (written to a temp file
and renamed; the same id again is acknowledged without a second copy, so an agent's resent sample is stored once).
Retention: at most ``max_bytes`` in all; the oldest samples go first. ``export`` stacks the inputs of a model's
samples on a new axis 0 into one ``.npz`` keyed by input name (row i is request i's input, at the model's rank): the
layout ``edgefleet package --calibration`` reads.
Captured data stays on the controller's disk; nothing sends it anywhere.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.sdk.errors import InputError

__all__ = ["CaptureStore", "CaptureSummary"]

_ID = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")
_MEMBER = re.compile(r"^(in|out)/[^/\x00]{1,256}$")
_MAX_MEMBERS = 256


@dataclass(frozen=True)
class CaptureSummary:
    """Samples held for one model version from one device."""

    model: str
    version: str
    device: str
    samples: int
    bytes: int
    first: float
    last: float


def _check(what: str, value: str) -> str:
    if not _ID.match(value) or value in (".", ".."):
        raise InputError(f"{what} must match [A-Za-z0-9_.+-]{{1,64}}, got {value[:70]!r}")
    return value


def read_sample(data: bytes) -> dict[str, Any]:
    """The arrays of one uploaded sample, checked: numpy's own ``.npz`` reader without pickles, ``in/`` and ``out/``
    members only, numeric dtypes only (InputError otherwise)."""
    import numpy as np

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, ValueError) as exc:
        raise InputError(f"not an .npz: {exc}") from exc
    if not names or len(names) > _MAX_MEMBERS:
        raise InputError(f"an .npz of 1..{_MAX_MEMBERS} arrays expected, got {len(names)}")
    out: dict[str, Any] = {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            for k in npz.files:
                if not _MEMBER.match(k):
                    raise InputError(f"member {k[:80]!r}: only in/<input> and out/<output> arrays are taken")
                a = npz[k]
                if a.dtype.kind not in "biuf":
                    raise InputError(f"member {k[:80]!r}: dtype {a.dtype} is not numeric")
                out[k] = a
    except InputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"unreadable .npz: {exc}") from exc
    if not any(k.startswith("in/") for k in out):
        raise InputError("the sample has no in/<input> array")
    return out


class CaptureStore:
    """Captured samples on the controller's disk, bounded by ``max_bytes`` (oldest first out)."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int = 1 << 30) -> None:
        if max_bytes < 1:
            raise ValueError(f"captures max_bytes must be >= 1, got {max_bytes}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.evicted = 0
        self._total = sum(p.stat().st_size for p in self._files())  # kept up to date; a full scan only to evict

    def _dir(self, fleet: str, model: str, version: str, device: str) -> Path:
        return (self.root / _check("fleet", fleet) / _check("model", model) / _check("version", version)
                / _check("device", device))

    def add(self, fleet: str, model: str, version: str, device: str, sample_id: str, data: bytes) -> bool:
        """Check and keep one sample; False when this (device, id) was stored before (nothing written)."""
        d = self._dir(fleet, model, version, device)
        target = d / f"{_check('id', sample_id)}.npz"
        read_sample(data)
        with self._lock:
            if target.exists():
                return False
            self._make_room(len(data))
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=d)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return True

    def _files(self, fleet: str | None = None) -> list[Path]:
        base = self.root / fleet if fleet else self.root
        return list(base.glob("*/*/*/*.npz") if fleet else base.glob("*/*/*/*/*.npz"))

    def _make_room(self, need: int) -> None:
        if self._total + need <= self.max_bytes:
            self._total += need
            return
        files = []
        for p in self._files():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(s for _, s, _ in files)
        for _, size, p in sorted(files):
            if total + need <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
            self.evicted += 1
        self._total = total + need

    def summaries(self, fleet: str, model: str | None = None) -> list[CaptureSummary]:
        """What is held, per (model, version, device)."""
        acc: dict[tuple[str, str, str], list[Any]] = {}
        for p in self._files(_check("fleet", fleet)):
            dev, ver, mod = p.parent.name, p.parent.parent.name, p.parent.parent.parent.name
            if model is not None and mod != model:
                continue
            st = p.stat()
            a = acc.setdefault((mod, ver, dev), [0, 0, st.st_mtime, st.st_mtime])
            a[0] += 1
            a[1] += st.st_size
            a[2] = min(a[2], st.st_mtime)
            a[3] = max(a[3], st.st_mtime)
        return [CaptureSummary(m, v, d, *a) for (m, v, d), a in sorted(acc.items())]

    def export(self, fleet: str, model: str, version: str | None = None, limit: int = 10_000) -> tuple[bytes, int]:
        """The newest ``limit`` samples' inputs of ``model`` (one version, or all) stacked on a new axis 0, as
        ``.npz`` bytes keyed by input name; and how many samples went in. Samples whose inputs differ in names,
        shapes or dtypes from the newest one are left out."""
        import numpy as np

        base = self.root / _check("fleet", fleet) / _check("model", model)
        paths = list(base.glob(f"{_check('version', version)}/*/*.npz" if version else "*/*/*.npz"))
        paths = sorted(paths, key=lambda p: p.stat().st_mtime, reverse=True)[:limit]
        if not paths:
            raise InputError(f"no captured samples of {model}" + (f" {version}" if version else ""))
        stacks: dict[str, list[Any]] = {}
        want: Mapping[str, tuple[tuple[int, ...], str]] | None = None
        used = 0
        for p in paths:
            try:
                arrays = {k[3:]: a for k, a in read_sample(p.read_bytes()).items() if k.startswith("in/")}
            except (InputError, OSError):
                continue
            sig = {k: (a.shape, a.dtype.str) for k, a in arrays.items()}
            if want is None:
                want = sig
            if sig != want:
                continue
            for k, a in arrays.items():
                stacks.setdefault(k, []).append(a)
            used += 1
        buf = io.BytesIO()
        # one request's input per row: what package --calibration reads (each row is one feed, at the model's rank)
        np.savez(buf, **{k: np.stack(v, axis=0) for k, v in stacks.items()})  # type: ignore[arg-type]
        return buf.getvalue(), used
