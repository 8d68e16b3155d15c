"""Choosing variants on the device: how good is the pinned variant, and what does choosing cost at install?

For each model: ``package(..., variants=True)`` for this host's CPU profile (a multi-variant bundle of every
candidate within the accuracy budget), then ``--installs`` fresh installs on a local agent installer (real store,
real ORT sessions, the same code the agent daemon runs): each self-tests every variant, times them interleaved
within ``install.variant_budget_s`` and pins one. Separately, every variant is opened again and timed in long
interleaved rounds (``sdk.timing``, ``--judge-s`` seconds): the **choice quality** of an install is the best
variant's median time over the pinned variant's (goal ≥ 0.95: the pinned one is within 5% of the best). The
**install-time cost** is the install's wall time against installing the single-variant bundle of the packager's
own pick (``variants=False``), and the choice's own seconds.

    .venv/bin/python bench/variants.py             # writes bench/results/variants.md and variants.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
sys.path.insert(0, str(ROOT))  # packager_models loads tests/conftest.py, which imports tests.helpers

import packager_models as pm  # noqa: E402
from edgefleet.agent.installer import Installer, bundle_file  # noqa: E402
from edgefleet.agent.registry import Registry  # noqa: E402
from edgefleet.agent.store import Store  # noqa: E402
from edgefleet.packager import PackageOptions, package  # noqa: E402
from edgefleet.sdk.keys import TrustedKeys, generate_keypair  # noqa: E402
from edgefleet.sdk.runtime import Model, ort_info  # noqa: E402
from edgefleet.sdk.timing import TimingPolicy, interleaved_rounds  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GOAL = 0.95
Feeds = list[dict[str, np.ndarray]]


def host_profile() -> str:
    """The CPU profile the agent would detect on this machine (what the bundle is built for)."""
    from edgefleet.devices.detect import detect
    from edgefleet.devices.profile import load_profiles

    cpu = {n: p for n, p in load_profiles().items() if p.primary_provider == "CPUExecutionProvider"
           and len(p.providers) == 1}
    found = detect(cpu).profile
    return found.name if found else "x86-cpu"


def models(names: list[str], work: Path) -> dict[str, tuple[Path, Feeds, Feeds, str]]:
    """name -> (model, calibration, validation, what it is)."""
    makers: dict[str, Callable[[], tuple[Path | None, Callable[[int], Feeds], str]]] = {
        "convnet-128": lambda: (pm.make_convnet(work / "convnet.onnx", size=128),
                                lambda n: pm.photo_samples(n, 128), "conv classifier (tests' convnet, 128x128)"),
        "magika": lambda: (pm.shipped_model("magika"), pm.magika_samples, "byte classifier (magika v3), real files"),
        "yolov8n-320": lambda: (pm.nudenet_model(), lambda n: pm.photo_samples(n, 320, name="images"),
                                "detector (nudenet's YOLOv8n, 320x320), skimage photos"),
    }
    out = {}
    for name in names:
        path, make, what = makers[name]()
        if path is None:
            print(f"skip {name}: its package is not installed", file=sys.stderr)
            continue
        data = make(48)
        out[name] = (path, data[:16], data[16:], what)
    return out


def judge(bundle_dir: Path, trusted: TrustedKeys, names: list[str], seconds: float, cache: Path) -> dict[str, Any]:
    """Every variant opened fresh and timed in long interleaved rounds: per-variant median ms and the per-round
    ratio of each to the fastest (the yardstick the pinned variant is judged by)."""
    sessions = {n: Model.open(bundle_dir, trusted, variant=n, cache_dir=cache / n, verify_files=False)
                for n in names}
    runners = {}
    for n, m in sessions.items():
        feed = m.example_inputs()
        outs = [o.name for o in m.manifest.outputs]
        runners[n] = (lambda s=m.session, o=outs, f=feed: s.run(o, f))
    res = interleaved_rounds(runners, names[0], TimingPolicy(min_rounds=15, max_rounds=400, budget_s=seconds,
                                                            target_halfwidth=0.005, min_call_s=0.05))
    best = min(names, key=lambda n: res.estimates[n].ratio)
    rel = {n: res.compare(n, best) for n in names}
    return {"best": best, "rounds": res.estimates[best].rounds, "seconds": round(res.seconds, 1),
            "median_ms": {n: round(res.estimates[n].median_ms, 4) for n in names},
            "vs_best": {n: {"ratio": round(c.ratio, 4), "ci": [round(c.low, 4), round(c.high, 4)]}
                        for n, c in rel.items()}}


def install(bundle: Path, trusted: TrustedKeys, root: Path, target: str, budget_s: float) -> dict[str, Any]:
    inst = Installer(Store(root), Registry(), trusted, targets=(target,), variant_budget_s=budget_s)
    try:
        sha, size = bundle_file(bundle)
        t0 = time.perf_counter()
        res = inst.install(bundle.as_uri(), sha, size)
        wall = time.perf_counter() - t0
        return {"wall_s": round(wall, 3), "variant": res.variant, "timings_ms": res.timings_ms,
                "choice": res.variants, "digest": res.digest}
    finally:
        inst.store.close()


def run_padded(target: str, key: Path, trusted: TrustedKeys, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A clear winner: the tests' MLP as two variants with exactly the same outputs, the first (the default a
    device that cannot choose runs) padded with a heavy side branch multiplied by zero. Built with the sdk's test
    bundle writer (the packager would never plan the padded one)."""
    from edgefleet.sdk.bundle import SessionConfig
    from edgefleet.sdk.keys import load_private_key
    from edgefleet.sdk.testing import VariantSpec, build_test_variant_bundle

    from tests.conftest import make_mlp, make_padded_mlp

    work.mkdir(parents=True, exist_ok=True)
    good = make_mlp(work / "mlp.onnx")
    padded = make_padded_mlp(good, work / "padded.onnx", layers=4, width=256)
    bundle = build_test_variant_bundle(good, [
        VariantSpec("padded", padded, session=SessionConfig(graph_optimization_level="disabled")),
        VariantSpec("fp32", good)], work / "padded.efb", load_private_key(key), target=target)
    names = ["padded", "fp32"]
    installs = [install(bundle, trusted, work / f"agent-m{i}", target, args.budget) for i in range(args.installs)]
    store = Store(work / f"agent-m{args.installs - 1}")
    try:
        verdict = judge(store.path(installs[-1]["digest"]), trusted, names, args.judge_s, work / "judge-cache")
    finally:
        store.close()
    _quality(installs, verdict)
    return {"model": "mlp-padded", "what": "synthetic: the tests' MLP, and the same with a zero-weighted heavy "
                                           "branch first (same outputs)", "target": target, "variants": names,
            "packager_pick": "padded (first)", "bundle_bytes": {"multi": bundle.stat().st_size, "single": 0},
            "package_s": None, "installs": [{k: v for k, v in r.items() if k != "digest"} for r in installs],
            "single_installs_s": [], "judge": verdict, "quality_min": min(r["quality"] for r in installs),
            "choice_s_median": round(statistics.median(r["choice"]["seconds"] for r in installs), 2),
            "install_s_median": round(statistics.median(r["wall_s"] for r in installs), 2),
            "single_install_s_median": None}


