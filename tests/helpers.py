"""Helpers every test area shares: a free port, polling, a real Mosquitto (plain or TLS-only with client
certificates) and throw-away TLS files. Fixtures built on them are in tests/conftest.py."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

__all__ = ["Mosquitto", "free_port", "make_tls_files", "remove_tls_files", "tls_files_for_broker", "wait_until"]


def free_port() -> int:
    """A free TCP port on loopback (the one definition the test suite uses)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any] | None, grace_s: float = 20.0) -> None:
    """SIGTERM a child still running, wait ``grace_s`` for it to stop on its own, then SIGKILL it."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def wait_until(pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition", *,
               timeout_s: float | None = None, interval: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy (and return it); fail the test naming ``what`` on timeout."""
    limit = timeout if timeout_s is None else timeout_s
    deadline = time.monotonic() + limit
    while True:
        val = pred()
        if val:
            return val
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {limit:g} s waiting for {what} (last value {val!r})")
        time.sleep(interval)


def make_tls_files(d: Path) -> dict[str, Path]:
    """A throw-away CA, a server certificate for localhost/127.0.0.1 and a client certificate (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: Any, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("edgefleet test CA")).issuer_name(name("edgefleet test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    out = {"ca": d / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name("localhost" if who == "server" else "agent"))
             .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
        if who == "server":
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        out[f"{who}_cert"] = d / f"{who}.pem"
        out[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}_key"] = write_key(key, d / f"{who}.key")
    return out


class Mosquitto:
    """A real Mosquitto broker on a free loopback port with its own config and persistence directory.

    ``restart()`` keeps the port and the persistence file, so persistent sessions and queued QoS 1 messages survive,
    as with a production broker restart. ``kill()`` is SIGKILL (no persistence flush), ``stop()`` is SIGTERM.
    """

    def __init__(self, workdir: Path, extra_conf: str = "", tls: dict[str, Path] | None = None) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            pytest.skip("mosquitto is not installed (make test installs it with apt)")
        self.exe = exe
        self.workdir = workdir
        self.port = free_port()
        self.host = "127.0.0.1"
        self.tls = tls
        # TLS-only with client certificates: no plain listener at all, and a client without a certificate from
        # the CA is refused. The server certificate names localhost and 127.0.0.1.
        self.url = f"mqtts://localhost:{self.port}" if tls else f"mqtt://{self.host}:{self.port}"
        listener = f"listener {self.port} 127.0.0.1\n"
        if tls:
            listener += (f"cafile {tls['ca']}\ncertfile {tls['server_cert']}\nkeyfile {tls['server_key']}\n"
                         "require_certificate true\n")
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            listener +
            # Started as root, Mosquitto drops to the 'mosquitto' user, which cannot write its persistence file into
            # pytest's private temp dir: sessions would silently not survive restart(). Ignored when not root.
            "user root\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir / 'data'}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 100\n"
            "persistent_client_expiration 1h\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            + extra_conf
        )
        self.proc = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    log = self.log.read_text() if self.log.exists() else ""
                    raise RuntimeError(f"mosquitto exited: {log}") from None
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()


def tls_files_for_broker() -> dict[str, Path]:
    """TLS files in a directory Mosquitto can read: started as root it drops to the mosquitto user, which cannot
    enter pytest's private temporary directories. The caller removes ``files['ca'].parent``."""
    d = Path(tempfile.mkdtemp(prefix="edgefleet-tls-"))
    d.chmod(0o755)
    files = make_tls_files(d)
    for f in files.values():
        f.chmod(0o644)
    return files


def remove_tls_files(files: dict[str, Path]) -> None:
    """Remove what :func:`tls_files_for_broker` made."""
    shutil.rmtree(files["ca"].parent, ignore_errors=True)
