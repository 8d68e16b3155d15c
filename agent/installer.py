"""Install a bundle so the device is never left without a working model.

Steps, in order, each named in the reply when it fails: ``download`` (free space for the archive and its unpacked
files with the reserve left over, resume, size cap, free-space floor, sha256) → ``verify``
(signature and manifest) → ``compatibility`` (target, ONNX Runtime version, providers offered) → ``extract``
(every hash again, into ``store/<digest>`` via a staging rename) → ``session`` (on the device's provider, building
the OpenVINO / TensorRT cache into the data dir now, not at the first request) → ``selftest`` (the bundle's
validation set within its tolerances) → ``activate`` (one atomic pointer write, then the in-memory swap). Until
``activate`` nothing that serves has changed; a failure or a kill before it leaves the old bundle serving. A full
disk at any step fails that step with ``storage.full`` and removes what the install had written (partial download,
staging, the unreferenced bundle directory): the device is left as it was, serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.sdk.errors import (
    BundleCompatibilityError,
    BundleError,
    EdgefleetError,
    ModelError,
    SelfTestError,
    TransportError,
)

from .download import fetch
from .failpoints import failpoint
from .registry import Registry
from .storage import StorageFullError, is_disk_full
from .store import Store
from .variants import VariantChooser, environment

if TYPE_CHECKING:
    from edgefleet.sdk.keys import TrustedKeys
    from edgefleet.sdk.runtime import Model

__all__ = ["STEPS", "InstallError", "InstallResult", "Installer", "NotInstalledError"]

log = logging.getLogger("edgefleet.agent.installer")
STEPS = ("download", "verify", "compatibility", "extract", "session", "selftest", "activate")


_failpoint = failpoint  # crash-test hook (agent/failpoints.py): zero cost unless $EDGEFLEET_AGENT_FAILPOINT is set


class NotInstalledError(EdgefleetError):
    """The command names a model, or a previous bundle, that this device does not have."""

    code = "not_found"


class InstallError(EdgefleetError):
    """An install step failed; ``step`` names it and ``code`` is the underlying error's code."""

    def __init__(self, step: str, cause: BaseException) -> None:
        self.step = step
        self.cause = cause
        self.code = getattr(cause, "code", "edgefleet")
        super().__init__(f"{step} failed: {cause}")


