"""Devices are small: agent, fleet and the CLI root must not load onnx, quantization tools, coremltools or torch.

Each check runs in a fresh interpreter so nothing another test imported can hide or fake a heavy import.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

HEAVY = ("onnx", "coremltools", "torch", "onnxruntime.quantization", "onnxconverter_common", "onnxscript")

_PROBE = """
import json, sys
{body}
heavy = {heavy!r}
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def _heavy_loaded(body: str) -> list[str]:
    code = _PROBE.format(body=body, heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("module", ["edgefleet.agent", "edgefleet.fleet", "edgefleet.sdk", "edgefleet.sdk.runtime",
                                    "edgefleet.sdk.cli", "edgefleet.devices.detect"])
def test_import_loads_no_heavy_modules(module: str) -> None:
    assert _heavy_loaded(f"import {module}") == []


def test_agent_cli_help_loads_no_heavy_modules() -> None:
    if not _has("edgefleet.agent.cli"):
        pytest.skip("edgefleet.agent.cli is not built yet (the import of edgefleet.agent is checked above)")
    body = (
        "from click.testing import CliRunner\n"
        "from edgefleet.sdk.cli import cli\n"
        "r = CliRunner().invoke(cli, ['agent', '--help'], prog_name='edgefleet')\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'Usage: edgefleet agent' in r.output\n"
    )
    assert _heavy_loaded(body) == []


def test_root_help_and_foundation_commands_load_no_heavy_modules() -> None:
    body = (
        "from click.testing import CliRunner\n"
        "from edgefleet.sdk.cli import cli\n"
        "for args in (['--help'], ['devices', 'detect', '--json'], ['bundle', 'verify', '--help']):\n"
        "    r = CliRunner().invoke(cli, args, prog_name='edgefleet')\n"
        "    assert r.exit_code == 0, (args, r.output)\n"
    )
    assert _heavy_loaded(body) == []


def test_probe_detects_a_heavy_import() -> None:
    """The probe itself works: importing onnx is seen (so an empty list above means something)."""
    if not _has("onnx"):
        pytest.skip("onnx is not installed here")
    assert "onnx" in _heavy_loaded("import onnx")
