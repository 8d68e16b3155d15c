"""Calibration and validation samples: read from ``.npy``/``.npz`` files and checked against the model's inputs.

Accepted layouts (``--calibration`` / ``--validation``):

- one ``.npz`` keyed by input name; each array stacks the samples on a new leading axis: ``(N, *input_shape)``;
- a folder of ``.npz`` files, one sample each, keyed by input name;
- a folder of ``.npy`` files, one sample each, for a model with a single input.

Every sample must name exactly the model's inputs, with the model's dtype, rank and fixed dims; anything else is an
:class:`InputError` naming the file and the input. Pickled object arrays are never loaded.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet.sdk.bundle import TensorSpec
from edgefleet.sdk.errors import InputError

__all__ = ["Feed", "SampleSource", "check_samples", "load_samples", "synthetic_samples"]

Feed = dict[str, np.ndarray]


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npz file: {exc}") from exc


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy file: {exc}") from exc


class SampleSource(Sequence[Feed]):
    """Samples read one at a time, never the whole set in memory: a folder's files are opened when a sample is
    asked for; a stacked ``.npz`` whose members are stored uncompressed (``np.savez``) is memory-mapped, so a sample is
    a slice of the page cache. A compressed stacked ``.npz`` has to be decompressed whole: refused when it would not
    fit ``max_bytes`` (with the advice to use a folder or ``np.savez``).

    Every sample is checked against the model's inputs: names, dtype, rank and fixed dims (an InputError naming the
    file). Pickled arrays are never loaded.
    """

    def __init__(self, path: str | os.PathLike[str], inputs: Sequence[TensorSpec], what: str,
                 max_bytes: int = 2 << 30) -> None:
        self.path = Path(path)
        self.inputs = tuple(inputs)
        self.what = what
        names = [t.name for t in inputs]
        self._files: list[Path] = []
        self._stacked: dict[str, np.ndarray] = {}
        p = self.path
        if p.is_dir():
            self._files = sorted(f for f in p.iterdir() if f.suffix in (".npz", ".npy"))
            if not self._files:
                raise InputError(f"{what} folder {p} has no .npz or .npy files")
            if any(f.suffix == ".npy" for f in self._files) and len(names) != 1:
                f = next(f for f in self._files if f.suffix == ".npy")
                raise InputError(f"{what} file {f}: .npy holds one array, but the model has inputs {names}; "
                                 f"use .npz files keyed by input name")
            self._n = len(self._files)
        elif p.is_file() and p.suffix == ".npz":
            self._stacked = _open_stacked(p, what, max_bytes)
            _check_names(self._stacked, names, what, str(p))
            counts = {k: (v.shape[0] if v.ndim else 0) for k, v in self._stacked.items()}
            if len(set(counts.values())) != 1 or 0 in counts.values():
                raise InputError(f"{what} {p}: every array needs the same number of samples on axis 0, got {counts}")
            self._n = next(iter(counts.values()))
        elif p.exists():
            raise InputError(f"{what} {p}: expected a .npz file or a folder of .npz/.npy files")
        else:
            raise InputError(f"{what} {p} does not exist")
        check_samples([self[0]], inputs, what, [self.origin(0)])

    def origin(self, i: int) -> str:
        """Where sample ``i`` comes from, for messages."""
        return str(self._files[i]) if self._files else f"{self.path}[{i}]"

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int | slice) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        i %= self._n
        if self._files:
            f = self._files[i]
            feed = {self.inputs[0].name: _load_npy(f)} if f.suffix == ".npy" else _load_npz(f)
        else:
            feed = {k: np.ascontiguousarray(v[i]) for k, v in self._stacked.items()}
        check_samples([feed], self.inputs, self.what, [self.origin(i)])
        return feed

    def sample_bytes(self) -> int:
        """Bytes of one sample (the first)."""
        return sum(int(a.nbytes) for a in self[0].values())

    def check_all(self) -> None:
        """Check every sample (reading each once, one at a time)."""
        for i in range(self._n):
            self[i]


def _open_stacked(path: Path, what: str, max_bytes: int) -> dict[str, np.ndarray]:
    """Arrays of a stacked .npz: memory-mapped where stored uncompressed, else loaded (within ``max_bytes``)."""
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as z:
            infos = [i for i in z.infolist() if i.filename.endswith(".npy")]
            compressed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED]
            if compressed:
                total = sum(i.file_size for i in compressed)
                if total > max_bytes:
                    raise InputError(f"{what} {path}: compressed .npz that expands to {total} bytes, over the "
                                     f"memory budget of {max_bytes}; save it with np.savez (uncompressed, read "
                                     f"without loading it whole) or as a folder of one .npz per sample")
                return _load_npz(path)
            with open(path, "rb") as fh:
                for info in infos:
                    fh.seek(info.header_offset)
                    local = fh.read(30)
                    name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30],
                                                                                                "little")
                    start = info.header_offset + 30 + name_len + extra_len
                    fh.seek(start)
                    version = np.lib.format.read_magic(fh)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read(fh)
                    if dtype.hasobject:
                        raise InputError(f"{what} {path}: {info.filename} holds Python objects (a pickle); "
                                         f"refused")
                    out[info.filename[:-4]] = np.memmap(path, dtype=dtype, mode="r", offset=fh.tell(), shape=shape,
                                                        order="F" if fortran else "C")
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npz file: {exc}") from exc
    return out


def load_samples(path: str | os.PathLike[str], inputs: Sequence[TensorSpec], what: str,
                 min_samples: int = 1) -> list[Feed]:
    """Read every sample from ``path`` into memory and check them against ``inputs`` (small sets only; the
    packager itself reads through :class:`SampleSource`)."""
    src = SampleSource(path, inputs, what)
    if len(src) < min_samples:
        raise InputError(f"{what} {path}: {len(src)} sample(s), at least {min_samples} needed")
    return list(src)


def _check_names(feed: dict[str, Any], names: Sequence[str], what: str, where: str) -> None:
    if set(feed) != set(names):
        missing = sorted(set(names) - set(feed))
        extra = sorted(set(feed) - set(names))
        raise InputError(f"{what} {where}: input names do not match the model (missing {missing}, unknown {extra}; "
                         f"model inputs are {list(names)})")


def check_samples(samples: Sequence[Feed], inputs: Sequence[TensorSpec], what: str,
                  origin: Sequence[str] | None = None) -> None:
    """Raise InputError for the first sample whose names, dtypes, ranks or fixed dims differ from the model's."""
    names = [t.name for t in inputs]
    for i, feed in enumerate(samples):
        where = origin[i] if origin else f"sample {i}"
        _check_names(feed, names, what, where)
        for spec in inputs:
            arr = feed[spec.name]
            if arr.dtype.kind == "O" or str(arr.dtype) != spec.dtype:
                raise InputError(f"{what} {where}: input {spec.name!r} has dtype {arr.dtype}, "
                                 f"model expects {spec.dtype}")
            if arr.ndim != len(spec.shape):
                raise InputError(f"{what} {where}: input {spec.name!r} has shape {list(arr.shape)}, model expects "
                                 f"rank {len(spec.shape)} {list(spec.shape)}")
            for axis, d in enumerate(spec.shape):
                if isinstance(d, int) and arr.shape[axis] != d:
                    raise InputError(f"{what} {where}: input {spec.name!r} has shape {list(arr.shape)}, model expects "
                                     f"{list(spec.shape)} (dim {axis} must be {d})")


def synthetic_samples(inputs: Sequence[TensorSpec], n: int, seed: int = 0) -> list[Feed]:
    """Inputs made up from the declared shapes (symbolic dims = 1), for a smoke check when no data is given.

    Only good enough to catch a broken conversion: accuracy on such data says little, and the report says so.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        feed: Feed = {}
        for t in inputs:
            shape = [d if isinstance(d, int) else 1 for d in t.shape]
            dt = np.dtype(t.dtype)
            if dt.kind == "f":
                feed[t.name] = rng.standard_normal(shape).astype(dt)
            elif dt.kind == "b":
                feed[t.name] = rng.integers(0, 2, shape).astype(dt)
            else:
                feed[t.name] = rng.integers(0, 100, shape).astype(dt)
        out.append(feed)
    return out
