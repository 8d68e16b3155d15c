"""Bundle format v1: one signed archive that carries a model to a device (see docs/bundle-format.md).

A bundle is an uncompressed POSIX tar whose first member is ``manifest.json`` (canonical JSON), second
``signatures.json`` (Ed25519 signatures over those exact bytes), then every file the manifest lists, each a regular
file under a relative path. Reading verifies, in order: signature → manifest schema → member names, types, sizes and
sha256 (a read-only pass) → only then extracts into a staging directory that is renamed into place.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import IO, Any

from ._fs import fsync_dir, sha256_file
from .errors import (
    BundleError,
    BundleFormatError,
    BundleIntegrityError,
    BundleSignatureError,
    UnsafeArchiveError,
)
from .keys import PrivateKey, TrustedKeys

__all__ = [
    "MANIFEST_NAME",
    "META_CPU_FALLBACK",
    "META_FIXED_SHAPES",
    "META_MEASURED_ON",
    "META_MEASUREMENT",
    "SCHEMA_VERSION",
    "SIGNATURES_NAME",
    "BundleLimits",
    "FileEntry",
    "Manifest",
    "ProviderConfig",
    "SessionConfig",
    "TensorSpec",
    "Tolerance",
    "ValidationSpec",
    "Variant",
    "VerifiedManifest",
    "canonical_json",
    "extract_bundle",
    "read_installed",
    "read_manifest",
    "verify_bundle",
    "version_key",
    "write_bundle",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURES_NAME = "signatures.json"
_MAX_MANIFEST_BYTES = 1 << 20
_MAX_SIGNATURES_BYTES = 64 << 10
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".ckpt")
DTYPES = frozenset(
    {"float32", "float16", "float64", "bfloat16", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
     "uint64", "bool", "string"}
)
OPT_LEVELS = ("disabled", "basic", "extended", "layout", "all")


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON value that signatures cover: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key for versions like ``1.10.2`` or ``2024.05-rc1``: numeric parts compare as numbers."""
    key = [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.+-]", version)]
    while len(key) > 1 and key[-1] == (0, 0):  # "1.16" == "1.16.0": trailing zero parts do not make a version newer
        key.pop()
    return tuple(key)


def _check_id(what: str, value: object, pattern: re.Pattern[str] = _ID_RE) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise BundleFormatError(f"manifest: {what} must match {pattern.pattern}, got {value!r}")
    return value


