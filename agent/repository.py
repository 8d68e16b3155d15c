"""The model repository the local API shows (Triton's model-repository extension): the bundles installed here.

``index`` lists each installed model's active bundle (READY when it serves, UNAVAILABLE with the reason otherwise)
and its previous bundle (UNAVAILABLE: kept for rollback). ``load`` opens the active bundle again — files re-hashed,
signature re-verified — and serves it (a reload when it already serves); ``unload`` stops serving a model without
touching its bundles. Unloading lasts until the next load, deploy or rollback of that model, or the agent's restart
(as with Triton's explicit model control, the repository — here the installed bundles — decides what serves at
start). Only bundles installed through signed deployments can be loaded: no model configuration or files from the
request are accepted.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from edgefleet.sdk.errors import EdgefleetError

from .httpd import HttpError
from .registry import Registry

if TYPE_CHECKING:
    from edgefleet.sdk.runtime import Model

    from .installer import Installer
    from .store import Store

__all__ = ["Repository"]

log = logging.getLogger("edgefleet.agent.repository")


class Repository:
    """Index, load and unload over the agent's store, installer and registry."""

    def __init__(self, store: Store, installer: Installer, registry: Registry) -> None:
        self.store = store
        self.installer = installer
        self.registry = registry
        self._lock = threading.Lock()  # one load/unload at a time
        self._unloaded: set[str] = set()
        self._errors: dict[str, str] = {}
        self._versions: dict[str, str] = {}  # digest -> version, read from installed manifests

    def _version(self, digest: str) -> str:
        v = self._versions.get(digest)
        if v is None:
            from edgefleet.sdk.bundle import read_installed

            try:
                v = read_installed(self.store.path(digest), self.installer.trusted, verify_files=False
                                   ).manifest.version
            except (EdgefleetError, OSError) as exc:
                return f"unreadable ({exc})"
            self._versions[digest] = v
        return v

    def installed(self) -> dict[str, tuple[str, str | None]]:
        """name -> (active digest, previous digest)."""
        return {n: (p.active, p.previous) for n, p in self.store.pointers().items()}

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Triton's ``$repository_index_response``."""
        out: list[dict[str, Any]] = []
        served = dict(self.registry.items())
        pointers = self.store.pointers()
        for name in sorted(set(pointers) | set(served)):
            model = served.get(name)
            ptr = pointers.get(name)
            if model is not None:
                out.append({"name": name, "version": model.version, "state": "READY", "reason": ""})
            elif ptr is not None:
                reason = ("unloaded" if name in self._unloaded
                          else f"not loaded: {self._errors[name]}" if name in self._errors else "not loaded")
                out.append({"name": name, "version": self._version(ptr.active), "state": "UNAVAILABLE",
                            "reason": reason})
            if ptr is not None and ptr.previous is not None and (model is None or model.digest != ptr.previous):
                out.append({"name": name, "version": self._version(ptr.previous), "state": "UNAVAILABLE",
                            "reason": "previous bundle, kept for rollback"})
        if ready_only:
            out = [e for e in out if e["state"] == "READY"]
        return out

    def load(self, name: str) -> Model:
        """Open ``name``'s active bundle (re-verified) and serve it; HttpError 400 if it is not installed."""
        with self._lock:
            ptr = self.store.pointers().get(name)
            if ptr is None:
                raise HttpError(400, f"model {name!r} is not installed on this device; installed: "
                                     f"{sorted(self.store.pointers())} (models arrive by deployment)")
            current = self.registry.get(name)
            try:
                model = self.installer.open_model(ptr.active, verify_files=True)
            except EdgefleetError as exc:
                self._errors[name] = str(exc)
                raise HttpError(400, f"failed to load model {name!r}: {exc}") from None
            digest = ptr.active
            ok = self.registry.replace(name, current, model,
                                       check=lambda: (p := self.store.pointers().get(name)) is not None
                                       and p.active == digest)
            if not ok:
                raise HttpError(409, f"model {name!r} changed while it was loading (a deployment or rollback); "
                                     "the new bundle serves")
            self._unloaded.discard(name)
            self._errors.pop(name, None)
            log.info("model loaded through the API", extra={"model": name, "version": model.version})
            return model

    def unload(self, name: str) -> None:
        """Stop serving ``name`` (its bundles stay installed); HttpError 400 if it is neither served nor installed."""
        with self._lock:
            if self.registry.pop(name) is None and name not in self.store.pointers():
                raise HttpError(400, f"model {name!r} is not served or installed on this device")
            self._unloaded.add(name)
            log.info("model unloaded through the API", extra={"model": name})

    def reopen(self, model: Model) -> Model | None:
        """A fresh session of the same bundle (the serving layer recycles a hung one), None if it is gone."""
        ptr = self.store.pointers().get(model.name)
        if ptr is None or model.digest not in (ptr.active, ptr.previous):
            return None
        return self.installer.open_model(model.digest, verify_files=False)
