"""``edgefleet package``: a thin click command over :func:`edgefleet.packager.package`, with rich progress."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .options import PRECISION_CHOICES as precision_choices

__all__ = ["package"]


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
              help="Input name and shape, repeatable (NAME=1x64 or NAME=1,64). For an ONNX MODEL: fixes that "
                   "input's dynamic dims in the bundle (EPs such as OpenVINO may compile only static shapes); "
                   "calibration and validation data must have that shape. For a PyTorch MODEL: the export shapes.")
@click.option("--no-measure", is_flag=True,
              help="Do not time candidates (auto then keeps the conservative precisions).")
@click.option("--runtime-python", "runtime_python", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Python of an environment whose ONNX Runtime has a target's provider (e.g. .venv-openvino/bin/"
                   "python): candidates are measured and validated there. Default: found next to the project.")
@click.option("--threads", type=click.IntRange(0, 1024), default=None,
              help="Intra-op threads for the bundle and for timing (default: the profile's; 0 = ORT's default).")
@click.option("--time-budget", "time_budget", type=click.FloatRange(min=1.0), default=300.0, show_default=True,
              help="Seconds per target; past it, optional candidates and retries are skipped (the report says so).")
@click.option("--min-validation-samples", type=click.IntRange(min=1), default=32, show_default=True,
              help="Fewest validation samples for auto to consider lossy candidates (INT8, FP16...).")
@click.option("--memory-budget-mb", "memory_mb", type=click.IntRange(min=64), default=2048, show_default=True,
              help="Memory for calibration and validation data (calibration statistics are merged to stay within).")
@click.option("--output-kind", "output_kinds", multiple=True, metavar="OUTPUT=KIND",
              help="How to judge an output: classifier, sequence, detector, mask, tensor (default: inferred).")
@click.option("--variants/--single", "variants", default=None,
              help="--variants: one bundle per target holding every candidate within budget; the device self-tests "
                   "and times them and pins the fastest that passes. Default: variants only when the target's "
                   "runtime cannot be reached from this host (nothing here could measure the choice).")
@click.option("--json", "as_json", is_flag=True, help="Print the packaging reports as JSON.")
def package(model: str, targets: tuple[str, ...], precision: str, calibration: Path | None,
            validation: Path | None, budget: tuple[str, ...], name: str | None, version: str,
            model_type: str | None, key: Path | None, out_dir: Path, profiles_dir: tuple[str, ...],
            input_shapes: tuple[str, ...], no_measure: bool, runtime_python: tuple[str, ...], threads: int | None,
            time_budget: float, min_validation_samples: int, memory_mb: int, output_kinds: tuple[str, ...],
            variants: bool | None, as_json: bool) -> None:
    """Optimize, quantize and validate MODEL into one signed bundle per --target.

    MODEL is an ONNX file, or a PyTorch model (a TorchScript file, or module:factory) with --input-shape: it is
    exported to ONNX, and apple-silicon bundles also carry a native Core ML .mlpackage (FP16).
    """
    from edgefleet.sdk.errors import ConfigError
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .api import package as run
    from .options import PackageOptions, ProgressEvent
    from .reporting import human_lines, unmeasured_line

    kinds = {}
    for item in output_kinds:
        out_name, sep, kind = item.rpartition("=")
        if not sep or not out_name:
            raise ConfigError(f"--output-kind {item!r}: expected OUTPUT=KIND")
        kinds[out_name] = kind
    opts = PackageOptions.build(
        precision=precision, budget=list(budget), name=name, version=version, model_type=model_type,
        calibration=calibration, validation=validation, input_shapes=list(input_shapes), profiles_dirs=profiles_dir,
        measure=not no_measure, runtime_python=runtime_python, threads=threads, time_budget_s=time_budget,
        min_validation_samples=min_validation_samples, calibration_memory_mb=memory_mb, output_kinds=kinds,
        variants=variants)
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[step]}", markup=False))
    with Progress(*columns, console=console, transient=False) as bars:
        tasks: dict[str, Any] = {}

        def progress(ev: ProgressEvent) -> None:
            label = ev.target or "shared"
            if label not in tasks:
                tasks[label] = bars.add_task(label, total=max(ev.total, 1), step="")
            bars.update(tasks[label], completed=ev.done, total=max(ev.total, ev.done, 1),
                        step=ev.message.removeprefix(f"{ev.target}: ")[:70])

        results = run(model, list(targets), key=key, out_dir=out_dir, options=opts, progress=progress)
        for t in tasks.values():
            bars.update(t, completed=bars.tasks[t].total)
    for r in results:
        line = unmeasured_line(r.report)
        if line:
            click.echo(line, err=True)  # one line, never wrapped
    if as_json:
        payload = [{"target": r.target, "bundle": str(r.path), "report": r.report} for r in results]
        click.echo(json.dumps(payload, indent=2, sort_keys=True, default=str))
        return
    for r in results:
        for line in human_lines(r.report, r.path):
            click.echo(line)
    sys.stdout.flush()
