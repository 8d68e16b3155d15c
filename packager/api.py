"""``package()``: one model in, one signed bundle per target out, with a report explaining every choice.

The shared work happens once (check the model, read the data, the FP32 original's reference outputs, find the
runtimes); each target is then built by :class:`~edgefleet.packager.orchestration.TargetBuild`, its bundle written
(``bundling.py``) and self-tested in the runtime that will run it. Everything is built in a temporary folder inside
the output folder and renamed into place only when every target succeeded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from edgefleet.devices.profile import Profile, get_profile, load_profiles
from edgefleet.sdk._fs import sha256_file
from edgefleet.sdk.bundle import META_FIXED_SHAPES, Manifest, version_key
from edgefleet.sdk.errors import ConfigError, InputError
from edgefleet.sdk.keys import PrivateKey, load_private_key

from .accuracy import kinds_of
from .bundling import VariantBuild, measurement_metadata, min_ort_version, tolerances, write
from .data import Feed, SampleSource, check_samples, synthetic_samples
from .options import PackageOptions, PackageResult, Progress, ProgressEvent
from .orchestration import RunContext, TargetBuild
from .planning import inspect_model
from .policy import COREML, CPU
from .steps import StepRecord, make_plan, model_size, run_plan
from .worker import Runtimes, cpu_session, run_session

__all__ = ["PackageOptions", "PackageResult", "package"]

log = logging.getLogger("edgefleet.packager")

_MAX_BUNDLE_SAMPLE_BYTES = 64 << 20


def _host_cpu_profile(profiles: Mapping[str, Profile]) -> str | None:
    from edgefleet.devices.detect import detect

    cpu = {n: p for n, p in profiles.items() if p.primary_provider == CPU and len(p.providers) == 1}
    found = detect(cpu).profile
    return found.name if found else None


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
    options: PackageOptions | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> list[PackageResult]:
    """Optimize, quantize and validate ``model`` for each target and write one signed bundle per target.

    ``options`` holds every knob (:class:`PackageOptions`, the same object the CLI builds); keyword ``overrides``
    replace single fields of it (``precision="int8"``, ``calibration="calib.npz"``, ``budget=["cosine=0.995"]``...),
    and an unknown one is a ConfigError. ``model`` is an ONNX file, or a PyTorch model (TorchScript file or
    ``module:factory``, with ``input_shapes``): that is exported to ONNX first, and Apple targets also get a native
    Core ML ``.mlpackage`` (FP16).

    Returns the results in target order. Bad input raises InputError/ConfigError, a budget no candidate meets raises
    AccuracyBudgetError listing every candidate; in every failure case nothing is left in ``out_dir``.
    """
    t_start = time.perf_counter()
    opts = PackageOptions.build(options, **overrides)

    def say(ev: ProgressEvent) -> None:
        log.info("%s", ev.message)
        if progress is not None:
            progress(ev)

    def shared(step: str, msg: str) -> None:
        say(ProgressEvent("", step, 0, 0, msg))

    if not targets:
        raise ConfigError("at least one --target is needed")
    signing_key = _resolve_key(key)
    profiles = load_profiles(opts.profiles_dirs)
    chosen_profiles = [get_profile(t, opts.profiles_dirs) for t in dict.fromkeys(targets)]
    from . import torch_input

    torch_module = None
    shapes = dict(opts.input_shapes)
    if torch_input.is_torch_spec(str(model)):
        if not shapes:
            raise ConfigError("a PyTorch model needs its input shapes (--input-shape NAME=1x3x224x224)")
        torch_module = torch_input.load_torch_model(str(model))
        stem = str(model).rsplit(":", 1)[-1] if ":" in str(model) else Path(model).stem
        bundle_name = opts.name or _safe_name(Path(stem + ".onnx"))
    else:
        src = Path(model)
        if not src.is_file():
            raise InputError(f"model {src} does not exist or is not a file")
        bundle_name = opts.name or _safe_name(src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".edgefleet-package-", dir=out))
    runtimes: Runtimes | None = None
    try:
        if torch_module is not None:
            shared("export", f"export {model} to ONNX")
            src = torch_input.export_onnx(torch_module, shapes, staging / "torch" / f"{bundle_name}.onnx")
        coreml: dict[str, Any] | None = None
        if torch_module is not None and any(p.primary_provider == COREML for p in chosen_profiles):
            shared("coreml", "convert to a Core ML .mlpackage (FP16)")
            pkg = torch_input.convert_mlpackage(torch_module, shapes, staging / "coreml" / "model.mlpackage")
            coreml = {"path": pkg, "check": torch_input.check_mlpackage(pkg, shapes)}
        shared("check", f"check {src.name}")
        from .steps import CheckConfig, CheckModel

        step = CheckModel()
        t0 = time.perf_counter()
        checked = step.run(src, staging / "check", CheckConfig())
        check_record = StepRecord("check", {}, step.notes, model_size(checked), time.perf_counter() - t0)
        shape_record: StepRecord | None = None
        if shapes and torch_module is None:
            # an ONNX model: fix the named inputs' dynamic dims (EPs that compile only static shapes need it)
            shared("shapes", f"fix input shapes {_shapes_text(shapes)}")
            checked, [shape_record] = run_plan(checked, staging / "shapes", make_plan([("fix_shapes",
                                                                                     {"shapes": shapes})]))
        facts = inspect_model(checked)
        budget_bytes = opts.calibration_memory_mb << 20
        calib = _source(opts.calibration, facts.inputs, "calibration data", budget_bytes, staging / "calibration")
        if calib is not None and len(calib) < opts.min_calibration_samples:
            raise InputError(f"calibration data: {len(calib)} sample(s), at least {opts.min_calibration_samples} "
                             f"needed")
        val = _source(opts.validation, facts.inputs, "validation data", budget_bytes, staging / "validation")
        data_notes: list[str] = []
        if val is None:
            if calib is not None:
                val = calib
                data_notes.append("validated on the calibration data (no --validation given): the gate then judges "
                                  "the samples the quantizer saw, which flatters INT8")
            else:
                val = synthetic_samples(facts.inputs, 4)
                data_notes.append("no --validation or --calibration: validated on synthetic inputs made from the "
                                  "declared shapes, which says little about real accuracy")
        shared("reference", f"reference outputs of the FP32 original ({len(val)} samples, streamed)")
        refs = run_session(cpu_session(src), val)
        ref_bytes = sum(int(a.nbytes) for r in refs for a in r.values())
        if ref_bytes > budget_bytes:
            raise InputError(f"validation data: the FP32 outputs of {len(val)} samples take {ref_bytes} bytes, over "
                             f"the memory budget of {budget_bytes} (--memory-budget-mb); use fewer validation samples")
        kinds = kinds_of(refs, opts.output_kinds)
        max_inter = _max_intermediate(checked, val[0], budget_bytes, data_notes) if calib is not None else 0
        runtimes = Runtimes(staging, opts.runtime_python, opts.discover_runtimes)
        ctx = RunContext(opts, src, checked, check_record, facts, str(calib.path) if calib is not None else None,
                         len(calib) if calib is not None else 0, max_inter, val, refs, kinds,
                         _host_cpu_profile(profiles), runtimes, staging, say, data_notes, shape_record)
        trusted = staging / "signer.pub"
        trusted.write_bytes(signing_key.public.to_pem())
        results: list[tuple[Profile, Manifest, dict[str, Any], Path]] = []
        for prof in chosen_profiles:
            tb = TargetBuild(ctx, prof)
            t_target = time.perf_counter()
            chosen, report = tb.build()
            tb.say("write", f"chose {chosen.cand.name}; writing the bundle")
            if torch_module is not None:
                report["source"] = {"pytorch": str(model), "input_shapes": {k: list(v) for k, v in shapes.items()},
                                    "exported_to": "ONNX (opset 17, symbolic batch dim)"}
            extra_files: dict[str, Path] = {}
            metadata: dict[str, str] = {"packager": "edgefleet", "candidate": chosen.cand.name,
                                        "source_sha256": sha256_file(src)[0]}
            if shape_record is not None:
                metadata[META_FIXED_SHAPES] = ";".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())
            kept = next((r for r in chosen.records if r.name == "keep_float"), None)
            if kept is not None:
                # mixed precision: which nodes' outputs stay in float (the full tensor list is in report.json)
                metadata["int8_float_tensors"] = str(len(kept.notes.get("float_tensors", [])))
                metadata["int8_float_nodes"] = ",".join(kept.notes.get("float_nodes", []))[:4000]
            if coreml is not None and prof.primary_provider == COREML:
                pkg = coreml["path"]
                for f in sorted(pkg.rglob("*")):
                    if f.is_file():
                        extra_files[f"coreml/model.mlpackage/{f.relative_to(pkg).as_posix()}"] = f
                metadata["coreml_package"] = "coreml/model.mlpackage"
                report["coreml"] = coreml["check"]
            bundle, manifest = _write(tb, chosen, report, ctx, bundle_name, signing_key, staging, metadata,
                                      extra_files, t_start, t_target)
            selftest = tb.self_test(bundle, trusted)
            report["selftest_here"] = selftest  # in the returned report; the bundle's copy was signed before
            results.append((prof, manifest, report, bundle))
        final: list[PackageResult] = []
        for prof, manifest, report, bundle in results:
            dest = out / bundle.name
            os.replace(bundle, dest)
            final.append(PackageResult(prof.name, dest, manifest, report))
        return final
    finally:
        if runtimes is not None:
            runtimes.close()
        shutil.rmtree(staging, ignore_errors=True)


def _write(tb: TargetBuild, chosen: Any, report: dict[str, Any], ctx: RunContext, bundle_name: str,
           key: PrivateKey, staging: Path, metadata: dict[str, str], extra_files: dict[str, Path],
           t_start: float, t_target: float) -> tuple[Path, Manifest]:
    import onnxruntime as ort

    prof, opts = tb.profile, ctx.opts
    assert chosen.model is not None  # only built candidates pass the gate
    n = min(opts.bundle_samples, len(ctx.validation))
    per = sum(int(a.nbytes) for a in ctx.validation[0].values()) + sum(int(a.nbytes) for a in ctx.refs[0].values())
    n = max(1, min(n, _MAX_BUNDLE_SAMPLE_BYTES // max(per, 1)))
    samples = [(ctx.validation[i], ctx.refs[i]) for i in range(n)]
    tol = _tolerances_for(tb, chosen, ctx, n)
    all_records = [*report["base_steps"], *[r.to_dict() for r in chosen.records]]
    contrib = any(r["step"] == "fuse_transformer" for r in all_records) or any(
        r["step"] == "optimize" and r["config"].get("level") not in ("basic", "disabled") for r in all_records)
    min_ort = min_ort_version(ctx.facts.opset, [r.to_dict() for r in chosen.records], contrib, ort.__version__)
    variants: list[VariantBuild] = []
    for b in tb.variants:  # the chosen candidate first
        if b.model is None:
            continue  # only built candidates become variants (_pick_variants)
        v_tol = tol if b is chosen else _tolerances_for(tb, b, ctx, n)
        v_records = [*report["base_steps"], *[r.to_dict() for r in b.records]]
        v_contrib = any(r["step"] == "fuse_transformer" for r in v_records) or any(
            r["step"] == "optimize" and r["config"].get("level") not in ("basic", "disabled") for r in v_records)
        v_min = min_ort_version(ctx.facts.opset, [r.to_dict() for r in b.records], v_contrib, ort.__version__)
        if version_key(v_min) > version_key(min_ort):
            min_ort = v_min
        v_meta = {"accuracy_on": b.accuracy_on[:500]}
        if b.speed is not None:
            v_meta["packager_speedup"] = f"{b.speed['speedup']:.3f}"
        variants.append(VariantBuild(b.cand.name, b.cand.precision, b.model, b.providers,
                                     b.session or prof.session, v_tol, v_meta))
    metadata.update(_output_reference(chosen.out_specs, ctx))
    measured_on = (f"{chosen.accuracy_on}" if tb.runtime is not None else tb.runtime_why)
    metadata.update(measurement_metadata(tb.runtime is not None, measured_on, chosen.cpu_fraction))
    report.update({
        "edgefleet_packager": 2,
        "options": opts.to_dict(),
        "model": {"source": ctx.src.name, "sha256": metadata["source_sha256"], "size": ctx.src.stat().st_size,
                  **ctx.facts.to_dict()},
        "output_kinds": ctx.kinds,
        "data": {"validation_samples": len(ctx.validation), "calibration_samples": ctx.n_calibration,
                 "bundle_samples": n, "calibration_max_intermediate_outputs": ctx.max_intermediate_outputs or None,
                 "notes": ctx.data_notes},
        "budget": opts.budget.to_dict(),
        "sizes": {"original": ctx.src.stat().st_size, "bundle_model": model_size(chosen.model)},
        "tolerances": {k: v.to_dict() for k, v in tol.items()},
        "variant_tolerances": {v.name: {k: t.to_dict() for k, t in v.tol.items()} for v in variants},
        "min_ort_version": min_ort,
        "host": {"onnxruntime": ort.__version__, "providers": list(ctx.runtimes.local.info.providers)},
        "packaging_seconds": round(time.perf_counter() - t_start, 2),
        "target_seconds": round(time.perf_counter() - t_target, 2),
    })
    path = staging / f"{bundle_name}-{opts.version}-{prof.name}.efb"
    manifest = write(path, name=bundle_name, version=opts.version, target=prof.name,
                     precision=chosen.cand.precision, model=chosen.model, providers=chosen.providers,
                     session=chosen.session or prof.session, inputs=chosen.inputs, outputs=chosen.out_specs,
                     samples=samples, tol=tol, report=report, min_ort=min_ort, metadata=metadata,
                     extra_files=extra_files, key=key, work=staging / f"bundle-{prof.name}", variants=variants)
    return path, manifest


def _output_reference(out_specs: Any, ctx: RunContext) -> dict[str, str]:
    """The output statistic for drift telemetry, chosen from the outputs' kinds, and its distribution over the
    validation data's FP32 outputs (manifest metadata; sdk/outputs.py)."""
    import json

    from edgefleet.sdk.outputs import (
        META_OUTPUT_REFERENCE,
        META_OUTPUT_STAT,
        choose_stat,
        reference_quantiles,
    )

    stat = choose_stat([(o.name, o.dtype) for o in out_specs], ctx.kinds, ctx.refs)
    if stat is None:
        return {}
    values = [v for r in ctx.refs for v in stat.values(r)]
    if not values:
        return {}
    q = [float(f"{x:.6g}") for x in reference_quantiles(values)]
    return {META_OUTPUT_STAT: stat.to_json(), META_OUTPUT_REFERENCE: json.dumps({"q": q, "n": len(values)})}


