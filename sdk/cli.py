"""The one ``edgefleet`` command. Each component owns its click commands; this root loads them only when invoked.

The table below is the whole command tree's entry points: nothing registers itself by import side effects, and
``edgefleet agent --help`` imports only the agent's CLI module (no onnx, no quantization tools).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .errors import ConfigError, EdgefleetError, SelfTestError

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["cli", "main", "mqtt_options"]

# name -> (module, attribute, short help shown by `edgefleet --help` without importing the module)
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "package": ("edgefleet.packager.cli", "package", "Optimize, quantize and validate a model into signed bundles."),
    "devices": ("edgefleet.devices.cli", "devices", "List, show and detect target device profiles."),
    "keys": ("edgefleet.sdk.cli", "keys", "Generate Ed25519 signing keys."),
    "bundle": ("edgefleet.sdk.cli", "bundle", "Inspect and verify bundles."),
    "agent": ("edgefleet.agent.cli", "agent", "Run the device agent."),
    "fleet": ("edgefleet.fleet.cli", "fleet", "Run the fleet controller, watch and simulate the fleet."),
    "deploy": ("edgefleet.fleet.cli", "deploy", "Deploy bundles to devices (staged, with canary)."),
    "deployments": ("edgefleet.fleet.cli", "deployments", "List and show deployments."),
    "rollback": ("edgefleet.fleet.cli", "rollback", "Roll devices back to their previous bundle."),
    "demo": ("edgefleet.demo.harness", "demo", "Package a real model, run local agents and watch them live."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use, from the explicit table above."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = _COMMANDS.get(cmd_name)
        if entry is None:
            return None
        module, attr, _ = entry
        try:
            cmd: click.Command = getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            raise click.ClickException(
                f"'{cmd_name}' needs a component that is not installed ({exc.name}); "
                f"install the matching extra, e.g. pip install 'edgefleet[packager]'"
            ) from exc
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgefleetError as exc:
            if ctx.params.get("verbose"):  # -v: the traceback too, for a bug report
                traceback.print_exc()
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="edgefleet", prog_name="edgefleet")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """edgefleet: take an ONNX model to a fleet of edge devices and keep watching it there."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="edgefleet")


# -- keys -------------------------------------------------------------------------------------------------------------

@click.group()
def keys() -> None:
    """Ed25519 signing keys for bundles and commands."""


@keys.command("generate")
@click.argument("private_key", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--public", "public_key", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the public key (default: PRIVATE_KEY with .pub).")
def keys_generate(private_key: Path, public_key: Path | None) -> None:
    """Create a new key pair: PRIVATE_KEY (0600) and its public key to give to devices."""
    from .keys import generate_keypair

    key = generate_keypair(private_key, public_key)
    click.echo(f"wrote {private_key} and {public_key or private_key.with_suffix('.pub')} (key id {key.public.key_id})")


# -- bundle -----------------------------------------------------------------------------------------------------------

@click.group()
def bundle() -> None:
    """Inspect and verify bundles."""


_trust_option = click.option(
    "--trust", "trust", multiple=True, required=True, type=click.Path(exists=True, path_type=Path),
    help="Trusted public key file or directory of *.pub files (repeatable).",
)


@bundle.command("inspect")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_trust_option
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def bundle_inspect(path: Path, trust: tuple[Path, ...], as_json: bool) -> None:
    """Show a bundle's signed manifest (the signature is checked; file hashes are not: use verify)."""
    from .bundle import read_manifest
    from .keys import TrustedKeys

    vm = read_manifest(path, TrustedKeys.from_paths(trust))
    m = vm.manifest
    if as_json:
        click.echo(json.dumps({"digest": vm.digest, "key_id": vm.key_id, "manifest": m.to_dict()}, indent=2))
        return
    click.echo(f"{m.name} {m.version}  target={m.target}  precision={m.precision}  signed by {vm.key_id}")
    click.echo(f"digest   {vm.digest}")
    click.echo(f"providers {' > '.join(p.name for p in m.providers)}")
    threads = m.session.intra_op_num_threads or "default"
    click.echo(f"session  {m.session.graph_optimization_level} opt, intra_op={threads}")
    from .bundle import META_FIXED_SHAPES

    fixed = {part.split("=", 1)[0] for part in m.metadata.get(META_FIXED_SHAPES, "").split(";") if part}
    for t in m.inputs:
        note = "  (fixed at packaging: --input-shape)" if t.name in fixed else ""
        click.echo(f"input    {t.name}: {t.dtype} {list(t.shape)}{note}")
    for t in m.outputs:
        click.echo(f"output   {t.name}: {t.dtype} {list(t.shape)}")
    for name, e in m.files.items():
        click.echo(f"file     {name}  {e.size} bytes  sha256 {e.sha256[:16]}…")
    if m.validation:
        click.echo(f"selftest {m.validation.samples} samples, tolerances for {', '.join(m.validation.tolerances)}")
    for v in m.variants:  # a multi-variant bundle: the device self-tests and times each, and pins one
        click.echo(f"variant  {v.name}  precision={v.precision}  {' > '.join(p.name for p in v.providers)}  "
                   f"{v.session.graph_optimization_level} opt  {v.model}")