def _check_relpath(what: str, name: object) -> str:
    """A member or file name must be a plain relative POSIX path that stays inside the bundle."""
    if not isinstance(name, str) or not name:
        raise UnsafeArchiveError(f"{what}: empty or non-string path {name!r}")
    if len(name) > 255 or any(len(p) > 128 for p in name.split("/")):
        raise UnsafeArchiveError(f"{what}: path too long ({len(name)} chars): {name[:80]!r}...")
    if "\\" in name or "\x00" in name or ":" in name:
        raise UnsafeArchiveError(f"{what}: path {name!r} has a backslash, NUL or drive letter")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"{what}: absolute path {name!r}")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeArchiveError(f"{what}: path {name!r} has '..', '.' or empty segments")
    if not all(p.isprintable() for p in parts):
        raise UnsafeArchiveError(f"{what}: path {name!r} has control characters")
    return name


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of a model input or output; a dim is an int, a symbolic name or None."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise BundleFormatError(f"manifest: tensor name must be a non-empty string, got {self.name!r}")
        if self.dtype not in DTYPES:
            raise BundleFormatError(f"manifest: tensor {self.name!r} has unknown dtype {self.dtype!r}")
        for d in self.shape:
            if not (d is None or isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)):
                raise BundleFormatError(f"manifest: tensor {self.name!r} has invalid dim {d!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        """Parse from manifest JSON."""
        shape = d.get("shape")
        if not isinstance(shape, list):
            raise BundleFormatError(f"manifest: tensor {d.get('name')!r} shape must be a list, got {shape!r}")
        return cls(name=d.get("name"), dtype=d.get("dtype"), shape=tuple(shape))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ProviderConfig:
    """One execution provider the bundle asks for, with its options (``{cache_dir}`` is filled in on device)."""

    name: str
    options: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.endswith("ExecutionProvider"):
            raise BundleFormatError(f"manifest: provider name must end with 'ExecutionProvider', got {self.name!r}")
        if not isinstance(self.options, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.options.items()
        ):
            raise BundleFormatError(f"manifest: options of {self.name} must map strings to strings")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProviderConfig:
        """Parse from manifest JSON."""
        return cls(name=d.get("name"), options=dict(d.get("options") or {}))  # type: ignore[arg-type]


@dataclass(frozen=True)
class SessionConfig:
    """ONNX Runtime session options the bundle was tuned with; 0 threads means ORT's default."""

    graph_optimization_level: str = "all"
    intra_op_num_threads: int = 0
    inter_op_num_threads: int = 0
    execution_mode: str = "sequential"
    config_entries: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.graph_optimization_level not in OPT_LEVELS:
            raise BundleFormatError(
                f"manifest: graph_optimization_level must be one of {OPT_LEVELS}, got {self.graph_optimization_level!r}"
            )
        for key in ("intra_op_num_threads", "inter_op_num_threads"):
            n = getattr(self, key)
            if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 1024:
                raise BundleFormatError(f"manifest: {key} must be an int in 0..1024, got {n!r}")
        if self.execution_mode not in ("sequential", "parallel"):
            raise BundleFormatError(
                f"manifest: execution_mode must be sequential or parallel, got {self.execution_mode!r}"
            )
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.config_entries.items()):
            raise BundleFormatError("manifest: session config_entries must map strings to strings")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SessionConfig:
        """Parse from manifest JSON; unknown keys are errors."""
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise BundleFormatError(f"manifest: unknown session option(s) {sorted(unknown)}")
        return cls(**{**d, "config_entries": dict(d.get("config_entries") or {})})


@dataclass(frozen=True)
class FileEntry:
    """Size and sha256 of one file in the bundle."""

    sha256: str
    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or not _SHA_RE.match(self.sha256):
            raise BundleFormatError(f"manifest: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise BundleFormatError(f"manifest: size must be a non-negative int, got {self.size!r}")


@dataclass(frozen=True)
class Tolerance:
    """How close an output must stay to the reference on a device: max absolute error and min cosine similarity."""

    max_abs: float
    min_cosine: float = 0.99
    # Per channel (axis 1) over all samples, for outputs that mix scales (a detector's boxes and class scores): one
    # cosine over the whole tensor hides a collapsed score channel. Channels whose reference never reaches
    # ``channel_floor`` carry no signal and are not judged. None: no per-channel check.
    min_channel_cosine: float | None = None
    channel_floor: float = 0.0
    # Optional, added after v1 bundles were in the field (written only when set, so bundles that do not use them stay
    # readable by older agents): the share of positions whose argmax over the last axis must match the reference in
    # every sample (a classifier's top-1, a CTC recogniser's per-time-step symbol); and how the packager derived
    # max_abs ("kind"): e.g. "measured on OpenVINOExecutionProvider x2" -- for people, not checked.
    min_argmax_agreement: float | None = None
    kind: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_abs, (int, float)) or not self.max_abs >= 0:
            raise BundleFormatError(f"manifest: tolerance max_abs must be >= 0, got {self.max_abs!r}")
        if not isinstance(self.min_cosine, (int, float)) or not -1.0 <= self.min_cosine <= 1.0:
            raise BundleFormatError(f"manifest: tolerance min_cosine must be in [-1, 1], got {self.min_cosine!r}")
        if self.min_channel_cosine is not None and (
            not isinstance(self.min_channel_cosine, (int, float)) or not -1.0 <= self.min_channel_cosine <= 1.0
        ):
            raise BundleFormatError(
                f"manifest: tolerance min_channel_cosine must be in [-1, 1], got {self.min_channel_cosine!r}")
        if not isinstance(self.channel_floor, (int, float)) or not self.channel_floor >= 0:
            raise BundleFormatError(f"manifest: tolerance channel_floor must be >= 0, got {self.channel_floor!r}")
        if self.min_argmax_agreement is not None and (
            not isinstance(self.min_argmax_agreement, (int, float)) or not 0.0 <= self.min_argmax_agreement <= 1.0
        ):
            raise BundleFormatError(
                f"manifest: tolerance min_argmax_agreement must be in [0, 1], got {self.min_argmax_agreement!r}")
        if self.kind is not None and (not isinstance(self.kind, str) or len(self.kind) > 200):
            raise BundleFormatError("manifest: tolerance kind must be a string of at most 200 characters")

    def to_dict(self) -> dict[str, Any]:
        """JSON form; the optional fields added after v1 are left out when unset (older readers refuse unknown
        keys, so a bundle that does not use them stays readable by agents already in the field)."""
        d = asdict(self)
        for k in _LATER_TOLERANCE_KEYS:
            if d.get(k) is None:
                d.pop(k, None)
        return d


