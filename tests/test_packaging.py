"""The distribution: ``python -m build`` makes a wheel without setuptools warnings that ships every data file
(schemas, profiles, the dashboard), and the installed wheel runs without the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    pytest.importorskip("build", reason="the 'build' package is in the dev extra")
    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # else setuptools says so
    # --no-isolation: the venv's setuptools, no download (the README's plain `python -m build` fetches its own)
    res = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (whl,) = out.glob("edgefleet-*.whl")
    return whl, res.stdout + res.stderr


def test_the_wheel_builds_without_setuptools_warnings(wheel: tuple[Path, str]) -> None:
    _, log = wheel
    noisy = [line for line in log.splitlines() if "warn" in line.lower() or "deprecat" in line.lower()]
    assert noisy == [], "\n".join(noisy[:20])


def test_the_wheel_ships_schemas_profiles_and_the_dashboard(wheel: tuple[Path, str]) -> None:
    whl, _ = wheel
    names = set(zipfile.ZipFile(whl).namelist())
    for sub, pattern in (("sdk/schemas", "*.json"), ("devices/profiles", "*.toml"), ("fleet/static", "*.*"),
                         ("fleet/static/vendor/uplot", "*")):
        src = {f"edgefleet/{sub}/{p.name}" for p in (ROOT / sub).glob(pattern) if p.is_file()}
        assert src and src <= names, sorted(src - names)
    for pkg in ("sdk", "sdk/protocol", "devices", "packager", "agent", "fleet", "fleet/store"):
        assert f"edgefleet/{pkg}/__init__.py" in names
    assert not any(n.startswith(("tests/", "bench/", "edgefleet/tests")) for n in names)
    meta = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta and "Provides-Extra: cpu" in meta


def test_the_installed_wheel_runs_from_its_own_files(wheel: tuple[Path, str], tmp_path: Path) -> None:
    whl, _ = wheel
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet",
                          "--disable-pip-version-check", "--target", str(target), str(whl)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (target / "bin" / "edgefleet").exists()
    code = (
        "import json, edgefleet.sdk, edgefleet.fleet.http as h\n"
        "from pathlib import Path\n"
        "from edgefleet.devices.profile import load_profiles\n"
        "from edgefleet.sdk.protocol import schemas\n"
        f"assert Path(edgefleet.sdk.__file__).is_relative_to({str(target)!r}), edgefleet.sdk.__file__\n"
        "assert 'x86-cpu' in load_profiles()\n"
        "root = Path(edgefleet.sdk.__file__).parent / 'schemas'\n"
        "assert schemas.check(root, None) == [], schemas.check(root, None)\n"
        "static = Path(h.__file__).parent / 'static'\n"
        "assert (static / 'index.html').is_file() and (static / 'vendor/uplot/uPlot.iife.min.js').is_file()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
    cli = subprocess.run([sys.executable, "-m", "edgefleet.sdk.cli", "devices", "list"], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert cli.returncode == 0 and "x86-cpu" in cli.stdout, cli.stderr
