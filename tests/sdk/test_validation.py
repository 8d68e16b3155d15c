"""Validation sets: npz round trip without pickles, malformed files refused, the per-output comparison."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from edgefleet.sdk.bundle import Tolerance
from edgefleet.sdk.errors import BundleFormatError
from edgefleet.sdk.validation import compare_output, load_validation, save_validation


def test_validation_roundtrips_samples_in_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    samples = [({"x": rng.standard_normal((1, 4)).astype(np.float32), "sr": np.array(16000, np.int64)},
                {"y": rng.standard_normal((1, 2)).astype(np.float32)}) for _ in range(12)]
    save_validation(tmp_path / "v.npz", samples)
    back = load_validation(tmp_path / "v.npz")
    assert len(back) == 12
    for (i0, o0), (i1, o1) in zip(samples, back, strict=True):
        np.testing.assert_array_equal(i0["x"], i1["x"])
        assert i1["sr"].dtype == np.int64 and i1["sr"].shape == ()
        np.testing.assert_array_equal(o0["y"], o1["y"])


def test_load_validation_refuses_pickled_object_arrays(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, **{"s0/in/x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(BundleFormatError, match="unreadable validation set"):
        load_validation(path)


@pytest.mark.parametrize("key", ["x", "s0/inputs/x", "sX/in/x", "0/in/x"])
def test_load_validation_refuses_unexpected_keys(tmp_path: Path, key: str) -> None:
    path = tmp_path / "v.npz"
    np.savez(path, **{key: np.zeros(2)})
    with pytest.raises(BundleFormatError, match="unexpected validation key"):
        load_validation(path)


def test_load_validation_refuses_gaps_in_sample_numbers(tmp_path: Path) -> None:
    path = tmp_path / "v.npz"
    np.savez(path, **{"s0/in/x": np.zeros(2), "s2/in/x": np.zeros(2)})
    with pytest.raises(BundleFormatError, match="not numbered"):
        load_validation(path)


def test_load_validation_refuses_non_npz(tmp_path: Path) -> None:
    path = tmp_path / "v.npz"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(BundleFormatError, match="unreadable"):
        load_validation(path)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("s0/in/x.npy", b"garbage")
    with pytest.raises(BundleFormatError, match="'s0/in/x' is not a numpy array"):
        load_validation(path)


def test_compare_output_judges_max_abs_and_cosine() -> None:
    ref = np.array([1.0, 2.0, 3.0], np.float32)
    tol = Tolerance(max_abs=0.1, min_cosine=0.999)
    assert compare_output("y", ref + 0.05, ref, tol).ok
    far = compare_output("y", ref + 0.5, ref, tol)
    assert not far.ok and "max abs error 0.5 > 0.1" in far.reason
    flipped = compare_output("y", ref[::-1].copy(), ref, Tolerance(max_abs=10.0, min_cosine=0.99))
    assert not flipped.ok and "cosine" in flipped.reason
    assert not compare_output("y", np.array([np.nan, 2, 3], np.float32), ref, tol).ok
    assert not compare_output("y", ref[:2], ref, tol).ok
    assert compare_output("y", ref + 5, ref, None).ok  # no tolerance: reported, not judged


def test_compare_output_exact_for_non_numeric_outputs() -> None:
    a = np.array(["cat", "dog"], dtype=object)
    assert compare_output("label", a, a.copy(), None).ok
    assert not compare_output("label", a, np.array(["cat", "cow"], dtype=object), None).ok


def test_check_channels_catches_a_collapsed_score_channel_that_the_whole_tensor_cosine_hides() -> None:
    import numpy as np
    from edgefleet.sdk.bundle import Tolerance
    from edgefleet.sdk.validation import check_channels, compare_output

    rng = np.random.default_rng(0)
    # a detector-like output: 4 box channels in 0..320, 2 class-score channels in 0..1 — (batch, channels, anchors)
    ref = [np.concatenate([rng.uniform(0, 320, (1, 4, 50)), rng.uniform(0, 1, (1, 2, 50))], axis=1).astype(np.float32)
           for _ in range(3)]
    got = [r.copy() for r in ref]
    for g in got:
        g[:, 5, :] = 0.0  # class 1 scores collapse
    tol = Tolerance(max_abs=2.0, min_cosine=0.99, min_channel_cosine=0.9, channel_floor=0.05)
    assert all(compare_output("out", g, r, tol).ok for g, r in zip(got, ref, strict=True))  # whole tensor: passes
    ch = check_channels("out", got, ref, tol)
    assert ch is not None and not ch.ok and "channel 5" in ch.reason
    assert check_channels("out", ref, ref, tol).ok
    assert check_channels("out", got, ref, Tolerance(max_abs=2.0)) is None  # not asked for: not checked