_LATER_TOLERANCE_KEYS = ("min_argmax_agreement", "kind")

# Manifest ``metadata`` keys the packager fills in (strings: metadata is a free {str: str} map that every v1 reader
# accepts, so these labels never make a bundle unreadable by an agent already in the field).
META_MEASUREMENT = "measurement"
"""``measured``: the choice and the tolerances come from the target's own runtime and provider on the build host;
``unmeasured``: that runtime could not be reached, the packager took the provider's conservative precision."""
META_MEASURED_ON = "measured_on"
"""Provider and ONNX Runtime (version, flavour) that produced the numbers, or why none did."""
META_FIXED_SHAPES = "fixed_input_shapes"
"""Inputs whose dynamic dims the packager fixed (``--input-shape``), as ``name=1x64;other=1x64``: the model (and the
manifest's ``inputs``) take only these shapes."""
META_CPU_FALLBACK = "cpu_fallback_nodes"
"""Share of graph nodes ONNX Runtime assigned to the CPU EP instead of the bundle's provider ("0" .. "1"; absent
when not measured or when the CPU EP is the bundle's provider)."""


def _tolerance(name: str, v: Any) -> Tolerance:
    if not isinstance(v, Mapping):
        raise BundleFormatError(f"manifest: tolerance of {name!r} must be an object")
    unknown = set(v) - set(Tolerance.__dataclass_fields__)
    if unknown:
        raise BundleFormatError(f"manifest: tolerance of {name!r} has unknown key(s) {sorted(unknown)}")
    if "max_abs" not in v:
        raise BundleFormatError(f"manifest: tolerance of {name!r} has no max_abs")
    return Tolerance(**v)


@dataclass(frozen=True)
class ValidationSpec:
    """The self-test set: an .npz of inputs (``in/<name>``) and reference outputs (``out/<name>``), and tolerances."""

    file: str
    samples: int
    tolerances: Mapping[str, Tolerance]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ValidationSpec:
        """Parse from manifest JSON."""
        tol = d.get("tolerances")
        if not isinstance(tol, Mapping):
            raise BundleFormatError("manifest: validation.tolerances must be an object")
        samples = d.get("samples")
        if not isinstance(samples, int) or samples < 1:
            raise BundleFormatError(f"manifest: validation.samples must be >= 1, got {samples!r}")
        return cls(
            file=_check_relpath("manifest validation.file", d.get("file")),
            samples=samples,
            tolerances={k: _tolerance(k, v) for k, v in tol.items()},
        )


