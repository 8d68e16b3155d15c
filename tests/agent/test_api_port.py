"""The API's port (issue 15): KServe/Triton's 8000 by default, so the controller keeps 8080 on the same host; a busy
port is one line ``Error: ...`` and exit code 2, before the agent connects to anything."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from _agent_util import EDGEFLEET, write_config
from edgefleet.agent.config import ApiConfig, parse_config


def test_default_port_is_8000_and_metrics_share_it(tmp_path: Path, signing_key) -> None:
    (tmp_path / "fleet.pub").write_bytes(signing_key.public.to_pem())
    cfg = parse_config({"agent": {"device": "d", "fleet": "f", "data_dir": "data", "trusted_keys": ["fleet.pub"]}},
                       base=tmp_path)
    assert cfg.api.address == ("127.0.0.1", 8000) == ApiConfig().address


def test_busy_port_is_one_line_error_and_exit_code_2(tmp_path: Path, signing_key) -> None:
    (tmp_path / "fleet.pub").write_bytes(signing_key.public.to_pem())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = write_config(tmp_path / "agent.toml", device="d1", broker_url="mqtt://127.0.0.1:9",
                              data_dir=tmp_path / "data", trusted=tmp_path / "fleet.pub", api=f"127.0.0.1:{port}")
        proc = subprocess.run([EDGEFLEET, "agent", "run", "--config", str(config)], capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"Error: api.listen: cannot listen on 127.0.0.1:{port}: Address already in use"], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
