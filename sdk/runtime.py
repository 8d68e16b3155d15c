"""The on-device runtime: an ONNX Runtime session made from a verified bundle, on the provider it asks for.

No silent provider fallback: the bundle's providers must all be offered by this ONNX Runtime, ``get_providers()``
must list them after session creation, and the graph assignment must give the preferred provider at least one node
(where ORT can report assignments). ``allow_fallback=True`` runs anyway and records what actually serves.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ._onnx_external import check_external_data
from .bundle import Manifest, ProviderConfig, SessionConfig, TensorSpec, VerifiedManifest, read_installed, version_key
from .errors import (
    BundleCompatibilityError,
    InputError,
    ModelError,
    ProviderFallbackError,
    ProviderUnavailableError,
    SelfTestError,
)
from .keys import TrustedKeys
from .outputs import OutputStat
from .sketch import LatencyRecorder
from .validation import (
    OutputCheck,
    check_channels,
    check_outputs,
    check_self_test_set,
    load_validation,
    output_scales,
)

__all__ = [
    "BenchmarkResult",
    "Model",
    "OrtInfo",
    "ProviderPlacement",
    "SelfTestReport",
    "dtype_from_ort",
    "make_session_options",
    "ort_info",
]

log = logging.getLogger("edgefleet.runtime")

_ORT_FLAVOURS = (
    ("onnxruntime-openvino", "openvino"),
    ("onnxruntime-gpu", "cuda"),
    ("onnxruntime-directml", "directml"),
    ("onnxruntime-qnn", "qnn"),
    ("onnxruntime", "cpu"),
)
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(uint16)": "uint16", "tensor(int32)": "int32", "tensor(uint32)": "uint32", "tensor(int64)": "int64",
    "tensor(uint64)": "uint64", "tensor(bool)": "bool", "tensor(string)": "string",
}
_OPT_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}


def dtype_from_ort(ort_type: str) -> str:
    """Manifest dtype for an ORT type string such as ``tensor(float)``."""
    try:
        return _ORT_TYPES[ort_type]
    except KeyError:
        raise ModelError(f"unsupported ONNX Runtime type {ort_type!r}") from None


@dataclass(frozen=True)
class OrtInfo:
    """The installed ONNX Runtime: version, flavour (which wheel) and the providers it offers."""

    version: str
    flavour: str
    providers: tuple[str, ...]


def ort_info() -> OrtInfo:
    """Describe the ONNX Runtime this process imports (the flavour comes from the installed distribution)."""
    import onnxruntime as ort

    flavour = "unknown"
    for dist, name in _ORT_FLAVOURS:
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        flavour = name
        break
    return OrtInfo(ort.__version__, flavour, tuple(ort.get_available_providers()))


def make_session_options(cfg: SessionConfig) -> Any:
    """An ``ort.SessionOptions`` from the manifest's session config."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    level = _OPT_LEVELS[cfg.graph_optimization_level]
    if not hasattr(ort.GraphOptimizationLevel, level):  # "layout" is new in recent ORT; older ones know "all"
        level = "ORT_ENABLE_ALL"
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = cfg.intra_op_num_threads
    so.inter_op_num_threads = cfg.inter_op_num_threads
    so.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if cfg.execution_mode == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    for k, v in cfg.config_entries.items():
        so.add_session_config_entry(k, v)
    return so


@dataclass(frozen=True)
class ProviderPlacement:
    """Which providers serve the session: asked for, registered by ORT, and nodes assigned to each."""

    requested: tuple[str, ...]
    registered: tuple[str, ...]
    nodes: Mapping[str, int]
    fallback: bool
    reason: str = ""

    @property
    def serving(self) -> tuple[str, ...]:
        """Providers that run at least one node (registered ones when ORT cannot report assignments)."""
        if self.nodes:
            return tuple(p for p in self.registered if self.nodes.get(p, 0) > 0)
        return self.registered

    def to_dict(self) -> dict[str, Any]:
        """JSON form for telemetry and reports."""
        return {"requested": list(self.requested), "registered": list(self.registered), "nodes": dict(self.nodes),
                "serving": list(self.serving), "fallback": self.fallback, "reason": self.reason}


