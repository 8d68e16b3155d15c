"""mqtts:// with a private CA and a client certificate: the agent connects, is born, and answers commands."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from _agent_util import AgentProc, Watcher, write_config

from tests.helpers import free_port, make_tls_files


class _Broker:
    host = "127.0.0.1"

    def __init__(self, port: int) -> None:
        self.port = port


def test_agent_over_mqtts_with_client_certificate(tmp_path: Path, signing_key) -> None:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(exe).exists():
        pytest.skip("mosquitto is not installed")
    # Mosquitto started as root drops to the mosquitto user: the TLS files must be readable outside pytest's
    # private tmp dir.
    tls_dir = Path(tempfile.mkdtemp(prefix="edgefleet-tls-"))
    tls_dir.chmod(0o755)
    tls = make_tls_files(tls_dir)
    for f in tls.values():
        f.chmod(0o644)
    plain, secure = free_port(), free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"per_listener_settings true\n"
                    f"listener {plain} 127.0.0.1\nallow_anonymous true\n"
                    f"listener {secure} 127.0.0.1\nallow_anonymous true\ncafile {tls['ca']}\n"
                    f"certfile {tls['server_cert']}\nkeyfile {tls['server_key']}\nrequire_certificate true\n")
    log = (tmp_path / "mq.log").open("wb")
    broker = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", secure), timeout=0.2).close()
                socket.create_connection(("127.0.0.1", plain), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"mosquitto did not start: {(tmp_path / 'mq.log').read_text()}")
                time.sleep(0.05)
        pub = tmp_path / "fleet.pub"
        pub.write_bytes(signing_key.public.to_pem())
        cfg = write_config(tmp_path / "agent.toml", device="tls-dev", broker_url=f"mqtts://localhost:{secure}",
                           data_dir=tmp_path / "data", trusted=pub)
        text = cfg.read_text().replace(
            "[mqtt]\n", f'[mqtt]\nca_file = "{tls["ca"]}"\ncert_file = "{tls["client_cert"]}"\n'
                        f'key_file = "{tls["client_key"]}"\n')
        cfg.write_text(text)
        w = Watcher(_Broker(plain), "tls-dev")
        agent = AgentProc(cfg, tmp_path / "data").start()
        try:
            birth = w.wait_for("status", lambda s: s["state"] == "online")
            assert birth["description"]["profile"] == "x86-cpu"
            reply = w.wait_reply(w.send("describe"))
            assert reply["status"] == "ok" and reply["result"]["boot"] == birth["boot"]
            assert agent.terminate() == 0
        finally:
            agent.kill()
            w.close()
    finally:
        broker.terminate()
        broker.wait(10)
        log.close()
        shutil.rmtree(tls_dir, ignore_errors=True)