def _tolerances_for(tb: TargetBuild, b: Any, ctx: RunContext, n: int) -> dict[str, Any]:
    """Device tolerances of one built candidate: from its outputs in the runtime that runs it when it ran there
    (or its own provider is the CPU EP, which runs here), a CPU-EP stand-in otherwise, with the policy's margins."""
    if (tb.runtime is not None and bool(b.outputs) and b.loaded) or (b.cand.cpu_guard and b.outputs):
        how = f"on {b.accuracy_on}"
        margin = tb.policy.margin_measured
    elif b.outputs:
        how = f"on a CPU-EP stand-in for {tb.policy.provider} (the device runtime could not be reached)"
        margin = tb.policy.margin_stand_in
    else:
        how = "unverified: nothing could run this candidate here"
        margin = 0.0
    return tolerances(b.out_specs, b.outputs[:n], ctx.refs[:n], ctx.opts.budget, ctx.kinds, how, margin,
                      tb.policy.unverified_rel)


def _shapes_text(shapes: Mapping[str, Sequence[int]]) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())


def _safe_name(src: Path) -> str:
    import re

    stem = src.stem if src.stem != "model" else src.parent.name or "model"
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", stem)[:64].strip(".-") or "model"
    return cleaned


def _source(data: Any, inputs: Sequence[Any], what: str, budget: int, spill: Path) -> Any:
    """Samples as a lazy sequence: files are streamed (``SampleSource``); feeds given in memory are checked and
    written to a folder (one ``.npz`` per sample) so the calibrator can stream them like files."""
    if data is None:
        return None
    if isinstance(data, (str, os.PathLike)):
        return SampleSource(data, inputs, what, max_bytes=budget)
    samples = [dict(s) for s in data]
    check_samples(samples, inputs, what)
    if not samples:
        raise InputError(f"{what}: no samples given")
    spill.mkdir(parents=True)
    for i, s in enumerate(samples):
        np.savez(spill / f"{i:06d}.npz", **s)  # type: ignore[arg-type]
    return SampleSource(spill, inputs, what, max_bytes=budget)


