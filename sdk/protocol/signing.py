"""Signed commands: Ed25519 over the canonical JSON of the whole command as sent, without ``signature``.

The signature covers every field — id, kind, args, ts, expires, counter, device, fleet, nonce, and any field a newer
controller adds — so nothing can be changed, and a receiver verifies it over the payload it *received*
(``payload=``), never over a re-encoding of what its own model understood: a field it does not know is still covered.

What a signed command is bound to, and what refuses a copy of it (issue 18: a command captured for one device was
accepted when replayed to another):

* ``device`` and ``fleet``: the receiver refuses a command for anyone else (``command.target``), and one that names
  no device at all unless it runs with binding off (an upgrade from controllers older than the field);
* ``expires``: refused after it (``command.expired``);
* ``counter``: per device, only goes up; the receiver keeps the last one it accepted (``command.replay``);
* ``nonce``: 128 random bits, new for every signature; the receiver remembers the nonces it accepted until they
  expire (``command.replay``), which still holds where a counter cannot (a device whose state was reset).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import (
    BundleSignatureError,
    CommandExpiredError,
    CommandSignatureError,
    CommandTargetError,
    ProtocolError,
)
from .messages import Command

if TYPE_CHECKING:
    from ..keys import PrivateKey, TrustedKeys

__all__ = ["check_expiry", "check_target", "sign_command", "signed_part", "verify_command"]


def signed_part(cmd: Mapping[str, Any]) -> bytes:
    """The bytes a command signature covers: canonical JSON (sorted keys, no spaces) without ``signature``."""
    from ..bundle import canonical_json  # lazy: the agent's hot path never needs the bundle module for this

    return canonical_json({k: v for k, v in cmd.items() if k != "signature"})


def sign_command(cmd: Command, key: PrivateKey, *, counter: int, ttl_s: float, device: str | None = None,
                 fleet: str | None = None) -> Command:
    """``cmd`` bound to ``device`` and ``fleet``, with a per-device ``counter``, an ``expires`` time (``ts + ttl_s``:
    signing the same command again, to resend it, keeps its expiry), a fresh ``nonce`` and an Ed25519
    ``signature``."""
    if counter < 1:
        raise ValueError(f"counter must be >= 1, got {counter}")
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
    body = {k: v for k, v in cmd.to_dict().items() if k != "signature"}
    if device is not None:
        body["device"] = device
    if fleet is not None:
        body["fleet"] = fleet
    body["counter"] = int(counter)
    body["expires"] = float(cmd.ts) + float(ttl_s)
    body["nonce"] = secrets.token_hex(16)
    body["signature"] = key.sign(signed_part(body))
    return Command.from_dict(body)


def verify_command(cmd: Command, trusted: TrustedKeys, *, payload: bytes | None = None,
                   now: float | None = None, device: str | None = None, fleet: str | None = None,
                   require_bound: bool = True) -> str:
    """Check a command's signature (over ``payload``, the bytes received, when given), expiry and target; returns
    the key id.

    Raises :class:`CommandSignatureError` (unsigned, untrusted key, signature not matching, no counter, expiry or
    nonce), :class:`CommandExpiredError` or :class:`CommandTargetError` (``device``/``fleet`` given and the command
    is for another one, or names none while ``require_bound``). The counter and the nonce are the receiver's to
    check: only it knows what it accepted before.
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
    check_target(cmd, device, fleet, require_bound=require_bound)
    if require_bound and cmd.nonce is None:
        raise CommandSignatureError(f"command {cmd.id!r}: a signed command must carry a nonce")
    return keyid


def check_target(cmd: Command, device: str | None, fleet: str | None, *, require_bound: bool = True) -> None:
    """Raise :class:`CommandTargetError` when ``cmd`` names another device or fleet than the receiver's, or (with
    ``require_bound``) names none. ``device``/``fleet`` None: that part is not checked."""
    for what, mine, theirs in (("device", device, cmd.device), ("fleet", fleet, cmd.fleet)):
        if mine is None:
            continue
        if theirs is None:
            if require_bound:
                raise CommandTargetError(f"command {cmd.id!r} names no {what}: refused as possibly meant for "
                                         "another one (a controller older than command binding? see "
                                         "commands.require_bound)")
        elif theirs != mine:
            raise CommandTargetError(f"command {cmd.id!r} is for {what} {theirs!r}, not this {what} {mine!r}")


def check_expiry(cmd: Command, now: float | None = None) -> None:
    """Raise :class:`CommandExpiredError` when ``cmd`` carries an ``expires`` time that has passed."""
    if cmd.expires is not None:
        t = time.time() if now is None else now
        if t > cmd.expires:
            raise CommandExpiredError(f"command {cmd.id!r} expired {t - cmd.expires:.0f} s ago")
