"""Target profiles: one TOML file per device class, loaded into frozen dataclasses.

A profile says what a target is (architecture, CPU features, markers such as ``jetson``), which ONNX Runtime flavour
and execution providers it runs, in priority order with their options, which precisions it supports, and how to
quantize for it, each non-obvious choice with its reason. The built-in profiles live in ``devices/profiles/``;
users add their own from a directory (``--profiles DIR`` or ``EDGEFLEET_PROFILES``); a user profile with a built-in
name replaces it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgefleet.sdk.bundle import OPT_LEVELS, ProviderConfig, SessionConfig
from edgefleet.sdk.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["PRECISIONS", "Profile", "Quantization", "builtin_dir", "load_profile", "load_profiles"]

PRECISIONS = ("fp32", "fp16", "bf16", "f16", "int8")
_ARCHES = ("x86_64", "aarch64", "arm64")
_FLAVOURS = ("cpu", "openvino", "cuda")
_QTYPES = ("int8", "uint8")


def builtin_dir() -> Path:
    """Where the built-in profile TOML files are installed."""
    return Path(__file__).with_name("profiles")


@dataclass(frozen=True)
class Quantization:
    """How to quantize for a target, and why."""

    format: str = "qdq"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    reduce_range: bool = False
    per_channel: bool = True
    calibration_method: str = "minmax"
    reason: str = ""

    def __post_init__(self) -> None:
        if self.format not in ("qdq", "qoperator"):
            raise ConfigError(f"quantization.format must be qdq or qoperator, got {self.format!r}")
        for k in ("activation_type", "weight_type"):
            if getattr(self, k) not in _QTYPES:
                raise ConfigError(f"quantization.{k} must be one of {_QTYPES}, got {getattr(self, k)!r}")
        if self.calibration_method not in ("minmax", "entropy", "percentile"):
            raise ConfigError(f"quantization.calibration_method must be minmax, entropy or percentile, "
                              f"got {self.calibration_method!r}")


@dataclass(frozen=True)
class Profile:
    """One target device class."""

    name: str
    description: str
    arch: str
    ort_flavour: str
    providers: tuple[ProviderConfig, ...]
    session: SessionConfig
    precisions: tuple[str, ...]
    quantization: Quantization
    cpu_flags: tuple[str, ...] = ()
    markers: tuple[str, ...] = ()
    rank: int = 0
    default_threads: int = 0
    preferred_precision: str = "auto"
    session_reason: str = ""
    max_cpu_fallback: float = 0.0
    max_cpu_fallback_reason: str = ""
    extra: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        if self.arch not in _ARCHES:
            raise ConfigError(f"profile {self.name}: arch must be one of {_ARCHES}, got {self.arch!r}")
        if self.ort_flavour not in _FLAVOURS:
            raise ConfigError(f"profile {self.name}: ort_flavour must be one of {_FLAVOURS}, got {self.ort_flavour!r}")
        if not self.providers:
            raise ConfigError(f"profile {self.name}: at least one provider is required")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise ConfigError(f"profile {self.name}: precisions must be among {PRECISIONS}, "
                              f"got {list(self.precisions)}")
        if self.preferred_precision != "auto" and self.preferred_precision not in self.precisions:
            raise ConfigError(f"profile {self.name}: preferred_precision {self.preferred_precision!r} "
                              f"is not in precisions")
        if not isinstance(self.default_threads, int) or isinstance(self.default_threads, bool) \
                or not 0 <= self.default_threads <= 1024:
            raise ConfigError(f"profile {self.name}: default_threads must be in 0..1024, got {self.default_threads!r}")
        if not isinstance(self.max_cpu_fallback, (int, float)) or isinstance(self.max_cpu_fallback, bool) \
                or not 0.0 <= self.max_cpu_fallback <= 1.0:
            raise ConfigError(f"profile {self.name}: max_cpu_fallback must be a share in [0, 1], "
                              f"got {self.max_cpu_fallback!r}")

    @property
    def primary_provider(self) -> str:
        """The provider the bundle is built for (first in priority order)."""
        return self.providers[0].name

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``devices show --json``."""
        return {
            "name": self.name, "description": self.description, "arch": self.arch, "ort_flavour": self.ort_flavour,
            "cpu_flags": list(self.cpu_flags), "markers": list(self.markers), "rank": self.rank,
            "providers": [{"name": p.name, "options": dict(p.options)} for p in self.providers],
            "session": {**{f.name: getattr(self.session, f.name) for f in fields(self.session)},
                        "config_entries": dict(self.session.config_entries), "reason": self.session_reason},
            "precisions": list(self.precisions), "preferred_precision": self.preferred_precision,
            "default_threads": self.default_threads, "max_cpu_fallback": self.max_cpu_fallback,
            "max_cpu_fallback_reason": self.max_cpu_fallback_reason,
            "quantization": {f.name: getattr(self.quantization, f.name) for f in fields(self.quantization)},
            "extra": {k: dict(v) for k, v in self.extra.items()}, "source": self.source,
        }


