"""The controller's bundle library: verified bundles stored by content hash, served at ``/bundles/<sha256>.efb``."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from edgefleet.sdk.bundle import VerifiedManifest, verify_bundle
from edgefleet.sdk.errors import BundleError, InputError
from edgefleet.sdk.keys import TrustedKeys
from edgefleet.sdk.protocol import BundleInfo

__all__ = ["BundleLibrary", "bundle_filename"]


def bundle_filename(sha256: str) -> str:
    """The file name a bundle is stored and served under."""
    return f"{sha256}.efb"


class BundleLibrary:
    """Bundles the controller serves, stored by content hash; nothing enters it unverified."""

    def __init__(self, root: str | Path, trusted: TrustedKeys) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.trusted = trusted

    def path(self, sha256: str) -> Path:
        """Local path of a stored bundle (the name is validated: it becomes a file name)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise InputError(f"bundle id must be 64 lowercase hex digits, got {sha256[:70]!r}")
        return self.root / bundle_filename(sha256)

    def add(self, source: str | Path, label: str | None = None) -> BundleInfo:
        """Verify a bundle completely (signature by a trusted key, manifest, sizes, hashes), then store it.

        ``label`` names the bundle in error messages (default: the source path).
        """
        src = Path(source)
        if len(self.trusted) == 0:
            raise BundleError("the controller trusts no signing keys (--trust): it cannot verify any bundle")
        # Copy first, verify the copy: what is verified is exactly what is served (no swap after the check).
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", suffix=".efb", dir=self.root)
        try:
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                while chunk := inp.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            try:
                vm = verify_bundle(tmp, self.trusted)
            except BundleError as exc:
                # Name what the operator gave us, not the controller's private temporary copy.
                raise type(exc)(str(exc).replace(str(tmp), label or str(src))) from exc
            sha = h.hexdigest()
            os.replace(tmp, self.path(sha))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self._entry(sha, vm)

    def get(self, sha256: str) -> BundleInfo:
        """A stored bundle, re-reading its manifest (signature checked)."""
        p = self.path(sha256)
        if not p.exists():
            raise InputError(f"no bundle {sha256[:12]}… on this controller; upload it first")
        return self._entry(sha256, verify_bundle(p, self.trusted))

    def _entry(self, sha: str, vm: VerifiedManifest) -> BundleInfo:
        m = vm.manifest
        return BundleInfo(sha256=sha, size=self.path(sha).stat().st_size, name=m.name, version=m.version,
                          target=m.target, key_id=vm.key_id)
