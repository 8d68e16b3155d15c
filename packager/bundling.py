"""Writing the bundle: device tolerances derived from the target runtime's own outputs, the validation set (checked
not to be vacuous), the minimum ONNX Runtime, the manifest with its measurement labels, and the signature."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet.sdk.bundle import (
    META_CPU_FALLBACK,
    META_MEASURED_ON,
    META_MEASUREMENT,
    Manifest,
    ProviderConfig,
    SessionConfig,
    TensorSpec,
    Tolerance,
    ValidationSpec,
    Variant,
    version_key,
    write_bundle,
)
from edgefleet.sdk.keys import PrivateKey
from edgefleet.sdk.validation import check_self_test_set, save_validation

from .accuracy import Budget

__all__ = ["FLOAT_DTYPES", "VariantBuild", "min_ort_version", "tolerances", "write"]

FLOAT_DTYPES = ("float32", "float16", "float64", "bfloat16")
# opset -> first ONNX Runtime release that implements it (ORT's compatibility table)
_OPSET_ORT = {15: "1.10.0", 16: "1.11.0", 17: "1.13.0", 18: "1.14.0", 19: "1.16.0", 20: "1.17.0", 21: "1.18.0",
              22: "1.20.0", 23: "1.22.0", 24: "1.23.0"}


def min_ort_version(opset: int, records: Sequence[Mapping[str, Any]], contrib: bool, builder_ort: str) -> str:
    """The oldest ONNX Runtime that may load the bundle: the opset's first release, raised to ``builder_ort`` when
    the graph holds fused contrib ops or extended/layout-level rewrites (older runtimes may lack those ops)."""
    need = "1.16.0"
    by_opset = _OPSET_ORT.get(opset)
    if by_opset and version_key(by_opset) > version_key(need):
        need = by_opset
    for r in records:
        if r.get("step") == "upgrade_opset":
            v = _OPSET_ORT.get(int(r.get("notes", {}).get("opset", 0)))
            if v and version_key(v) > version_key(need):
                need = v
    if contrib:
        major, minor = builder_ort.split(".")[:2]
        mine = f"{major}.{minor}.0"
        if version_key(mine) > version_key(need):
            need = mine
    return need


def tolerances(outputs: Sequence[TensorSpec], got: Sequence[Mapping[str, np.ndarray]],
               refs: Sequence[Mapping[str, np.ndarray]], budget: Budget, kinds: Mapping[str, str],
               how: str, margin: float, unverified_rel: float) -> dict[str, Tolerance]:
    """Device self-test limits per float output.

    ``got`` are the chosen candidate's outputs on the bundle's samples *in the runtime and provider that will run it*
    (``how`` says which), or empty when that could not be run here: then the limit is ``unverified_rel`` of the
    output's scale. max_abs is ``margin`` times the worst error measured (at least 1e-4 of the output's scale: other
    CPUs of the device class round differently); the cosine is the budget's; classifier and sequence outputs also
    keep their argmax agreement when the samples' decisions are clear-cut (top-2 gap over 5% of the scale).
    """
    tol = {}
    for spec in outputs:
        if spec.dtype not in FLOAT_DTYPES:
            continue  # integer and bool outputs are compared exactly by the self-test
        rs = [np.asarray(r[spec.name], dtype=np.float64) for r in refs]
        scale = max(float(np.max(np.abs(r))) if r.size else 0.0 for r in rs)
        if got:
            err = max(float(np.max(np.abs(np.asarray(g[spec.name], dtype=np.float64) - r))) if r.size else 0.0
                      for g, r in zip(got, rs, strict=True))
            max_abs = max(margin * err, 1e-4 * scale, 1e-6)
            kind = f"{margin:g}x the max abs error measured {how}"
        else:
            max_abs = unverified_rel * scale + 1e-6
            kind = f"{unverified_rel:.0%} of the output's scale: {how}"
        if not math.isfinite(max_abs):
            max_abs = 1e30
        b = budget.for_output(spec.name)
        per_channel = rs[0].ndim >= 3 and rs[0].shape[1] > 1 and kinds.get(spec.name) != "sequence"
        argmax = None
        if kinds.get(spec.name) in ("classifier", "sequence") and got:
            clear = all(_clear_decisions(r, scale) for r in rs)
            agree = min(float(np.mean(np.argmax(np.asarray(g[spec.name]), axis=-1) == np.argmax(r, axis=-1)))
                        for g, r in zip(got, rs, strict=True))
            if clear and agree >= b.min_step_agreement:
                argmax = min(agree, b.min_step_agreement if kinds.get(spec.name) == "sequence" else 1.0)
        tol[spec.name] = Tolerance(max_abs=float(f"{max_abs:.6g}"), min_cosine=b.min_cosine,
                                   min_channel_cosine=b.min_channel_cosine if per_channel else None,
                                   channel_floor=b.channel_floor if per_channel else 0.0,
                                   min_argmax_agreement=argmax, kind=kind[:200])
    return tol


def _clear_decisions(ref: np.ndarray, scale: float) -> bool:
    if ref.shape[-1] < 2:
        return False
    top2 = np.sort(ref.reshape(-1, ref.shape[-1]), axis=-1)[:, -2:]
    return bool(np.all(top2[:, 1] - top2[:, 0] > 0.05 * max(scale, 1e-30)))


@dataclass(frozen=True)
class VariantBuild:
    """One variant as built and verified, to be written into a multi-variant bundle."""

    name: str
    precision: str
    model: Path
    providers: Sequence[ProviderConfig]
    session: SessionConfig
    tol: Mapping[str, Tolerance]
    metadata: Mapping[str, str]


def _model_files(model: Path) -> dict[str, Path]:
    """The model file and its external-data files (``model.onnx*`` next to it)."""
    return {f.name: f for f in sorted(model.parent.iterdir()) if f.name.startswith("model.onnx")}


def _content_key(files: Mapping[str, Path]) -> str:
    h = hashlib.sha256()
    for fname, f in sorted(files.items()):
        h.update(fname.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def write(path: Path, *, name: str, version: str, target: str, precision: str, model: Path,
          providers: Sequence[ProviderConfig], session: SessionConfig, inputs: Sequence[TensorSpec],
          outputs: Sequence[TensorSpec], samples: Sequence[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
          tol: Mapping[str, Tolerance], report: dict[str, Any], min_ort: str, metadata: Mapping[str, str],
          extra_files: Mapping[str, Path], key: PrivateKey, work: Path,
          variants: Sequence[VariantBuild] = ()) -> Manifest:
    """Check the self-test set is not vacuous, then write and sign the bundle at ``path``.

    ``variants`` (at least two, the first being ``model``/``providers``/``session``/``tol``): a multi-variant
    bundle. Each variant's model folder goes in once per distinct content (``model/<sha256 of its files>/``), so
    variants that run the same bytes on other providers or options share them; the validation inputs and reference
    outputs are the same for all variants (one ``validation.npz``), the tolerances are each variant's own.
    """
    dtypes = {o.name: o.dtype for o in outputs}
    check_self_test_set(samples, tol, dtypes)
    for v in variants:
        check_self_test_set(samples, v.tol, dtypes)
    work.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    model_name = "model/model.onnx"
    listed: list[Variant] = []
    if variants:
        vspec = lambda t: ValidationSpec("validation.npz", len(samples), dict(t))  # noqa: E731
        for v in variants:
            mf = _model_files(v.model)
            folder = f"model/{_content_key(mf)[:16]}"
            for fname, f in mf.items():
                files[f"{folder}/{fname}"] = f
            listed.append(Variant(v.name, v.precision, f"{folder}/{v.model.name}", tuple(v.providers), v.session,
                                  vspec(v.tol), dict(v.metadata)))
        model_name = listed[0].model
    else:
        for fname, f in _model_files(model).items():
            files[f"model/{fname}"] = f
    save_validation(work / "validation.npz", samples)
    files["validation.npz"] = work / "validation.npz"
    (work / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    files["report.json"] = work / "report.json"
    files.update(extra_files)
    manifest = Manifest(
        name=name, version=version, target=target, precision=precision, model=model_name,
        providers=tuple(providers), session=session, inputs=tuple(inputs), outputs=tuple(outputs), files={},
        min_ort_version=min_ort, validation=ValidationSpec("validation.npz", len(samples), dict(tol)),
        report="report.json", metadata=dict(metadata), variants=tuple(listed))
    return write_bundle(path, manifest, files, key).manifest


def measurement_metadata(measured: bool, measured_on: str, cpu_fraction: float | None) -> dict[str, str]:
    """The manifest's measurement labels (strings in ``metadata``, readable by every v1 agent)."""
    meta = {META_MEASUREMENT: "measured" if measured else "unmeasured", META_MEASURED_ON: measured_on[:500]}
    if cpu_fraction is not None:
        meta[META_CPU_FALLBACK] = f"{cpu_fraction:.4f}"
    return meta
