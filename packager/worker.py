"""Run candidates in the target's own runtime: this interpreter when its ONNX Runtime offers the target's provider,
else a worker process started from an environment that does (``.venv-openvino`` found next to the project, or
``--runtime-python PATH``), over a small typed request/response protocol.

Protocol (version 1): one JSON object per line on the worker's stdin (requests) and stdout (replies); arrays travel
in uncompressed ``.npz`` files in a folder both sides can read (the validation-set layout, ``s<i>/in|out/<name>``).
Requests: ``hello``, ``load``, ``run``, ``time``, ``selftest``, ``unload``, ``shutdown``; a reply is
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "...", "code": "..."}``. The worker's stdout carries
nothing else (ONNX Runtime and OpenVINO chatter is moved to stderr, which goes to a log file).

Sessions are made by the device's own code (:class:`edgefleet.sdk.runtime.Model`, no fallback allowed), so a provider
that silently falls back fails here exactly as on a device; the share of nodes ONNX Runtime put on the CPU EP is
reported with every load. The worker imports the sdk, numpy and onnxruntime only (never onnx or the quantizer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from edgefleet.sdk.bundle import Manifest, ProviderConfig, SessionConfig, TensorSpec
from edgefleet.sdk.errors import EdgefleetError, ModelError, PackagingError
from edgefleet.sdk.timing import TimingPolicy, TimingResult, interleaved_rounds
from edgefleet.sdk.validation import load_validation, save_validation

__all__ = [
    "PROTOCOL_VERSION",
    "LoadResult",
    "LocalRuntime",
    "RuntimeInfo",
    "Runtimes",
    "TargetRuntime",
    "WorkerRuntime",
    "cpu_session",
    "main",
]

PROTOCOL_VERSION = 1
CPU = "CPUExecutionProvider"
_CHUNK_BYTES = 64 << 20  # arrays per run request: well below the validation-set reader's cap
Feed = dict[str, np.ndarray]


# -- messages ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RuntimeInfo:
    """An ONNX Runtime a candidate can run in: which interpreter, which ORT build, which providers."""

    python: str
    ort_version: str
    flavour: str
    providers: tuple[str, ...]
    local: bool = True

    def describe(self) -> str:
        """One line for reports: 'onnxruntime-openvino 1.24.1 (worker: /path/python)'."""
        where = "this process" if self.local else f"worker: {self.python}"
        dist = "onnxruntime" if self.flavour == "cpu" else f"onnxruntime-{self.flavour}"
        return f"{dist} {self.ort_version} ({where})"

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"python": self.python, "ort_version": self.ort_version, "flavour": self.flavour,
                "providers": list(self.providers), "local": self.local}


@dataclass(frozen=True)
class LoadResult:
    """A session made in the target runtime: what serves it and how much of the graph fell back to the CPU EP."""

    key: str
    registered: tuple[str, ...]
    nodes: Mapping[str, int]
    session_ms: float

    def cpu_fraction(self, primary: str) -> float | None:
        """Share of nodes on the CPU EP when ``primary`` is another provider (None: not reported by this ORT)."""
        if primary == CPU or not self.nodes:
            return None
        total = sum(self.nodes.values())
        return self.nodes.get(CPU, 0) / total if total else None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"key": self.key, "registered": list(self.registered), "nodes": dict(self.nodes),
                "session_ms": round(self.session_ms, 3)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoadResult:
        """Parse the JSON form."""
        return cls(str(d["key"]), tuple(str(x) for x in d["registered"]),
                   {str(k): int(v) for k, v in dict(d["nodes"]).items()}, float(d["session_ms"]))


@dataclass(frozen=True)
class Request:
    """Base of the protocol's requests: ``op`` names it, ``to_dict``/``from_dict`` carry it."""

    op: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON form with the op name."""
        return {"op": self.op, "v": PROTOCOL_VERSION, **self.__dict__}


@dataclass(frozen=True)
class Hello(Request):
    """Describe the runtime."""

    op: ClassVar[str] = "hello"


@dataclass(frozen=True)
class Load(Request):
    """Create a session for a model file on the given providers and session config."""

    op: ClassVar[str] = "load"
    key: str = ""
    model: str = ""
    providers: list[dict[str, Any]] = field(default_factory=list)
    session: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    cache_dir: str = ""


@dataclass(frozen=True)
class Run(Request):
    """Run every sample of an inputs file; write the outputs to ``output``."""

    op: ClassVar[str] = "run"
    key: str = ""
    inputs: str = ""
    output: str = ""


@dataclass(frozen=True)
class Time(Request):
    """Time sessions against a reference in interleaved rounds (sdk.timing) on one sample."""

    op: ClassVar[str] = "time"
    keys: list[str] = field(default_factory=list)
    reference: str = ""
    feed: str = ""
    policy: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SelfTest(Request):
    """Verify, extract and open a written bundle as a device would, then run its self-test."""

    op: ClassVar[str] = "selftest"
    bundle: str = ""
    trusted: str = ""
    work: str = ""


@dataclass(frozen=True)
class Unload(Request):
    """Drop sessions."""

    op: ClassVar[str] = "unload"
    keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Shutdown(Request):
    """End the worker."""

    op: ClassVar[str] = "shutdown"


REQUESTS: dict[str, type[Request]] = {r.op: r for r in (Hello, Load, Run, Time, SelfTest, Unload, Shutdown)}


def parse_request(d: Any) -> Request:
    """A request from its JSON form; unknown ops, versions and fields are errors."""
    if not isinstance(d, dict) or d.get("v") != PROTOCOL_VERSION:
        raise ValueError(f"not a protocol v{PROTOCOL_VERSION} request: {str(d)[:120]}")
    cls = REQUESTS.get(str(d.get("op")))
    if cls is None:
        raise ValueError(f"unknown op {d.get('op')!r}; known: {sorted(REQUESTS)}")
    body = {k: v for k, v in d.items() if k not in ("op", "v")}
    unknown = set(body) - set(cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{cls.op}: unknown field(s) {sorted(unknown)}")
    return cls(**body)


# -- the runtime interface -------------------------------------------------------------------------------------------

class TargetRuntime(ABC):
    """Where candidates for one target are run: load, run, time, self-test (same API in-process and in a worker)."""

    info: RuntimeInfo

    @abstractmethod
    def load(self, key: str, model: Path, providers: Sequence[ProviderConfig], session: SessionConfig,
             inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], cache_dir: Path) -> LoadResult:
        """Create a session as the device would."""

    @abstractmethod
    def run(self, key: str, samples: Sequence[Feed]) -> list[dict[str, np.ndarray]]:
        """Outputs of every sample."""

    @abstractmethod
    def time(self, keys: Sequence[str], reference: str, feed: Feed, policy: TimingPolicy) -> TimingResult:
        """Interleaved timing of loaded sessions against ``reference``."""

    @abstractmethod
    def self_test(self, bundle: Path, trusted: Path, work: Path) -> dict[str, Any]:
        """Install a bundle into ``work`` as a device would and run its self-test; the report's JSON form."""

    @abstractmethod
    def unload(self, keys: Sequence[str]) -> None:
        """Drop sessions."""

    @abstractmethod
    def close(self) -> None:
        """Release the runtime."""


