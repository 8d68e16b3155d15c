"""API tokens of the controller: created by the CLI, stored hashed, each with a scope.

A token reads ``eft_<id>_<secret>``: ``id`` (12 hex digits) finds it in the store, ``secret`` (256 random bits,
URL-safe base64) proves it. The store keeps the id and a SHA-256 of the secret, never the token itself: a copy of the
database gives nobody a usable token. (A slow password hash buys nothing here: 256 random bits cannot be guessed,
and a fast hash keeps every request cheap.) Secrets are compared in constant time.

Scopes, each including the ones before it:

| scope | may |
|---|---|
| ``read`` | read the API, ``/metrics`` and the live stream (where reads need a token at all: ``--read-auth``) |
| ``capture`` | upload captured inference samples (``POST /api/captures/...``: what a device's token needs, no more) |
| ``deploy`` | upload bundles, create deployments, roll back, send ``describe``, ``benchmark`` and ``rollback`` |
| ``admin`` | everything, including ``remove`` and ``configure`` commands and listing the tokens |

``edgefleet fleet token create --scope deploy --name ci`` prints a token once; ``token list`` and ``token revoke``
manage them (docs/api.md, "Authentication").
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from edgefleet.sdk.errors import EdgefleetError, InputError

from .store import ApiToken, Store

__all__ = ["SCOPES", "AuthError", "IssuedToken", "allows", "authenticate", "hash_secret", "issue_token",
           "parse_token"]

SCOPES = ("read", "capture", "deploy", "admin")
"""In order: each scope includes the ones before it."""

_TOKEN_RE = re.compile(r"^eft_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


class AuthError(EdgefleetError):
    """A request without a valid token for what it asks (HTTP 401), or with one whose scope is too small (403)."""

    code = "auth"

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class IssuedToken:
    """A token just created: ``token`` is shown once and stored nowhere."""

    token: str
    record: ApiToken


def hash_secret(secret: str) -> str:
    """The stored form of a token's secret."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


def allows(scope: str, needed: str) -> bool:
    """Whether a token of ``scope`` may do what needs ``needed``."""
    return scope in SCOPES and needed in SCOPES and SCOPES.index(scope) >= SCOPES.index(needed)


def parse_token(token: str) -> tuple[str, str]:
    """``(id, secret)`` of a token string, or InputError."""
    m = _TOKEN_RE.match(token.strip())
    if m is None:
        raise InputError("not an edgefleet API token (eft_<12 hex>_<43 characters>)")
    return m.group(1), m.group(2)


def issue_token(store: Store, name: str, scope: str, *, fleet: str = "*", ttl_s: float = 0.0) -> IssuedToken:
    """Create a token of ``scope`` for ``fleet`` (``*``: every fleet of this store), valid ``ttl_s`` seconds (0:
    until revoked), and store its hash."""
    if scope not in SCOPES:
        raise InputError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if not name or len(name) > 128 or any(ord(c) < 32 for c in name):
        raise InputError(f"token name must be 1-128 printable characters, got {name[:40]!r}")
    if ttl_s < 0:
        raise InputError(f"ttl_s must be >= 0, got {ttl_s}")
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    now = time.time()
    record = ApiToken(id=token_id, name=name, scope=scope, fleet=fleet, created=now,
                      expires=now + ttl_s if ttl_s else 0.0, secret_hash=hash_secret(secret))
    store.add_token(record)
    return IssuedToken(f"eft_{token_id}_{secret}", record)


def authenticate(store: Store, token: str, fleet: str, now: float | None = None) -> ApiToken:
    """The stored token ``token`` proves, for ``fleet``, or AuthError (one line, never naming the secret)."""
    try:
        token_id, secret = parse_token(token)
    except InputError as exc:
        raise AuthError(str(exc)) from None
    rec = store.token(token_id)
    # Compare even when there is no such token, so the time taken does not tell which ids exist.
    want = rec.secret_hash if rec is not None else hash_secret("x" * 43)
    if not hmac.compare_digest(hash_secret(secret), want) or rec is None:
        raise AuthError("unknown or revoked token")
    if rec.expires and (time.time() if now is None else now) > rec.expires:
        raise AuthError(f"token {token_id} expired")
    if rec.fleet not in ("*", fleet):
        raise AuthError(f"token {token_id} is for fleet {rec.fleet!r}, not {fleet!r}", 403)
    return rec
