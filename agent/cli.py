"""``edgefleet agent``: run the device agent, write its systemd unit.

Importing this module loads click and the config parser only: ``edgefleet agent --help`` never imports ONNX
Runtime, onnx or the quantization tools.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

__all__ = ["agent"]


@click.group()
def agent() -> None:
    """The device agent: installs bundles from MQTT commands, serves them locally, reports latency."""


def _abs(p: Path | None) -> str | None:
    return str(p.resolve()) if p is not None else None


@agent.command("run")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Agent config file (TOML, see docs/agent.md). Flags override its values.")
@click.option("--device", help="Device id ([A-Za-z0-9_.-]{1,64}).  [agent.device]")
@click.option("--fleet", help="Fleet id.  [agent.fleet]")
@click.option("--mqtt-url", "--broker", "broker", help="Broker URL: mqtt://host:port or mqtts://host:port.  [mqtt.url]")
@click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path),
              help="mqtts: CA bundle of the broker's certificate.  [mqtt.ca_file]")
@click.option("--cert-file", type=click.Path(dir_okay=False, path_type=Path),
              help="mqtts: client certificate (with --key-file).  [mqtt.cert_file]")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path),
              help="mqtts: the client certificate's key.  [mqtt.key_file]")
@click.option("--username", help="MQTT username.  [mqtt.username]")
@click.option("--password-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File whose first line is the MQTT password.  [mqtt.password_file]")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where bundles, caches and the outbox live.  [agent.data_dir]")
@click.option("--trust", "trusted_keys", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Trusted public key file or directory (repeatable).  [agent.trusted_keys]")
@click.option("--profile", help="Device profile name, or 'auto' to detect.  [agent.profile]")
@click.option("--telemetry-interval", type=float, help="Seconds between telemetry records.  [telemetry.interval_s]")
@click.option("--keepalive", type=int, help="MQTT keepalive in seconds.  [mqtt.keepalive_s]")
@click.option("--api", "api_listen", help="Local API host:port (default 127.0.0.1:8000; '' disables, port 0 picks "
                                         "one).  [api.listen]")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="[agent.log_level]")
@click.option("--allow-unsigned-commands", is_flag=True, default=None,
              help="Development only: execute commands without a controller signature.  [commands.require_signed]")
def run(config_path: Path | None, device: str | None, fleet: str | None, broker: str | None, ca_file: Path | None,
        cert_file: Path | None, key_file: Path | None, username: str | None, password_file: Path | None,
        data_dir: Path | None, trusted_keys: tuple[Path, ...], profile: str | None, telemetry_interval: float | None,
        keepalive: int | None, api_listen: str | None, log_level: str | None,
        allow_unsigned_commands: bool | None) -> None:
    """Run the agent in the foreground until SIGTERM (logs: JSON lines on stderr)."""
    from .config import load_config

    overrides = {
        "agent.device": device, "agent.fleet": fleet, "mqtt.url": broker, "agent.data_dir": _abs(data_dir),
        "mqtt.ca_file": _abs(ca_file), "mqtt.cert_file": _abs(cert_file), "mqtt.key_file": _abs(key_file),
        "mqtt.username": username, "mqtt.password_file": _abs(password_file),
        "agent.trusted_keys": tuple(str(p.resolve()) for p in trusted_keys), "agent.profile": profile,
        "telemetry.interval_s": telemetry_interval, "mqtt.keepalive_s": keepalive, "api.listen": api_listen,
        "agent.log_level": log_level,
        "commands.require_signed": False if allow_unsigned_commands else None,
    }
    if config_path is not None and not config_path.is_file():
        raise click.BadParameter(f"{config_path} does not exist", param_hint="--config")
    cfg = load_config(config_path, overrides)

    from .log import setup_logging

    setup_logging(cfg.log_level, {"device": cfg.device})
    from .api import ListenError
    from .daemon import Agent

    try:
        agent_ = Agent(cfg)
    except ListenError as exc:
        # a busy or unusable port is a usage problem: one line, exit code 2, before anything connects to MQTT
        raise _UsageExit(str(exc)) from None
    sys.exit(agent_.run())


class _UsageExit(click.ClickException):
    """``Error: <message>`` and exit code 2 (click's code for usage errors), without click's usage line."""

    exit_code = 2


_UNIT = """\
[Unit]
Description=edgefleet device agent ({device})
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={user}
Group={user}
ExecStart={exe} agent run --config {config}
Restart=always
RestartSec=2
# SIGTERM: in-flight requests finish, offline status is published, exit 0.
KillSignal=SIGTERM
TimeoutStopSec=30
StateDirectory={state_dir}
Environment=PYTHONUNBUFFERED=1
# Hardening: the agent needs its data dir, the network and nothing else.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices={private_devices}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictSUIDSGID=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
CapabilityBoundingSet=
AmbientCapabilities=
UMask=0027
ReadWritePaths={data_dir}

[Install]
WantedBy=multi-user.target
"""


@agent.command("install-service")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The agent config file the service runs with.")
@click.option("--user", default="edgefleet", show_default=True, help="System user the agent runs as.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("/etc/systemd/system/edgefleet-agent.service"), show_default=True,
              help="Where to write the unit ('-' for stdout).")
@click.option("--gpu", is_flag=True, help="Allow /dev access (GPU, NPU, Jetson): drops PrivateDevices.")
def install_service(config_path: Path, user: str, output: Path, gpu: bool) -> None:
    """Write a hardened systemd unit for `edgefleet agent run --config CONFIG`."""
    from edgefleet.sdk._fs import atomic_write_text

    from .config import load_config

    cfg = load_config(config_path)
    argv0 = Path(sys.argv[0])
    exe = argv0.resolve() if argv0.name == "edgefleet" else Path(sys.executable).parent / "edgefleet"
    data_dir = cfg.data_dir
    # systemd creates /var/lib/<StateDirectory> owned by the service user
    state_dir = data_dir.name if data_dir.parent == Path("/var/lib") else "edgefleet"
    unit = _UNIT.format(device=cfg.device, user=user,
                        exe=shlex.quote(str(exe)), config=shlex.quote(str(config_path.resolve())),
                        state_dir=state_dir, data_dir=shlex.quote(str(data_dir)),
                        private_devices="no" if gpu else "yes")
    if str(output) == "-":
        click.echo(unit, nl=False)
        return
    atomic_write_text(output, unit)
    click.echo(f"wrote {output}; enable with: systemctl daemon-reload && systemctl enable --now {output.stem}")
    owns = (f"systemd creates {data_dir} for it" if data_dir.parent == Path("/var/lib")
            else f"let it write {data_dir}")
    click.echo(f"note: the unit runs as user {user!r}: create it first (useradd --system --home-dir {data_dir} "
               f"--shell /usr/sbin/nologin {user}); {owns}", err=True)