def _quality(installs: list[dict[str, Any]], verdict: dict[str, Any]) -> None:
    for r in installs:
        vb = verdict["vs_best"][r["variant"]]
        r["quality"] = round(1.0 / vb["ratio"], 4)
        # the interval of best/pinned: the ratio's interval inverted
        r["quality_ci"] = [round(1.0 / vb["ci"][1], 4), round(1.0 / vb["ci"][0], 4)]


def run_model(name: str, src: Path, calib: Feeds, val: Feeds, what: str, target: str, key: Path,
              trusted: TrustedKeys, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    opts = PackageOptions(time_budget_s=600.0)
    t0 = time.perf_counter()
    [multi] = package(src, [target], key=key, out_dir=work / "multi", calibration=calib, validation=val,
                      options=opts, variants=True)
    pack_multi = time.perf_counter() - t0
    t0 = time.perf_counter()
    [single] = package(src, [target], key=key, out_dir=work / "single", calibration=calib, validation=val,
                       options=opts, variants=False)
    pack_single = time.perf_counter() - t0
    names = [v.name for v in multi.manifest.variants]
    row: dict[str, Any] = {"model": name, "what": what, "target": target, "variants": names,
                           "packager_pick": multi.report["chosen"]["name"],
                           "bundle_bytes": {"multi": multi.path.stat().st_size, "single": single.path.stat().st_size},
                           "package_s": {"multi": round(pack_multi, 1), "single": round(pack_single, 1)}}
    if len(names) < 2:
        row["note"] = "only one candidate within the accuracy budget: no variants to choose among"
        return row
    installs = []
    for i in range(args.installs):
        installs.append(install(multi.path, trusted, work / f"agent-m{i}", target, args.budget))
    singles = [install(single.path, trusted, work / f"agent-s{i}", target, args.budget) for i in range(args.installs)]
    # judge in the last multi install's store (same bytes, fresh sessions)
    store = Store(work / f"agent-m{args.installs - 1}")
    try:
        verdict = judge(store.path(installs[-1]["digest"]), trusted, names, args.judge_s, work / "judge-cache")
    finally:
        store.close()
    _quality(installs, verdict)
    row.update({
        "installs": [{k: v for k, v in r.items() if k != "digest"} for r in installs],
        "single_installs_s": [r["wall_s"] for r in singles],
        "judge": verdict,
        "quality_min": min(r["quality"] for r in installs),
        "choice_s_median": round(statistics.median(r["choice"]["seconds"] for r in installs), 2),
        "install_s_median": round(statistics.median(r["wall_s"] for r in installs), 2),
        "single_install_s_median": round(statistics.median(r["wall_s"] for r in singles), 2),
    })
    return row


def _machine() -> str:
    info = ort_info()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu} ({os.cpu_count()} cores, {platform.machine()}, shared with other work: load average {load}), "
            f"Python {platform.python_version()}, ONNX Runtime {info.version} ({info.flavour})")


