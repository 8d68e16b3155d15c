"""Calibration/validation data: layouts accepted, and every mismatch refused with the file and input named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from edgefleet.packager.data import load_samples
from edgefleet.sdk.bundle import TensorSpec
from edgefleet.sdk.errors import InputError

IMAGE = (TensorSpec("image", "float32", ("batch", 3, 8, 8)),)


def test_stacked_npz_gives_one_sample_per_row(tmp_path: Path) -> None:
    p = tmp_path / "calib.npz"
    np.savez(p, image=np.zeros((5, 1, 3, 8, 8), np.float32))
    samples = load_samples(p, IMAGE, "calibration data", min_samples=5)
    assert len(samples) == 5 and samples[0]["image"].shape == (1, 3, 8, 8)


def test_folder_of_npy_and_npz_files(tmp_path: Path) -> None:
    for i in range(3):
        np.save(tmp_path / f"s{i}.npy", np.zeros((1, 3, 8, 8), np.float32))
    np.savez(tmp_path / "s3.npz", image=np.ones((2, 3, 8, 8), np.float32))
    samples = load_samples(tmp_path, IMAGE, "calibration data")
    assert [s["image"].shape[0] for s in samples] == [1, 1, 1, 2]


def test_wrong_input_name_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.npz"
    np.savez(p, pixels=np.zeros((2, 1, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"missing \['image'\], unknown \['pixels'\]"):
        load_samples(p, IMAGE, "calibration data")


def test_wrong_dtype_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.npz"
    np.savez(p, image=np.zeros((2, 1, 3, 8, 8), np.float64))
    with pytest.raises(InputError, match="dtype float64, model expects float32"):
        load_samples(p, IMAGE, "calibration data")


def test_wrong_shape_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.npz"
    np.savez(p, image=np.zeros((2, 1, 3, 16, 16), np.float32))
    with pytest.raises(InputError, match="dim 2 must be 8"):
        load_samples(p, IMAGE, "calibration data")


def test_wrong_rank_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((3, 8, 8), np.float32))
    with pytest.raises(InputError, match="model expects rank 4"):
        load_samples(tmp_path, IMAGE, "validation data")


def test_too_few_samples_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.npz"
    np.savez(p, image=np.zeros((3, 1, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match="3 sample\\(s\\), at least 8 needed"):
        load_samples(p, IMAGE, "calibration data", min_samples=8)


def test_pickled_object_arrays_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "c.npy"
    np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"not a readable \.npy"):
        load_samples(tmp_path, IMAGE, "calibration data")


def test_missing_path_and_empty_folder_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        load_samples(tmp_path / "nope.npz", IMAGE, "calibration data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no \.npz or \.npy files"):
        load_samples(tmp_path / "empty", IMAGE, "calibration data")