def _max_intermediate(model: Path, sample: Feed, budget: int, notes: list[str]) -> int:
    """How many samples' intermediate tensors the MinMax calibrator may hold before merging them, to stay within
    ``budget`` bytes: estimated from the model's float tensors at the sample's shapes (shape inference)."""
    import onnx
    from onnx import shape_inference

    try:
        m = onnx.load(str(model), load_external_data=False)
        for inp in m.graph.input:
            if inp.name in sample:
                dims = inp.type.tensor_type.shape.dim
                for d, v in zip(dims, sample[inp.name].shape, strict=False):
                    d.ClearField("dim_param")
                    d.dim_value = int(v)
        m = shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
        per = 0
        for vi in [*m.graph.value_info, *m.graph.output]:
            t = vi.type.tensor_type
            if t.elem_type != onnx.TensorProto.FLOAT or not t.HasField("shape"):
                continue
            dims = [d.dim_value for d in t.shape.dim]
            if dims and all(d > 0 for d in dims):
                per += int(np.prod(dims)) * 4
    except Exception as exc:  # noqa: BLE001 - an estimate; fall back to a conservative count
        notes.append(f"calibration memory not estimated ({exc}); ranges merged every 8 samples")
        return 8
    if per <= 0:
        return 8
    n = max(1, min(64, budget // (2 * per)))
    notes.append(f"calibration holds ~{per / 1e6:.1f} MB of intermediate tensors per sample: ranges merged every "
                 f"{n} sample(s) to stay within the {budget >> 20} MiB memory budget")
    return int(n)