def _manifest(model: Path, providers: Sequence[ProviderConfig], session: SessionConfig,
              inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> Manifest:
    return Manifest(name="candidate", version="0", target="candidate", precision="fp32", model=model.name,
                    providers=tuple(providers), session=session, inputs=tuple(inputs), outputs=tuple(outputs),
                    files={})


class LocalRuntime(TargetRuntime):
    """This interpreter's ONNX Runtime."""

    def __init__(self) -> None:
        from edgefleet.sdk.runtime import ort_info

        info = ort_info()
        self.info = RuntimeInfo(sys.executable, info.version, info.flavour, info.providers, local=True)
        self._models: dict[str, Any] = {}

    def load(self, key: str, model: Path, providers: Sequence[ProviderConfig], session: SessionConfig,
             inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], cache_dir: Path) -> LoadResult:
        from edgefleet.sdk.runtime import Model

        m = Model(model, _manifest(model, providers, session, inputs, outputs), allow_fallback=False,
                  cache_dir=cache_dir)
        self._models[key] = m
        return LoadResult(key, m.placement.registered, dict(m.placement.nodes), m.session_ms)

    def _model(self, key: str) -> Any:
        try:
            return self._models[key]
        except KeyError:
            raise ModelError(f"no session loaded as {key!r}") from None

    def run(self, key: str, samples: Sequence[Feed]) -> list[dict[str, np.ndarray]]:
        m = self._model(key)
        names = [o.name for o in m.manifest.outputs]
        out = []
        for s in samples:
            try:
                out.append(dict(zip(names, m.session.run(names, dict(s)), strict=True)))
            except Exception as exc:
                raise ModelError(f"inference failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
        return out

    def time(self, keys: Sequence[str], reference: str, feed: Feed, policy: TimingPolicy) -> TimingResult:
        runners = {}
        for k in dict.fromkeys([reference, *keys]):
            m = self._model(k)
            names = [o.name for o in m.manifest.outputs]
            runners[k] = (lambda s=m.session, n=names, f=dict(feed): s.run(n, f))
        return interleaved_rounds(runners, reference, policy)

    def self_test(self, bundle: Path, trusted: Path, work: Path) -> dict[str, Any]:
        from edgefleet.sdk.bundle import extract_bundle
        from edgefleet.sdk.keys import TrustedKeys
        from edgefleet.sdk.runtime import Model

        keys = TrustedKeys.from_paths([trusted])
        dest = Path(tempfile.mkdtemp(prefix="selftest-", dir=work)) / "bundle"
        vm = extract_bundle(bundle, keys, dest)
        if not vm.manifest.variants:
            m = Model.open(dest, keys, cache_dir=dest.parent / "cache")
            report = m.self_test().to_dict()
            report["serving"] = list(m.placement.serving)
            return report
        # a multi-variant bundle: every variant must pass where it was measured, as the device will test each
        per: dict[str, Any] = {}
        for v in vm.manifest.variants:
            m = Model.open(dest, keys, cache_dir=dest.parent / "cache" / v.name, variant=v.name, verify_files=False)
            per[v.name] = {**m.self_test().to_dict(), "serving": list(m.placement.serving)}
            del m
        first = per[vm.manifest.variants[0].name]
        return {**first, "ok": all(r["ok"] for r in per.values()),
                "failures": [f"{n}: {f}" for n, r in per.items() for f in r["failures"]], "variants": per}

    def unload(self, keys: Sequence[str]) -> None:
        for k in keys:
            self._models.pop(k, None)

    def close(self) -> None:
        self._models.clear()


class WorkerRuntime(TargetRuntime):
    """Another interpreter's ONNX Runtime, driven over the worker protocol."""

    def __init__(self, python: str, work: Path, timeout_s: float = 600.0) -> None:
        self.python = python
        self.work = Path(tempfile.mkdtemp(prefix="worker-", dir=work))
        self.log = self.work / "worker.log"
        self.timeout_s = timeout_s
        self._n = 0
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen([python, "-m", "edgefleet.packager.worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, env=env)
        try:
            d = self._call(Hello())
        except Exception:
            self.close()
            raise
        self.info = RuntimeInfo(str(d["python"]), str(d["ort_version"]), str(d["flavour"]),
                                tuple(str(p) for p in d["providers"]), local=False)

    def _call(self, req: Request) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise PackagingError(f"runtime worker {self.python} has exited ({self.proc.returncode}): {self._tail()}")
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write((json.dumps(req.to_dict()) + "\n").encode())
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError) as exc:
            raise PackagingError(f"runtime worker {self.python} is gone: {exc}: {self._tail()}") from exc
        if not line:
            raise PackagingError(f"runtime worker {self.python} closed its output: {self._tail()}")
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise PackagingError(f"runtime worker {self.python} sent a line that is not JSON: {line[:200]!r}") from exc
        if not reply.get("ok"):
            code = reply.get("code", "")
            msg = str(reply.get("error", "unknown error"))
            err_cls = {c.code: c for c in _error_classes()}.get(code, PackagingError)
            raise err_cls(msg)
        return dict(reply.get("result") or {})

    def _tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-600:]
        except OSError:
            return ""

    def _file(self, what: str) -> Path:
        self._n += 1
        return self.work / f"{self._n:05d}-{what}.npz"

    def load(self, key: str, model: Path, providers: Sequence[ProviderConfig], session: SessionConfig,
             inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], cache_dir: Path) -> LoadResult:
        d = self._call(Load(key, str(model), [{"name": p.name, "options": dict(p.options)} for p in providers],
                            _session_dict(session), [_spec_dict(t) for t in inputs], [_spec_dict(t) for t in outputs],
                            str(cache_dir)))
        return LoadResult.from_dict(d)

    def run(self, key: str, samples: Sequence[Feed]) -> list[dict[str, np.ndarray]]:
        out: list[dict[str, np.ndarray]] = []
        for chunk in _chunks(samples):
            src, dst = self._file("in"), self._file("out")
            save_validation(src, [(s, {}) for s in chunk])
            self._call(Run(key, str(src), str(dst)))
            out.extend(o for _, o in load_validation(dst))
            src.unlink(missing_ok=True)
            dst.unlink(missing_ok=True)
        return out

    def time(self, keys: Sequence[str], reference: str, feed: Feed, policy: TimingPolicy) -> TimingResult:
        f = self._file("feed")
        save_validation(f, [(feed, {})])
        d = self._call(Time(list(keys), reference, str(f), policy.to_dict()))
        return TimingResult.from_dict(d)

    def self_test(self, bundle: Path, trusted: Path, work: Path) -> dict[str, Any]:
        return self._call(SelfTest(str(bundle), str(trusted), str(work)))

    def unload(self, keys: Sequence[str]) -> None:
        self._call(Unload(list(keys)))

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._call(Shutdown())
            except EdgefleetError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _error_classes() -> list[type[EdgefleetError]]:
    from edgefleet.sdk import errors

    found: list[type[EdgefleetError]] = []
    for c in vars(errors).values():
        if isinstance(c, type) and issubclass(c, EdgefleetError):
            found.append(c)
    return found


