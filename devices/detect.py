"""Detect the machine we run on and pick the best-fitting profile, saying why (and why not the others)."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.sdk.runtime import OrtInfo

from .profile import Profile

__all__ = ["Detection", "Host", "detect", "read_host"]

_SHOWN_FLAGS = ("avx", "amx", "asimd", "sve", "fma", "f16c")
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}


@dataclass(frozen=True)
class Host:
    """What this machine is: architecture, OS, CPU, markers (jetson, macos, raspberry-pi, gpus) and ONNX Runtime."""

    arch: str
    system: str
    cpu_model: str
    cpu_flags: frozenset[str]
    cores: int
    memory_bytes: int
    markers: frozenset[str]
    ort: OrtInfo | None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (flags trimmed to the ones profiles ask about)."""
        return {
            "arch": self.arch, "system": self.system, "cpu_model": self.cpu_model, "cores": self.cores,
            "memory_bytes": self.memory_bytes, "markers": sorted(self.markers),
            "cpu_flags": sorted(f for f in self.cpu_flags if f.startswith(_SHOWN_FLAGS)),
            "ort": None if self.ort is None else {"version": self.ort.version, "flavour": self.ort.flavour,
                                                  "providers": list(self.ort.providers)},
        }


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "", set[str]()
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    if not model:
        model = platform.processor() or platform.machine()
    return model, frozenset(flags)


def _markers(system: str) -> set[str]:
    found = set()
    dt_model = _read("/proc/device-tree/model").strip("\x00\n ")
    if system == "Darwin":
        found.add("macos")
    if Path("/etc/nv_tegra_release").exists() or "jetson" in dt_model.lower():
        found.add("jetson")
    if dt_model.startswith("Raspberry Pi"):
        found.add("raspberry-pi")
    if Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists():
        found.add("nvidia-gpu")
    drm = Path("/sys/class/drm")
    if drm.is_dir():
        for card in drm.glob("card*/device/vendor"):
            if _read(str(card)).strip() == "0x8086":
                found.add("intel-gpu")
    return found


def _memory() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def read_host() -> Host:
    """Read this machine's facts (CPU flags, markers, the installed ORT flavour and its providers)."""
    system = platform.system()
    arch = _ARCH_ALIASES.get(platform.machine().lower(), platform.machine().lower())
    model, flags = _cpuinfo()
    try:
        from edgefleet.sdk.runtime import ort_info

        ort: OrtInfo | None = ort_info()
    except ImportError:
        ort = None
    return Host(arch, system, model, flags, os.cpu_count() or 1, _memory(), frozenset(_markers(system)), ort)


@dataclass(frozen=True)
class Detection:
    """The chosen profile with the reasons it fits, and for every other profile why it does not."""

    profile: Profile | None
    reasons: list[str]
    rejected: Mapping[str, str]
    host: Host
    fitting: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``devices detect --json``."""
        return {"profile": self.profile.name if self.profile else None, "reasons": self.reasons,
                "fitting": self.fitting, "rejected": dict(self.rejected), "host": self.host.to_dict()}


def _fit(p: Profile, host: Host) -> tuple[bool, list[str]]:
    """Whether ``p`` fits ``host``; the reasons why (if it fits) or the first reason why not."""
    arch = _ARCH_ALIASES.get(p.arch, p.arch)
    if arch != _ARCH_ALIASES.get(host.arch, host.arch):
        return False, [f"needs {p.arch}, this machine is {host.arch}"]
    why = [f"{host.arch} CPU ({host.cpu_model}, {host.cores} cores)"]
    missing = [f for f in p.cpu_flags if f not in host.cpu_flags]
    if missing:
        return False, [f"CPU lacks {', '.join(missing)}"]
    if p.cpu_flags:
        why.append(f"CPU has {', '.join(p.cpu_flags)}")
    absent = [m for m in p.markers if m not in host.markers]
    if absent:
        return False, [f"no {', '.join(absent)} found on this machine"]
    if p.markers:
        why.append(f"found {', '.join(p.markers)}")
    if host.ort is None:
        return False, ["ONNX Runtime is not installed"]
    need = [pr.name for pr in p.providers if pr.name not in host.ort.providers]
    if need:
        return False, [f"ONNX Runtime {host.ort.version} ({host.ort.flavour}) does not offer {', '.join(need)}"]
    offered = ", ".join(pr.name for pr in p.providers)
    why.append(f"ONNX Runtime {host.ort.version} ({host.ort.flavour}) offers {offered}")
    return True, why


def detect(profiles: Mapping[str, Profile], host: Host | None = None) -> Detection:
    """Pick the highest-ranked profile that fits this machine (CPU flags, markers, providers ORT offers)."""
    host = host or read_host()
    fits: list[tuple[Profile, list[str]]] = []
    rejected: dict[str, str] = {}
    for p in profiles.values():
        ok, why = _fit(p, host)
        if ok:
            fits.append((p, why))
        else:
            rejected[p.name] = why[0]
    if not fits:
        return Detection(None, ["no profile fits this machine"], rejected, host)
    fits.sort(key=lambda pw: (-pw[0].rank, pw[0].name))
    best, why = fits[0]
    for other, _ in fits[1:]:
        rejected[other.name] = f"fits, but ranks below {best.name} ({other.rank} < {best.rank})"
    return Detection(best, why, rejected, host, [p.name for p, _ in fits])