@dataclass(frozen=True)
class BenchmarkResult:
    """Latency statistics of ``n`` timed runs, plus cold start, in milliseconds."""

    runs: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput: float
    session_ms: float
    first_run_ms: float

    def to_dict(self) -> dict[str, float | int]:
        """JSON form."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class SelfTestReport:
    """Result of running the bundle's validation set on this device."""

    ok: bool
    samples: int
    checks: list[OutputCheck] = field(default_factory=list)

    @property
    def failures(self) -> list[OutputCheck]:
        """The output checks that failed."""
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        """JSON form (worst value per output)."""
        worst: dict[str, dict[str, float]] = {}
        for c in self.checks:
            w = worst.setdefault(c.name, {"max_abs": 0.0, "cosine": 1.0})
            w["max_abs"] = max(w["max_abs"], c.max_abs)
            w["cosine"] = min(w["cosine"], c.cosine)
        return {"ok": self.ok, "samples": self.samples, "outputs": worst,
                "failures": [f"{c.name}: {c.reason}" for c in self.failures]}


def _np_dtype(dtype: str) -> np.dtype[Any] | None:
    if dtype in ("bfloat16", "string"):
        return None
    return np.dtype(dtype)


class _InputCheck:
    """Precomputed per-input checks so validation costs little on the hot path."""

    __slots__ = ("dtype", "fixed", "name", "rank", "spec")

    def __init__(self, spec: TensorSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.dtype = _np_dtype(spec.dtype)
        self.rank = len(spec.shape)
        self.fixed = tuple((i, d) for i, d in enumerate(spec.shape) if isinstance(d, int))

    def check(self, arr: Any) -> None:
        if not isinstance(arr, np.ndarray):
            raise InputError(f"input {self.name!r}: expected a numpy array, got {type(arr).__name__}")
        if self.dtype is not None and arr.dtype != self.dtype:
            raise InputError(f"input {self.name!r}: dtype {arr.dtype} given, model expects {self.spec.dtype}")
        if arr.ndim != self.rank:
            raise InputError(f"input {self.name!r}: rank {arr.ndim} (shape {list(arr.shape)}) given, model expects "
                             f"rank {self.rank} {list(self.spec.shape)}")
        shape = arr.shape
        for i, d in self.fixed:
            if shape[i] != d:
                raise InputError(f"input {self.name!r}: dim {i} is {shape[i]}, model expects {d} "
                                 f"(shape {list(self.spec.shape)})")


# Provider options whose value is a directory the EP writes into (TensorRT engine/timing caches, OpenVINO cache_dir,
# CoreML ModelCacheDirectory): created before the session so the EP never fails on a missing directory.
_DIR_OPTION_SUFFIXES = ("_path", "cache_dir", "Directory")


def _fill_options(p: ProviderConfig, cache_dir: Path) -> dict[str, str]:
    """The provider's options with ``{cache_dir}`` filled in; directories named by them are created."""
    out = {}
    for k, v in p.options.items():
        if "{cache_dir}" in v:
            v = v.replace("{cache_dir}", str(cache_dir))
            if k.endswith(_DIR_OPTION_SUFFIXES):
                Path(v).mkdir(parents=True, exist_ok=True)
        out[k] = v
    return out


def _placement(sess: Any, requested: Sequence[str], allow_fallback: bool, notes: list[str]) -> ProviderPlacement:
    registered = tuple(sess.get_providers())
    nodes: dict[str, int] = {}
    getter = getattr(sess, "get_provider_graph_assignment_info", None)
    if getter is not None:
        try:
            for sub in getter():
                nodes[sub.ep_name] = nodes.get(sub.ep_name, 0) + len(sub.get_nodes())
        except Exception as exc:  # noqa: BLE001 - diagnostics only; ORT builds differ in what they record
            log.debug("graph assignment info unavailable: %s", exc)
            nodes = {}
    primary = requested[0]
    problem = ""
    if primary not in registered:
        problem = f"{primary} was asked for but ONNX Runtime registered only {list(registered)}"
    elif nodes and nodes.get(primary, 0) == 0:
        total = sum(nodes.values())
        where = ", ".join(f"{k}: {v}" for k, v in sorted(nodes.items()))
        problem = f"{primary} is registered but runs 0 of {total} nodes ({where}): ORT fell back silently"
    if problem and not allow_fallback:
        raise ProviderFallbackError(problem)
    reason = "; ".join([*notes, problem] if problem else notes)
    return ProviderPlacement(tuple(requested), registered, nodes, bool(problem or notes), reason)


class Model:
    """A bundle's model in an ORT session on the bundle's provider, with input checks and a latency recorder."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        manifest: Manifest,
        *,
        root: Path | None = None,
        allow_fallback: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        digest: str = "",
    ) -> None:
        import onnxruntime as ort

        self.manifest = manifest
        self.model_path = Path(model_path)
        self.root = root
        self.digest = digest
        self.variant: str | None = None  # the variant of a multi-variant bundle this session runs (Model.open)
        info = ort_info()
        self.ort = info
        if version_key(info.version) < version_key(manifest.min_ort_version):
            raise BundleCompatibilityError(
                f"bundle {manifest.name} {manifest.version} needs ONNX Runtime >= {manifest.min_ort_version}, "
                f"this device has {info.version}"
            )
        requested = [p for p in manifest.providers]
        notes: list[str] = []
        missing = [p.name for p in requested if p.name not in info.providers]
        if missing:
            msg = (f"bundle {manifest.name} {manifest.version} ({manifest.target}) asks for {', '.join(missing)}, "
                   f"but ONNX Runtime {info.version} ({info.flavour}) offers only {', '.join(info.providers)}")
            if not allow_fallback:
                raise ProviderUnavailableError(msg)
            notes.append(msg)
            requested = [p for p in requested if p.name in info.providers] or [ProviderConfig("CPUExecutionProvider")]
        default_cache = Path(tempfile.gettempdir()) / "edgefleet-cache" / (digest or manifest.name)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache
        providers = [(p.name, _fill_options(p, self.cache_dir)) for p in requested]
        so = make_session_options(manifest.session)
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        if all(name != "CPUExecutionProvider" for name, _ in providers):
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        self._session_options = so
        self._providers = providers
        if root is not None:
            # Before ORT sees the model: old ORT builds follow external-data paths out of the bundle directory.
            check_external_data(root, manifest.model, manifest.files)
        t0 = time.perf_counter()
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
        except Exception as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "fallback" in text.lower() or "not assigned" in text.lower():
                raise ProviderFallbackError(f"{providers[0][0]} cannot run the whole model and CPU fallback is "
                                            f"disabled: {text}") from exc
            raise ModelError(f"cannot create an ONNX Runtime session for {model_path}: {text}") from exc
        self.session_ms = (time.perf_counter() - t0) * 1000.0
        self.first_run_ms: float | None = None
        self.placement = _placement(self.session, [n for n, _ in providers], allow_fallback, notes)
        if self.placement.fallback:
            log.warning("provider fallback for %s %s: %s", manifest.name, manifest.version, self.placement.reason)
        self._checks = [_InputCheck(t) for t in manifest.inputs]
        self._input_names = frozenset(t.name for t in manifest.inputs)
        self._output_names = [t.name for t in manifest.outputs]
        self.recorder = LatencyRecorder(now=time.monotonic())
        # Output drift (sdk/outputs.py): the statistic the packager chose, one value per sample of every request,
        # in a sketch of its own (the latency sketch's code: a window recorder of non-negative values).
        self.output_stat: OutputStat | None = None
        try:
            self.output_stat = OutputStat.from_metadata(manifest.metadata)
        except ValueError as exc:
            log.warning("no output drift statistics for %s %s: %s", manifest.name, manifest.version, exc)
        if self.output_stat is not None and self.output_stat.output not in self._output_names:
            log.warning("no output drift statistics for %s %s: output %r is not the model's",
                        manifest.name, manifest.version, self.output_stat.output)
            self.output_stat = None
        self.output_recorder = LatencyRecorder(now=time.monotonic())
        self._stat_failed = False

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        trusted: TrustedKeys,
        *,
        verify_files: bool = True,
        allow_fallback: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        variant: str | None = None,
    ) -> Model:
        """Open an extracted bundle: re-verify its signature (and file hashes), then create the session.

        ``variant``: which of a multi-variant bundle's variants to run (default: the first, the top-level one); its
        model, providers, session options and self-test set replace the top-level ones in ``Model.manifest``.
        """
        root = Path(directory)
        vm: VerifiedManifest = read_installed(root, trusted, verify_files=verify_files)
        manifest = vm.manifest
        chosen = manifest.variants[0].name if manifest.variants else None
        if variant is not None:
            try:
                manifest = manifest.variant(variant)
            except KeyError as exc:
                raise BundleCompatibilityError(str(exc.args[0])) from None
            chosen = variant
        model_path = root.joinpath(*PurePosixPath(manifest.model).parts)
        m = cls(model_path, manifest, root=root, allow_fallback=allow_fallback, cache_dir=cache_dir,
                digest=vm.digest)
        m.variant = chosen
        return m

    @property
    def name(self) -> str:
        """Bundle name."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """Bundle version."""
        return self.manifest.version

    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """Raise InputError naming the first input that is missing, extra, or of the wrong dtype, rank or dims."""
        if inputs.keys() != self._input_names:
            missing = sorted(self._input_names - inputs.keys())
            extra = sorted(set(inputs) - self._input_names)
            parts = []
            if missing:
                parts.append(f"missing input(s) {missing}")
            if extra:
                parts.append(f"unknown input(s) {extra}")
            raise InputError(f"{'; '.join(parts)}; model inputs are {sorted(self._input_names)}")
        for c in self._checks:
            c.check(inputs[c.name])

    def run(self, inputs: Mapping[str, Any], run_options: Any = None) -> dict[str, np.ndarray]:
        """Check inputs, run the session, record the latency; returns outputs by name.

        ``run_options``: an ``onnxruntime.RunOptions`` (the agent sets its ``terminate`` when a request's deadline
        passes).
        """
        self.check_inputs(inputs)
        t0 = time.perf_counter()
        try:
            outs = self.session.run(self._output_names, inputs, run_options)
        except Exception as exc:
            self.recorder.record_error()
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"inference failed: {text}") from exc
        ms = (time.perf_counter() - t0) * 1000.0
        if self.first_run_ms is None:
            self.first_run_ms = ms
        self.recorder.record(ms)
        result = dict(zip(self._output_names, outs, strict=True))
        if self.output_stat is not None:
            self._record_output(result)
        return result

    def _record_output(self, outputs: Mapping[str, np.ndarray]) -> None:
        """Add this request's output statistic to the drift sketch; a failure never fails the request."""
        try:
            record = self.output_recorder.record
            for v in self.output_stat.values(outputs):  # type: ignore[union-attr]
                record(v if v < 1e9 else 1e9)
        except Exception as exc:  # noqa: BLE001 - statistics are an aid; serving goes on
            if not self._stat_failed:
                self._stat_failed = True
                log.warning("output statistic failed for %s %s: %s", self.manifest.name, self.manifest.version, exc)

    def example_inputs(self, dim_value: int = 1) -> dict[str, np.ndarray]:
        """Inputs for warm-up and benchmarks: the first validation sample, else zeros with symbolic dims set."""
        if self.manifest.validation and self.root is not None:
            samples = load_validation(self.root.joinpath(*PurePosixPath(self.manifest.validation.file).parts))
            if samples:
                return samples[0][0]
        out = {}
        for t in self.manifest.inputs:
            shape = [d if isinstance(d, int) else dim_value for d in t.shape]
            out[t.name] = np.zeros(shape, dtype=_np_dtype(t.dtype) or np.float32)
        return out

    def warmup(self, runs: int = 3, inputs: Mapping[str, Any] | None = None) -> None:
        """Run a few times so the first real request does not pay for lazy initialisation."""
        feed = dict(inputs) if inputs is not None else self.example_inputs()
        for _ in range(runs):
            t0 = time.perf_counter()
            self.session.run(self._output_names, feed)
            if self.first_run_ms is None:
                self.first_run_ms = (time.perf_counter() - t0) * 1000.0

    def benchmark(self, runs: int = 100, inputs: Mapping[str, Any] | None = None, warmup: int = 3) -> BenchmarkResult:
        """Time ``runs`` calls of the bare session (inputs checked once) after ``warmup`` calls."""
        if runs < 1:
            raise ValueError(f"runs must be >= 1, got {runs}")
        feed = dict(inputs) if inputs is not None else self.example_inputs()
        self.check_inputs(feed)
        self.warmup(warmup, feed)
        times = np.empty(runs)
        run = self.session.run
        names = self._output_names
        start = time.perf_counter()
        for i in range(runs):
            t0 = time.perf_counter()
            run(names, feed)
            times[i] = time.perf_counter() - t0
        wall = time.perf_counter() - start
        ms = times * 1000.0
        return BenchmarkResult(
            runs=runs, p50_ms=float(np.percentile(ms, 50)), p95_ms=float(np.percentile(ms, 95)),
            p99_ms=float(np.percentile(ms, 99)), mean_ms=float(ms.mean()), min_ms=float(ms.min()),
            throughput=runs / wall if wall > 0 else 0.0, session_ms=self.session_ms,
            first_run_ms=float(self.first_run_ms or 0.0),
        )

    def self_test(self) -> SelfTestReport:
        """Run the bundle's validation set and compare each output with its reference within the tolerances."""
        v = self.manifest.validation
        if v is None or self.root is None:
            raise SelfTestError(f"bundle {self.name} {self.version} has no validation set to self-test with")
        samples = load_validation(self.root.joinpath(*PurePosixPath(v.file).parts))
        if len(samples) != v.samples:
            raise SelfTestError(f"validation set has {len(samples)} samples, manifest says {v.samples}")
        # a self-test that cannot fail proves nothing: refused before anything runs
        check_self_test_set(samples, v.tolerances, {o.name: o.dtype for o in self.manifest.outputs})
        scales = output_scales(samples)
        checks: list[OutputCheck] = []
        outs: list[dict[str, np.ndarray]] = []
        for inputs, refs in samples:
            try:
                self.check_inputs(inputs)
                got = dict(zip(self._output_names, self.session.run(self._output_names, inputs), strict=True))
            except (InputError, Exception) as exc:
                raise SelfTestError(f"self-test could not run: {exc}") from exc
            checks.extend(check_outputs(got, refs, v.tolerances, self._output_names, scales))
            outs.append(got)
        for name, tol in v.tolerances.items():
            ch = check_channels(name, [o[name] for o in outs], [r[name] for _, r in samples], tol)
            if ch is not None:
                checks.append(ch)
        return SelfTestReport(ok=all(c.ok for c in checks), samples=len(samples), checks=checks)

    def profile(self, runs: int = 20, inputs: Mapping[str, Any] | None = None) -> dict[str, dict[str, float]]:
        """Time per op type (and provider) from ORT's profiler, in a separate profiling session."""
        import onnxruntime as ort

        feed = dict(inputs) if inputs is not None else self.example_inputs()
        so = make_session_options(self.manifest.session)
        so.enable_profiling = True
        with tempfile.TemporaryDirectory(prefix="edgefleet-prof-") as tmp:
            so.profile_file_prefix = str(Path(tmp) / "ort")
            sess = ort.InferenceSession(str(self.model_path), sess_options=so, providers=self._providers)
            for _ in range(runs):
                sess.run(self._output_names, feed)
            trace = json.loads(Path(sess.end_profiling()).read_text())
        totals: dict[str, dict[str, float]] = defaultdict(lambda: {"ms": 0.0, "calls": 0.0})
        for ev in trace:
            args = ev.get("args") or {}
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time") and "op_name" in args:
                key = f"{args['op_name']}@{args.get('provider', '?')}"
                totals[key]["ms"] += ev.get("dur", 0) / 1000.0 / runs
                totals[key]["calls"] += 1.0 / runs
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]["ms"]))
