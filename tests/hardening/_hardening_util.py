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


def mount_small_filesystem(path: Path, size_bytes: int) -> str | None:
    """Mount a tmpfs of ``size_bytes`` at ``path`` (a real filesystem that fills up); None, or why it cannot."""
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(path)],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount exited {r.returncode}")


def unmount(path: Path) -> None:
    """Unmount what :func:`mount_small_filesystem` mounted (lazily if still busy)."""
    import subprocess

    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(path: Path, leave: int = 0) -> int:
    """Write zeros into the file ``path`` until its filesystem has at most ``leave`` bytes free (or is full);
    returns the bytes written."""
    import shutil

    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for block in (1 << 20, 1 << 12):
            chunk = bytes(block)
            while shutil.disk_usage(path.parent).free - block >= leave:
                try:
                    written += os.write(fd, chunk)
                except OSError:
                    break
        if leave == 0:
            try:
                while True:
                    written += os.write(fd, b"\0" * 512)
            except OSError:
                pass
    finally:
        os.close(fd)
    return written
