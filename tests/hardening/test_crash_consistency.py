"""Crash consistency (issue 7 part 3): SIGKILL the agent at every instrumented step of an install and of a rollback
(agent/failpoints.py: journal commits, install steps, each write, fsync and rename of the pointer file), and at
random moments during installs and rollbacks. After each restart:

- the pointer file names a bundle whose files re-verify (``read_installed``, every hash), and the local API serves
  exactly that version, which is the one from before the command or the one it asked for;
- no staging directory, temp pointer file or unreferenced bundle is left;
- the agent's retained status is republished (new boot, online) within 10 s;
- the interrupted command is finished and answered exactly once, leaving the version it asked for.

Counts: every point once and 12 random kills in the default run (about 60 s here: each kill costs two agent
starts); every point 3 times and 1,000 random kills with ``--long`` (about 20 minutes). Figures go to
``$EDGEFLEET_HARDENING_REPORT`` (docs/reliability.md).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from _agents import FLEET, AgentProc, Watcher, make_agent, serving_version, sha_size, wait_until
from edgefleet.agent.failpoints import FAILPOINTS
from edgefleet.sdk import protocol
from edgefleet.sdk.bundle import read_installed, read_manifest

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

JOURNAL_POINTS = ("journal:received", "journal:started", "journal:replied")
INSTALL_POINTS = [p for p in FAILPOINTS if not p.startswith("rollback:")]
ROLLBACK_POINTS = [*JOURNAL_POINTS[:2], *(p for p in FAILPOINTS if p.startswith("rollback:")), JOURNAL_POINTS[2]]


class Device:
    """One agent under test, its watcher, its bundles and what it should serve."""

    def __init__(self, agent: AgentProc, w: Watcher, key: Any, make: Any, trusted: Any) -> None:
        self.agent = agent
        self.w = w
        self.key = key
        self.make = make
        self.trusted = trusted
        self.counter = int(time.time() * 1e6)
        self.next_major = 1
        self.versions: dict[str, str] = {}  # digest -> version
        self.n = 0
        self.status_latency: list[float] = []
        self.duplicate_replies = 0

    def signed(self, kind: str, args: dict[str, Any]) -> protocol.Command:
        self.counter += 1
        self.n += 1
        cmd = protocol.command(kind, args, cmd_id=f"c{self.n}-{kind}")
        return protocol.sign_command(cmd, self.key, counter=self.counter, ttl_s=3600, device=self.agent.device,
                                     fleet=FLEET)

    def new_bundle(self) -> tuple[dict[str, Any], str, str]:
        version = f"{self.next_major}.0.0"
        self.next_major += 1
        path = self.make(version=version, filename=f"v{version}.efb")
        digest = read_manifest(path, self.trusted).digest
        self.versions[digest] = version
        sha, size = sha_size(path)
        return {"url": path.as_uri(), "sha256": sha, "size": size}, version, digest

    def pointers(self) -> dict[str, Any]:
        f = self.agent.data_dir / "state" / "pointers.json"
        if not f.exists():
            return {}
        return dict(json.loads(f.read_text())["models"].get("testmodel") or {})

    def send(self, cmd: protocol.Command) -> str:
        self.w.send_raw(cmd.to_json())
        return cmd.id

    def check_dead(self, allowed: set[str | None], what: str) -> None:
        """While the agent is dead the pointer file alone decides what will serve: old or new, every hash intact."""
        ptr = self.pointers()
        served = None
        if ptr:
            served = read_installed(self.agent.data_dir / "store" / ptr["active"], self.trusted,
                                    verify_files=True).manifest.version
        assert served in allowed, (what, served, allowed)

    def restart_and_check(self, allowed: set[str | None], what: str) -> None:
        """Start after a kill: status republished within 10 s, and the API serves the old or the new version."""
        boots = {st.get("boot") for st in self.w.payloads("status")}
        t0 = time.monotonic()
        self.agent.start()
        wait_until(lambda: any(st.get("state") == "online" and st.get("boot") not in boots
                               for st in self.w.payloads("status")), 10, what=f"{what}: status republished")
        self.status_latency.append(time.monotonic() - t0)
        version = serving_version(self.agent)
        assert version in allowed, (what, version, allowed)

    def check_settled(self, what: str) -> None:
        """After the interrupted command is answered: nothing left but the bundles the pointers name."""
        ptr = self.pointers()
        named = {d for d in (ptr.get("active"), ptr.get("previous")) if d}
        entries = {p.name for p in (self.agent.data_dir / "store").iterdir()}
        assert entries == named, (what, entries, named)
        assert not list((self.agent.data_dir / "state").glob(".*.tmp")), what
        assert not list((self.agent.data_dir / "downloads").iterdir()), what


@pytest.fixture
def device(tmp_path: Path, mosquitto, signing_key, make_bundle, mlp_model, trusted):
    pub = tmp_path / "trusted.pub"
    pub.write_bytes(signing_key.public.to_pem())
    agent = make_agent(tmp_path, mosquitto.url, pub, interval=30.0, keepalive=5)
    w = Watcher(mosquitto, agent.device)
    agent.start()
    d = Device(agent, w, signing_key, lambda **kw: make_bundle(mlp_model, **kw), trusted)
    yield d
    w.close()
    if agent.proc is not None and agent.proc.poll() is None:
        agent.kill()


def _prepare(d: Device) -> None:
    """Two versions installed, so a rollback has a previous bundle."""
    for _ in range(2):
        args, _, _ = d.new_bundle()
        assert d.w.wait_reply(d.send(d.signed("deploy", args)))["status"] == "ok"
    assert serving_version(d.agent) == "2.0.0"


def _one(d: Device, op: str, *, failpoint: str | None = None, kill_after: float | None = None) -> dict[str, Any]:
    """Run one install or rollback with a kill (at a failpoint, or after ``kill_after`` s); check the restart."""
    before = serving_version(d.agent)
    ptr = d.pointers()
    if op == "install":
        args, target, _ = d.new_bundle()
        cmd = d.signed("deploy", args)
    else:
        target = d.versions[ptr["previous"]]
        cmd = d.signed("rollback", {"name": "testmodel"})
    what = f"{op} {failpoint or f'+{kill_after:.3f}s'}"
    if failpoint is not None:
        d.agent.kill()
        d.agent.start(env={"EDGEFLEET_AGENT_FAILPOINT": failpoint})
        cid = d.send(cmd)
        code = d.agent.wait(30)
        assert code == -9, f"{what}: the failpoint did not kill the agent (exit {code})"
    else:
        cid = d.send(cmd)
        time.sleep(kill_after or 0.0)
        d.agent.kill()
    allowed: set[str | None] = {before, target}
    d.check_dead(allowed, what)
    d.restart_and_check(allowed, what)
    reply = d.w.wait_reply(cid, 30)
    assert reply["status"] == "ok", (what, reply)
    wait_until(lambda: serving_version(d.agent) == target, 10, what=f"{what}: {target} serving")
    d.check_settled(what)
    time.sleep(0.3)  # a second reply would arrive by now
    # One answer per id: a kill between the broker's PUBACK and the outbox row's deletion re-sends the same stored
    # reply (QoS 1 is at least once; the controller de-duplicates by id), never a second, different answer.
    replies = d.w.replies(cid)
    assert all(r == replies[0] for r in replies), (what, replies)
    d.duplicate_replies += len(replies) - 1
    return {"before": before, "target": target}


@pytest.mark.timeout(1800)
def test_sigkill_at_every_failpoint_leaves_old_or_new_serving(device: Device, long_run: bool, figures) -> None:
    d = device
    _prepare(d)
    t0 = time.monotonic()
    runs = 0
    rounds = 3 if long_run else 1
    for _ in range(rounds):
        for fp in INSTALL_POINTS:
            _one(d, "install", failpoint=fp)
            runs += 1
        for fp in ROLLBACK_POINTS:
            _one(d, "rollback", failpoint=fp)
            runs += 1
    assert runs == rounds * (len(INSTALL_POINTS) + len(ROLLBACK_POINTS))
    assert d.agent.terminate() == 0
    figures.add("crash", "failpoint_kills", runs)
    figures.add("crash", "failpoints", len(INSTALL_POINTS) + len(ROLLBACK_POINTS))
    figures.add("crash", "failpoint_seconds", round(time.monotonic() - t0, 1))
    figures.add("crash", "status_republished_max_s", round(max(d.status_latency), 2))
    figures.add("crash", "duplicate_replies_failpoints", d.duplicate_replies)


@pytest.mark.timeout(3600)  # --long: 1,000 kills at ~1 s each (pyproject: 300 s per test)
def test_sigkill_at_random_moments_of_installs_and_rollbacks(device: Device, long_run: bool, figures) -> None:
    d = device
    _prepare(d)
    # How long one install and one rollback take here: the random kills fall within them (and a bit after).
    t = time.monotonic()
    _one_timed = d.signed("rollback", {"name": "testmodel"})
    assert d.w.wait_reply(d.send(_one_timed))["status"] == "ok"
    rollback_s = time.monotonic() - t
    args, _, _ = d.new_bundle()
    t = time.monotonic()
    assert d.w.wait_reply(d.send(d.signed("deploy", args)))["status"] == "ok"
    install_s = time.monotonic() - t
    n = 1000 if long_run else 12
    rng = random.Random(7)
    t0 = time.monotonic()
    for i in range(n):
        op = "install" if i % 2 == 0 else "rollback"
        span = install_s if op == "install" else rollback_s
        _one(d, op, kill_after=rng.uniform(0.0, span * 1.2))
    assert d.agent.terminate() == 0
    figures.add("crash", "random_kills", n)
    figures.add("crash", "install_s", round(install_s, 3))
    figures.add("crash", "rollback_s", round(rollback_s, 3))
    figures.add("crash", "random_seconds", round(time.monotonic() - t0, 1))
    figures.add("crash", "status_republished_max_s_random", round(max(d.status_latency), 2))
    figures.add("crash", "duplicate_replies_random", d.duplicate_replies)