def _chunks(samples: Sequence[Feed]) -> list[list[Feed]]:
    chunks: list[list[Feed]] = [[]]
    size = 0
    for s in samples:
        n = sum(int(a.nbytes) for a in s.values())
        if chunks[-1] and size + n > _CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(s)
        size += n
    return [c for c in chunks if c]


def _session_dict(s: SessionConfig) -> dict[str, Any]:
    return {"graph_optimization_level": s.graph_optimization_level, "intra_op_num_threads": s.intra_op_num_threads,
            "inter_op_num_threads": s.inter_op_num_threads, "execution_mode": s.execution_mode,
            "config_entries": dict(s.config_entries)}


def _spec_dict(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


# -- finding a runtime -----------------------------------------------------------------------------------------------

# Where an environment with another ONNX Runtime flavour is looked for, next to the project (the Makefile's venvs).
FLAVOUR_VENVS = {"openvino": ".venv-openvino", "cuda": ".venv-cuda"}


def discovered_pythons(flavour: str) -> list[Path]:
    """Interpreters of environments named for ``flavour`` next to the project or the current directory."""
    venv = FLAVOUR_VENVS.get(flavour)
    if not venv:
        return []
    roots = [Path(__file__).resolve().parents[1], Path.cwd()]
    found = []
    for root in roots:
        p = root / venv / "bin" / "python"
        if p.exists() and p not in found:
            found.append(p)
    return found


class Runtimes:
    """The runtimes reachable from this packaging run, probed once each: this process, ``--runtime-python``
    interpreters, ``$EDGEFLEET_RUNTIME_PYTHON`` (os.pathsep-separated), and the flavour's venv next to the project."""

    def __init__(self, work: Path, explicit: Sequence[str] = (), discover: bool = True) -> None:
        self.work = work
        self.local = LocalRuntime()
        self.explicit = [str(p) for p in explicit]
        env = os.environ.get("EDGEFLEET_RUNTIME_PYTHON", "")
        self.explicit += [p for p in env.split(os.pathsep) if p]
        self.discover = discover
        self._workers: dict[str, WorkerRuntime | None] = {}
        self.tried: list[str] = []

    def _worker(self, python: str) -> WorkerRuntime | None:
        if python not in self._workers:
            try:
                self._workers[python] = WorkerRuntime(python, self.work)
            except (EdgefleetError, OSError) as exc:
                self.tried.append(f"{python}: {str(exc).splitlines()[0][:200] if str(exc) else exc!r}")
                self._workers[python] = None
        return self._workers[python]

    def for_provider(self, provider: str, flavour: str) -> tuple[TargetRuntime | None, str]:
        """The runtime to measure ``provider`` in, or None and why none could be found."""
        if provider in self.local.info.providers:
            return self.local, f"{provider} in this process ({self.local.info.describe()})"
        pythons = list(self.explicit)
        if self.discover:
            pythons += [str(p) for p in discovered_pythons(flavour)]
        for py in dict.fromkeys(pythons):
            w = self._worker(py)
            if w is not None and provider in w.info.providers:
                return w, f"{provider} in a worker ({w.info.describe()})"
            if w is not None:
                self.tried.append(f"{py}: offers {', '.join(w.info.providers)}, not {provider}")
        looked = "; ".join(self.tried) or "no --runtime-python given and no environment found next to the project"
        return None, (f"{provider} is not in this ONNX Runtime ({self.local.info.describe()}: "
                      f"{', '.join(self.local.info.providers)}) nor in any runtime found ({looked})")

    def close(self) -> None:
        """End every worker."""
        for w in self._workers.values():
            if w is not None:
                w.close()
        self.local.close()


def cpu_session(path: Path, level: str = "all") -> Any:
    """A plain CPU EP session in this process (the FP32 original's reference outputs, CPU stand-ins)."""
    import onnxruntime as ort
    from edgefleet.sdk.runtime import make_session_options

    so = make_session_options(SessionConfig(graph_optimization_level=level))
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=[CPU])
    except Exception as exc:
        raise ModelError(f"cannot load {path.name} on the CPU EP: {str(exc).splitlines()[0]}") from exc