@dataclass
class InstallResult:
    """What an install did, for the reply and the install-time figures."""

    name: str
    version: str
    digest: str
    previous: str | None
    providers: list[str]
    timings_ms: dict[str, float] = field(default_factory=dict)
    selftest: dict[str, Any] = field(default_factory=dict)
    already_active: bool = False
    # a multi-variant bundle: the variant pinned here, and the table it was chosen from (agent/variants.py)
    variant: str | None = None
    variants: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the reply."""
        return dict(self.__dict__)


class Installer:
    """Runs the install steps against one store and registry (one install at a time: the command worker)."""

    def __init__(self, store: Store, registry: Registry, trusted: TrustedKeys, *, targets: tuple[str, ...],
                 allow_fallback: bool = False, timeout_s: float = 30.0, ca_file: str = "",
                 download_max_s: float = 3600.0,
                 max_bundle_bytes: int = 4 << 30, on_step: Callable[[str, dict[str, Any]], None] | None = None,
                 variant_budget_s: float = 20.0, host: dict[str, Any] | None = None) -> None:
        self.store = store
        self.registry = registry
        self.trusted = trusted
        self.targets = targets
        self.allow_fallback = allow_fallback
        self.timeout_s = timeout_s
        self.download_max_s = download_max_s
        self.ca_file = ca_file
        self.max_bundle_bytes = max_bundle_bytes
        self.on_step = on_step or (lambda step, data: None)
        self.variant_budget_s = variant_budget_s
        self.host = host
        self._variants: VariantChooser | None = None

    @property
    def variants(self) -> VariantChooser:
        """Chooses among a multi-variant bundle's variants (made on first use: it asks ONNX Runtime what it is)."""
        if self._variants is None:
            self._variants = VariantChooser(self.store, self.trusted, environment(self.targets[0], self.host),
                                            budget_s=self.variant_budget_s, allow_fallback=self.allow_fallback)
        return self._variants

    def open_model(self, digest: str, *, verify_files: bool = True) -> Model:
        """Create the session for an installed bundle, with its provider cache under the data dir; a multi-variant
        bundle opens its pinned variant (chosen again when the runtime or hardware changed since)."""
        from edgefleet.sdk.bundle import read_installed
        from edgefleet.sdk.runtime import Model

        if read_installed(self.store.path(digest), self.trusted, verify_files=False).manifest.variants:
            return self.variants.open(digest, verify_files=verify_files)[0]
        return Model.open(self.store.path(digest), self.trusted, verify_files=verify_files,
                          allow_fallback=self.allow_fallback, cache_dir=self.store.cache_dir(digest))

    def install(self, url: str, sha256: str, size: int,
                progress: Callable[[str], None] | None = None, *, split_pct: float = 0.0,
                split_s: float = 0.0) -> InstallResult:
        """Download, verify, extract, open, self-test and activate; InstallError naming the failing step.

        ``progress`` hears the deployment states a controller shows: downloading, verifying, self-test. With
        ``split_pct``/``split_s`` (a canary), the version it replaces keeps serving that share of the requests for
        ``split_s`` seconds (agent/registry.py, "Traffic split").
        """
        say = progress or (lambda state: None)
        from edgefleet.sdk._ort_options import check_ort_options
        from edgefleet.sdk.bundle import extract_bundle, read_manifest, version_key
        from edgefleet.sdk.runtime import ort_info

        timings: dict[str, float] = {}
        t = time.perf_counter()

        def lap(step: str) -> None:
            nonlocal t
            now = time.perf_counter()
            timings[step] = round((now - t) * 1000.0, 3)
            t = now

        if size > self.max_bundle_bytes:
            raise InstallError("download", TransportError(
                f"bundle is {size} bytes, over install.max_bundle_bytes ({self.max_bundle_bytes})"))
        part = self.store.download_path(sha256)
        try:
            self.store.prepare_download(sha256, size)
        except StorageFullError as exc:
            raise InstallError("download", exc) from exc
        say("downloading")
        try:
            fetch(url, part, size, sha256, timeout_s=self.timeout_s, ca_file=self.ca_file, max_s=self.download_max_s,
                  storage=self.store.storage)
        except (TransportError, StorageFullError) as exc:
            raise InstallError("download", exc) from exc
        lap("download")
        _failpoint("after-download")
        say("verifying")
        try:
            try:
                vm = read_manifest(part, self.trusted)
                # Paths the manifest hands to ONNX Runtime (provider options, session entries) stay in the bundle's
                # cache dir; the model file's own references are checked before its session (sdk._onnx_external).
                # Every variant's too: the device may pin any of them.
                for where, provs, sess in [("manifest", vm.manifest.providers, vm.manifest.session),
                                           *((f"manifest variant {v.name}", v.providers, v.session)
                                             for v in vm.manifest.variants)]:
                    check_ort_options(((p.name, p.options) for p in provs), sess.config_entries, f"{part}: {where}")
            except BundleError as exc:
                raise InstallError("verify", exc) from exc
            m = vm.manifest
            lap("verify")
            self.on_step("verified", {"name": m.name, "version": m.version, "digest": vm.digest, "key_id": vm.key_id})
            try:
                if m.target not in self.targets:
                    raise BundleCompatibilityError(
                        f"bundle {m.name} {m.version} is for target {m.target!r}; this device accepts "
                        f"{', '.join(repr(x) for x in self.targets)}")
                ort = ort_info()
                if version_key(ort.version) < version_key(m.min_ort_version):
                    raise BundleCompatibilityError(
                        f"bundle needs ONNX Runtime >= {m.min_ort_version}, this device has {ort.version}")
                missing = [p.name for p in m.providers if p.name not in ort.providers]
                if m.variants and any(all(p.name in ort.providers for p in v.providers) for v in m.variants):
                    missing = []  # a variant this runtime can run exists; the others fail their self-test here
                if missing and not self.allow_fallback:
                    raise BundleCompatibilityError(
                        f"bundle asks for {', '.join(missing)}, but ONNX Runtime {ort.version} ({ort.flavour}) "
                        f"here offers only {', '.join(ort.providers)}")
                self._check_not_rollback(m.name, m.version, vm.digest)
            except BundleCompatibilityError as exc:
                raise InstallError("compatibility", exc) from exc
            lap("compatibility")
            current = self.store.pointers().get(m.name)
            if current is not None and current.active == vm.digest and self.registry.get(m.name) is not None:
                model = self.registry.get(m.name)
                return InstallResult(m.name, m.version, vm.digest, current.previous,
                                     list(model.placement.serving) if model else [], timings, already_active=True)
            dest = self.store.path(vm.digest)
            reused = dest.exists()  # e.g. the previous bundle deployed again: re-hash its files before trusting them
            _failpoint("before-extract")
            try:
                if not reused:
                    # The signed manifest gives the exact unpacked size: it must fit with the reserve left free.
                    unpacked = sum(f.size for f in m.files.values()) + len(vm.raw) + (64 << 10)
                    self.store.storage.require(unpacked, f"unpacking {m.name} {m.version}")
                    # extract_bundle checks every size and hash again while it writes, into a staging dir it renames
                    extract_bundle(part, self.trusted, dest)
            except StorageFullError as exc:
                raise InstallError("extract", exc) from exc
            except (BundleError, OSError) as exc:
                if is_disk_full(exc):
                    raise InstallError("extract", StorageFullError(
                        f"disk full while unpacking {m.name} {m.version} into {dest}: {exc}")) from exc
                if isinstance(exc, OSError):
                    exc = BundleError(f"cannot write {dest}: {exc.strerror or exc}")
                raise InstallError("extract", exc) from exc
            lap("extract")
            _failpoint("after-extract")
        finally:
            # The archive is no longer needed once extracted or refused; a refused one must not be resumed either.
            part.unlink(missing_ok=True)
        choice = None
        try:
            try:
                if m.variants:
                    say("choosing a variant")
                    try:
                        model, choice = self.variants.choose(vm.digest, verify_files=reused, progress=say)
                    except SelfTestError as exc:
                        raise InstallError("selftest", exc) from exc
                    self.variants.save(vm.digest, choice)
                    self.on_step("variant", {"name": m.name, "variant": choice.variant, "table": choice.table})
                else:
                    model = self.open_model(vm.digest, verify_files=reused)
                model.warmup(1)
            except InstallError:
                raise
            except EdgefleetError as exc:
                raise InstallError("session", exc) from exc
            except Exception as exc:
                raise InstallError("session", ModelError(f"first run failed: {exc}")) from exc
            lap("session")
            self.on_step("session", {"name": m.name, "providers": list(model.placement.serving),
                                     "session_ms": round(model.session_ms, 3)})
            say("self-test")
            try:
                report = model.self_test()
            except EdgefleetError as exc:
                raise InstallError("selftest", exc) from exc
            if not report.ok:
                raise InstallError("selftest", SelfTestError(
                    f"{report.samples} samples on {', '.join(model.placement.serving)}: "
                    f"{'; '.join(report.to_dict()['failures'])}"))
            lap("selftest")
            _failpoint("after-selftest")
        except InstallError:
            if vm.digest not in self.store.referenced():
                self.store.collect()
            raise
        try:
            pointer = self.store.activate(m.name, vm.digest)
        except OSError as exc:
            # The pointer file is replaced atomically: on failure it names the old bundle (which serves) unless only
            # the directory fsync failed after the rename; the new bundle's directory goes only if nothing names it.
            if vm.digest not in self.store.persisted_digests():
                self.store.collect()
            raise InstallError("activate", _storage_error(exc, f"switching {m.name} to {m.version}")) from exc
        _failpoint("after-activate")
        self.registry.put(m.name, model, split_pct=split_pct, split_s=split_s)
        lap("activate")
        self.store.collect()
        log.info("installed", extra={"model": m.name, "version": m.version, "digest": vm.digest,
                                     "providers": list(model.placement.serving), "timings_ms": timings})
        return InstallResult(m.name, m.version, vm.digest, pointer.previous, list(model.placement.serving), timings,
                             report.to_dict(), variant=model.variant,
                             variants=choice.to_dict() if choice is not None else None)

    def _check_not_rollback(self, name: str, version: str, digest: str) -> None:
        """Refuse an older version than the active one, or the same version with other content (TUF rollback).

        Going back is what the ``rollback`` command is for: it swaps to the previous bundle this device verified.
        """
        from edgefleet.sdk.bundle import read_installed, version_key

        current = self.store.pointers().get(name)
        if current is None or current.active == digest:
            return
        model = self.registry.get(name)
        if model is not None and model.digest == current.active:
            active = model.version
        else:
            try:
                active = read_installed(self.store.path(current.active), self.trusted, verify_files=False
                                        ).manifest.version
            except BundleError:
                return  # the active bundle is damaged: load_all reports it; do not block its replacement
        if version_key(version) < version_key(active):
            raise BundleCompatibilityError(f"bundle {name} {version} is older than the installed {active}: "
                                           "refused (use the rollback command to go back)")
        if version_key(version) == version_key(active):
            raise BundleCompatibilityError(f"bundle {name} {version} has the installed version but other content "
                                           f"(manifest {digest[:12]}…, installed {current.active[:12]}…): refused")

    def load_all(self) -> list[tuple[str, str, str]]:
        """At start-up, open every active bundle; a broken one falls back to its previous. Returns problems."""
        problems: list[tuple[str, str, str]] = []
        for name, ptr in self.store.pointers().items():
            try:
                self.registry.put(name, self.open_model(ptr.active))
                continue
            except EdgefleetError as exc:
                problems.append((name, ptr.active, str(exc)))
                log.error("active bundle does not open", extra={"model": name, "digest": ptr.active, "error": str(exc)})
            if ptr.previous is not None:
                try:
                    self.registry.put(name, self.open_model(ptr.previous))
                    self.store.rollback(name)
                    log.warning("serving the previous bundle instead", extra={"model": name, "digest": ptr.previous})
                except EdgefleetError as exc:
                    problems.append((name, ptr.previous, str(exc)))
        self.registry.ready.set()
        return problems

    def rollback(self, name: str, target: str | None = None) -> InstallResult:
        """Serve ``name``'s previous bundle again (opened and self-tested first); the current one becomes previous.

        ``target``: the digest this rollback goes to, when it was decided before (a rollback command resumed after
        a crash); if it already serves, nothing changes.
        """
        ptr = self.store.pointers().get(name)
        model = self.registry.get(name)
        if target is not None and ptr is not None and ptr.active == target and model is not None \
                and model.digest == target:
            return InstallResult(name, model.version, ptr.active, ptr.previous, list(model.placement.serving),
                                 already_active=True)
        if ptr is None or ptr.previous is None:
            what = "is not installed" if ptr is None else "has no previous bundle to roll back to"
            raise InstallError("rollback", NotInstalledError(f"model {name!r} {what}"))
        try:
            model = self.open_model(ptr.previous)
            report = model.self_test()
        except EdgefleetError as exc:
            raise InstallError("session", exc) from exc
        if not report.ok:
            raise InstallError("selftest", SelfTestError("; ".join(report.to_dict()["failures"])))
        _failpoint("rollback:after-selftest")
        try:
            new = self.store.rollback(name)
        except OSError as exc:
            raise InstallError("rollback", _storage_error(exc, f"switching {name} back")) from exc
        _failpoint("rollback:after-pointer")
        self.registry.put(name, model)
        return InstallResult(name, model.version, new.active, new.previous, list(model.placement.serving),
                             selftest=report.to_dict())

    def remove(self, name: str) -> str:
        """Stop serving ``name`` and delete its bundles; returns the digest that was active."""
        try:
            ptr = self.store.remove(name)
        except KeyError:
            raise InstallError("remove", NotInstalledError(f"no model named {name!r} is installed")) from None
        except OSError as exc:
            raise InstallError("remove", _storage_error(exc, f"removing {name}")) from exc
        self.registry.pop(name)
        self.store.collect()
        return ptr.active


def _storage_error(exc: OSError, what: str) -> Exception:
    """A full disk as StorageFullError (code storage.full), any other OS error as it is."""
    if is_disk_full(exc):
        return StorageFullError(f"disk full while {what}: {exc.strerror or exc}")
    return exc


def bundle_file(path: Path) -> tuple[str, int]:
    """sha256 and size of a local bundle file (for building deploy commands in tests and tools)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest(), path.stat().st_size