@bundle.command("verify")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_trust_option
@click.option("--run", "run_selftest", is_flag=True, help="Also open it on this machine and run its self-test.")
@click.option("--allow-fallback", is_flag=True, help="With --run: run even if the bundle's provider is missing here.")
def bundle_verify(path: Path, trust: tuple[Path, ...], run_selftest: bool, allow_fallback: bool) -> None:
    """Verify signature, manifest, member names, sizes and hashes (and optionally self-test on this machine)."""
    import tempfile

    from .bundle import extract_bundle, verify_bundle
    from .keys import TrustedKeys

    trusted = TrustedKeys.from_paths(trust)
    vm = verify_bundle(path, trusted)
    click.echo(f"OK {vm.manifest.name} {vm.manifest.version} ({vm.manifest.target}): signature by {vm.key_id}, "
               f"{len(vm.manifest.files)} files, {vm.manifest.total_size} bytes verified")
    if run_selftest:
        from .errors import ProviderUnavailableError
        from .runtime import Model

        with tempfile.TemporaryDirectory(prefix="edgefleet-verify-") as tmp:
            dest = Path(tmp) / "bundle"
            extract_bundle(path, trusted, dest)
            if not vm.manifest.variants:
                model = Model.open(dest, trusted, allow_fallback=allow_fallback, cache_dir=Path(tmp) / "cache")
                if model.placement.fallback:
                    click.echo(f"fallback: {model.placement.reason}")
                report = model.self_test()
                serving = ", ".join(model.placement.serving)
                if not report.ok:
                    raise SelfTestError(f"self-test failed on {serving}: {'; '.join(report.to_dict()['failures'])}")
                click.echo(f"self-test OK on {serving}: {report.samples} samples within tolerances")
                return
            # every variant this machine can run (a device pins one that passes; one that fails here is a failure)
            ran = 0
            for v in vm.manifest.variants:
                try:
                    model = Model.open(dest, trusted, verify_files=False, allow_fallback=allow_fallback,
                                       cache_dir=Path(tmp) / "cache" / v.name, variant=v.name)
                except ProviderUnavailableError as exc:
                    click.echo(f"variant {v.name}: not run here ({exc})")
                    continue
                report = model.self_test()
                serving = ", ".join(model.placement.serving)
                if not report.ok:
                    raise SelfTestError(f"variant {v.name}: self-test failed on {serving}: "
                                        f"{'; '.join(report.to_dict()['failures'])}")
                click.echo(f"variant {v.name}: self-test OK on {serving}: {report.samples} samples within tolerances")
                ran += 1
            if not ran:
                raise SelfTestError("no variant of this bundle can run on this machine")


if __name__ == "__main__":  # pragma: no cover
    main()


# -- MQTT connection options, the same on every command that connects ----------------------------------------------

def mqtt_options(default_url: str = "mqtt://127.0.0.1:1883") -> Callable[[F], F]:
    """Add the broker options every connecting command takes; the command receives ``mqtt: MqttOptions``.

    ``--mqtt-url`` (alias ``--broker``), ``--ca-file``, ``--cert-file``, ``--key-file``, ``--username``,
    ``--password-file`` (or ``EDGEFLEET_MQTT_PASSWORD``), and ``--mqtt-config FILE``: a TOML file whose ``[mqtt]``
    section (the agent's format) gives the defaults the flags override.
    """

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def wrapper(*args: Any, **kw: Any) -> Any:
            from .transport import MqttOptions

            keys = {"url": kw.pop("mqtt_url"), "ca_file": kw.pop("ca_file"), "cert_file": kw.pop("cert_file"),
                    "key_file": kw.pop("key_file"), "username": kw.pop("username"),
                    "password_file": kw.pop("password_file")}
            config = kw.pop("mqtt_config")
            section: dict[str, Any] = {}
            base = Path.cwd()
            source = "<flags>"
            if config is not None:
                section, base, source = _mqtt_section(config)
            flags = {k: v for k, v in keys.items() if v}
            section.update({k: (str(Path(v).resolve()) if k.endswith("_file") else v) for k, v in flags.items()})
            section.setdefault("url", default_url)
            env = os.environ.get("EDGEFLEET_MQTT_PASSWORD")
            if env and "password" not in section and "password_file" not in section:
                section["password"] = env
            kw["mqtt"] = MqttOptions.from_mapping(section, source, base)
            return f(*args, **kw)

        opts = [
            click.option("--mqtt-url", "--broker", "mqtt_url", default=None, metavar="URL",
                         help=f"MQTT broker URL, mqtt:// or mqtts:// (TLS) [default: {default_url}]."),
            click.option("--ca-file", type=click.Path(dir_okay=False), default=None,
                         help="mqtts: CA bundle that signed the broker's certificate (default: the system CAs)."),
            click.option("--cert-file", type=click.Path(dir_okay=False), default=None,
                         help="mqtts: client certificate (with --key-file) for brokers that require one."),
            click.option("--key-file", type=click.Path(dir_okay=False), default=None,
                         help="mqtts: the client certificate's private key."),
            click.option("--username", default=None, help="MQTT username."),
            click.option("--password-file", type=click.Path(dir_okay=False), default=None,
                         help="File whose first line is the MQTT password (or set EDGEFLEET_MQTT_PASSWORD)."),
            click.option("--mqtt-config", type=click.Path(dir_okay=False), default=None,
                         help="TOML file with an [mqtt] section (as in the agent's config); flags override it."),
        ]
        for opt in reversed(opts):
            wrapper = opt(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorate


def _mqtt_section(path: str) -> tuple[dict[str, Any], Path, str]:
    """The ``[mqtt]`` table of a TOML file (ConfigError naming the file when it cannot be read)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    section = data.get("mqtt", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{p}: [mqtt] must be a table")
    return dict(section), p.resolve().parent, str(p)
