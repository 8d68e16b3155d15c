"""Real inputs for the demo's model (Magika's content-type classifier): features of real files on this machine.

Magika looks at the first and last 1 KiB of a file (after stripping leading/trailing whitespace), padded with token
256. We compute the same features from files of the Python installation (source, text, JSON, images, archives...),
so the demo's load and the packager's calibration use real content, not noise.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["magika_features", "sample_files"]

_BEG = 1024
_END = 1024
_BLOCK = 4096
_PAD = 256


def magika_features(content: bytes) -> np.ndarray:
    """The model's int32[2048] input for one file's bytes."""
    beg = content[:_BLOCK].lstrip()[:_BEG]
    end = content[-_BLOCK:].rstrip()[-_END:] if content else b""
    out = np.full(_BEG + _END, _PAD, dtype=np.int32)
    out[: len(beg)] = np.frombuffer(beg, dtype=np.uint8)
    if end:
        out[_BEG + _END - len(end):] = np.frombuffer(end, dtype=np.uint8)
    return out


def sample_files(limit: int = 400, max_bytes: int = 1 << 20) -> Iterator[Path]:
    """Up to ``limit`` varied real files from the Python installation, a few of each suffix."""
    roots = [Path(sys.base_prefix) / "lib", Path(sys.prefix) / "lib"]
    per_suffix: dict[str, int] = {}
    seen = 0
    for root in roots:
        for path in sorted(root.rglob("*")):
            if seen >= limit:
                return
            try:
                if not path.is_file() or path.is_symlink() or path.stat().st_size > max_bytes:
                    continue
            except OSError:
                continue
            n = per_suffix.get(path.suffix, 0)
            if n >= 12:
                continue
            per_suffix[path.suffix] = n + 1
            seen += 1
            yield path
