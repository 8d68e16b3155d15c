"""The one options object of a packaging run: the CLI builds it from its flags, the Python API takes it as is.

Every field is honoured end to end and written into the bundle's report (``report.json``, listed in the signed
manifest), so what a bundle was built with can always be read back from the bundle.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet.sdk.bundle import Manifest
from edgefleet.sdk.errors import ConfigError
from edgefleet.sdk.timing import TimingPolicy

from .accuracy import OUTPUT_KINDS, Budget, parse_budget

__all__ = ["PRECISION_CHOICES", "DataSource", "PackageOptions", "PackageResult", "Progress", "ProgressEvent"]

PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16", "f16", "int8")

DataSource = str | os.PathLike[str] | Sequence[Mapping[str, np.ndarray]]
"""Samples: an ``.npz`` (arrays stacked on axis 0), a folder of ``.npz``/``.npy`` files, or feeds in memory."""


@dataclass(frozen=True)
class PackageOptions:
    """Knobs of one packaging run (the CLI flags, as data); see docs/packaging.md for each."""

    precision: str = "auto"
    budget: Budget = field(default_factory=Budget)
    name: str | None = None
    version: str = "1.0.0"
    model_type: str | None = None
    calibration: DataSource | None = None
    validation: DataSource | None = None
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    profiles_dirs: tuple[str, ...] = ()
    output_kinds: Mapping[str, str] = field(default_factory=dict)
    measure: bool = True
    runtime_python: tuple[str, ...] = ()
    discover_runtimes: bool = True
    threads: int | None = None
    time_budget_s: float = 300.0
    timing: TimingPolicy = field(default_factory=TimingPolicy)
    compare_cpu: bool = True
    tie_margin: float = 0.03
    min_calibration_samples: int = 8
    min_validation_samples: int = 32
    bundle_samples: int = 8
    calibration_memory_mb: int = 2048
    mixed_precision_rounds: int = 6
    mixed_precision_s: float = 90.0
    trt_max_batch: int = 8
    # One bundle holding every verified candidate; the device pins the fastest that passes its self-test there.
    # None: only when the target's runtime cannot be reached from the build host (nothing measured chose for it).
    variants: bool | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_CHOICES:
            raise ConfigError(f"precision must be one of {PRECISION_CHOICES}, got {self.precision!r}")
        if not isinstance(self.budget, Budget):
            raise ConfigError(f"budget must be a Budget (or a list of METRIC=VALUE strings), got {self.budget!r}")
        for k in ("bundle_samples", "min_calibration_samples", "min_validation_samples", "trt_max_batch",
                  "calibration_memory_mb"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{k} must be an integer >= 1, got {v!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or not 0 <= self.threads <= 1024):
            raise ConfigError(f"threads must be in 0..1024 (0 = ONNX Runtime's default), got {self.threads!r}")
        if not isinstance(self.time_budget_s, (int, float)) or not self.time_budget_s > 0 \
                or not math.isfinite(self.time_budget_s):
            raise ConfigError(f"time_budget_s must be a positive number of seconds, got {self.time_budget_s!r}")
        if not 0 <= self.tie_margin < 0.5:
            raise ConfigError(f"tie_margin must be in [0, 0.5), got {self.tie_margin!r}")
        for k, v in self.input_shapes.items():
            if not isinstance(v, tuple) or not v or not all(isinstance(d, int) and d >= 1 for d in v):
                raise ConfigError(f"input_shapes[{k!r}] must be a non-empty tuple of dims >= 1, got {v!r}")
        bad = {k: v for k, v in self.output_kinds.items() if v not in OUTPUT_KINDS}
        if bad:
            raise ConfigError(f"output kind(s) {bad} not among {OUTPUT_KINDS}")
        if self.version and not isinstance(self.version, str):
            raise ConfigError(f"version must be a string, got {self.version!r}")
        if not isinstance(self.mixed_precision_rounds, int) or isinstance(self.mixed_precision_rounds, bool) \
                or not 0 <= self.mixed_precision_rounds <= 16:
            raise ConfigError(f"mixed_precision_rounds must be an integer in 0..16, "
                              f"got {self.mixed_precision_rounds!r}")
        if not isinstance(self.mixed_precision_s, (int, float)) or isinstance(self.mixed_precision_s, bool) \
                or not 0 < self.mixed_precision_s <= 3600:
            raise ConfigError(f"mixed_precision_s must be in (0, 3600] seconds, got {self.mixed_precision_s!r}")

    @classmethod
    def build(cls, base: PackageOptions | None = None, **overrides: Any) -> PackageOptions:
        """``base`` (or the defaults) with ``overrides`` applied; a budget may be given as METRIC=VALUE strings,
        an unknown option is a ConfigError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown packaging option(s) {unknown}; known: {sorted(known)}")
        if "budget" in overrides and not isinstance(overrides["budget"], Budget):
            overrides["budget"] = parse_budget(list(overrides["budget"] or []))
        for k in ("profiles_dirs", "runtime_python"):
            if k in overrides:
                overrides[k] = tuple(str(x) for x in overrides[k])
        if "input_shapes" in overrides:
            overrides["input_shapes"] = _shapes(overrides["input_shapes"])
        return replace(base or cls(), **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, written into every bundle's report (data sources by path, or their sample count)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("calibration", "validation"):
                v = None if v is None else (str(v) if isinstance(v, (str, os.PathLike)) else f"{len(v)} samples "
                                            f"given in memory")
            elif isinstance(v, Budget):
                v = v.to_dict()
            elif isinstance(v, TimingPolicy):
                v = v.to_dict()
            elif isinstance(v, Mapping):
                v = {k: (list(x) if isinstance(x, tuple) else x) for k, x in v.items()}
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


def _shapes(given: Any) -> dict[str, tuple[int, ...]]:
    if not given:
        return {}
    if isinstance(given, Mapping):
        return {str(k): tuple(int(d) for d in v) for k, v in given.items()}
    from .torch_input import parse_input_shapes

    return parse_input_shapes([str(s) for s in given])


@dataclass(frozen=True)
class PackageResult:
    """One written bundle with its signed manifest and the packaging report."""

    target: str
    path: Path
    manifest: Manifest
    report: dict[str, Any]


@dataclass(frozen=True)
class ProgressEvent:
    """Where a packaging run is: ``target`` (or "" for shared work), the step, and how far through the target's
    planned steps (``done`` of ``total``); ``message`` says it in words."""

    target: str
    step: str
    done: int
    total: int
    message: str

    def __str__(self) -> str:
        return self.message


Progress = Callable[[ProgressEvent], None]
