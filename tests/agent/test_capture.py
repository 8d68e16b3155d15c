"""Sampled input capture on the device: opt-in per model, a ring bounded by its byte cap under a flood (oldest out
first, every drop counted), never eating the disk's reserve, and samples that round-trip through numpy's loader."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from edgefleet.agent.capture import CaptureConfig, CaptureRing
from edgefleet.agent.config import parse_config
from edgefleet.agent.storage import Storage
from edgefleet.sdk.errors import ConfigError

X = np.arange(64, dtype=np.float32).reshape(1, 64)


def _files(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/*.npz"))


def _disk_bytes(root: Path) -> int:
    total = 0
    for f in _files(root):
        try:
            total += f.stat().st_size
        except FileNotFoundError:  # evicted between the listing and the stat
            pass
    return total


def test_ring_stays_within_its_cap_under_a_flood_and_counts_what_it_dropped(tmp_path: Path) -> None:
    cap = 40_000
    # a queue that holds the whole flood, so every sample reaches the ring whatever the machine's load: the cap and
    # the eviction are what is tested (a full queue drops and counts, the identity below covers it)
    ring = CaptureRing(tmp_path / "cap", CaptureConfig(models=("m",), rate=1.0, max_bytes=cap, max_pending=4000))
    sizes: list[int] = []

    def flood() -> None:
        for _ in range(500):
            ring.offer("m", "1.0.0", {"x": X}, {"y": X[:, :4]})
            sizes.append(_disk_bytes(tmp_path / "cap"))

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ring.flush()
    ring.stop()
    st = ring.status()
    on_disk = _disk_bytes(tmp_path / "cap")
    assert on_disk <= cap and st["bytes"] == on_disk and max(sizes) <= cap + 2 * 1000  # a write in flight at most
    assert st["sampled"] == 2000 and st["written"] + st["dropped_queue"] + st["dropped_storage"] == 2000
    assert st["evicted"] == st["written"] - st["files"] > 0
    newest = np.load(_files(tmp_path / "cap")[-1], allow_pickle=False)
    assert newest.files == ["in/x"]  # outputs only with capture.outputs
    np.testing.assert_array_equal(newest["in/x"], X)


def test_capture_is_off_for_models_the_config_does_not_name(tmp_path: Path) -> None:
    ring = CaptureRing(tmp_path / "cap", CaptureConfig(models=("m",), rate=1.0, outputs=True))
    ring.offer("other", "1", {"x": X})
    ring.offer("m", "1", {"x": X}, {"y": X})
    ring.flush()
    ring.stop()
    (f,) = _files(tmp_path / "cap")
    assert f.parent.parent.name == "m" and sorted(np.load(f).files) == ["in/x", "out/y"]


def test_capture_drops_samples_rather_than_eat_the_disk_reserve(tmp_path: Path) -> None:
    storage = Storage(tmp_path, reserve_bytes=1 << 60, ballast_bytes=0)  # more than any disk: nothing fits
    ring = CaptureRing(tmp_path / "cap", CaptureConfig(models=("m",), rate=1.0), storage=storage)
    for _ in range(10):
        ring.offer("m", "1", {"x": X})
    ring.flush()
    ring.stop()
    assert ring.status()["dropped_storage"] == 10 and not _files(tmp_path / "cap")


def test_ring_picks_up_what_an_earlier_run_left(tmp_path: Path) -> None:
    cfg = CaptureConfig(models=("m",), rate=1.0)
    first = CaptureRing(tmp_path / "cap", cfg)
    for _ in range(3):
        first.offer("m", "1", {"x": X})
    first.flush()
    first.stop()
    again = CaptureRing(tmp_path / "cap", cfg)
    assert again.status()["files"] == 3
    again.stop()


@pytest.mark.parametrize("section, message", [
    ({"rate": 2.0}, "capture.rate"),
    ({"models": ["a/b"]}, "capture.models"),
    ({"upload_url": "ftp://x"}, "capture.upload_url"),
    ({"nope": 1}, "nope"),
])
def test_capture_config_is_checked(tmp_path: Path, section: dict, message: str) -> None:
    data = {"agent": {"device": "d", "fleet": "f", "data_dir": str(tmp_path), "trusted_keys": [str(tmp_path)]},
            "capture": section}
    with pytest.raises(ConfigError, match=message):
        parse_config(data, "t.toml", tmp_path)
