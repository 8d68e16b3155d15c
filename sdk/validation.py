"""Validation sets (inputs + reference outputs) and the per-output comparison used by self-tests and the packager.

A validation file is an ``.npz`` (never pickled: loaded with ``allow_pickle=False``) whose keys are
``s<i>/in/<input name>`` and ``s<i>/out/<output name>`` for samples ``i = 0..n-1``.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._fs import atomic_write_bytes
from .bundle import Tolerance
from .errors import BundleFormatError, SelfTestError, UnsafeArchiveError

__all__ = ["MAX_VALIDATION_BYTES", "OutputCheck", "Sample", "check_self_test_set", "compare_output", "load_validation",
           "output_scales", "save_validation"]

MAX_VALIDATION_BYTES = 256 << 20
"""Cap on a validation set's uncompressed size: a deflated npz member can expand ~1000x (a zip bomb)."""

Sample = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def save_validation(path: str | os.PathLike[str], samples: Sequence[Sample]) -> None:
    """Write samples atomically as an uncompressed npz."""
    arrays: dict[str, np.ndarray] = {}
    for i, (inputs, outputs) in enumerate(samples):
        for name, arr in inputs.items():
            arrays[f"s{i}/in/{name}"] = np.asarray(arr)
        for name, arr in outputs.items():
            arrays[f"s{i}/out/{name}"] = np.asarray(arr)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(path, buf.getvalue())


