"""Kill the agent (SIGKILL) at every stage of an install: after restart exactly the old or the new bundle serves,
staging and orphans are gone, and the interrupted deploy is finished and answered exactly once."""

from __future__ import annotations

import json
import sqlite3

from _agent_util import AgentProc, Watcher, http_json, sha_size, wait_until
from edgefleet.sdk.bundle import read_installed, read_manifest


def _version(agent: AgentProc) -> str:
    status, meta = http_json("GET", f"http://{agent.api}/v2/models/testmodel")
    assert status == 200, meta
    return meta["versions"][0]


def _check_store(agent: AgentProc) -> set[str]:
    store = agent.data_dir / "store"
    pointers = json.loads((agent.data_dir / "state" / "pointers.json").read_text())["models"]["testmodel"]
    named = {d for d in (pointers["active"], pointers["previous"]) if d}
    entries = {p.name for p in store.iterdir()}
    assert not [e for e in entries if e.startswith(".staging")], entries
    assert entries == named, (entries, named)
    return named


def test_sigkill_at_each_install_stage_leaves_old_or_new_serving(agent_factory, mosquitto, make_bundle, mlp_model,
                                                                 bundle_server, trusted) -> None:
    agent = agent_factory(interval=5.0, start=False)
    w = Watcher(mosquitto, agent.device)
    agent.start()
    first = make_bundle(mlp_model, version="1.0.0", filename="v1.efb")
    sha, size = sha_size(first)
    assert w.wait_reply(w.send("deploy", {"url": first.as_uri(), "sha256": sha, "size": size}))["status"] == "ok"
    current, current_digest = "1.0.0", read_manifest(first, trusted).digest
    stages = ["mid-download", "after-download", "after-extract", "after-selftest", "after-activate"]
    for i, stage in enumerate(stages, start=2):
        new = f"{i}.0.0"
        bundle = make_bundle(mlp_model, version=new, filename=f"v{i}.efb")
        sha, size = sha_size(bundle)
        new_digest = read_manifest(bundle, trusted).digest
        if stage == "mid-download":
            server = bundle_server(rate=size / 2.0)  # ~2 s for the whole file
            url = server.url(f"v{i}.efb")
            assert agent.terminate() == 0
            agent.start()
        else:
            url = bundle.as_uri()
            assert agent.terminate() == 0
            agent.start(env={"EDGEFLEET_AGENT_FAILPOINT": stage})
        cid = w.send("deploy", {"url": url, "sha256": sha, "size": size}, cmd_id=f"crash-{stage}")
        if stage == "mid-download":
            part = agent.data_dir / "downloads" / f"{sha}.part"
            wait_until(lambda p=part: p.exists() and p.stat().st_size > 0, 10, what="download started")
            agent.kill()
        else:
            assert agent.wait(30) == -9, f"{stage}: failpoint did not kill the agent"
        assert not w.replies(cid), f"{stage}: a reply was sent before the crash"

        # While the agent is dead, the pointer file alone decides what will serve: old, or new once activated.
        expect_new = stage == "after-activate"
        pointers = json.loads((agent.data_dir / "state" / "pointers.json").read_text())["models"]["testmodel"]
        active = pointers["active"]
        assert active == (new_digest if expect_new else current_digest), stage
        assert read_installed(agent.data_dir / "store" / active, trusted).manifest.version == (
            new if expect_new else current)
        if stage == "after-extract":
            assert (agent.data_dir / "store" / new_digest).is_dir()  # an orphan the restart must remove

        agent.start()
        # The interrupted deploy resumes at once, so what serves now is the old version or already the new one.
        assert _version(agent) in (current, new), stage

        reply = w.wait_reply(cid)
        assert reply["status"] == "ok", (stage, reply)
        assert reply["result"]["already_active"] is expect_new, (stage, reply)
        wait_until(lambda new=new: _version(agent) == new, 10, what=f"{stage}: {new} serving")
        _check_store(agent)
        assert not list((agent.data_dir / "downloads").iterdir())
        if stage == "mid-download":
            assert any(r["range"] for r in server.requests), f"no Range request: {server.requests}"
        current, current_digest = new, new_digest

    assert agent.terminate() == 0
    for stage in stages:
        assert len(w.replies(f"crash-{stage}")) == 1, stage
    db = sqlite3.connect(agent.data_dir / "state" / "agent.db")
    pending = db.execute("SELECT id FROM commands WHERE state='pending'").fetchall()
    assert pending == []
    assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
    w.close()


def test_command_that_kills_the_agent_every_time_is_answered_not_retried_forever(agent_factory, mosquitto,
                                                                                make_bundle, mlp_model) -> None:
    from edgefleet.agent.commands import MAX_ATTEMPTS

    agent = agent_factory(interval=5.0, start=False)
    w = Watcher(mosquitto, agent.device)
    agent.start(env={"EDGEFLEET_AGENT_FAILPOINT": "after-selftest"})
    bundle = make_bundle(mlp_model, version="1.0.0")
    sha, size = sha_size(bundle)
    cid = w.send("deploy", {"url": bundle.as_uri(), "sha256": sha, "size": size}, cmd_id="poison-1")
    assert agent.wait(30) == -9
    for _ in range(MAX_ATTEMPTS - 1):  # systemd would restart it: each start runs the pending command and dies
        agent.start(env={"EDGEFLEET_AGENT_FAILPOINT": "after-selftest"})
        assert agent.wait(30) == -9
    agent.start()
    reply = w.wait_reply(cid)
    assert reply["status"] == "error" and reply["error"]["code"] == "crashloop"
    assert f"stopped {MAX_ATTEMPTS} times" in reply["error"]["message"]
    assert http_json("GET", f"http://{agent.api}/v2/models/testmodel")[0] == 404
    assert [p.name for p in (agent.data_dir / "store").iterdir()] == []
    assert agent.terminate() == 0
    assert len(w.replies(cid)) == 1
    w.close()
