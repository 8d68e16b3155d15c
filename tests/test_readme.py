"""The README's quick start runs as written: its code blocks, extracted and executed in order in a temporary directory.

Only the block that starts with ``# placeholders`` is changed (free ports and a temporary directory instead of the
README's values); every other line runs verbatim in one ``bash`` with ``set -euo pipefail``, against a real Mosquitto,
a real controller and two real agents serving Magika. A README edit that breaks a command, a flag or an exit code
fails here. At the end the walkthrough's own last block stops what it started, and no process may be left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## Quick start on one machine"
MARKER = "# placeholders"


def quickstart_blocks(text: str) -> list[str]:
    """The ```bash blocks of the quick-start section, in order."""
    start = text.find(f"\n{SECTION}\n")
    if start < 0:
        raise AssertionError(f"README.md has no {SECTION!r} section")
    end = text.find("\n## ", start + len(SECTION) + 2)
    section = text[start:end if end > 0 else len(text)]
    return re.findall(r"^```bash\n(.*?)^```$", section, flags=re.S | re.M)


def with_placeholders(block: str, values: dict[str, str]) -> str:
    """The placeholders block with ``values`` in place of the README's (each name must be assigned there once)."""
    out = block
    for name, value in values.items():
        out, n = re.subn(rf"^{name}=\S*", f"{name}={value}", out, flags=re.M)
        if n != 1:
            raise AssertionError(f"the placeholders block must assign {name} once, found {n}")
    return out


def walkthrough_script(text: str, values: dict[str, str]) -> str:
    """One bash script: the quick start's blocks with the placeholders replaced, each announced by a marker line."""
    blocks = quickstart_blocks(text)
    if len(blocks) < 8 or not blocks[0].startswith(MARKER):
        raise AssertionError(f"the quick start needs its placeholders block first and the walkthrough after it; "
                             f"found {len(blocks)} bash blocks")
    parts = ["set -euo pipefail"]
    for i, block in enumerate(blocks):
        body = with_placeholders(block, values) if i == 0 else block
        parts.append(f"printf '\\n### README block {i + 1}\\n'\n{body}")
    return "\n".join(parts) + "\nprintf '\\n### README done\\n'\n"


def _free_ports(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports (the quick start's agents take AGENT_PORT and the next)."""
    for _ in range(200):
        base = free_port()
        if base + n > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"found no {n} consecutive free ports")


def _mosquitto() -> str | None:
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def _left_behind(work: Path) -> list[str]:
    """Processes whose command line names the walkthrough's directory (agents, controller, load loops' children)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(work) in cmd:
            found.append(f"{p.name}: {cmd[:200]}")
    return found


def _run(script: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:/usr/sbin:{os.environ.get('PATH', '')}"}
    for var in ("EDGEFLEET_CONTROLLER", "EDGEFLEET_TOKEN", "EDGEFLEET_TOKEN_FILE", "EDGEFLEET_STORE"):
        env.pop(var, None)
    log = cwd / "walkthrough.out"  # a file, not a pipe: what the script leaves running must not hold us
    with open(log, "wb") as fh:
        proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        raise AssertionError(f"the README walkthrough did not finish within {timeout:.0f} s:\n"
                             f"{log.read_text(errors='replace')[-6000:]}") from None
    return subprocess.CompletedProcess([str(proc.pid)], proc.returncode, log.read_text(errors="replace"), "")


def _in_group(pgid: int) -> list[str]:
    """Processes of the script's process group still alive (what its background jobs left)."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(f"{p.name}: {cmd[:200]}")
    return found


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _logs(work: Path) -> str:
    return "".join(f"\n--- {p.name} (tail) ---\n{p.read_text(errors='replace')[-2500:]}"
                   for p in sorted(work.glob("*.log")))


@pytest.mark.slow
@pytest.mark.mosquitto
@pytest.mark.timeout(1200)
def test_readme_quickstart_runs_verbatim(tmp_path: Path) -> None:
    if _mosquitto() is None:
        pytest.skip("mosquitto is not installed (make test installs it with apt)")
    pytest.importorskip("magika", reason="the quick start's model ships in the magika package (make setup)")
    work = tmp_path / "quickstart"
    values = {"WORK": str(work), "BROKER_PORT": str(free_port()), "CONTROLLER_PORT": str(free_port()),
              "AGENT_PORT": str(_free_ports(4))}
    script = walkthrough_script(README.read_text(encoding="utf-8"), values)
    res = _run(script, tmp_path, timeout=1100)
    pgid = int(res.args[0])  # the script's process group (it was started in a new session)
    out = res.stdout
    try:
        assert res.returncode == 0 and "### README done" in out, (
            f"the README walkthrough failed (exit {res.returncode}) after the last block marked below:\n"
            f"{out[-8000:]}{_logs(work) if work.exists() else ''}")
        # What the walkthrough showed: the canary verdict let 1.1.0 through, and the rollback brought 1.0.0 back.
        canary = out[out.index("### README block 8"):out.index("### README block 9")]
        assert "verdict proceed" in canary, canary[-3000:]
        after = out[out.rindex("rollback sent to"):]
        assert after.count('"versions":["1.0.0"]') == 4, after[-2000:]
        # The last block stopped everything with a plain SIGTERM: nothing may be left, in its group or anywhere.
        deadline = time.monotonic() + 30
        while (left := _in_group(pgid) + _left_behind(work)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"processes left behind after the README's last block: {left}"
    finally:
        _kill_group(pgid)


def test_readme_quickstart_fails_when_a_command_breaks(tmp_path: Path) -> None:
    """The harness is honest: a misspelt command in the README stops the walkthrough with its exit code."""
    text = README.read_text(encoding="utf-8").replace("edgefleet keys generate fleet.key", "edgefleet keys generat "
                                                      "fleet.key", 1)
    work = tmp_path / "broken"
    values = {"WORK": str(work), "BROKER_PORT": "1", "CONTROLLER_PORT": "2", "AGENT_PORT": "3"}
    res = _run(walkthrough_script(text, values), tmp_path, timeout=120)
    _kill_group(int(res.args[0]))
    assert res.returncode == 2 and "### README block 2" in res.stdout and "### README block 3" not in res.stdout, \
        res.stdout[-3000:]
    assert "No such command 'generat'" in res.stdout