_TOP_KEYS = {"name", "description", "arch", "ort_flavour", "cpu_flags", "markers", "rank", "default_threads",
             "precisions", "preferred_precision", "providers", "session", "quantization", "openvino", "tensorrt",
             "coreml", "max_cpu_fallback", "max_cpu_fallback_reason"}


def _parse(data: Mapping[str, Any], source: str) -> Profile:
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)}")
    for key in ("name", "description", "arch", "ort_flavour", "providers"):
        if key not in data:
            raise ConfigError(f"{source}: missing key {key!r}")
    try:
        session = dict(data.get("session") or {})
        session_reason = str(session.pop("reason", ""))
        if session.get("graph_optimization_level", "all") not in OPT_LEVELS:
            raise ConfigError(f"{source}: session.graph_optimization_level must be one of {OPT_LEVELS}")
        providers = data["providers"]
        if not isinstance(providers, list) or not all(isinstance(p, dict) for p in providers):
            raise ConfigError(f"{source}: providers must be an array of tables")
        quant = dict(data.get("quantization") or {})
        extra_q = set(quant) - {f.name for f in fields(Quantization)}
        if extra_q:
            raise ConfigError(f"{source}: unknown key(s) {sorted(extra_q)} in [quantization]")
        for p in providers:
            extra = set(p) - {"name", "options"}
            if extra:
                raise ConfigError(f"{source}: unknown key(s) {sorted(extra)} in provider {p.get('name')!r}")
        return Profile(
            name=str(data["name"]),
            description=str(data["description"]),
            arch=data["arch"],
            ort_flavour=data["ort_flavour"],
            providers=tuple(
                ProviderConfig(p["name"], {str(k): str(v) for k, v in (p.get("options") or {}).items()})
                for p in providers
            ),
            session=SessionConfig.from_dict(session),
            precisions=tuple(data.get("precisions") or ("fp32",)),
            quantization=Quantization(**quant),
            cpu_flags=tuple(data.get("cpu_flags") or ()),
            markers=tuple(data.get("markers") or ()),
            rank=int(data.get("rank", 0)),
            default_threads=data.get("default_threads", 0),
            preferred_precision=str(data.get("preferred_precision", "auto")),
            session_reason=session_reason,
            max_cpu_fallback=data.get("max_cpu_fallback", 0.0),
            max_cpu_fallback_reason=str(data.get("max_cpu_fallback_reason", "")),
            extra={k: dict(data[k]) for k in ("openvino", "tensorrt", "coreml") if k in data},
            source=source,
        )
    except ConfigError as exc:
        if source in str(exc):
            raise
        raise ConfigError(f"{source}: {exc}") from exc  # name the file: the dataclasses only know the profile
    except Exception as exc:
        raise ConfigError(f"{source}: {str(exc).removeprefix('manifest: ')}") from exc


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Load and validate one profile file; the profile's name must match the file name."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read profile {p}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"profile {p} is not valid TOML: {exc}") from exc
    prof = _parse(data, str(p))
    if prof.name != p.stem:
        raise ConfigError(f"{p}: profile name {prof.name!r} must match the file name {p.stem!r}")
    return prof


def load_profiles(extra_dirs: Iterable[str | os.PathLike[str]] = ()) -> dict[str, Profile]:
    """Built-in profiles plus those in ``extra_dirs`` and ``$EDGEFLEET_PROFILES`` (later ones override)."""
    dirs: list[Path] = [builtin_dir()]
    env = os.environ.get("EDGEFLEET_PROFILES")
    if env:
        dirs.extend(Path(d) for d in env.split(os.pathsep) if d)
    dirs.extend(Path(d) for d in extra_dirs)
    profiles: dict[str, Profile] = {}
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"profile directory {d} does not exist")
        for f in sorted(d.glob("*.toml")):
            prof = load_profile(f)
            profiles[prof.name] = prof
    return profiles


def get_profile(name: str, extra_dirs: Iterable[str | os.PathLike[str]] = ()) -> Profile:
    """The profile called ``name``, or a ConfigError listing the known ones."""
    profiles = load_profiles(extra_dirs)
    try:
        return profiles[name]
    except KeyError:
        raise ConfigError(f"unknown target {name!r}; known targets: {', '.join(sorted(profiles))}") from None
