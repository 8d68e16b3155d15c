"""Where the controller keeps what the fleet reports: the :class:`Store` interface and its backends.

``base`` is the interface (typed rows from :mod:`edgefleet.sdk.protocol`, the guarantees every backend keeps);
each backend is one module beside it with its own migrations (``sqlite``, the embedded default; ``postgres``, for
several controllers sharing one database, with the ``postgres`` install extra). The controller only ever calls
:func:`open_store` and the interface.
"""

from __future__ import annotations

from pathlib import Path

from edgefleet.sdk.errors import ConfigError

from .base import (
    LIVENESS_BOOT,
    TARGET_FIELDS,
    ApiToken,
    Batch,
    Store,
    TrackedCommand,
    VersionSketch,
    VersionTotal,
    WriteResult,
)
from .sqlite import SQLiteStore

__all__ = ["LIVENESS_BOOT", "TARGET_FIELDS", "ApiToken", "Batch", "SQLiteStore", "Store", "TrackedCommand",
           "VersionSketch", "VersionTotal", "WriteResult", "open_store"]


def open_store(url: str | Path) -> Store:
    """Open a store from a path or URL: ``path/to/fleet.db``, ``sqlite:///path`` or ``postgresql://...``."""
    s = str(url)
    if s.startswith(("postgres://", "postgresql://")):
        from .postgres import PostgresStore  # psycopg is loaded only by those who ask for PostgreSQL

        return PostgresStore(s)
    if "://" in s and not s.startswith("sqlite:///"):
        raise ConfigError(f"unknown store URL {s.split('://')[0]}://...: use a file path, sqlite:///path or "
                          "postgresql://user@host/db")
    if s.startswith("sqlite:///"):
        s = s[len("sqlite:///"):]
    return SQLiteStore(s)
