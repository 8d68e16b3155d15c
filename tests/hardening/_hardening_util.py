"""Helpers shared by the hardening tests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


def tree_snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under ``root``: kind, size and sha256 of regular files (symlinks by target) — not mtimes."""
    snap: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                snap[rel] = ("link", 0, os.readlink(p))
            elif p.is_dir():
                snap[rel] = ("dir", 0, "")
            elif p.is_file():
                snap[rel] = ("file", p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                snap[rel] = ("other", 0, "")
    return snap


def sdk_bundle_tools() -> Any:
    """tests/sdk/bundle_tools.py (the hostile-archive builders), loaded by path: tests/sdk is not on sys.path when
    only tests/hardening runs."""
    import importlib.util
    import sys

    if "bundle_tools" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bundle_tools",
                                                      Path(__file__).resolve().parents[1] / "sdk" / "bundle_tools.py")
        if spec is None or spec.loader is None:
            raise ImportError("tests/sdk/bundle_tools.py not found")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bundle_tools"] = module
        spec.loader.exec_module(module)
    return sys.modules["bundle_tools"]
