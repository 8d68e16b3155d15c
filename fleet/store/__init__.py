"""Where the controller keeps what the fleet reports: the :class:`Store` interface and its backends.

``base`` is the interface (typed rows from :mod:`edgefleet.sdk.protocol`, the guarantees every backend keeps);
each backend is one module beside it with its own migrations (``sqlite``; PostgreSQL is the next file). The
controller only ever calls :func:`open_store` and the interface.
"""

from __future__ import annotations

from pathlib import Path

from edgefleet.sdk.errors import ConfigError

from .base import TARGET_FIELDS, Batch, Store, VersionSketch, VersionTotal, WriteResult
from .sqlite import SQLiteStore

__all__ = ["TARGET_FIELDS", "Batch", "SQLiteStore", "Store", "VersionSketch", "VersionTotal", "WriteResult",
           "open_store"]


def open_store(url: str | Path) -> Store:
    """Open a store from a path or URL: ``path/to/fleet.db`` or ``sqlite:///path`` (PostgreSQL: not yet)."""
    s = str(url)
    if s.startswith(("postgres://", "postgresql://")):
        raise ConfigError("PostgreSQL stores are not implemented yet; a backend is a module beside "
                          "edgefleet/fleet/store/sqlite.py implementing store.base.Store (docs/fleet.md)")
    if s.startswith("sqlite:///"):
        s = s[len("sqlite:///"):]
    return SQLiteStore(s)
