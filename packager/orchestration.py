"""Orchestration of one target: base model, candidates, the accuracy gate in the target's runtime, sensitivity
retries, interleaved timing against FP32, the choice, and the bundle with its self-test run where it will run.

Reads top to bottom in :meth:`TargetBuild.build`. Everything measured comes from the runtime that will run the
bundle (this process or a worker, ``worker.py``); where none is reachable the bundle is labelled ``unmeasured`` and
only the provider's conservative precisions are candidates.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet.devices.profile import Profile
from edgefleet.sdk.bundle import ProviderConfig, SessionConfig, TensorSpec
from edgefleet.sdk.errors import AccuracyBudgetError, EdgefleetError, PackagingError, SelfTestError
from edgefleet.sdk.timing import TimingPolicy, TimingResult

from .accuracy import CandidateAccuracy, evaluate
from .choosing import Contender, choose
from .data import Feed
from .options import PackageOptions, ProgressEvent
from .planning import Candidate, ModelFacts, _ov_hint, candidates_for, io_specs, offline_level, trt_shape_options
from .policy import CPU, OPENVINO, TENSORRT, ProviderPolicy, policy_for
from .reporting import budget_text, session_dict
from .sensitivity import float_error, search_float_tensors, tail_tensors
from .steps import StepRecord, StreamingReader, make_plan, model_size, run_plan
from .worker import Runtimes, TargetRuntime, cpu_session, run_session

__all__ = ["Built", "RunContext", "TargetBuild"]


@dataclass
class RunContext:
    """What every target of one packaging run shares."""

    opts: PackageOptions
    src: Path
    checked: Path
    check_record: StepRecord
    facts: ModelFacts
    calibration: str | None
    n_calibration: int
    max_intermediate_outputs: int
    validation: Sequence[Feed]
    refs: list[dict[str, np.ndarray]]
    kinds: dict[str, str]
    host_cpu: str | None
    runtimes: Runtimes
    work: Path
    say: Callable[[ProgressEvent], None]
    data_notes: list[str] = field(default_factory=list)
    shape_record: StepRecord | None = None  # the fix_shapes step (--input-shape on an ONNX model), when it ran


@dataclass
class Built:
    """One candidate as built, gated and timed."""

    cand: Candidate
    model: Path | None = None
    records: list[StepRecord] = field(default_factory=list)
    accuracy: CandidateAccuracy | None = None
    accuracy_on: str = ""
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    providers: tuple[ProviderConfig, ...] = ()
    session: SessionConfig | None = None
    inputs: tuple[TensorSpec, ...] = ()
    out_specs: tuple[TensorSpec, ...] = ()
    key: str = ""
    loaded: bool = False
    cpu_fraction: float | None = None
    nodes: Mapping[str, int] = field(default_factory=dict)
    speed: dict[str, Any] | None = None
    error: str = ""
    source: Path | None = None  # the model the candidate's steps ran on (the base, or the checked model)

    @property
    def ok(self) -> bool:
        return not self.error and self.accuracy is not None and self.accuracy.ok

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.cand.name, "precision": self.cand.precision, "why": self.cand.why,
                "cpu_guard": self.cand.cpu_guard, "steps": [r.to_dict() for r in self.records],
                "providers": [{"name": p.name, "options": dict(p.options)} for p in self.providers],
                "provider_options": {k: dict(v) for k, v in self.cand.provider_options.items()},
                "size": model_size(self.model) if self.model else None,
                "accuracy": self.accuracy.to_dict() if self.accuracy else None, "accuracy_on": self.accuracy_on,
                "cpu_fallback_nodes": None if self.cpu_fraction is None else round(self.cpu_fraction, 4),
                "nodes_by_provider": dict(self.nodes), "speed": self.speed,
                "latency_ms": None if self.speed is None else self.speed.get("median_ms"),
                "within_budget": self.ok, "error": self.error}

    def line(self) -> str:
        if self.error:
            return f"{self.cand.name}: {self.error}"
        lat = (f"{self.speed['speedup']:.2f}x the reference" if self.speed else "latency not measured")
        if self.accuracy is None:
            return f"{self.cand.name}: accuracy unverified ({self.accuracy_on}); {lat}"
        state = "within budget" if self.accuracy.ok else "OVER budget: " + "; ".join(self.accuracy.failures)
        return (f"{self.cand.name}: {state}; " + " | ".join(o.summary() for o in self.accuracy.outputs)
                + f"; {lat} [{self.accuracy_on}]")


class TargetBuild:
    """Everything done for one target (an object so the steps read top to bottom in ``build``)."""

    def __init__(self, ctx: RunContext, profile: Profile) -> None:
        self.ctx, self.profile, self.opts = ctx, profile, ctx.opts
        self.policy: ProviderPolicy = policy_for(profile)
        self.work = ctx.work / f"work-{profile.name}"
        self.notes: list[str] = []
        self.t0 = time.perf_counter()
        self.step_no = 0
        self.total_steps = 6
        self.runtime: TargetRuntime | None
        self.runtime, self.runtime_why = ctx.runtimes.for_provider(profile.primary_provider, self.policy.flavour)
        self.timed = self.runtime is not None and self.opts.measure
        # Threads: the bundle keeps the profile's count (0 = the device's default); timing pins the same explicit
        # count for every candidate and the FP32 yardstick, so they compete at equal threads. When the profile does
        # not say (0: all the device's cores, a number unknown here), they compete at one thread each: measured on
        # this shared 2-core host, two-thread ratios between identical sessions strayed by up to 40% under load,
        # one-thread ratios by 1-5% (bench/results/packager.md, "A/A" column).
        self.bundle_threads = self.opts.threads if self.opts.threads is not None else profile.default_threads
        self.timing_threads = self.bundle_threads or 1
        self.timing: TimingResult | None = None
        self.noise = 0.0
        self.aa: dict[str, Any] | None = None
        # Multi-variant bundle (every verified candidate goes in, the device times them and pins the fastest): asked
        # for, or by default when the target's runtime cannot be reached here, so nothing measured chose for it.
        self.want_variants = (ctx.opts.variants if ctx.opts.variants is not None else self.runtime is None)
        self.variants: list[Built] = []
        self.mixed_precision: dict[str, Any] | None = None

    # -- helpers ---------------------------------------------------------------------------------------------------

    def say(self, step: str, message: str) -> None:
        self.step_no += 1
        self.total_steps = max(self.total_steps, self.step_no + 1)
        self.ctx.say(ProgressEvent(self.profile.name, step, self.step_no, self.total_steps,
                                   f"{self.profile.name}: {message}"))

    def left_s(self) -> float:
        return self.opts.time_budget_s - (time.perf_counter() - self.t0)

    # -- the build ---------------------------------------------------------------------------------------------------

    def build(self) -> tuple[Built, dict[str, Any]]:
        p, opts, ctx = self.profile, self.opts, self.ctx
        level, level_reason = offline_level(p, ctx.host_cpu)
        base_items: list[tuple[str, dict[str, Any]]] = []
        fuse = bool(opts.model_type) or ctx.facts.transformer
        if fuse and self.policy.contrib_ops:
            base_items.append(("fuse_transformer", {"model_type": opts.model_type or "bert"}))
        elif fuse:
            self.notes.append(f"transformer fusion skipped: {p.primary_provider} does not take ORT contrib ops")
        base_items.append(("optimize", {"level": "basic"}))
        self.say("base", f"base model ({', '.join(n for n, _ in base_items)})")
        base, base_records = run_plan(ctx.checked, self.work / "base", make_plan(base_items))
        cands, skipped = candidates_for(p, ctx.facts, opts.precision, ctx.calibration is not None, level,
                                        measurable=self.timed, compare_cpu=opts.compare_cpu)
        self.notes.extend(skipped)
        cands = self._enough_samples(cands)
        self.total_steps = 2 + len(cands) + 3
        # the yardstick first: it is the safe choice if the time budget runs out
        ref = next((c for c in cands if c.cpu_guard), None) or next((c for c in cands if c.precision == "fp32"), None)
        order = ([ref] if ref else []) + [c for c in cands if c is not ref]
        built: list[Built] = []
        for i, c in enumerate(order):
            if c.last_resort and any(b.ok and b.cand.int8 for b in built):
                self.notes.append(f"{c.name} not built: an INT8 candidate before it is within budget")
                continue
            if c is not ref and self.left_s() <= 0 and any(b.ok for b in built):
                self.notes.append(f"{c.name} not built: the time budget ({opts.time_budget_s:.0f} s) is spent")
                continue
            self.say("candidate", f"candidate {c.name}")
            built.append(self._build(c, base, self.work / f"cand{i}"))
        built.sort(key=lambda b: cands.index(b.cand))  # back to the planned (expected-fastest-first) order
        if opts.precision in ("auto", "int8") or not any(b.ok for b in built):
            built.extend(self._retry_int8(built, base))
        self._time(built)
        chosen, why, decision = self._choose(built)
        if self.want_variants:
            built.extend(self._extra_variants(built, base, cands))
            self.variants = self._pick_variants(built, chosen)
        report = {
            "target": p.name, "profile_description": p.description, "primary_provider": p.primary_provider,
            "policy": self.policy.to_dict(),
            "runtime": {"found": self.runtime is not None, "why": self.runtime_why,
                        "info": self.runtime.info.to_dict() if self.runtime else None},
            "measurement": "measured" if self.runtime is not None else "unmeasured",
            "offline_optimization": {"level": level, "reason": level_reason},
            "base_steps": [ctx.check_record.to_dict(),
                           *([ctx.shape_record.to_dict()] if ctx.shape_record else []),
                           *[r.to_dict() for r in base_records]],
            "candidates": [b.to_dict() for b in built],
            "chosen": {"name": chosen.cand.name, "precision": chosen.cand.precision, "why": why,
                       "decision": decision},
            "timing": self.timing.to_dict() if self.timing else None,
            "threads": {"bundle": self.bundle_threads, "timed_at": self.timing_threads if self.timed else None,
                        "reason": "the bundle keeps the profile's count (0: the device's default); every candidate "
                                  "and the FP32 yardstick are timed at the same explicit count (the profile's, or 1 "
                                  "when it leaves the count to the device)"},
            "notes": self.notes,
            "mixed_precision": self.mixed_precision,
            "measured_here": self.timed,
            "not_measured": [] if self.timed else [
                self.runtime_why + ": latency not measured; accuracy checked on a CPU-EP stand-in where one exists"
                if self.runtime is None else "latency not measured: timing turned off (--no-measure)"],
            "session": {"config": session_dict(chosen.session or p.session), "reason": p.session_reason},
            "variants": {"asked": opts.variants, "built": self.want_variants,
                         "names": [b.cand.name for b in self.variants],
                         "why": ("" if not self.want_variants else
                                 "every candidate within budget ships; the device self-tests and times them and "
                                 "pins the fastest that passes" if len(self.variants) > 1 else
                                 "only one candidate within budget: a plain single-variant bundle")},
        }
        return chosen, report

    def _extra_variants(self, built: list[Built], base: Path, cands: Sequence[Candidate]) -> list[Built]:
        """Unmeasured targets plan only the conservative precisions; a multi-variant bundle also carries the others
        that can be verified here (on the target's runtime or a CPU-EP stand-in): the device times them."""
        if self.timed:
            return []
        more, _ = candidates_for(self.profile, self.ctx.facts, self.opts.precision, self.ctx.calibration is not None,
                                 offline_level(self.profile, self.ctx.host_cpu)[0], measurable=True,
                                 compare_cpu=self.opts.compare_cpu)
        have = {c.name for c in cands}
        # only what can be verified here (a stand-in exists), and float layers at the hint the stand-in verified
        more = [c for c in more if c.proxy_possible and not (c.lossy and not self.policy.stand_in.get(c.precision))]
        for c in more:
            if self.policy.hints and c.provider_options:
                c.provider_options = _ov_hint(self.profile, "fp32")
        if [c for c in more if c.name not in have]:
            self.notes.append(f"variants: {', '.join(c.name for c in more if c.name not in have)} built as well and "
                              f"verified here where they can be; they ship as variants only: the device self-tests "
                              f"and times every variant and pins one only where it passes")
        out = []
        for i, c in enumerate(self._enough_samples([c for c in more if c.name not in have])):
            if self.left_s() <= 0:
                self.notes.append(f"variant {c.name} not built: the time budget ({self.opts.time_budget_s:.0f} s) "
                                  "is spent")
                continue
            self.say("candidate", f"variant {c.name}")
            out.append(self._build(c, base, self.work / f"variant{i}"))
        return out

    def _pick_variants(self, built: Sequence[Built], chosen: Built) -> list[Built]:
        """The chosen candidate first (what a device that cannot choose runs), then every other verified one in the
        planned order; fewer than two: no variants."""
        out = [chosen]
        for b in built:
            if b is not chosen and b.ok and b.model is not None and b.outputs \
                    and all(b.cand.name != o.cand.name for o in out):
                out.append(b)
        if len(out) < 2:
            self.notes.append("variants: only one candidate is within budget, so the bundle holds one")
            return []
        return out

    def _enough_samples(self, cands: list[Candidate]) -> list[Candidate]:
        n, need = len(self.ctx.validation), self.opts.min_validation_samples
        if self.opts.precision != "auto" or n >= need:
            if self.opts.precision != "auto" and n < need and any(c.lossy for c in cands):
                self.notes.append(f"only {n} validation samples (a lossy candidate needs {need} for auto to trust "
                                  f"the gate): --precision {self.opts.precision} was asked for, so it is built; the "
                                  f"gate's verdict on so few samples is weak")
            return cands
        keep = [c for c in cands if not c.lossy]
        dropped = [c.name for c in cands if c.lossy]
        if dropped:
            self.notes.append(
                f"auto left out {', '.join(dropped)}: {n} validation sample(s), at least {need} needed before a "
                f"lossy candidate can be trusted (a candidate wrong on 1 input in 10 passes {need} samples by chance "
                f"with probability {0.9 ** need:.1%}, {n} samples with {0.9 ** n:.0%}); give --validation with "
                f">= {need} samples")
        return keep or cands

    def _providers(self, c: Candidate, timing: bool) -> tuple[tuple[ProviderConfig, ...], SessionConfig]:
        p = self.profile
        threads = self.timing_threads if timing else self.bundle_threads
        if c.cpu_guard:
            return (ProviderConfig(CPU),), SessionConfig(graph_optimization_level="all",
                                                         intra_op_num_threads=threads)
        extra: dict[str, dict[str, str]] = {}
        if self.policy.provider == TENSORRT:
            extra = {TENSORRT: trt_shape_options(self.ctx.facts.inputs, self.ctx.validation[0],
                                                 self.opts.trt_max_batch)}
        if self.policy.hints and threads:
            # OpenVINO runs its own thread pool: pin it too, or the equal-threads comparison is not equal
            extra.setdefault(self.policy.provider, {})["num_of_threads"] = str(threads)
        out = []
        for pr in p.providers:
            opts = {**pr.options, **c.provider_options.get(pr.name, {}), **extra.get(pr.name, {})}
            out.append(ProviderConfig(pr.name, opts))
        return tuple(out), replace(p.session, intra_op_num_threads=threads)

    def _items(self, steps: Sequence[tuple[str, dict[str, Any]]], source: Path) -> list[tuple[str, dict[str, Any]]]:
        """A candidate's steps with the run's calibration data filled in, and a range cache shared by the candidates
        quantizing the same ``source`` with the same method (ranges of another graph would not fit)."""
        import hashlib

        tag = hashlib.sha256(str(source).encode()).hexdigest()[:10]
        items = []
        for n, cfg in steps:
            if n == "quantize_static":
                method = cfg.get("method", "minmax")
                cfg = {**cfg, "calibration": self.ctx.calibration or "",
                       "max_intermediate_outputs": self.ctx.max_intermediate_outputs,
                       "calibration_cache": str(self.work / f"calibration-{method}-{tag}.json")}
            items.append((n, cfg))
        return items

    def _build(self, c: Candidate, base: Path, work: Path) -> Built:
        b = Built(c, key=f"{self.profile.name}/{c.name}")
        ctx = self.ctx
        loading = False
        try:
            items = self._items(c.steps, base)
            try:
                b.source = base
                b.model, b.records = run_plan(base, work, make_plan(items))
            except PackagingError as exc:
                if not c.int8:
                    raise
                # ORT's quantizer fails on some ORT-optimized graphs (measured: Magika after basic-level constant
                # folding) that it quantizes fine unoptimized; the device's session optimizes at load either way.
                b.source = ctx.checked
                items = self._items(c.steps, ctx.checked)
                b.model, b.records = run_plan(ctx.checked, work / "from-checked", make_plan(items))
                self.notes.append(f"{c.name}: quantized the checked model instead of the optimized base, "
                                  f"which the quantizer refused ({str(exc)[:160]})")
            b.inputs, b.out_specs = io_specs(b.model)
            b.providers, b.session = self._providers(c, timing=False)
            if self.runtime is not None:
                providers, session = self._providers(c, timing=True)
                loading = True
                res = self.runtime.load(b.key, b.model, providers, session, b.inputs, b.out_specs,
                                        self.work / "cache")
                loading = False
                b.loaded = True
                b.nodes = dict(res.nodes)
                if not c.cpu_guard:
                    b.cpu_fraction = res.cpu_fraction(self.policy.provider)
                where = CPU if c.cpu_guard else self.policy.provider
                b.accuracy_on = f"{where} in {self.runtime.info.describe()}"
                b.outputs = self.runtime.run(b.key, ctx.validation)
                limit = self.profile.max_cpu_fallback
                if b.cpu_fraction is not None and b.cpu_fraction > limit and not c.cpu_guard:
                    b.error = (f"{b.cpu_fraction:.0%} of the nodes run on the CPU EP instead of "
                               f"{self.policy.provider}, over the profile's limit of {limit:.0%} "
                               f"({self.profile.max_cpu_fallback_reason or 'max_cpu_fallback'})")
            elif c.proxy_possible and self.policy.stand_in.get(c.precision):
                proxy = b.model
                if c.proxy_steps:
                    proxy, _ = run_plan(b.model, work / "proxy", make_plan(c.proxy_steps))
                b.outputs = run_session(cpu_session(proxy), ctx.validation)
                b.accuracy_on = ("CPUExecutionProvider, its own provider, in this ONNX Runtime" if c.cpu_guard else
                                 "CPU EP stand-in for " + self.policy.provider +
                                 (" (FP16 weights: the worst case of per-layer FP16)" if c.proxy_steps else ""))
            else:
                b.accuracy_on = f"unverified: {self.policy.provider} does not run here and has no CPU stand-in " \
                                f"for {c.precision}"
                return b
            b.accuracy = evaluate(b.outputs, ctx.refs, self.opts.budget, kinds=ctx.kinds)
        except (EdgefleetError, OSError, ValueError) as exc:
            b.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            if loading and not c.cpu_guard:
                b.error = self._dynamic_hint(b.inputs) + b.error
        return b

    def _dynamic_hint(self, inputs: Sequence[TensorSpec]) -> str:
        """The likely cause and the fix, first in the reason, when OpenVINO cannot compile a graph with dynamic input
        dims (measured: MiniLM and silero-vad fail in OpenVINO's Expand with symbolic dims, compile once fixed)."""
        dynamic = {t.name: t.shape for t in inputs if any(not isinstance(d, int) for d in t.shape)}
        if self.policy.provider != OPENVINO or not dynamic:
            return ""
        shapes = ", ".join(f"{k} {list(v)}" for k, v in dynamic.items())
        return (f"{self.policy.provider} could not compile it, and its input dims are dynamic ({shapes}): fix the "
                f"shape with --input-shape NAME=D1xD2... (OpenVINO often compiles only static shapes); ")

    def _retry_int8(self, built: list[Built], base: Path) -> list[Built]:
        """Accuracy-aware mixed precision before giving up static INT8: keep the output tail, then the measured
        most harmful runs of tensors, in float, re-gating each step in the target's runtime; the first passing model
        is a candidate like the others (timed, chosen or not on its speed). Skipped when it cannot win (the failing
        candidate is not faster than FP32 even over budget)."""
        failing = next((b for b in built if b.cand.int8 == "static" and b.model and b.accuracy and not b.accuracy.ok
                        and not b.error), None)
        if failing is None or not self.opts.mixed_precision_rounds:
            return []
        if self.left_s() <= 0:
            self.notes.append(f"{failing.cand.name} not retried: the time budget is spent")
            return []
        ahead = next((b for b in built[:built.index(failing)] if b.ok), None)
        if not self.timed and ahead is not None:
            self.notes.append(f"{failing.cand.name} not retried in mixed precision: {ahead.cand.name}, ahead of it "
                              f"in the planned order, is within budget")
            return []
        ref = self._reference(built)
        if self.timed and ref is not None and failing.loaded and self.runtime is not None:
            # a quick look: keeping tensors in float only adds work, so a candidate that is not faster than FP32, or
            # than the fastest candidate already within budget, even with every tensor quantized cannot win
            rivals = [b for b in built if b.ok and b.loaded and b is not ref and b is not failing]
            screen = self.runtime.time([failing.key, *(b.key for b in rivals)], ref.key, self.ctx.validation[0],
                                       TimingPolicy(min_rounds=3, max_rounds=5, budget_s=10.0,
                                                    target_halfwidth=0.05))
            cmp = screen.compare(failing.key, ref.key)
            if not cmp.faster(self.opts.tie_margin):
                self.notes.append(f"{failing.cand.name} not retried in mixed precision: over budget it already runs "
                                  f"at {1 / cmp.ratio:.2f}x {ref.cand.name}, not faster with confidence (keeping "
                                  f"tensors in float only adds work)")
                return []
            best = min(rivals, key=lambda b: screen.compare(b.key, ref.key).ratio, default=None)
            if best is not None:
                vs = screen.compare(failing.key, best.key)
                if not vs.faster(0.0):
                    self.notes.append(f"{failing.cand.name} not retried in mixed precision: over budget it runs at "
                                      f"{1 / vs.ratio:.2f}x {best.cand.name} (within budget), not faster with "
                                      f"confidence (keeping tensors in float only adds work)")
                    return []
        src = failing.source or base
        if not self.ctx.calibration:
            return []
        t0 = time.perf_counter()

        def mixed(floats: Sequence[str], method: str) -> list[tuple[str, dict[str, Any]]]:
            steps: list[tuple[str, dict[str, Any]]] = []
            for n, cfg in failing.cand.steps:
                if n == "quantize_static":
                    # Relu/Clip kept with their own Q/DQ, so a tensor put back in float still passes through them
                    steps.append((n, {**cfg, "keep_removable_activations": True, "method": method}))
                    steps.append(("keep_float", {"tensors": list(floats)}))
                else:
                    steps.append((n, cfg))
            return steps

        # The search runs on calibration samples, the gate on the validation set: the search cannot fit the gate.
        reader = StreamingReader(Path(self.ctx.calibration), src)
        samples = [s for s in (reader.get_next() for _ in range(min(8, len(reader)))) if s is not None]
        # Calibration method, measured: with the output tail in float, the profile's method and Percentile (clips
        # the rare outliers MinMax spends its 256 steps on) are compared on the output error; the lower one is
        # searched. Measured on YOLOv8n: tail + MinMax F1 0.36, tail + Percentile F1 0.90 on the worst photo.
        first = next(cfg for n, cfg in failing.cand.steps if n == "quantize_static")
        methods = list(dict.fromkeys([str(first.get("method", "minmax")), "percentile"]))
        tried: dict[str, tuple[float, Path, list[str]]] = {}
        for method in methods:
            if tried and self.left_s() <= 0:
                break
            try:
                upto = mixed([], method)
                upto = upto[:next(i for i, (n, _) in enumerate(upto) if n == "keep_float")]
                q, _ = run_plan(src, self.work / f"mixed-q-{method}", make_plan(self._items(upto, src)))
                tail = tail_tensors(q, src)
                tried[method] = (float_error(q, src, samples, tail, self.work / "mixed-err",
                                             self.opts.budget.channel_floor), q, tail)
            except (EdgefleetError, ValueError, RuntimeError) as exc:
                self.notes.append(f"mixed precision with {method} calibration not tried: "
                                  f"{str(exc).splitlines()[0][:200]}")
        if not tried:
            return []
        method = min(tried, key=lambda k: (round(tried[k][0], 6), methods.index(k)))
        _, quantized, floats = tried[method]
        calibration = {k: round(v[0], 5) for k, v in tried.items()}
        trail: list[dict[str, Any]] = []
        out: list[Built] = []
        for i in range(self.opts.mixed_precision_rounds + 1):
            if self.left_s() <= 0:
                self.notes.append("mixed-precision search stopped: the time budget is spent")
                break
            if time.perf_counter() - t0 > self.opts.mixed_precision_s:
                # measured on the bench set: rounds past ~90 s on a loaded 2-core host never passed the gate
                self.notes.append(f"mixed-precision search stopped after {self.opts.mixed_precision_s:.0f} s "
                                  f"(mixed_precision_s)")
                break
            how = "the output tail (from the graph outputs back to the last Conv/MatMul/Gemm)"
            if i > 0 or not floats:
                self.say("sensitivity", f"{failing.cand.name} over budget, measuring which tensors to keep in float")
                try:
                    left = min(self.left_s(), self.opts.mixed_precision_s - (time.perf_counter() - t0))
                    res = search_float_tensors(quantized, src, samples, self.work / f"search{i}", start=floats,
                                               deadline=time.monotonic() + max(5.0, left),
                                               channel_floor=self.opts.budget.channel_floor)
                except Exception as exc:  # noqa: BLE001 - the search is an aid; report and go on
                    self.notes.append(f"mixed-precision search failed: {str(exc).splitlines()[0][:200]}")
                    break
                trail.append({"round": i, "evaluations": res.evaluations, "error_before": round(res.error_before, 5),
                              "error_after": round(res.error_after, 5), "float_tensors": len(res.tensors)})
                if len(res.tensors) == len(floats):
                    self.notes.append(f"mixed-precision search round {i}: no run of tensors lowers the output error "
                                      f"further ({res.error_before:.4f}); stopped")
                    break
                how = (f"round {i}: the run of tensors whose float copy lowered the output error most "
                       f"({res.error_before:.3f} -> {res.error_after:.3f} on {len(samples)} calibration samples)")
                floats = res.tensors
            c = replace(failing.cand, name=f"{failing.cand.name}-excl{len(floats)}", steps=mixed(floats, method),
                        why=failing.cand.why + f"; mixed precision: {len(floats)} activation tensor(s) kept in float, "
                            f"{how}; {method} calibration (output error with the tail in float: "
                            f"{', '.join(f'{k} {v}' for k, v in calibration.items())})")
            self.say("candidate", f"candidate {c.name}")
            current = self._build(c, src, self.work / f"retry{i}")
            out.append(current)
            if current.ok or current.model is None or current.accuracy is None:
                break
        self.mixed_precision = {"from": failing.cand.name, "seconds": round(time.perf_counter() - t0, 2),
                                "calibration": method, "calibration_errors": calibration,
                                "candidates": [b.cand.name for b in out], "search": trail,
                                "passed": next((b.cand.name for b in out if b.ok), None)}
        return out

    def _reference(self, built: Sequence[Built]) -> Built | None:
        """The FP32 yardstick timed against: FP32 on the CPU EP (the guard) where the target's provider is another,
        else the target's own FP32."""
        return (next((b for b in built if b.cand.cpu_guard and b.ok and b.loaded), None)
                or next((b for b in built if b.cand.precision == "fp32" and b.ok and b.loaded), None))

    def _time(self, built: list[Built]) -> None:
        if not self.timed or self.runtime is None:
            return
        ref = self._reference(built)
        timed = [b for b in built if b.ok and b.loaded]
        if ref is None or len(timed) < 2:
            if ref is None and timed:
                self.notes.append("no FP32 yardstick within budget to time against: not timed")
            return
        budget = max(5.0, min(self.opts.timing.budget_s, self.left_s()))
        policy = replace(self.opts.timing, budget_s=budget)
        self.say("timing", f"timing {len(timed)} candidates against {ref.cand.name} in interleaved rounds "
                           f"({self.timing_threads} thread(s), up to {budget:.0f} s)")
        # An A/A pair: a second session of the yardstick, timed like any candidate. When its interval excludes 1.0,
        # two sessions of one model differ (placement, compilation, the neighbours' rhythm), a bias no interval of
        # one session's rounds can see: a challenger must then clear that offset as well as the floor.
        twin = ref.key + "#twin"
        providers, session = self._providers(ref.cand, timing=True)
        self.runtime.load(twin, ref.model, providers, session, ref.inputs, ref.out_specs,  # type: ignore[arg-type]
                          self.work / "cache")
        self.timing = self.runtime.time([b.key for b in timed] + [twin], ref.key, self.ctx.validation[0], policy)
        self.runtime.unload([twin])
        aa = self.timing.estimates.pop(twin)
        self.timing.times_ms.pop(twin)
        # An offset within the twin's own interval is chance, and the rounds' spread is already in every challenger's
        # interval: counting it made the margin swing from run to run (the offset alone, PP-OCRv4 rec for OpenVINO,
        # three consecutive runs: 12.3%, 2.8%, 0.6%).
        self.noise = 0.0 if aa.low <= 1.0 <= aa.high else abs(1.0 - aa.ratio)
        self.aa = aa.to_dict()
        for b in timed:
            e = self.timing.estimates[b.key]
            b.speed = {**e.to_dict(), "reference": ref.cand.name}

    def _choose(self, built: Sequence[Built]) -> tuple[Built, str, dict[str, Any]]:
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
                           f"checked on this host ({b.accuracy_on}): the device self-test is the check"), {}
            lines = "\n  ".join(b.line() for b in built)
            raise AccuracyBudgetError(f"{self.profile.name}: no candidate within the accuracy budget "
                                      f"({budget_text(self.opts.budget)}):\n  {lines}")
        if explicit and self.opts.precision == "int8" and not any(b.cand.int8 for b in ok):
            lines = "\n  ".join(b.line() for b in built if b.cand.int8)
            raise AccuracyBudgetError(f"{self.profile.name}: INT8 was asked for and no INT8 candidate could be built "
                                      f"within the accuracy budget ({budget_text(self.opts.budget)}):\n  {lines}")
        keyed = {b.key: b for b in built}
        contenders = [Contender(b.key, b.cand.simplicity, b.ok, b.cand.cpu_guard) for b in built]
        if explicit:
            # an explicit precision restricts the choice; the CPU guard is only a yardstick then
            contenders = [c for c in contenders if not c.guard or not any(
                x.ok and not x.guard for x in contenders)]
        ref = self._reference(built)
        label = "FP32 on the CPU EP" if ref is not None and ref.cand.cpu_guard else "FP32"
        margin = max(self.opts.tie_margin, self.noise)
        choice = choose(contenders, self.timing, margin, self.policy.provider,
                        f"{label} at {self.timing_threads} thread(s)")
        choice.decision["aa_noise"] = round(self.noise, 4)
        choice.decision["aa"] = self.aa
        chosen = keyed[choice.name]
        why = choice.why.replace(f"{self.profile.name}/", "")
        rejected = [b.cand.name for b in built if not b.ok]
        if rejected:
            why += f"; over budget or failed: {', '.join(rejected)}"
        if not self.timed:
            why += f"; latency not measured: {self._why_not_timed()}"
        decision = {k: (v.replace(f"{self.profile.name}/", "") if isinstance(v, str) else v)
                    for k, v in choice.decision.items()}
        return chosen, why, _strip_keys(decision, f"{self.profile.name}/")

    def _why_not_timed(self) -> str:
        if self.runtime is None:
            return self.runtime_why
        return "timing turned off (measure=False / --no-measure)"

    def self_test(self, bundle: Path, trusted: Path) -> dict[str, Any] | None:
        """Run the written bundle's self-test in the target's runtime, as the device will (None: unreachable)."""
        if self.runtime is None:
            return None
        self.say("self-test", f"self-test of the bundle on {self.runtime.info.describe()}")
        report = self.runtime.self_test(bundle, trusted, self.work)
        if not report.get("ok"):
            raise SelfTestError(f"{self.profile.name}: the bundle fails its own self-test on "
                                f"{self.runtime.info.describe()}: {'; '.join(report.get('failures', []))}")
        return report


def _strip_keys(obj: Any, prefix: str) -> Any:
    if isinstance(obj, dict):
        return {(k.replace(prefix, "") if isinstance(k, str) else k): _strip_keys(v, prefix) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_strip_keys(v, prefix) for v in obj]
    if isinstance(obj, str):
        return obj.replace(prefix, "")
    return obj