@dataclass(frozen=True)
class Variant:
    """One verified way to run the bundle's model on its target: a model file, providers, session options and its own
    self-test set and tolerances. A multi-variant bundle lists several; the device self-tests and times them and
    pins the fastest that passes (docs/bundle-format.md, "Variants")."""

    name: str
    precision: str
    model: str
    providers: tuple[ProviderConfig, ...]
    session: SessionConfig
    validation: ValidationSpec
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id("variant name", self.name)
        _check_id(f"variant {self.name} precision", self.precision)
        _check_relpath(f"manifest variant {self.name} model", self.model)
        if not self.providers:
            raise BundleFormatError(f"manifest: variant {self.name} must list at least one execution provider")
        if not isinstance(self.validation, ValidationSpec):
            raise BundleFormatError(f"manifest: variant {self.name} needs a validation set (the device self-tests "
                                    "every variant before it may serve)")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise BundleFormatError(f"manifest: variant {self.name} metadata must map strings to strings")

    def to_dict(self) -> dict[str, Any]:
        """JSON form (as it sits in the manifest's ``variants`` list)."""
        return {"name": self.name, "precision": self.precision, "model": self.model,
                "providers": [{"name": p.name, "options": dict(p.options)} for p in self.providers],
                "session": {**asdict(self.session), "config_entries": dict(self.session.config_entries)},
                "validation": {"file": self.validation.file, "samples": self.validation.samples,
                               "tolerances": {k: t.to_dict() for k, t in self.validation.tolerances.items()}},
                "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Variant:
        """Parse one entry of ``variants``; unknown keys are errors."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise BundleFormatError(f"manifest: variant {d.get('name')!r} has unknown key(s) {sorted(unknown)}")
        missing = {"name", "precision", "model", "providers", "session", "validation"} - set(d)
        if missing:
            raise BundleFormatError(f"manifest: variant {d.get('name')!r} misses {sorted(missing)}")
        return cls(name=d["name"], precision=d["precision"], model=d["model"],
                   providers=tuple(ProviderConfig.from_dict(p) for p in _list(d, "providers")),
                   session=SessionConfig.from_dict(_dict(d, "session")),
                   validation=ValidationSpec.from_dict(_dict(d, "validation")),
                   metadata=dict(d.get("metadata") or {}))


@dataclass(frozen=True)
class Manifest:
    """Everything a device needs to trust, install and run a bundle; signed in canonical JSON form."""

    name: str
    version: str
    target: str
    precision: str
    model: str
    providers: tuple[ProviderConfig, ...]
    session: SessionConfig
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: Mapping[str, FileEntry]
    min_ort_version: str = "1.16.0"
    validation: ValidationSpec | None = None
    report: str | None = None
    created: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    # Added after v1 shipped, written only when set (v1 readers refuse unknown fields, so a single-variant bundle
    # stays readable by every agent in the field): the variants the device chooses among. The first one is the
    # top-level model/providers/session/precision/validation, so a reader that ignores variants runs that one.
    variants: tuple[Variant, ...] = ()

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise BundleFormatError(
                f"manifest: schema_version {self.schema_version!r} is not supported "
                f"(this edgefleet reads {SCHEMA_VERSION})"
            )
        _check_id("name", self.name)
        _check_id("version", self.version, _VERSION_RE)
        _check_id("target", self.target)
        _check_id("precision", self.precision)
        _check_id("min_ort_version", self.min_ort_version, _VERSION_RE)
        if not self.providers:
            raise BundleFormatError("manifest: providers must list at least one execution provider")
        if not self.inputs or not self.outputs:
            raise BundleFormatError("manifest: inputs and outputs must not be empty")
        for name in self.files:
            _check_relpath("manifest files", name)
            if name.lower().endswith(_PICKLE_SUFFIXES):
                raise UnsafeArchiveError(f"manifest: {name!r} is a pickle; bundles never carry pickles (they run "
                                         "code when loaded)")
            if name.lower() in (MANIFEST_NAME, SIGNATURES_NAME):  # any case: macOS and Windows fold case
                raise BundleFormatError(f"manifest: files must not list the reserved name {name!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise BundleFormatError("manifest: metadata must map strings to strings")
        lowered = [n.lower() for n in self.files]
        if len(set(lowered)) != len(lowered):
            raise BundleFormatError("manifest: files has names that differ only in case")
        folded = set(lowered)
        for name in lowered:  # "model" and "model/x" cannot both be extracted: one must be a directory
            parts = name.split("/")
            clash = next(("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]) in folded), None)
            if clash is not None:
                raise BundleFormatError(f"manifest: file {clash!r} is also the directory of {name!r}")
        # A manifest with no files is a template for write_bundle, which fills them in; read manifests never are.
        for what, ref in (("model", self.model), ("report", self.report),
                          ("validation.file", self.validation.file if self.validation else None)):
            if self.files and ref is not None and ref not in self.files:
                raise BundleFormatError(f"manifest: {what} {ref!r} is not listed in files")
        if self.validation:
            outs = {o.name for o in self.outputs}
            extra = set(self.validation.tolerances) - outs
            if extra:
                raise BundleFormatError(f"manifest: validation tolerances name unknown outputs {sorted(extra)}")
        if self.variants:
            self._check_variants()

    def _check_variants(self) -> None:
        names = [v.name for v in self.variants]
        if len(self.variants) < 2:
            raise BundleFormatError("manifest: variants must list at least two (one variant is the plain manifest)")
        if len(set(names)) != len(names):
            raise BundleFormatError(f"manifest: variant names must be unique, got {names}")
        first = self.variants[0]
        if (first.model, first.precision, first.providers, first.session, first.validation) != (
                self.model, self.precision, self.providers, self.session, self.validation):
            raise BundleFormatError(f"manifest: the first variant ({first.name}) must be the top-level model, "
                                    "precision, providers, session and validation")
        outs = {o.name for o in self.outputs}
        for v in self.variants:
            for what, ref in (("model", v.model), ("validation.file", v.validation.file)):
                if self.files and ref not in self.files:
                    raise BundleFormatError(f"manifest: variant {v.name} {what} {ref!r} is not listed in files")
            extra = set(v.validation.tolerances) - outs
            if extra:
                raise BundleFormatError(f"manifest: variant {v.name} tolerances name unknown outputs {sorted(extra)}")

    def variant(self, name: str) -> Manifest:
        """This manifest as the single-variant manifest of variant ``name`` (what the runtime opens and self-tests);
        a KeyError for a name the bundle does not hold."""
        for v in self.variants:
            if v.name == name:
                return replace(self, model=v.model, precision=v.precision, providers=v.providers,
                               session=v.session, validation=v.validation, variants=())
        raise KeyError(f"bundle {self.name} {self.version} has no variant {name!r} "
                       f"(it has {', '.join(v.name for v in self.variants) or 'none'})")

    @property
    def total_size(self) -> int:
        """Sum of all listed file sizes."""
        return sum(e.size for e in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what ``canonical_json`` signs)."""
        d = asdict(self)
        if self.validation is not None:
            d["validation"]["tolerances"] = {k: t.to_dict() for k, t in self.validation.tolerances.items()}
        d["providers"] = [{"name": p.name, "options": dict(p.options)} for p in self.providers]
        d["inputs"] = [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.inputs]
        d["outputs"] = [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.outputs]
        if self.variants:
            d["variants"] = [v.to_dict() for v in self.variants]
        else:
            d.pop("variants")  # left out when unset: v1 agents in the field refuse unknown fields
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Parse and validate manifest JSON; every problem is a BundleFormatError naming the field."""
        if not isinstance(d, dict):
            raise BundleFormatError("manifest: top level must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise BundleFormatError(f"manifest: unknown field(s) {sorted(unknown)}")
        required = {"name", "version", "target", "precision", "model", "providers", "session", "inputs", "outputs",
                    "files"}
        missing = required - set(d)
        if missing:
            raise BundleFormatError(f"manifest: missing field(s) {sorted(missing)}")
        try:
            files = d["files"]
            if not isinstance(files, dict) or not files:
                raise BundleFormatError("manifest: files must be a non-empty object")
            return cls(
                **{
                    **d,
                    "providers": tuple(ProviderConfig.from_dict(p) for p in _list(d, "providers")),
                    "session": SessionConfig.from_dict(_dict(d, "session")),
                    "inputs": tuple(TensorSpec.from_dict(t) for t in _list(d, "inputs")),
                    "outputs": tuple(TensorSpec.from_dict(t) for t in _list(d, "outputs")),
                    "files": {k: FileEntry(**_dict(files, k)) for k in files},
                    "validation": ValidationSpec.from_dict(d["validation"]) if d.get("validation") else None,
                    "metadata": dict(d.get("metadata") or {}),
                    "variants": tuple(Variant.from_dict(v) for v in _list(d, "variants")) if "variants" in d else (),
                }
            )
        except BundleError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:
            raise BundleFormatError(f"manifest: {exc}") from exc


def _list(d: Mapping[str, Any], key: str) -> list[Any]:
    v = d[key]
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise BundleFormatError(f"manifest: {key} must be a list of objects")
    return v


def _dict(d: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = d[key]
    if not isinstance(v, dict):
        raise BundleFormatError(f"manifest: {key} must be an object")
    return v


@dataclass(frozen=True)
class BundleLimits:
    """Caps that stop archive bombs before any byte is written."""

    max_members: int = 1000
    max_total_bytes: int = 16 << 30
    max_file_bytes: int = 8 << 30


@dataclass(frozen=True)
class VerifiedManifest:
    """A manifest whose signature checked out, with the key that signed it and its digest (the store key)."""

    manifest: Manifest
    key_id: str
    digest: str
    raw: bytes
    signatures: list[dict[str, str]]


def write_bundle(
    out_path: str | os.PathLike[str],
    manifest: Manifest,
    files: Mapping[str, str | os.PathLike[str]],
    key: PrivateKey,
) -> VerifiedManifest:
    """Write a signed bundle atomically; ``files`` maps archive names to local paths; fills in ``manifest.files``."""
    entries: dict[str, FileEntry] = {}
    for arcname in sorted(files):
        _check_relpath("write_bundle", arcname)
        sha, size = sha256_file(Path(files[arcname]))
        entries[arcname] = FileEntry(sha256=sha, size=size)
    created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = replace(manifest, files=entries, created=created)
    raw = canonical_json(manifest.to_dict())
    signatures = [key.sign(raw)]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tf:
                _add_bytes(tf, MANIFEST_NAME, raw)
                _add_bytes(tf, SIGNATURES_NAME, canonical_json(signatures))
                for arcname in sorted(files):
                    info = _tarinfo(arcname, entries[arcname].size)
                    with open(files[arcname], "rb") as src:
                        tf.addfile(info, src)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
    return VerifiedManifest(manifest, key.public.key_id, hashlib.sha256(raw).hexdigest(), raw, signatures)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    tf.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:")
    except FileNotFoundError as exc:
        raise BundleFormatError(f"{path}: no such bundle file") from exc
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleFormatError(f"{path}: not a bundle (uncompressed tar expected): {exc}") from exc


def _next(tf: tarfile.TarFile, path: Path) -> tarfile.TarInfo | None:
    try:
        return tf.next()
    except (tarfile.TarError, OSError, EOFError, UnicodeError) as exc:
        raise BundleFormatError(f"{path}: truncated or corrupt archive: {exc}") from exc


def _read_small(tf: tarfile.TarFile, path: Path, expected: str, cap: int) -> bytes:
    info = _next(tf, path)
    if info is None or info.name != expected:
        got = "end of archive" if info is None else repr(info.name)
        raise BundleFormatError(f"{path}: member {expected!r} expected here, found {got}")
    if not info.isreg():
        raise UnsafeArchiveError(f"{path}: {expected} is not a regular file")
    if info.size > cap:
        raise BundleFormatError(f"{path}: {expected} is {info.size} bytes, over the {cap}-byte cap")
    fh = tf.extractfile(info)
    if fh is None:
        raise BundleFormatError(f"{path}: cannot read {expected}")
    try:
        data = fh.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleFormatError(f"{path}: truncated {expected}: {exc}") from exc
    if len(data) != info.size:
        raise BundleFormatError(f"{path}: truncated {expected}")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")  # NaN/Infinity: json accepts them, canonical JSON cannot hold them


def _verify_header(raw: bytes, sig_raw: bytes, trusted: TrustedKeys, what: str) -> VerifiedManifest:
    """Signature first (over the raw bytes), then the manifest schema."""
    try:
        signatures = json.loads(sig_raw)
    except (ValueError, UnicodeError, RecursionError) as exc:
        raise BundleSignatureError(f"{what}: {SIGNATURES_NAME} is not JSON: {exc}") from exc
    if not isinstance(signatures, list):
        raise BundleSignatureError(f"{what}: {SIGNATURES_NAME} must be a list of signatures")
    key_id = trusted.verify(signatures, raw, what)
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeError, RecursionError) as exc:
        raise BundleFormatError(f"{what}: {MANIFEST_NAME} is not JSON: {exc}") from exc
    try:
        canonical = canonical_json(data)
    except RecursionError as exc:  # nesting json.loads just managed is too deep for the encoder
        raise BundleFormatError(f"{what}: {MANIFEST_NAME} is nested too deeply") from exc
    if canonical != raw:
        raise BundleFormatError(f"{what}: {MANIFEST_NAME} is not in canonical form")
    try:
        manifest = Manifest.from_dict(data)
    except BundleError as exc:  # same error type, but naming the bundle it came from
        raise type(exc)(f"{what}: {exc}") from exc
    return VerifiedManifest(manifest, key_id, hashlib.sha256(raw).hexdigest(), raw, signatures)


def read_manifest(path: str | os.PathLike[str], trusted: TrustedKeys) -> VerifiedManifest:
    """Read and verify just the signed manifest of a bundle file (no member is read)."""
    p = Path(path)
    with _open_tar(p) as tf:
        raw = _read_small(tf, p, MANIFEST_NAME, _MAX_MANIFEST_BYTES)
        sig = _read_small(tf, p, SIGNATURES_NAME, _MAX_SIGNATURES_BYTES)
    return _verify_header(raw, sig, trusted, str(p))


def _members(
    tf: tarfile.TarFile, path: Path, vm: VerifiedManifest, limits: BundleLimits
) -> Iterator[tuple[tarfile.TarInfo, FileEntry]]:
    """Yield each payload member after checking its name, type and announced size against the manifest."""
    m = vm.manifest
    if len(m.files) > limits.max_members:
        raise UnsafeArchiveError(f"{path}: {len(m.files)} files listed, over the cap of {limits.max_members}")
    if m.total_size > limits.max_total_bytes:
        raise UnsafeArchiveError(f"{path}: {m.total_size} bytes listed, over the cap of {limits.max_total_bytes}")
    big = sorted(n for n, e in m.files.items() if e.size > limits.max_file_bytes)
    if big:
        raise UnsafeArchiveError(
            f"{path}: file(s) {', '.join(big)} listed over the per-file cap of {limits.max_file_bytes}"
        )
    seen: set[str] = {MANIFEST_NAME, SIGNATURES_NAME}
    while (info := _next(tf, path)) is not None:
        # Name, type and duplicates first, so a hostile member is reported as what it is, not as "one too many".
        name = _check_relpath(f"{path}: member", info.name)
        if not info.isreg() or info.issparse():
            kind = ("symlink" if info.issym() else "hardlink" if info.islnk() else
                    "directory" if info.isdir() else "special file")
            raise UnsafeArchiveError(f"{path}: member {name!r} is a {kind}; only regular files are allowed")
        if name in seen:
            raise UnsafeArchiveError(f"{path}: duplicate member {name!r}")
        seen.add(name)
        # Every member is distinct and listed, so the member count can never exceed the manifest's (capped) count.
        entry = m.files.get(name)
        if entry is None:
            raise BundleIntegrityError(f"{path}: member {name!r} is not listed in the manifest")
        if info.size != entry.size:
            raise BundleIntegrityError(f"{path}: member {name!r} is {info.size} bytes, manifest says {entry.size}")
        if info.size > limits.max_file_bytes:
            raise UnsafeArchiveError(f"{path}: member {name!r} is {info.size} bytes, over the cap")
        yield info, entry
    missing = sorted(set(m.files) - seen)
    if missing:
        raise BundleIntegrityError(f"{path}: file(s) listed in the manifest but missing: {', '.join(missing)}")


def _copy_hashed(src: IO[bytes], dst: IO[bytes] | None, size: int, name: str, path: Path) -> str:
    h = hashlib.sha256()
    left = size
    try:
        while left:
            chunk = src.read(min(_CHUNK, left))
            if not chunk:
                raise BundleFormatError(f"{path}: member {name!r} is truncated ({size - left} of {size} bytes)")
            h.update(chunk)
            if dst is not None:
                dst.write(chunk)
            left -= len(chunk)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleFormatError(f"{path}: member {name!r} is truncated or unreadable: {exc}") from exc
    return h.hexdigest()


def verify_bundle(
    path: str | os.PathLike[str], trusted: TrustedKeys, limits: BundleLimits = BundleLimits()
) -> VerifiedManifest:
    """Verify a bundle file completely without writing anything: signature, manifest, names, types, sizes, hashes."""
    p = Path(path)
    with _open_tar(p) as tf:
        raw = _read_small(tf, p, MANIFEST_NAME, _MAX_MANIFEST_BYTES)
        sig = _read_small(tf, p, SIGNATURES_NAME, _MAX_SIGNATURES_BYTES)
        vm = _verify_header(raw, sig, trusted, str(p))
        for info, entry in _members(tf, p, vm, limits):
            fh = tf.extractfile(info)
            if fh is None:
                raise BundleFormatError(f"{p}: cannot read member {info.name!r}")
            digest = _copy_hashed(fh, None, info.size, info.name, p)
            if digest != entry.sha256:
                raise BundleIntegrityError(f"{p}: member {info.name!r} sha256 {digest[:12]}… differs from the "
                                           f"manifest's "
                                           f"{entry.sha256[:12]}…")
    return vm


def extract_bundle(
    path: str | os.PathLike[str],
    trusted: TrustedKeys,
    dest: str | os.PathLike[str],
    limits: BundleLimits = BundleLimits(),
) -> VerifiedManifest:
    """Verify a bundle fully, then extract it into ``dest`` (which must not exist) via a staging dir and a rename.

    The files are hashed again while written, so a bundle changed between the two passes is still refused.
    On any failure nothing is left at ``dest`` and the staging directory is removed.
    """
    p = Path(path)
    target = Path(dest)
    if target.exists():
        raise BundleError(f"extract destination {target} already exists")
    verify_bundle(p, trusted, limits)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{target.name}-", dir=target.parent))
    try:
        with _open_tar(p) as tf:
            raw = _read_small(tf, p, MANIFEST_NAME, _MAX_MANIFEST_BYTES)
            sig = _read_small(tf, p, SIGNATURES_NAME, _MAX_SIGNATURES_BYTES)
            vm = _verify_header(raw, sig, trusted, str(p))
            for info, entry in _members(tf, p, vm, limits):
                out = staging.joinpath(*PurePosixPath(info.name).parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(info)
                if src is None:
                    raise BundleFormatError(f"{p}: cannot read member {info.name!r}")
                fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                with os.fdopen(fd, "wb") as fh:
                    digest = _copy_hashed(src, fh, info.size, info.name, p)
                    fh.flush()
                    os.fsync(fh.fileno())
                if digest != entry.sha256:
                    raise BundleIntegrityError(f"{p}: member {info.name!r} changed while extracting")
        (staging / MANIFEST_NAME).write_bytes(raw)
        (staging / SIGNATURES_NAME).write_bytes(sig)
        for d in sorted({q.parent for q in staging.rglob("*")}, key=lambda q: len(q.parts), reverse=True):
            fsync_dir(d)
        os.rename(staging, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return vm


def read_installed(
    directory: str | os.PathLike[str], trusted: TrustedKeys, verify_files: bool = True
) -> VerifiedManifest:
    """Re-verify an extracted bundle directory: signature, manifest, and (by default) every file's size and hash."""
    d = Path(directory)
    try:
        raw = (d / MANIFEST_NAME).read_bytes()
        sig = (d / SIGNATURES_NAME).read_bytes()
    except OSError as exc:
        raise BundleFormatError(f"{d}: not an installed bundle: {exc}") from exc
    vm = _verify_header(raw, sig, trusted, str(d))
    if verify_files:
        for name, entry in vm.manifest.files.items():
            f = d.joinpath(*PurePosixPath(name).parts)
            if f.is_symlink() or not f.is_file():
                raise BundleIntegrityError(f"{d}: {name} is missing or not a regular file")
            digest, size = sha256_file(f)
            if size != entry.size or digest != entry.sha256:
                raise BundleIntegrityError(
                    f"{d}: {name} differs from the manifest (size {size}, sha256 {digest[:12]}…)"
                )
    return vm
