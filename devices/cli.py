"""``edgefleet devices``: list, show and detect target profiles."""

from __future__ import annotations

import json
from pathlib import Path

import click
from edgefleet.sdk.providers import provider_label

from .profile import get_profile, load_profiles

__all__ = ["devices"]

_profiles_option = click.option(
    "--profiles", "profiles_dirs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Extra directory of profile TOML files (repeatable; also $EDGEFLEET_PROFILES).",
)


@click.group()
def devices() -> None:
    """Target device profiles: what each device class runs and how to package for it."""


@devices.command("list")
@_profiles_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def devices_list(profiles_dirs: tuple[Path, ...], as_json: bool) -> None:
    """List the known target profiles."""
    profiles = load_profiles(profiles_dirs)
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in profiles.values()], indent=2))
        return
    width = max(len(n) for n in profiles)
    for p in profiles.values():
        chain = " > ".join(provider_label(pr.name) for pr in p.providers)
        click.echo(f"{p.name:<{width}}  {p.arch:<7}  {chain:<24}  {','.join(p.precisions):<20}  {p.description}")


@devices.command("show")
@click.argument("name")
@_profiles_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def devices_show(name: str, profiles_dirs: tuple[Path, ...], as_json: bool) -> None:
    """Show one profile with the reasons behind its choices."""
    p = get_profile(name, profiles_dirs)
    d = p.to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"{p.name}: {p.description}")
    click.echo(f"  arch {p.arch}, ONNX Runtime flavour {p.ort_flavour}, cpu flags {list(p.cpu_flags)}, "
               f"markers {list(p.markers)}")
    for i, pr in enumerate(p.providers, 1):
        opts = ", ".join(f"{k}={v}" for k, v in pr.options.items())
        click.echo(f"  provider {i}: {pr.name}" + (f" ({opts})" if opts else ""))
    s = p.session
    click.echo(f"  session: {s.graph_optimization_level} optimization, intra_op threads "
               f"{s.intra_op_num_threads or 'default'} — {p.session_reason}")
    click.echo(f"  precisions: {', '.join(p.precisions)} (preferred: {p.preferred_precision})")
    q = p.quantization
    click.echo(f"  quantization: {q.format.upper()} {q.activation_type}/{q.weight_type}, "
               f"reduce_range={q.reduce_range}, "
               f"per_channel={q.per_channel}, calibration {q.calibration_method} — {q.reason}")


@devices.command("detect")
@_profiles_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def devices_detect(profiles_dirs: tuple[Path, ...], as_json: bool) -> None:
    """Detect this machine and print the best-fitting profile and why."""
    from .detect import detect

    det = detect(load_profiles(profiles_dirs))
    if as_json:
        click.echo(json.dumps(det.to_dict(), indent=2))
        return
    if det.profile is None:
        click.echo("No profile fits this machine:")
    else:
        click.echo(f"{det.profile.name}: {det.profile.description}")
        for r in det.reasons:
            click.echo(f"  because {r}")
    for name, why in sorted(det.rejected.items()):
        click.echo(f"  not {name}: {why}")
    if det.profile is None:
        raise SystemExit(1)
