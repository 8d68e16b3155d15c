"""Ed25519 signing keys: generate, load, sign and verify the canonical bundle manifest.

Key files are PEM (PKCS#8 private, SubjectPublicKeyInfo public). A key id is the first 16 hex digits of the
sha256 of the raw 32-byte public key, so a signature names the key that made it without revealing anything.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._fs import atomic_write_bytes
from .errors import BundleSignatureError, ConfigError

__all__ = ["PrivateKey", "PublicKey", "TrustedKeys", "generate_keypair", "load_private_key", "load_public_key"]


def _key_id(pub: Ed25519PublicKey) -> str:
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key and its id."""

    key: Ed25519PublicKey
    key_id: str

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when ``signature`` is this key's signature over ``data``."""
        try:
            self.key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def to_pem(self) -> bytes:
        """The key as SubjectPublicKeyInfo PEM."""
        return self.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class PrivateKey:
    """An Ed25519 signing key."""

    key: Ed25519PrivateKey

    @property
    def public(self) -> PublicKey:
        """The matching public key."""
        pub = self.key.public_key()
        return PublicKey(pub, _key_id(pub))

    def sign(self, data: bytes) -> dict[str, str]:
        """A detached signature record: algorithm, key id and base64 signature."""
        sig = self.key.sign(data)
        return {"alg": "ed25519", "keyid": self.public.key_id, "sig": base64.b64encode(sig).decode("ascii")}


def generate_keypair(
    private_path: str | os.PathLike[str], public_path: str | os.PathLike[str] | None = None
) -> PrivateKey:
    """Create a new key pair; the private key file is written 0600 and never overwritten."""
    priv_path = Path(private_path)
    if priv_path.exists():
        raise ConfigError(f"refusing to overwrite existing key file {priv_path}")
    key = PrivateKey(Ed25519PrivateKey.generate())
    pem = key.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write_bytes(priv_path, pem, mode=0o600)
    pub_path = Path(public_path) if public_path else priv_path.with_suffix(".pub")
    atomic_write_bytes(pub_path, key.public.to_pem())
    return key


def load_private_key(path: str | os.PathLike[str]) -> PrivateKey:
    """Load a PEM Ed25519 private key, with a one-line error naming the file on failure."""
    try:
        data = Path(path).read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot load private key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"private key {path} is not an Ed25519 key")
    return PrivateKey(key)


def load_public_key(path: str | os.PathLike[str]) -> PublicKey:
    """Load a PEM Ed25519 public key (or derive it from a private key file)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read public key {path}: {exc}") from exc
    if b"PRIVATE KEY" in data:
        return load_private_key(path).public
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"cannot load public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"public key {path} is not an Ed25519 key")
    return PublicKey(key, _key_id(key))


class TrustedKeys:
    """The set of public keys a device or controller accepts signatures from."""

    def __init__(self, keys: Iterable[PublicKey] = ()) -> None:
        self._keys = {k.key_id: k for k in keys}

    @classmethod
    def from_paths(cls, paths: Iterable[str | os.PathLike[str]]) -> TrustedKeys:
        """Load keys from files, or every ``*.pub``/``*.pem`` file in the directories given."""
        keys: list[PublicKey] = []
        for p in paths:
            path = Path(p)
            if path.is_dir():
                keys.extend(load_public_key(f) for f in sorted(path.iterdir()) if f.suffix in (".pub", ".pem"))
            else:
                keys.append(load_public_key(path))
        return cls(keys)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def key_ids(self) -> list[str]:
        """Ids of the trusted keys."""
        return sorted(self._keys)

    def verify(self, signatures: list[dict[str, str]], data: bytes, what: str) -> str:
        """Return the id of a trusted key with a valid signature over ``data``, else raise."""
        if not self._keys:
            raise BundleSignatureError(f"{what}: no trusted keys configured, refusing to accept any signature")
        if not signatures:
            raise BundleSignatureError(f"{what}: not signed")
        seen = []
        for rec in signatures:
            if not isinstance(rec, dict) or rec.get("alg") != "ed25519":
                continue
            keyid = str(rec.get("keyid", ""))
            seen.append(keyid)
            key = self._keys.get(keyid)
            if key is None:
                continue
            try:
                sig = base64.b64decode(str(rec.get("sig", "")), validate=True)
            except ValueError:
                raise BundleSignatureError(f"{what}: signature by key {keyid} is not valid base64") from None
            if key.verify(sig, data):
                return keyid
            raise BundleSignatureError(f"{what}: signature by trusted key {keyid} does not match the manifest")
        raise BundleSignatureError(
            f"{what}: signed by untrusted key(s) {', '.join(seen) or '(none)'}; trusted: {', '.join(self.key_ids)}"
        )