def run_session(sess: Any, samples: Sequence[Feed]) -> list[dict[str, np.ndarray]]:
    """Outputs by name for every sample of a plain ORT session."""
    names = [o.name for o in sess.get_outputs()]
    try:
        return [dict(zip(names, sess.run(names, dict(s)), strict=True)) for s in samples]
    except Exception as exc:
        raise ModelError(f"inference failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc


# -- the worker process ----------------------------------------------------------------------------------------------

def _serve(rt: LocalRuntime, req: Request) -> dict[str, Any]:
    if isinstance(req, Hello):
        return rt.info.to_dict()
    if isinstance(req, Load):
        res = rt.load(req.key, Path(req.model), [ProviderConfig(p["name"], dict(p.get("options") or {}))
                                                 for p in req.providers],
                      SessionConfig.from_dict(req.session), [TensorSpec.from_dict(t) for t in req.inputs],
                      [TensorSpec.from_dict(t) for t in req.outputs], Path(req.cache_dir))
        return res.to_dict()
    if isinstance(req, Run):
        samples = [i for i, _ in load_validation(req.inputs)]
        outs = rt.run(req.key, samples)
        save_validation(req.output, [({}, o) for o in outs])
        return {"output": req.output, "samples": len(outs)}
    if isinstance(req, Time):
        [(feed, _)] = load_validation(req.feed)
        return rt.time(req.keys, req.reference, feed, TimingPolicy.from_dict(req.policy)).to_dict()
    if isinstance(req, SelfTest):
        return rt.self_test(Path(req.bundle), Path(req.trusted), Path(req.work))
    if isinstance(req, Unload):
        rt.unload(req.keys)
        return {}
    return {}


def main() -> int:
    """Serve requests on stdin/stdout until ``shutdown`` or end of input."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    rt = LocalRuntime()
    for line in sys.stdin:
        if not line.strip():
            continue
        t0 = time.perf_counter()
        try:
            req = parse_request(json.loads(line))
            result = _serve(rt, req)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except EdgefleetError as exc:
            req = None
            reply = {"ok": False, "error": str(exc), "code": exc.code}
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reply; the caller decides
            req = None
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "code": ""}
        print(f"worker: {line[:80].strip()} -> ok={reply['ok']} in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
        proto.write(json.dumps(reply) + "\n")
        proto.flush()
        if isinstance(req, Shutdown):
            break
    rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
