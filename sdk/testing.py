"""Build a signed bundle from an ONNX model as is (no optimization), for tests of every component.

The packager is the real way to make bundles; this builds the same format with a plain CPU session computing the
reference outputs, so agent and fleet tests need neither onnx nor the quantization tools.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._fs import sha256_file
from .bundle import (
    Manifest,
    ProviderConfig,
    SessionConfig,
    TensorSpec,
    Tolerance,
    ValidationSpec,
    Variant,
    write_bundle,
)
from .keys import PrivateKey
from .runtime import dtype_from_ort
from .validation import save_validation

__all__ = ["VariantSpec", "build_test_bundle", "build_test_variant_bundle", "output_reference_metadata",
           "random_inputs"]


def random_inputs(session: Any, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching a session's declared inputs (symbolic dims set to ``batch``)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else batch for d in i.shape]
        dtype = np.dtype(dtype_from_ort(i.type))
        if dtype.kind == "f":
            feed[i.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feed[i.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            feed[i.name] = rng.integers(0, 100, shape).astype(dtype)
    return feed


def _spec(arg: Any) -> TensorSpec:
    """Manifest spec of an ORT NodeArg (unnamed symbolic dims become None)."""
    shape = tuple(d if isinstance(d, int) else (d or None) for d in arg.shape)
    return TensorSpec(arg.name, dtype_from_ort(arg.type), shape)


def build_test_bundle(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    key: PrivateKey,
    *,
    name: str = "testmodel",
    version: str = "1.0.0",
    target: str = "x86-cpu",
    precision: str = "fp32",
    providers: Sequence[ProviderConfig] = (ProviderConfig("CPUExecutionProvider"),),
    session: SessionConfig = SessionConfig(),
    samples: Sequence[Mapping[str, np.ndarray]] | None = None,
    tolerance: Tolerance = Tolerance(max_abs=1e-4, min_cosine=0.999),
    extra_files: Mapping[str, str | os.PathLike[str]] | None = None,
    report: Mapping[str, Any] | None = None,
    min_ort_version: str = "1.16.0",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a signed bundle for ``model`` whose validation set is ``samples`` (default: 2 random samples)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = list(samples) if samples is not None else [random_inputs(sess, seed=s) for s in range(2)]
    out_names = [o.name for o in sess.get_outputs()]
    pairs = [(dict(f), dict(zip(out_names, sess.run(out_names, dict(f)), strict=True))) for f in feeds]
    with tempfile.TemporaryDirectory(prefix="edgefleet-testbundle-") as tmp:
        t = Path(tmp)
        shutil.copyfile(model, t / "model.onnx")
        save_validation(t / "validation.npz", pairs)
        (t / "report.json").write_text(json.dumps(report or {"builder": "edgefleet.sdk.testing"}))
        files = {"model/model.onnx": t / "model.onnx", "validation.npz": t / "validation.npz",
                 "report.json": t / "report.json"}
        files.update({k: Path(v) for k, v in (extra_files or {}).items()})
        manifest = Manifest(
            name=name, version=version, target=target, precision=precision, model="model/model.onnx",
            providers=tuple(providers), session=session,
            inputs=tuple(_spec(i) for i in sess.get_inputs()),
            outputs=tuple(_spec(o) for o in sess.get_outputs()),
            files={}, min_ort_version=min_ort_version,
            validation=ValidationSpec("validation.npz", len(pairs), {n: tolerance for n in out_names}),
            report="report.json", metadata=dict(metadata or {}),
        )
        write_bundle(out, manifest, files, key)
    return Path(out)


def output_reference_metadata(model: str | os.PathLike[str], stat: str, output: str,
                              samples: Sequence[Mapping[str, np.ndarray]], softmax: bool = False) -> dict[str, str]:
    """Manifest metadata naming an output statistic and its reference distribution over ``samples`` (what the
    packager writes from validation data; sdk/outputs.py)."""
    import onnxruntime as ort

    from .outputs import META_OUTPUT_REFERENCE, META_OUTPUT_STAT, OutputStat, reference_quantiles

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    st = OutputStat(output, stat, softmax)
    values = [v for f in samples for v in st.values({output: sess.run([output], dict(f))[0]})]
    return {META_OUTPUT_STAT: st.to_json(),
            META_OUTPUT_REFERENCE: json.dumps({"q": reference_quantiles(values), "n": len(values)})}


@dataclass(frozen=True)
class VariantSpec:
    """One variant for :func:`build_test_variant_bundle`: a model file run with these providers and options."""

    name: str
    model: Path
    precision: str = "fp32"
    providers: tuple[ProviderConfig, ...] = (ProviderConfig("CPUExecutionProvider"),)
    session: SessionConfig = field(default_factory=SessionConfig)


def build_test_variant_bundle(
    source: str | os.PathLike[str],
    variants: Sequence[VariantSpec],
    out: str | os.PathLike[str],
    key: PrivateKey,
    *,
    name: str = "testmodel",
    version: str = "1.0.0",
    target: str = "x86-cpu",
    samples: Sequence[Mapping[str, np.ndarray]] | None = None,
    tolerance: Tolerance = Tolerance(max_abs=1e-3, min_cosine=0.999),
) -> Path:
    """A multi-variant bundle: reference outputs from ``source`` on the CPU EP, every variant judged against them with
    ``tolerance``; identical model files are stored once (``model/<sha256[:16]>/model.onnx``)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    feeds = list(samples) if samples is not None else [random_inputs(sess, seed=s) for s in range(2)]
    out_names = [o.name for o in sess.get_outputs()]
    pairs = [(dict(f), dict(zip(out_names, sess.run(out_names, dict(f)), strict=True))) for f in feeds]
    with tempfile.TemporaryDirectory(prefix="edgefleet-testbundle-") as tmp:
        t = Path(tmp)
        save_validation(t / "validation.npz", pairs)
        (t / "report.json").write_text(json.dumps({"builder": "edgefleet.sdk.testing"}))
        files: dict[str, Path] = {"validation.npz": t / "validation.npz", "report.json": t / "report.json"}
        spec = ValidationSpec("validation.npz", len(pairs), {n: tolerance for n in out_names})
        listed = []
        for v in variants:
            arc = f"model/{sha256_file(v.model)[0][:16]}/model.onnx"
            files[arc] = Path(v.model)
            listed.append(Variant(v.name, v.precision, arc, tuple(v.providers), v.session, spec))
        first = listed[0]
        manifest = Manifest(
            name=name, version=version, target=target, precision=first.precision, model=first.model,
            providers=first.providers, session=first.session,
            inputs=tuple(_spec(i) for i in sess.get_inputs()), outputs=tuple(_spec(o) for o in sess.get_outputs()),
            files={}, validation=spec, report="report.json", variants=tuple(listed))
        write_bundle(out, manifest, files, key)
    return Path(out)
