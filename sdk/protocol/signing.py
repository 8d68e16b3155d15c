"""Signed commands: Ed25519 over the canonical JSON of the whole command as sent, without ``signature``.

The signature covers every field — id, kind, args, ts, expires, counter, and any field a newer controller adds —
so nothing can be changed, and a receiver verifies it over the payload it *received* (``payload=``), never over a
re-encoding of what its own model understood: a field it does not know is still covered.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import BundleSignatureError, CommandExpiredError, CommandSignatureError, ProtocolError
from .messages import Command

if TYPE_CHECKING:
    from ..keys import PrivateKey, TrustedKeys

__all__ = ["check_expiry", "sign_command", "signed_part", "verify_command"]


def signed_part(cmd: Mapping[str, Any]) -> bytes:
    """The bytes a command signature covers: canonical JSON (sorted keys, no spaces) without ``signature``."""
    from ..bundle import canonical_json  # lazy: the agent's hot path never needs the bundle module for this

    return canonical_json({k: v for k, v in cmd.items() if k != "signature"})


def sign_command(cmd: Command, key: PrivateKey, *, counter: int, ttl_s: float) -> Command:
    """``cmd`` with a per-device ``counter``, an ``expires`` time (``ts + ttl_s``) and an Ed25519 ``signature``."""
    if counter < 1:
        raise ValueError(f"counter must be >= 1, got {counter}")
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
    body = {k: v for k, v in cmd.to_dict().items() if k != "signature"}
    body["counter"] = int(counter)
    body["expires"] = float(cmd.ts) + float(ttl_s)
    body["signature"] = key.sign(signed_part(body))
    return Command.from_dict(body)


def verify_command(cmd: Command, trusted: TrustedKeys, *, payload: bytes | None = None,
                   now: float | None = None) -> str:
    """Check a command's signature (over ``payload``, the bytes received, when given) and expiry; returns the key id.

    Raises :class:`CommandSignatureError` (unsigned, untrusted key, signature not matching) or
    :class:`CommandExpiredError`. The counter is the receiver's to check: only it knows the last one it accepted.
    """
    if cmd.signature is None:
        raise CommandSignatureError(f"command {cmd.id!r} is not signed")
    if cmd.counter is None or cmd.expires is None:
        raise CommandSignatureError(f"command {cmd.id!r}: a signed command must carry counter and expires")
    if payload is not None:
        try:
            raw = msgspec.json.decode(payload)
        except msgspec.DecodeError as exc:  # it parsed as a Command a moment ago: only a caller mix-up gets here
            raise ProtocolError(f"cmd: not JSON: {exc}") from None
    else:
        raw = cmd.to_dict()
    try:
        keyid = trusted.verify([cmd.signature.to_dict()], signed_part(raw), f"command {cmd.id!r}")
    except BundleSignatureError as exc:
        raise CommandSignatureError(str(exc).replace("the manifest", "the command")) from None
    check_expiry(cmd, now)
    return keyid


def check_expiry(cmd: Command, now: float | None = None) -> None:
    """Raise :class:`CommandExpiredError` when ``cmd`` carries an ``expires`` time that has passed."""
    if cmd.expires is not None:
        t = time.time() if now is None else now
        if t > cmd.expires:
            raise CommandExpiredError(f"command {cmd.id!r} expired {t - cmd.expires:.0f} s ago")
