"""The device description carried by the retained birth message and the ``describe`` reply."""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.sdk.protocol import Description

if TYPE_CHECKING:
    from .registry import Registry
    from .store import Store

__all__ = ["describe", "kernel_boot_id"]


def kernel_boot_id() -> str:
    """The kernel's boot id (Linux), or "" where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def describe(host: dict[str, Any], profile: str, profile_reasons: list[str], registry: Registry, store: Store,
             extra: dict[str, Any] | None = None) -> Description:
    """Profile, ONNX Runtime (version, flavour, providers), CPU, RAM, agent version and the bundles installed."""
    from edgefleet.sdk import __version__

    pointers = store.pointers()
    models = []
    for name, model in registry.items():
        ptr = pointers.get(name)
        models.append({
            "name": name, "version": model.version, "digest": model.digest, "target": model.manifest.target,
            "precision": model.manifest.precision, "providers": list(model.placement.serving),
            "requested_providers": list(model.placement.requested), "fallback": model.placement.fallback,
            "previous": ptr.previous if ptr else None, "variant": model.variant,
        })
    return Description.from_dict({
        "profile": profile,
        "profile_reasons": profile_reasons,
        "agent_version": __version__,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": host.get("arch"),
        "cpu": {"model": host.get("cpu_model"), "cores": host.get("cores"), "flags": host.get("cpu_flags", [])},
        "ram_bytes": host.get("memory_bytes"),
        "markers": host.get("markers", []),
        "ort": host.get("ort"),
        "kernel_boot_id": kernel_boot_id(),
        "models": models,
        "executable": sys.executable,
        **(extra or {}),
    })