def _check_sizes(path: str | os.PathLike[str], max_bytes: int) -> None:
    """Refuse a bomb before numpy allocates: declared sizes over the cap, or a .npy header claiming more data
    than its member holds (numpy would allocate what the header claims)."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        total = sum(i.file_size for i in infos)
        if total > max_bytes:
            raise UnsafeArchiveError(f"{path}: validation set expands to {total} bytes, over the cap of {max_bytes}")
        for info in infos:
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as fh:
                try:
                    version = np.lib.format.read_magic(fh)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(fh)
                except ValueError:
                    continue  # not a .npy at all: the loader below refuses it with its own message
                header_len = fh.tell()
            if dtype.hasobject:
                continue  # an object array (a pickle): np.load(allow_pickle=False) below refuses it
            claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if claimed != info.file_size - header_len:
                raise UnsafeArchiveError(f"{path}: validation entry {info.filename!r} claims {claimed} bytes of "
                                         f"data but holds {info.file_size - header_len}")


def load_validation(path: str | os.PathLike[str], max_bytes: int = MAX_VALIDATION_BYTES) -> list[Sample]:
    """Read a validation npz; object arrays (pickles), bombs and malformed keys are refused."""
    samples: dict[int, Sample] = {}
    try:
        _check_sizes(path, max_bytes)
        with np.load(Path(path), allow_pickle=False) as data:
            for key in data.files:
                parts = key.split("/", 2)
                well_formed = (len(parts) == 3 and parts[0].startswith("s") and parts[0][1:].isdigit()
                               and parts[1] in ("in", "out"))
                if not well_formed:
                    raise BundleFormatError(f"{path}: unexpected validation key {key!r}")
                idx = int(parts[0][1:])
                sample = samples.setdefault(idx, ({}, {}))
                arr = data[key]
                if not isinstance(arr, np.ndarray):  # NpzFile hands back raw bytes for a member that is not .npy
                    raise BundleFormatError(f"{path}: validation entry {key!r} is not a numpy array")
                sample[0 if parts[1] == "in" else 1][parts[2]] = arr
    except (BundleFormatError, UnsafeArchiveError):
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, MemoryError) as exc:
        raise BundleFormatError(f"{path}: unreadable validation set: {exc}") from exc
    if sorted(samples) != list(range(len(samples))):
        raise BundleFormatError(f"{path}: validation samples are not numbered 0..{len(samples) - 1}")
    return [samples[i] for i in range(len(samples))]


@dataclass(frozen=True)
class OutputCheck:
    """How one output compares with its reference."""

    name: str
    max_abs: float
    cosine: float
    ok: bool
    reason: str = ""


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two flat vectors; two zero vectors count as identical, one zero vector as unrelated."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def _argmax_agreement(got: np.ndarray, ref: np.ndarray) -> float:
    """Share of positions whose argmax over the last axis matches (a classifier's top-1, a sequence's per-step
    symbol)."""
    if ref.ndim < 1 or ref.shape[-1] < 2 or ref.size == 0:
        return 1.0
    g = np.argmax(got.reshape(-1, got.shape[-1]), axis=-1)
    r = np.argmax(ref.reshape(-1, ref.shape[-1]), axis=-1)
    return float(np.mean(g == r))


def compare_output(name: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance | None,
                   scale: float | None = None) -> OutputCheck:
    """One output against its reference: integer, bool and string outputs must be equal; float outputs are judged
    by ``tol`` (max absolute error, cosine, and argmax agreement when the tolerance asks for it).

    ``scale``: the output's largest magnitude over the whole validation set. A sample whose reference stays below 1%
    of it (a text detector's map of a photo without text) has no direction to keep: its cosine is not judged, its
    max abs error is (as the packager's gate does)."""
    if got.shape != ref.shape:
        return OutputCheck(name, float("inf"), 0.0, False, f"shape {got.shape} != reference {ref.shape}")
    if ref.dtype.kind not in "fc":
        # labels, counts, indices, masks: a decision, compared exactly (a tolerance would let any value through)
        equal = bool(np.array_equal(got, ref))
        return OutputCheck(name, 0.0 if equal else float("inf"), 1.0 if equal else 0.0, equal,
                           "" if equal else f"{ref.dtype} output differs from the reference (compared exactly)")
    a = got.astype(np.float64).ravel()
    b = ref.astype(np.float64).ravel()
    if not np.all(np.isfinite(a)):
        return OutputCheck(name, float("inf"), 0.0, False, "output has NaN or Inf")
    max_abs = float(np.max(np.abs(a - b))) if a.size else 0.0
    cos = cosine_similarity(a, b)
    if tol is None:
        return OutputCheck(name, max_abs, cos, True)
    reasons = []
    if max_abs > tol.max_abs:
        reasons.append(f"max abs error {max_abs:.3g} > {tol.max_abs:.3g}")
    flat = scale is not None and scale > 0 and (float(np.max(np.abs(b))) if b.size else 0.0) < 0.01 * scale
    if cos < tol.min_cosine and not flat:
        reasons.append(f"cosine {cos:.5f} < {tol.min_cosine:.5f}")
    if tol.min_argmax_agreement is not None and not flat:
        agree = _argmax_agreement(got, ref)
        if agree < tol.min_argmax_agreement:
            reasons.append(f"argmax agreement {agree:.1%} < {tol.min_argmax_agreement:.1%}")
    return OutputCheck(name, max_abs, cos, not reasons, "; ".join(reasons))


def output_scales(samples: Sequence[Sample]) -> dict[str, float]:
    """Each float output's largest magnitude over all samples' references."""
    out: dict[str, float] = {}
    for _, refs in samples:
        for name, r in refs.items():
            if r.dtype.kind in "fc" and r.size:
                out[name] = max(out.get(name, 0.0), float(np.max(np.abs(r))))
    return out


def check_self_test_set(samples: Sequence[Sample], tolerances: Mapping[str, Tolerance],
                        outputs: Mapping[str, str]) -> None:
    """Refuse a self-test that could not fail: no tolerances, an output never compared, references with NaN/Inf, a
    tolerance so loose that an all-zero output would pass, or references that carry no signal at all.

    ``outputs`` maps every model output to its dtype. Raises :class:`SelfTestError` naming the problem; the packager
    calls it before writing a bundle and the runtime before every self-test, so a vacuous set is refused twice.
    """
    if not samples:
        raise SelfTestError("vacuous self-test: the validation set has no samples")
    if not tolerances:
        raise SelfTestError("vacuous self-test: the manifest gives no tolerances, so no output would be compared")
    unknown = sorted(set(tolerances) - set(outputs))
    if unknown:
        raise SelfTestError(f"self-test tolerances name unknown outputs {unknown}")
    signal = False
    for name, dtype in outputs.items():
        is_float = dtype in ("float32", "float16", "float64", "bfloat16")
        if is_float and name not in tolerances:
            raise SelfTestError(f"vacuous self-test: float output {name!r} has no tolerance, so it would never be "
                                f"compared")
        tol = tolerances.get(name)
        zero_passes = True
        for i, (inputs, refs) in enumerate(samples):
            for arr_name, arr in inputs.items():
                if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
                    raise SelfTestError(f"self-test sample {i}: input {arr_name!r} holds NaN or Inf")
            if name not in refs:
                raise SelfTestError(f"self-test sample {i} has no reference for output {name!r}")
            ref = refs[name]
            if ref.dtype.kind in "fc":
                if not np.all(np.isfinite(ref)):
                    raise SelfTestError(f"self-test sample {i}: the reference of output {name!r} holds NaN or Inf, "
                                        f"which no output can be compared with")
                peak = float(np.max(np.abs(ref))) if ref.size else 0.0
                if peak > 0:
                    signal = True
                    if tol is not None and not (peak <= tol.max_abs and tol.min_cosine <= 0.0 and (
                            tol.min_argmax_agreement is None
                            or _argmax_agreement(np.zeros_like(ref), ref) >= tol.min_argmax_agreement)):
                        zero_passes = False
            elif ref.dtype.kind in "iub" and ref.size and np.any(ref != 0):
                signal = True
            elif ref.dtype.kind not in "iub":
                signal = True  # strings: compared exactly, any value is a signal
        if is_float and tol is not None and zero_passes and any(
                np.any(r[name] != 0) for _, r in samples if r[name].dtype.kind in "fc"):
            raise SelfTestError(f"vacuous self-test: the tolerance of output {name!r} (max_abs {tol.max_abs:.3g}, "
                                f"min_cosine {tol.min_cosine}) would pass an all-zero output")
    if not signal:
        raise SelfTestError("vacuous self-test: every reference output is zero, so a dead model would pass")


def check_outputs(
    got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], tolerances: Mapping[str, Tolerance],
    expected: Sequence[str] = (), scales: Mapping[str, float] | None = None,
) -> list[OutputCheck]:
    """Compare every reference output (float outputs by their tolerance, the others exactly); an output named in
    ``expected`` that the model did not produce fails. ``scales``: each output's magnitude over the whole set."""
    checks = [compare_output(name, got[name], ref[name], tolerances.get(name), (scales or {}).get(name))
              for name in ref if name in got]
    checks += [OutputCheck(name, float("inf"), 0.0, False, "output missing") for name in expected
               if name in ref and name not in got]
    return checks


def check_channels(
    name: str, got: Sequence[np.ndarray], ref: Sequence[np.ndarray], tol: Tolerance
) -> OutputCheck | None:
    """Per-channel (axis 1) cosine over all samples, for outputs of rank >= 3 when ``tol.min_channel_cosine`` is set.

    Returns None when the check does not apply; otherwise the worst judged channel's cosine, failing when it is below
    the limit. Channels whose reference is constant or never reaches ``tol.channel_floor`` are not judged.
    """
    if tol.min_channel_cosine is None or not ref or ref[0].ndim < 3 or ref[0].shape[1] < 2:
        return None
    if any(g.shape != r.shape for g, r in zip(got, ref, strict=True)):
        return OutputCheck(name, float("inf"), 0.0, False, "shape differs from the reference")
    c = ref[0].shape[1]
    g = np.concatenate([np.moveaxis(x, 1, 0).reshape(c, -1) for x in got], axis=1).astype(np.float64)
    r = np.concatenate([np.moveaxis(x, 1, 0).reshape(c, -1) for x in ref], axis=1).astype(np.float64)
    worst, worst_cos = -1, 1.0
    for ch in range(c):
        rc = r[ch]
        if float(np.max(np.abs(rc))) < tol.channel_floor or not np.any(rc != rc[0]):
            continue
        cos = cosine_similarity(g[ch], rc)
        if cos < worst_cos:
            worst, worst_cos = ch, cos
    ok = worst_cos >= tol.min_channel_cosine
    reason = "" if ok else f"channel {worst} cosine {worst_cos:.4f} < {tol.min_channel_cosine:.4f}"
    return OutputCheck(f"{name}[channel {worst}]" if worst >= 0 else name, 0.0, worst_cos, ok, reason)
