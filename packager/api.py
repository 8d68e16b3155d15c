"""``package()``: one model in, one signed bundle per target out, with a report explaining every choice.

For each target: check the model once, build the base (fusion when it is a transformer and the target's EP takes
contrib ops, basic offline optimization), then every candidate the profile allows; run each against the FP32
original on the validation data (on the target's EP when this host has it, else on a CPU-EP stand-in, else not at
all: "unverified"), time the ones that run on the target's EP, exclude the most sensitive nodes before giving up
INT8, choose, and write the bundle. Everything is built in a temporary folder inside the output folder and renamed
into place only when every target succeeded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet.devices.profile import Profile, get_profile, load_profiles
from edgefleet.sdk._fs import sha256_file
from edgefleet.sdk.bundle import (
    Manifest,
    ProviderConfig,
    SessionConfig,
    TensorSpec,
    Tolerance,
    ValidationSpec,
    VerifiedManifest,
    version_key,
    write_bundle,
)
from edgefleet.sdk.errors import (
    AccuracyBudgetError,
    ConfigError,
    EdgefleetError,
    InputError,
    PackagingError,
)
from edgefleet.sdk.keys import PrivateKey, load_private_key
from edgefleet.sdk.validation import save_validation

from .accuracy import Budget, CandidateAccuracy, evaluate, parse_budget
from .data import Feed, load_samples, synthetic_samples
from .measure import Runner, cpu_session, interleaved_times, run_all, target_session
from .plan import (
    CPU,
    TENSORRT,
    Candidate,
    ModelFacts,
    candidates_for,
    inspect_model,
    io_specs,
    offline_level,
    trt_shape_options,
)
from .sensitivity import rank_nodes, with_data_movement_successors
from .steps import StepRecord, make_plan, model_size, run_plan

__all__ = ["PackageOptions", "PackageResult", "package"]

log = logging.getLogger("edgefleet.packager")

Progress = Callable[[str], None]
# opset -> first ONNX Runtime release that implements it (ORT's compatibility table)
_NOISE = 0.03
_SAFETY = {"fp32": 4.0, "fp16": 3.0, "f16": 3.0, "bf16": 2.0, "int8": 1.0}
_OPSET_ORT = {15: "1.10.0", 16: "1.11.0", 17: "1.13.0", 18: "1.14.0", 19: "1.16.0", 20: "1.17.0", 21: "1.18.0",
              22: "1.20.0", 23: "1.22.0", 24: "1.23.0"}


@dataclass(frozen=True)
class PackageOptions:
    """Knobs of one packaging run (the CLI flags, as data)."""

    precision: str = "auto"
    budget: Budget = field(default_factory=Budget)
    name: str | None = None
    version: str = "1.0.0"
    model_type: str | None = None
    measure: bool = True
    min_calibration_samples: int = 8
    bundle_samples: int = 4
    sensitivity_rounds: tuple[float, ...] = (0.0, 0.0, 0.1)
    trt_max_batch: int = 8
    latency_rounds: int = 9

    def __post_init__(self) -> None:
        if self.bundle_samples < 1:
            raise ConfigError(f"bundle_samples must be >= 1, got {self.bundle_samples}")
        if self.min_calibration_samples < 1:
            raise ConfigError(f"min_calibration_samples must be >= 1, got {self.min_calibration_samples}")
        if self.trt_max_batch < 1:
            raise ConfigError(f"trt_max_batch must be >= 1, got {self.trt_max_batch}")


@dataclass(frozen=True)
class PackageResult:
    """One written bundle with its signed manifest and the packaging report."""

    target: str
    path: Path
    manifest: Manifest
    report: dict[str, Any]


@dataclass
class _Built:
    cand: Candidate
    model: Path | None = None
    proxy: Path | None = None
    records: list[StepRecord] = field(default_factory=list)
    accuracy: CandidateAccuracy | None = None
    accuracy_on: str = ""
    latency_ms: float | None = None
    latency_median_ms: float | None = None
    latency_note: str = ""
    error: str = ""
    runner: Runner | None = None
    providers: tuple[ProviderConfig, ...] = ()
    source: Path | None = None  # the model the candidate's steps ran on (the base, or the checked model)

    @property
    def ok(self) -> bool:
        return not self.error and self.accuracy is not None and self.accuracy.ok

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.cand.name, "precision": self.cand.precision, "why": self.cand.why,
                "steps": [r.to_dict() for r in self.records],
                "provider_options": {k: dict(v) for k, v in self.cand.provider_options.items()},
                "size": model_size(self.model) if self.model else None,
                "accuracy": self.accuracy.to_dict() if self.accuracy else None, "accuracy_on": self.accuracy_on,
                "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 4),
                "latency_median_ms": None if self.latency_median_ms is None else round(self.latency_median_ms, 4),
                "latency_note": self.latency_note, "within_budget": self.ok, "error": self.error}

    def line(self) -> str:
        if self.error:
            return f"{self.cand.name}: {self.error}"
        lat = f"{self.latency_ms:.3f} ms" if self.latency_ms is not None else "latency not measured"
        if self.accuracy is None:
            return f"{self.cand.name}: accuracy unverified ({self.accuracy_on}); {lat}"
        state = "within budget" if self.accuracy.ok else "OVER budget: " + "; ".join(self.accuracy.failures)
        return (f"{self.cand.name}: {state}; " + " | ".join(o.summary() for o in self.accuracy.outputs)
                + f"; {lat} [{self.accuracy_on}]")


def _host_cpu_profile(profiles: Mapping[str, Profile]) -> str | None:
    from edgefleet.devices.detect import detect

    cpu = {n: p for n, p in profiles.items() if p.primary_provider == CPU and len(p.providers) == 1}
    found = detect(cpu).profile
    return found.name if found else None


def _available_providers() -> tuple[str, ...]:
    import onnxruntime as ort

    return tuple(ort.get_available_providers())


def _merge_providers(profile: Profile, overrides: Mapping[str, Mapping[str, str]],
                     extra: Mapping[str, Mapping[str, str]] | None = None) -> tuple[ProviderConfig, ...]:
    extra = extra or {}
    out = []
    for p in profile.providers:
        opts = {**p.options, **overrides.get(p.name, {}), **extra.get(p.name, {})}
        out.append(ProviderConfig(p.name, opts))
    return tuple(out)


def _min_ort(facts_opset: int, records: Sequence[StepRecord], contrib: bool) -> str:
    import onnxruntime as ort

    need = "1.16.0"
    by_opset = _OPSET_ORT.get(facts_opset)
    if by_opset and version_key(by_opset) > version_key(need):
        need = by_opset
    for r in records:
        if r.name == "upgrade_opset":
            v = _OPSET_ORT.get(int(r.notes.get("opset", 0)))
            if v and version_key(v) > version_key(need):
                need = v
    if contrib:
        # Fused/extended-level graphs hold com.microsoft ops as this ORT writes them: older runtimes may lack them.
        major, minor = ort.__version__.split(".")[:2]
        mine = f"{major}.{minor}.0"
        if version_key(mine) > version_key(need):
            need = mine
    return need


def _tolerances(acc: CandidateAccuracy | None, outputs: Sequence[TensorSpec], budget: Budget, measured_on_target: bool,
                refs: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Tolerance]:
    """Device self-test limits: the budget's cosine, and a max abs error with margin over what was measured here
    (x2 when measured on the target's EP, x4 for a CPU stand-in, 5% of the output's scale when unverified)."""
    tol = {}
    by_name = {o.name: o for o in acc.outputs} if acc else {}
    for spec in outputs:
        if spec.dtype not in ("float32", "float16", "float64", "bfloat16"):
            continue
        scale = max(float(np.max(np.abs(r[spec.name]))) if r[spec.name].size else 0.0 for r in refs)
        m = by_name.get(spec.name)
        if m is None:
            max_abs = 0.05 * scale + 1e-6
        else:
            margin = 2.0 if measured_on_target else 4.0
            max_abs = max(margin * m.max_abs, 1e-4 * scale, 1e-6)
        if not math.isfinite(max_abs):
            max_abs = 1e30
        b = budget.for_output(spec.name)
        ref0 = refs[0][spec.name]
        per_channel = ref0.ndim >= 3 and ref0.shape[1] > 1  # the same outputs the gate judges channel by channel
        tol[spec.name] = Tolerance(max_abs=float(f"{max_abs:.6g}"), min_cosine=b.min_cosine,
                                   min_channel_cosine=b.min_channel_cosine if per_channel else None,
                                   channel_floor=b.channel_floor if per_channel else 0.0)
    return tol


class _TargetBuild:
    """Everything done for one target (kept as an object so the steps read top to bottom in ``build``)."""

    def __init__(self, profile: Profile, model: Path, facts: ModelFacts, checked: Path, check_record: StepRecord,
                 calib_file: Path | None, val: list[Feed], refs: list[dict[str, np.ndarray]], opts: PackageOptions,
                 work: Path, host_cpu: str | None, progress: Progress, synthetic: bool) -> None:
        self.profile, self.model, self.facts, self.checked = profile, model, facts, checked
        self.check_record = check_record
        self.calib_file, self.val, self.refs, self.opts = calib_file, val, refs, opts
        self.work, self.host_cpu, self.progress, self.synthetic = work, host_cpu, progress, synthetic
        self.available = _available_providers()
        self.runs_here = profile.primary_provider in self.available
        self.notes: list[str] = []

    def build(self) -> tuple[_Built, dict[str, Any]]:
        p, opts = self.profile, self.opts
        level, level_reason = offline_level(p, self.host_cpu)
        base_items: list[tuple[str, dict[str, Any]]] = []
        fuse = bool(opts.model_type) or self.facts.transformer
        if fuse and p.primary_provider in (CPU, "CUDAExecutionProvider"):
            base_items.append(("fuse_transformer", {"model_type": opts.model_type or "bert"}))
        elif fuse:
            self.notes.append(f"transformer fusion skipped: {p.primary_provider} does not take ORT contrib ops")
        base_items.append(("optimize", {"level": "basic"}))
        self.progress(f"{p.name}: base ({', '.join(n for n, _ in base_items)})")
        base, base_records = run_plan(self.checked, self.work / "base", make_plan(base_items))
        cands, skipped = candidates_for(p, self.facts, opts.precision, self.calib_file is not None, level,
                                        measurable=self.runs_here and opts.measure)
        self.notes.extend(skipped)
        built: list[_Built] = []
        for i, c in enumerate(cands):
            if c.last_resort and any(b.ok and b.cand.int8 for b in built):
                self.notes.append(f"{c.name} not built: an INT8 candidate before it is within budget")
                continue
            self.progress(f"{p.name}: candidate {c.name}")
            built.append(self._build_candidate(c, base, self.work / f"cand{i}"))
        self._measure(built)
        if not any(b.ok for b in built) or opts.precision in ("auto", "int8"):
            built.extend(self._retry_int8(built, base))
        chosen, why = self._choose(built)
        report = {
            "target": p.name, "profile_description": p.description, "primary_provider": p.primary_provider,
            "offline_optimization": {"level": level, "reason": level_reason},
            "base_steps": [self.check_record.to_dict(), *[r.to_dict() for r in base_records]],
            "candidates": [b.to_dict() for b in built],
            "chosen": {"name": chosen.cand.name, "precision": chosen.cand.precision, "why": why},
            "notes": self.notes,
            "measured_here": self.runs_here and opts.measure,
            "not_measured": [] if (self.runs_here and opts.measure) else [
                f"{p.primary_provider} is not available in this ONNX Runtime ({', '.join(self.available)}): latency "
                f"not measured; accuracy checked on a CPU-EP stand-in where one exists"
                if not self.runs_here else "latency not measured: timing turned off"],
            "session": {"config": _session_dict(p.session), "reason": p.session_reason},
        }
        return chosen, report

    def _build_candidate(self, c: Candidate, base: Path, work: Path) -> _Built:
        b = _Built(c)
        try:
            calib = {"calibration": str(self.calib_file)} if self.calib_file else {}
            items = [(n, {**cfg, **calib}) if n == "quantize_static" else (n, cfg) for n, cfg in c.steps]
            try:
                b.source = base
                b.model, b.records = run_plan(base, work, make_plan(items))
            except PackagingError as exc:
                if not c.int8:
                    raise
                # ORT's quantizer fails on some ORT-optimized graphs (measured: Magika after basic-level constant
                # folding) that it quantizes fine unoptimized; the device's session optimizes at load either way.
                b.source = self.checked
                b.model, b.records = run_plan(self.checked, work / "from-checked", make_plan(items))
                self.notes.append(f"{c.name}: quantized the checked model instead of the optimized base, "
                                  f"which the quantizer refused ({str(exc)[:160]})")
            extra = {}
            if self.profile.primary_provider == TENSORRT:
                extra = {TENSORRT: trt_shape_options(self.facts.inputs, self.val[0], self.opts.trt_max_batch)}
            b.providers = _merge_providers(self.profile, c.provider_options, extra)
            if self.runs_here:
                inputs, outputs = io_specs(b.model)
                b.runner = target_session(b.model, b.providers, self.profile.session, inputs, outputs,
                                          self.work / "cache")
                b.accuracy_on = f"{b.runner.where} (target EP, on this host)"
                got = run_all(b.runner, self.val)
            elif c.proxy_possible:
                proxy = b.model
                if c.proxy_steps:
                    proxy, _ = run_plan(b.model, work / "proxy", make_plan(c.proxy_steps))
                b.proxy = proxy
                got = run_all(cpu_session(proxy), self.val)
                b.accuracy_on = (f"CPU EP stand-in for {self.profile.primary_provider}"
                                 + (" (model converted as the target would run it)" if c.proxy_steps else ""))
            else:
                b.accuracy_on = f"unverified: {self.profile.primary_provider} is not available on this host"
                return b
            b.accuracy = evaluate(got, self.refs, self.opts.budget)
        except EdgefleetError as exc:
            b.error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, ConfigError):
                raise
        return b

    def _measure(self, built: Sequence[_Built]) -> None:
        if not (self.runs_here and self.opts.measure):
            for b in built:
                b.latency_note = self._why_not_timed()
            return
        runners = {str(id(b)): b.runner for b in built if b.runner is not None and b.latency_ms is None}
        self.progress(f"{self.profile.name}: timing {len(runners)} candidate(s) on {self.profile.primary_provider}")
        times = interleaved_times(runners, self.val[0], rounds=self.opts.latency_rounds)  # type: ignore[arg-type]
        for b in built:
            if str(id(b)) in times:
                # The choice uses the fastest run: on a shared build host slower runs mostly measure the neighbours
                # (cf. timeit); the median is reported alongside.
                b.latency_ms = min(times[str(id(b))])
                b.latency_median_ms = statistics.median(times[str(id(b))])
                b.latency_note = "fastest of interleaved runs on this host (median alongside)"

    def _retry_int8(self, built: list[_Built], base: Path) -> list[_Built]:
        """Before giving up INT8: exclude the most sensitive nodes and rebuild the first failing INT8 candidate."""
        failing = next((b for b in built if b.cand.int8 and b.model and b.accuracy and not b.accuracy.ok), None)
        if failing is None or not self.opts.sensitivity_rounds:
            return []
        ahead = next((b for b in built[:built.index(failing)] if b.ok), None)
        if failing.latency_ms is None and ahead is not None:
            # unmeasured, the first candidate within budget in the expected order wins: a rescued INT8 behind it
            # could not be chosen
            self.notes.append(f"{failing.cand.name} not retried with sensitive nodes excluded: {ahead.cand.name}, "
                              f"ahead of it in the expected order, is within budget")
            return []
        passing = [b for b in built if b.ok and b.latency_ms is not None]
        if failing.latency_ms is not None and passing:
            best = min(passing, key=lambda b: float(b.latency_ms or 0.0))
            if failing.latency_ms >= float(best.latency_ms or 0.0):
                # keeping nodes in float only adds work: it cannot beat what already passes
                self.notes.append(f"{failing.cand.name} not retried with sensitive nodes excluded: it is already "
                                  f"slower ({failing.latency_ms:.3f} ms) than {best.cand.name} "
                                  f"({best.latency_ms:.3f} ms), which is within budget")
                return []
        out: list[_Built] = []
        excluded: list[str] = []
        current = failing
        base = failing.source or base  # node names must be those of the graph the quantizer saw
        # Greedy and re-ranked each round (as NNCF's accuracy-control loop does): once a node is back in float the
        # error moves, e.g. a detector's score Sigmoid first, then the Concat that re-quantizes its output with the
        # boxes' scale. Round i adds the i-th entry of ``sensitivity_rounds`` (a share of the ranking, at least 1).
        for i, frac in enumerate(self.opts.sensitivity_rounds):
            self.progress(f"{self.profile.name}: {current.cand.name} over budget, measuring per-node sensitivity")
            # the quantizer's own output: a later CPU optimization fuses QDQ away and renames tensors
            quantized = next((r.path for r in current.records if r.name.startswith("quantize_")), None) or current.model
            if quantized is None:
                break
            try:
                ranked = rank_nodes(base, quantized, self.val[:4], self.work / f"sens{i}",
                                    channel_floor=self.opts.budget.channel_floor)
            except Exception as exc:  # noqa: BLE001 - sensitivity is an aid; report and go on
                self.notes.append(f"sensitivity analysis failed: {exc}")
                break
            fresh = [n for n, s in ranked if s > 0 and n not in excluded]
            if not fresh:
                break
            k = max(1, math.ceil(frac * len(fresh)))
            excluded = with_data_movement_successors(base, [*excluded, *fresh[:k]])
            steps = []
            for n, cfg in failing.cand.steps:
                if n in ("quantize_static", "quantize_dynamic"):
                    cfg = {**cfg, "nodes_to_exclude": excluded}
                steps.append((n, cfg))
            c = replace(failing.cand, name=f"{failing.cand.name}-excl{len(excluded)}", steps=steps,
                        why=failing.cand.why + f"; round {i + 1}: {len(excluded)} most sensitive node(s) kept in "
                            f"float (with the data-movement and Concat ops they feed): {', '.join(excluded[:6])}"
                            + ("..." if len(excluded) > 6 else ""))
            self.progress(f"{self.profile.name}: candidate {c.name}")
            current = self._build_candidate(c, base, self.work / f"retry{i}")
            self._measure([current])
            out.append(current)
            if current.ok or current.model is None or current.accuracy is None:
                break
        return out

    def _why_not_timed(self) -> str:
        if not self.runs_here:
            return f"{self.profile.primary_provider} does not run on this host"
        return "timing turned off (measure=False / --no-measure)"

    def _choose(self, built: Sequence[_Built]) -> tuple[_Built, str]:
        ok = [b for b in built if b.ok]
        explicit = self.opts.precision != "auto"
        if not ok:
            if all(b.error for b in built):
                lines = "\n  ".join(b.line() for b in built)
                raise PackagingError(f"{self.profile.name}: no candidate could be built or run:\n  {lines}")
            unverified = [b for b in built if b.accuracy is None and not b.error]
            if explicit and unverified:
                b = unverified[0]
                return b, (f"{b.cand.name} as asked (--precision {self.opts.precision}); its accuracy could not be "
                           f"checked on this host ({b.accuracy_on}): the device self-test is the check")
            lines = "\n  ".join(b.line() for b in built)
            raise AccuracyBudgetError(f"{self.profile.name}: no candidate within the accuracy budget "
                                      f"({_budget_text(self.opts.budget)}):\n  {lines}")
        timed = [b for b in ok if b.latency_ms is not None]
        if timed:
            lat = {id(b): float(b.latency_ms or 0.0) for b in timed}
            fastest = min(timed, key=lambda b: lat[id(b)])
            # Within timing noise (3%) of the fastest, the most accurate precision wins: no speed, no reason to lose.
            close = [b for b in timed if lat[id(b)] <= lat[id(fastest)] * (1 + _NOISE)]
            best = max(close, key=lambda b: (_SAFETY.get(b.cand.precision, 0.0)
                                             - (0.5 if "-excl" in b.cand.name else 0.0), -lat[id(b)]))
            others = ", ".join(f"{b.cand.name} {b.latency_ms:.3f} ms" for b in timed if b is not best)
            rejected = [b.cand.name for b in built if not b.ok]
            lead = ("fastest within budget" if best is fastest else
                    f"within {_NOISE:.0%} of the fastest ({fastest.cand.name}) and more precise")
            why = (f"{lead} on {self.profile.primary_provider} on this host: {best.latency_ms:.3f} ms"
                   + (f" (vs {others})" if others else "")
                   + (f"; over budget or failed: {', '.join(rejected)}" if rejected else ""))
            return best, why
        first = ok[0]
        why = (f"first within budget in the expected-fastest order for {self.profile.name} "
               f"({' > '.join(b.cand.name for b in built)}); latency not measured: {self._why_not_timed()}")
        return first, why


def _session_dict(s: SessionConfig) -> dict[str, Any]:
    return {"graph_optimization_level": s.graph_optimization_level, "intra_op_num_threads": s.intra_op_num_threads,
            "inter_op_num_threads": s.inter_op_num_threads, "execution_mode": s.execution_mode,
            "config_entries": dict(s.config_entries)}


def _budget_text(b: Budget) -> str:
    parts = [f"cosine >= {b.min_cosine}", f"top1 >= {b.min_top1:.0%}", f"channel cosine >= {b.min_channel_cosine}"]
    for k in ("max_abs", "max_rel", "mean_rel"):
        if getattr(b, k) is not None:
            parts.append(f"{k} <= {getattr(b, k)}")
    return ", ".join(parts)


def _resolve_key(key: PrivateKey | str | os.PathLike[str] | None) -> PrivateKey:
    if key is None:
        raise ConfigError("no signing key: pass --key KEY (create one with `edgefleet keys generate fleet.key`; "
                          "devices must trust its .pub)")
    if isinstance(key, PrivateKey):
        return key
    return load_private_key(key)


def package(
    model: str | os.PathLike[str],
    targets: Sequence[str],
    *,
    key: PrivateKey | str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str] = ".",
    calibration: str | os.PathLike[str] | Sequence[Feed] | None = None,
    validation: str | os.PathLike[str] | Sequence[Feed] | None = None,
    precision: str = "auto",
    budget: Budget | Sequence[str] | None = None,
    name: str | None = None,
    version: str = "1.0.0",
    model_type: str | None = None,
    profiles_dir: Sequence[str | os.PathLike[str]] = (),
    options: PackageOptions | None = None,
    progress: Progress | None = None,
    input_shapes: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
) -> list[PackageResult]:
    """Optimize, quantize and validate ``model`` for each target and write one signed bundle per target.

    ``model`` is an ONNX file, or a PyTorch model (TorchScript file or ``module:factory``, with ``input_shapes``):
    that is exported to ONNX first, and Apple targets also get a native Core ML ``.mlpackage`` (FP16).

    Returns the results in target order. Bad input raises InputError/ConfigError, a budget no candidate meets raises
    AccuracyBudgetError listing every candidate; in every failure case nothing is left in ``out_dir``.
    """
    t_start = time.perf_counter()
    say = progress or (lambda _msg: None)
    if not targets:
        raise ConfigError("at least one --target is needed")
    if isinstance(budget, Budget):
        bud = budget
    else:
        bud = parse_budget(list(budget or []))
    opts = replace(options or PackageOptions(), precision=precision, budget=bud, version=version,
                   model_type=model_type, name=name)
    signing_key = _resolve_key(key)
    profiles = load_profiles(profiles_dir)
    chosen_profiles = [get_profile(t, profiles_dir) for t in dict.fromkeys(targets)]
    from . import torch_input

    torch_module = None
    shapes: dict[str, tuple[int, ...]] = {}
    if torch_input.is_torch_spec(str(model)):
        shapes = _input_shapes(input_shapes)
        if not shapes:
            raise ConfigError("a PyTorch model needs its input shapes (--input-shape NAME=1x3x224x224)")
        torch_module = torch_input.load_torch_model(str(model))
        stem = str(model).rsplit(":", 1)[-1] if ":" in str(model) else Path(model).stem
        bundle_name = name or _safe_name(Path(stem + ".onnx"))
    else:
        src = Path(model)
        if not src.is_file():
            raise InputError(f"model {src} does not exist or is not a file")
        bundle_name = name or _safe_name(src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".edgefleet-package-", dir=out))
    try:
        if torch_module is not None:
            say(f"export {model} to ONNX")
            src = torch_input.export_onnx(torch_module, shapes, staging / "torch" / f"{bundle_name}.onnx")
        coreml: dict[str, Any] | None = None
        if torch_module is not None and any(p.primary_provider == "CoreMLExecutionProvider" for p in chosen_profiles):
            say("convert to a Core ML .mlpackage (FP16)")
            pkg = torch_input.convert_mlpackage(torch_module, shapes, staging / "coreml" / "model.mlpackage")
            coreml = {"path": pkg, "check": torch_input.check_mlpackage(pkg, shapes)}
        say(f"check {src.name}")
        from .steps import CheckConfig, CheckModel

        step = CheckModel()
        t0 = time.perf_counter()
        checked = step.run(src, staging / "check", CheckConfig())
        check_record = StepRecord("check", {}, step.notes, model_size(checked), time.perf_counter() - t0)
        facts = inspect_model(checked)
        calib = _samples(calibration, facts.inputs, "calibration data", opts.min_calibration_samples)
        val = _samples(validation, facts.inputs, "validation data", 1)
        data_note = []
        synthetic = False
        if val is None:
            if calib is not None:
                val = calib
                data_note.append("validated on the calibration data (no --validation given)")
            else:
                val = synthetic_samples(facts.inputs, 4)
                synthetic = True
                data_note.append("no --validation or --calibration: validated on synthetic inputs made from the "
                                 "declared shapes, which says little about real accuracy")
        calib_file = None
        if calib is not None:
            calib_file = staging / "calibration.npz"
            save_validation(calib_file, [(s, {}) for s in calib])
        say(f"reference outputs of the FP32 original ({len(val)} samples)")
        ref_runner = cpu_session(src)
        refs = run_all(ref_runner, val)
        host_cpu = _host_cpu_profile(profiles)
        results: list[tuple[Profile, Manifest, dict[str, Any], Path]] = []
        for prof in chosen_profiles:
            work = staging / f"work-{prof.name}"
            tb = _TargetBuild(prof, src, facts, checked, check_record, calib_file, val, refs, opts, work, host_cpu,
                              say, synthetic)
            chosen, report = tb.build()
            say(f"{prof.name}: chose {chosen.cand.name}; writing bundle")
            extra = coreml if prof.primary_provider == "CoreMLExecutionProvider" else None
            if torch_module is not None:
                report["source"] = {"pytorch": str(model), "input_shapes": {k: list(v) for k, v in shapes.items()},
                                    "exported_to": "ONNX (opset 17, symbolic batch dim)"}
            bundle, manifest = _write(prof, chosen, report, facts, val, refs, opts, bundle_name, signing_key,
                                      staging, src, data_note, calib, t_start, extra)
            results.append((prof, manifest, report, bundle))
        final: list[PackageResult] = []
        for prof, manifest, report, bundle in results:
            dest = out / bundle.name
            os.replace(bundle, dest)
            final.append(PackageResult(prof.name, dest, manifest, report))
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _input_shapes(given: Mapping[str, Sequence[int]] | Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    from .torch_input import parse_input_shapes

    if given is None:
        return {}
    if isinstance(given, Mapping):
        return {str(k): tuple(int(d) for d in v) for k, v in given.items()}
    return parse_input_shapes([str(s) for s in given])


def _safe_name(src: Path) -> str:
    import re

    stem = src.stem if src.stem != "model" else src.parent.name or "model"
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", stem)[:64].strip(".-") or "model"
    return cleaned


def _samples(data: str | os.PathLike[str] | Sequence[Feed] | None, inputs: Sequence[TensorSpec], what: str,
             min_samples: int) -> list[Feed] | None:
    from .data import check_samples

    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return load_samples(data, inputs, what, min_samples)
    samples = [dict(s) for s in data]
    check_samples(samples, inputs, what)
    if len(samples) < min_samples:
        raise InputError(f"{what}: {len(samples)} sample(s), at least {min_samples} needed")
    return samples


def _write(profile: Profile, chosen: _Built, report: dict[str, Any], facts: ModelFacts, val: list[Feed],
           refs: list[dict[str, np.ndarray]], opts: PackageOptions, bundle_name: str, key: PrivateKey,
           staging: Path, src: Path, data_note: list[str], calib: list[Feed] | None,
           t_start: float, coreml: dict[str, Any] | None = None) -> tuple[Path, Manifest]:
    import onnxruntime as ort

    if chosen.model is None:  # only built candidates can pass the gate; a bug if this triggers
        raise PackagingError(f"{profile.name}: chosen candidate {chosen.cand.name} has no model")
    inputs, outputs = io_specs(chosen.model)
    n = min(opts.bundle_samples, len(val))
    measured_on_target = chosen.runner is not None
    tol = _tolerances(chosen.accuracy, outputs, opts.budget, measured_on_target, refs[:n])
    files_dir = staging / f"bundle-{profile.name}"
    files_dir.mkdir()
    files: dict[str, Path] = {}
    for f in sorted(chosen.model.parent.iterdir()):
        if f.name.startswith("model.onnx"):
            files[f"model/{f.name}"] = f
    save_validation(files_dir / "validation.npz", list(zip(val[:n], refs[:n], strict=True)))
    files["validation.npz"] = files_dir / "validation.npz"
    metadata = {}
    if coreml is not None:
        pkg: Path = coreml["path"]
        for f in sorted(pkg.rglob("*")):
            if f.is_file():
                files[f"coreml/model.mlpackage/{f.relative_to(pkg).as_posix()}"] = f
        metadata["coreml_package"] = "coreml/model.mlpackage"
        report["coreml"] = coreml["check"]
    all_records = [*report["base_steps"], *[r.to_dict() for r in chosen.records]]
    contrib = any(r["step"] == "fuse_transformer" for r in all_records) or any(
        r["step"] == "optimize" and r["config"].get("level") not in ("basic", "disabled") for r in all_records)
    min_ort = _min_ort(facts.opset, chosen.records, contrib)
    report.update({
        "edgefleet_packager": 1,
        "model": {"source": src.name, "sha256": sha256_file(src)[0], "size": src.stat().st_size, **facts.to_dict()},
        "data": {"validation_samples": len(val), "calibration_samples": len(calib) if calib else 0,
                 "bundle_samples": n, "notes": data_note},
        "budget": opts.budget.to_dict(),
        "sizes": {"original": src.stat().st_size, "bundle_model": model_size(chosen.model)},
        "tolerances": {k: {"max_abs": v.max_abs, "min_cosine": v.min_cosine} for k, v in tol.items()},
        "min_ort_version": min_ort,
        "host": {"onnxruntime": ort.__version__, "providers": list(_available_providers())},
        "packaging_seconds": round(time.perf_counter() - t_start, 2),
    })
    (files_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    files["report.json"] = files_dir / "report.json"
    manifest = Manifest(
        name=bundle_name, version=opts.version, target=profile.name, precision=chosen.cand.precision,
        model="model/model.onnx", providers=chosen.providers, session=profile.session, inputs=inputs,
        outputs=outputs, files={}, min_ort_version=min_ort,
        validation=ValidationSpec("validation.npz", n, tol), report="report.json",
        metadata={"packager": "edgefleet", "candidate": chosen.cand.name, "source_sha256": report["model"]["sha256"],
                  **metadata},
    )
    path = staging / f"{bundle_name}-{opts.version}-{profile.name}.efb"
    vm: VerifiedManifest = write_bundle(path, manifest, files, key)
    return path, vm.manifest
