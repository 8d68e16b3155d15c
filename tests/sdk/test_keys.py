"""Signing keys: generate, load, sign, verify; bad key files are ConfigErrors naming the file."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from edgefleet.sdk.errors import BundleSignatureError, ConfigError
from edgefleet.sdk.keys import TrustedKeys, generate_keypair, load_private_key, load_public_key


def test_generate_keypair_writes_private_0600_and_loadable_public(tmp_path: Path) -> None:
    key = generate_keypair(tmp_path / "a" / "fleet.key")
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "fleet.key").st_mode) == 0o600
    pub = load_public_key(tmp_path / "a" / "fleet.pub")
    assert pub.key_id == key.public.key_id and len(pub.key_id) == 16
    assert load_private_key(tmp_path / "a" / "fleet.key").public.key_id == pub.key_id
    assert load_public_key(tmp_path / "a" / "fleet.key").key_id == pub.key_id  # derived from the private key


def test_generate_keypair_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "k.key")
    before = (tmp_path / "k.key").read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_keypair(tmp_path / "k.key")
    assert (tmp_path / "k.key").read_bytes() == before


def test_signature_verifies_only_the_signed_bytes(tmp_path: Path) -> None:
    key = generate_keypair(tmp_path / "k.key")
    rec = key.sign(b"manifest bytes")
    assert rec["alg"] == "ed25519" and rec["keyid"] == key.public.key_id
    trusted = TrustedKeys([key.public])
    assert trusted.verify([rec], b"manifest bytes", "x") == key.public.key_id
    with pytest.raises(BundleSignatureError, match="does not match"):
        trusted.verify([rec], b"manifest bytez", "x")


def test_trusted_keys_accepts_any_trusted_signature_among_several(tmp_path: Path) -> None:
    old, new = generate_keypair(tmp_path / "old.key"), generate_keypair(tmp_path / "new.key")
    data = b"rotating keys"
    sigs = [old.sign(data), new.sign(data)]
    assert TrustedKeys([new.public]).verify(sigs, data, "x") == new.public.key_id
    assert TrustedKeys([old.public]).verify(sigs, data, "x") == old.public.key_id


def test_trusted_keys_rejects_bad_base64_and_unknown_algorithms(tmp_path: Path) -> None:
    key = generate_keypair(tmp_path / "k.key")
    trusted = TrustedKeys([key.public])
    with pytest.raises(BundleSignatureError, match="not valid base64"):
        trusted.verify([{"alg": "ed25519", "keyid": key.public.key_id, "sig": "!!"}], b"d", "x")
    sig = key.sign(b"d")
    with pytest.raises(BundleSignatureError, match="untrusted"):
        trusted.verify([{**sig, "alg": "rsa"}], b"d", "x")


def test_trusted_keys_from_directory_loads_every_pub_file(tmp_path: Path) -> None:
    a, b = generate_keypair(tmp_path / "a.key"), generate_keypair(tmp_path / "b.key")
    (tmp_path / "notes.txt").write_text("not a key")
    keys = TrustedKeys.from_paths([tmp_path])
    assert keys.key_ids == sorted([a.public.key_id, b.public.key_id]) and len(keys) == 2


def test_load_public_key_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pub"
    with pytest.raises(ConfigError, match=str(missing)):
        load_public_key(missing)
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match=str(garbage)):
        load_public_key(garbage)


def test_load_keys_reject_non_ed25519_keys(tmp_path: Path) -> None:
    ecdsa = ec.generate_private_key(ec.SECP256R1())
    priv = tmp_path / "ec.key"
    priv.write_bytes(ecdsa.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    pub = tmp_path / "ec.pub"
    pub.write_bytes(ecdsa.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        load_private_key(priv)
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        load_public_key(pub)


def test_signature_is_64_bytes_base64(tmp_path: Path) -> None:
    key = generate_keypair(tmp_path / "k.key")
    assert len(base64.b64decode(key.sign(b"x")["sig"])) == 64
