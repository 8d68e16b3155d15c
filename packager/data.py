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

__all__ = ["Feed", "check_samples", "load_samples", "synthetic_samples"]

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


def load_samples(path: str | os.PathLike[str], inputs: Sequence[TensorSpec], what: str,
                 min_samples: int = 1) -> list[Feed]:
    """Read samples from ``path`` and check them against ``inputs``; ``what`` names the data in errors."""
    p = Path(path)
    names = [t.name for t in inputs]
    samples: list[Feed] = []
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in (".npz", ".npy"))
        if not files:
            raise InputError(f"{what} folder {p} has no .npz or .npy files")
        for f in files:
            if f.suffix == ".npy":
                if len(names) != 1:
                    raise InputError(f"{what} file {f}: .npy holds one array, but the model has inputs {names}; "
                                     f"use .npz files keyed by input name")
                samples.append({names[0]: _load_npy(f)})
            else:
                samples.append(_load_npz(f))
        origin = [str(f) for f in files]
    elif p.is_file() and p.suffix == ".npz":
        stacked = _load_npz(p)
        _check_names(stacked, names, what, str(p))
        counts = {k: (v.shape[0] if v.ndim else 0) for k, v in stacked.items()}
        if len(set(counts.values())) != 1 or 0 in counts.values():
            raise InputError(f"{what} {p}: every array needs the same number of samples on axis 0, got {counts}")
        n = next(iter(counts.values()))
        samples = [{k: v[i] for k, v in stacked.items()} for i in range(n)]
        origin = [f"{p}[{i}]" for i in range(n)]
    elif p.exists():
        raise InputError(f"{what} {p}: expected a .npz file or a folder of .npz/.npy files")
    else:
        raise InputError(f"{what} {p} does not exist")
    check_samples(samples, inputs, what, origin)
    if len(samples) < min_samples:
        raise InputError(f"{what} {p}: {len(samples)} sample(s), at least {min_samples} needed")
    return samples


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
