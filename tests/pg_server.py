"""A throwaway PostgreSQL server for tests and benchmarks: Debian's binaries, a temporary directory, a free port.

No pytest in here (``bench/fleet.py`` uses it too). ``initdb`` refuses to run as root, so as root the cluster belongs
to an unprivileged account (``postgres`` when Debian's package created it, else ``nobody``) and the server runs as
that account; as any other user it runs as that user. Trust authentication, loopback TCP only.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.helpers import free_port

__all__ = ["PostgresServer", "PostgresUnavailable", "find_bindir"]


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here (or they cannot start): the reason is the message."""


def _version_key(path: str) -> tuple[int, ...]:
    parts = Path(path).parent.name.split(".")
    return tuple(int(p) for p in parts if p.isdigit())


def find_bindir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``: ``$EDGEFLEET_PG_BINDIR``, ``pg_config
    --bindir``, then the newest ``/usr/lib/postgresql/*/bin`` (Debian keeps the server binaries off the PATH)."""
    candidates: list[Path] = []
    env = os.environ.get("EDGEFLEET_PG_BINDIR")
    if env:
        candidates.append(Path(env))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += [Path(p).parent for p in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                                                   key=lambda p: _version_key(str(Path(p).parent)), reverse=True)]
    exe = shutil.which("initdb")
    if exe:
        candidates.append(Path(os.path.realpath(exe)).parent)
    for c in candidates:
        if all((c / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return c
    raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install Debian's "
                              "postgresql package (make system-deps does) or set EDGEFLEET_PG_BINDIR")


class PostgresServer:
    """One PostgreSQL cluster in a fresh temporary directory; ``stop()`` removes it.

    ``settings`` are extra ``-c name=value`` server settings (tests turn durability off for speed; the bench keeps
    the defaults). ``url(db)`` is a libpq URL for the superuser ``postgres``.
    """

    def __init__(self, settings: dict[str, str] | None = None, *, start_timeout_s: float = 60.0) -> None:
        self.bindir = find_bindir()
        self.port = free_port()
        self.host = "127.0.0.1"
        self.dir = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))  # under /tmp: the server account can reach it
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                account = pwd.getpwnam("nobody")
            os.chown(self.dir, account.pw_uid, account.pw_gid)
            self._as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        opts = {"listen_addresses": "127.0.0.1", "unix_socket_directories": str(self.dir), "max_connections": "300",
                **(settings or {})}
        self._opts = " ".join(f"-c {k}={v}" for k, v in opts.items()) + f" -p {self.port}"
        try:
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                      "--locale=C.UTF-8" if _has_c_utf8() else "--no-locale", timeout=start_timeout_s)
            self._run("pg_ctl", "-D", str(self.data), "-o", self._opts, "-l", str(self.log), "-w", "-t",
                      str(int(start_timeout_s)), "start", timeout=start_timeout_s + 10)
        except BaseException:
            self.stop()
            raise

    def _run(self, tool: str, *args: str, timeout: float) -> None:
        proc = subprocess.run([str(self.bindir / tool), *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "LC_ALL": "C"}, cwd=self.dir, **self._as)
        if proc.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise PostgresUnavailable(f"{tool} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}"
                                      f"{log}")

    def url(self, dbname: str = "postgres") -> str:
        """libpq URL of a database on this server (superuser, trust auth)."""
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    def execute(self, sql: str, dbname: str = "postgres") -> None:
        """Run one statement in autocommit (``CREATE DATABASE`` cannot run in a transaction)."""
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, name: str, template: str = "template1") -> str:
        """A new database (copied from ``template``); returns its URL."""
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return self.url(name)

    def pids(self) -> list[int]:
        """The postmaster and its backends (for CPU accounting)."""
        pidfile = self.data / "postmaster.pid"
        if not pidfile.exists():
            return []
        return [int(pidfile.read_text().split()[0])]

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)
            except (PostgresUnavailable, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                shutil.rmtree(self.dir)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


def _has_c_utf8() -> bool:
    try:
        out = subprocess.run(["locale", "-a"], capture_output=True, text=True, timeout=10).stdout.lower()
    except (OSError, subprocess.SubprocessError):
        return False
    return "c.utf8" in out or "c.utf-8" in out
