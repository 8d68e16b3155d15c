"""``edgefleet package``: a thin click command over :func:`edgefleet.packager.package`, with rich progress."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .plan import precision_choices

__all__ = ["package"]


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _human(report: dict[str, Any], path: Path) -> list[str]:
    chosen = report["chosen"]
    sizes = report["sizes"]
    lines = [f"{report['target']}: {path.name}  precision={chosen['precision']} ({chosen['name']})  "
             f"model {_size(sizes['original'])} -> {_size(sizes['bundle_model'])}",
             f"  why: {chosen['why']}",
             f"  offline optimization: {report['offline_optimization']['level']} "
             f"({report['offline_optimization']['reason']})"]
    for c in report["candidates"]:
        if c["error"]:
            lines.append(f"  - {c['name']}: failed: {c['error']}")
            continue
        lat = f"{c['latency_ms']:.3f} ms" if c["latency_ms"] is not None else "not timed"
        acc = c["accuracy"]
        if acc is None:
            lines.append(f"  - {c['name']}: accuracy unverified ({c['accuracy_on']}), {lat}")
            continue
        worst = min(acc["outputs"], key=lambda o: o["cosine"])
        state = "ok" if c["within_budget"] else "over budget: " + "; ".join(acc["failures"])
        top1 = f", top1 {worst['top1']:.1%}" if worst.get("top1") is not None else ""
        lines.append(f"  - {c['name']}: {state}; worst cosine {worst['cosine']:.5f} ({worst['name']}){top1}, {lat}")
    for n in [*report["notes"], *report["not_measured"], *report["data"]["notes"]]:
        lines.append(f"  note: {n}")
    return lines


@click.command("package")
@click.argument("model")
@click.option("-t", "--target", "targets", multiple=True, required=True,
              help="Target profile (repeatable), e.g. x86-cpu-vnni, intel-openvino-cpu, nvidia-gpu, apple-silicon.")
@click.option("--precision", type=click.Choice(precision_choices), default="auto", show_default=True,
              help="auto tries every precision the target supports, fastest expected first, and keeps the fastest "
                   "measured (or first, where the target's EP cannot run here) within the accuracy budget.")
@click.option("--calibration", type=click.Path(exists=True, path_type=Path),
              help="Calibration data for static INT8: one .npz keyed by input name (samples on axis 0) or a folder "
                   "of .npz/.npy files, one sample each.")
@click.option("--validation", type=click.Path(exists=True, path_type=Path),
              help="Validation data in the same layout (default: the calibration data).")
@click.option("--accuracy-budget", "budget", multiple=True, metavar="[OUTPUT:]METRIC=VALUE",
              help="Accuracy limits (repeatable): cosine, top1, channel_cosine (minimums), max_abs, max_rel, "
                   "mean_rel (maximums), channel_floor (channels peaking below it are not judged). Default: "
                   "cosine=0.99 top1=0.99 channel_cosine=0.9 channel_floor=0.05 on every output.")
@click.option("--name", help="Bundle name (default: the model file's name).")
@click.option("--version", "version", default="1.0.0", show_default=True, help="Bundle version.")
@click.option("--model-type", help="Transformer type for fusion (bert, gpt2, vit, ...); default: detected.")
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path), envvar="EDGEFLEET_SIGNING_KEY",
              help="Ed25519 private key to sign with (or $EDGEFLEET_SIGNING_KEY). Required: devices only install "
                   "bundles signed by a key they trust (`edgefleet keys generate`).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Output folder for the bundles.")
@click.option("--profiles", "profiles_dir", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Extra profile folder (repeatable).")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDx...",
              help="For a PyTorch MODEL (TorchScript file or module:factory): input name and shape, repeatable.")
@click.option("--no-measure", is_flag=True, help="Do not time candidates (pick by expected order).")
@click.option("--json", "as_json", is_flag=True, help="Print the packaging reports as JSON.")
def package(model: str, targets: tuple[str, ...], precision: str, calibration: Path | None,
            validation: Path | None, budget: tuple[str, ...], name: str | None, version: str,
            model_type: str | None, key: Path | None, out_dir: Path, profiles_dir: tuple[str, ...],
            input_shapes: tuple[str, ...], no_measure: bool, as_json: bool) -> None:
    """Optimize, quantize and validate MODEL into one signed bundle per --target.

    MODEL is an ONNX file, or a PyTorch model (a TorchScript file, or module:factory) with --input-shape: it is
    exported to ONNX, and apple-silicon bundles also carry a native Core ML .mlpackage (FP16).
    """
    from rich.console import Console

    from .api import PackageOptions
    from .api import package as run

    console = Console(stderr=True)
    opts = PackageOptions(measure=not no_measure)
    with console.status("packaging", spinner="dots") as status:
        def progress(msg: str) -> None:
            status.update(msg)
            if not as_json:
                console.log(msg)

        results = run(model, list(targets), key=key, out_dir=out_dir, calibration=calibration,
                      validation=validation, precision=precision, budget=list(budget), name=name, version=version,
                      model_type=model_type, profiles_dir=profiles_dir, options=opts, progress=progress,
                      input_shapes=list(input_shapes) or None)
    if as_json:
        payload = [{"target": r.target, "bundle": str(r.path), "report": r.report} for r in results]
        click.echo(json.dumps(payload, indent=2, sort_keys=True, default=str))
        return
    for r in results:
        for line in _human(r.report, r.path):
            click.echo(line)
    sys.stdout.flush()