def _q(i: dict[str, Any]) -> str:
    return f"{i['quality']:.3f} [{i['quality_ci'][0]:.3f}-{i['quality_ci'][1]:.3f}]"


def _verdict(rows: list[dict[str, Any]]) -> str:
    """yes: every install's quality >= GOAL; within noise: some below, but their interval reaches GOAL; NO."""
    qs = [i for r in rows for i in r.get("installs", [])]
    if all(i["quality"] >= GOAL for i in qs):
        return "yes"
    if all(i["quality_ci"][1] >= GOAL for i in qs):
        return "within the measurement's noise (a point estimate below the goal, its 95% interval reaching it)"
    return "NO"


def _markdown(res: dict[str, Any]) -> str:
    lines = ["# Variants chosen on the device", "",
             f"Measured {res['when']} by `.venv/bin/python bench/variants.py` on {res['machine']}.", "",
             f"Each model is packaged with `--variants` for `{res['target']}` (this host's CPU profile); each install "
             f"self-tests every variant, times the passing ones interleaved within `install.variant_budget_s = "
             f"{res['budget_s']:g}` and pins the fastest. The judge then opens every variant again and times them in "
             f"long interleaved rounds (up to {res['judge_s']:g} s): quality = best variant's median time / pinned "
             f"variant's (median of per-round ratios, with its 95% interval). Goal: quality ≥ {GOAL}.", "",
             "| model | variants | packager's pick | pinned per install | judge's best (rounds) | quality per install "
             "| install s (multi / single) | choice s | bundle KiB (multi / single) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "installs" not in r:
            lines.append(f"| {r['model']} | {', '.join(r['variants'])} | {r['packager_pick']} | – | – | – | – | – | "
                         f"{r['bundle_bytes']['multi'] // 1024} / {r['bundle_bytes']['single'] // 1024} |")
            continue
        j = r["judge"]
        lines.append(
            f"| {r['model']} | {', '.join(r['variants'])} | {r['packager_pick']} | "
            f"{', '.join(i['variant'] for i in r['installs'])} | {j['best']} ({j['rounds']}) | "
            f"{', '.join(_q(i) for i in r['installs'])} | {r['install_s_median']} / "
            f"{r['single_install_s_median'] if r['single_install_s_median'] is not None else '–'} | "
            f"{r['choice_s_median']} | {r['bundle_bytes']['multi'] // 1024} / "
            f"{r['bundle_bytes']['single'] // 1024 if r['bundle_bytes']['single'] else '–'} |")
    lines += ["", "Per variant, the judge's median ms and ratio to the best with its 95% interval:", ""]
    for r in res["rows"]:
        if "judge" not in r:
            continue
        j = r["judge"]
        parts = [f"{n} {j['median_ms'][n]:.3f} ms ({j['vs_best'][n]['ratio']:.3f}x "
                 f"[{j['vs_best'][n]['ci'][0]:.3f}-{j['vs_best'][n]['ci'][1]:.3f}])" for n in r["variants"]]
        lines.append(f"- {r['model']}: " + "; ".join(parts))
    lines += ["", f"Meets the goal (every install's quality ≥ {GOAL}): {_verdict(res['rows'])}.", "",
              "Raw figures (every install's table): `variants.json` beside this file."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mlp-padded", "convnet-128", "magika"],
                    choices=["mlp-padded", "convnet-128", "magika", "yolov8n-320"])
    ap.add_argument("--installs", type=int, default=3, help="fresh installs per model (each chooses again)")
    ap.add_argument("--budget", type=float, default=20.0, help="install.variant_budget_s")
    ap.add_argument("--judge-s", type=float, default=60.0, help="seconds of the separate measurement per model")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    target = host_profile()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-variants-") as tmp:
        work = Path(tmp)
        key = work / "k.key"
        trusted = TrustedKeys([generate_keypair(key).public])
        if "mlp-padded" in args.models:
            print("mlp-padded: building and installing", file=sys.stderr)
            rows.append(run_padded(target, key, trusted, work / "mlp-padded", args))
        for name, (src, calib, val, what) in models([m for m in args.models if m != "mlp-padded"], work).items():
            print(f"{name}: packaging and installing", file=sys.stderr)
            rows.append(run_model(name, src, calib, val, what, target, key, trusted, work / name, args))
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine(), "target": target,
           "budget_s": args.budget, "judge_s": args.judge_s, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "variants.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "variants.md").write_text(_markdown(res))
    print(_markdown(res))
    return 1 if _verdict(rows) == "NO" else 0


if __name__ == "__main__":
    sys.exit(main())
