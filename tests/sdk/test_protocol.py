"""The MQTT contract: topics and ids, each payload builder accepted by its parser, malformed payloads refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from edgefleet.sdk import protocol as p
from edgefleet.sdk.errors import ProtocolError
from edgefleet.sdk.sketch import DDSketch

SHA = "ab" * 32


# -- topics and ids -------------------------------------------------------------------------------------------------

def test_topic_builds_and_parses_back_for_every_channel() -> None:
    for ch in p.CHANNELS:
        t = p.topic("plant-1", "cam_07.a", ch)
        assert t == f"edgefleet/v1/plant-1/cam_07.a/{ch}"
        assert p.parse_topic(t) == p.Topic("plant-1", "cam_07.a", ch)


@pytest.mark.parametrize("bad", ["+", "#", "a/b", "", "x" * 65, "dev ice", "dév", "a+", "#b", None, 7])
def test_check_id_rejects_wildcards_levels_empty_and_long(bad: object) -> None:
    with pytest.raises(ProtocolError, match="device must match"):
        p.check_id("device", bad)
    if isinstance(bad, str):
        with pytest.raises(ProtocolError):
            p.topic("fleet", bad, "status")


def test_check_id_accepts_64_chars_and_allowed_punctuation() -> None:
    assert p.check_id("device", "x" * 64) == "x" * 64
    assert p.check_id("device", "A-z_0.9") == "A-z_0.9"


@pytest.mark.parametrize(
    "bad",
    ["edgefleet/v1/f/d", "edgefleet/v1/f/d/status/x", "edgefleet/v2/f/d/status", "other/v1/f/d/status",
     "edgefleet/v1/f/d/bogus", "edgefleet/v1/+/d/status", "edgefleet/v1/f/#/status", "edgefleet/v1//d/status"],
)
def test_parse_topic_rejects_malformed(bad: str) -> None:
    with pytest.raises(ProtocolError):
        p.parse_topic(bad)


def test_topic_rejects_unknown_channel() -> None:
    with pytest.raises(ProtocolError, match="unknown channel 'logs'"):
        p.topic("f", "d", "logs")


def test_subscription_uses_single_level_wildcard_and_shared_group() -> None:
    assert p.subscription("f", "telemetry") == "edgefleet/v1/f/+/telemetry"
    assert p.subscription("f", "status", share_group="ctl") == "$share/ctl/edgefleet/v1/f/+/status"
    with pytest.raises(ProtocolError, match="share group"):
        p.subscription("f", "status", share_group="a/b")


# -- payloads: each parser accepts its builder's output ----------------------------------------------------------

def _model_entry(values: list[float]) -> dict:
    sk = DDSketch()
    for v in values:
        sk.add(v)
    return {"name": "mlp", "version": "1.0.0", "count": len(values), "errors": 0,
            "providers": ["CPUExecutionProvider"], "sketch": sk.to_dict()}


def test_status_roundtrip_online_and_offline() -> None:
    on = p.status("dev1", "online", boot="b1", description={"profile": "x86-cpu"})
    assert p.parse_status(p.encode(on))["description"] == {"profile": "x86-cpu"}
    off = p.status("dev1", "offline", reason="last will")
    assert p.parse_status(p.encode(off))["reason"] == "last will"


def test_telemetry_roundtrip_keeps_a_mergeable_sketch() -> None:
    msg = p.telemetry("dev1", "b1", 3, [_model_entry([1.0, 2.0, 4.0])], interval_s=10.0, process={"rss": 1})
    got = p.parse_telemetry(p.encode(msg))
    assert (got["device"], got["boot"], got["seq"]) == ("dev1", "b1", 3)
    sk = DDSketch.from_dict(got["models"][0]["sketch"])
    assert sk.count == 3 and sk.quantile(1.0) == pytest.approx(4.0, rel=0.01)


def test_event_roundtrip() -> None:
    msg = p.event("dev1", "b1", 1, "install", "installed mlp 1.0.0", level="warning", data={"digest": SHA})
    assert p.parse_event(p.encode(msg))["data"]["digest"] == SHA


@pytest.mark.parametrize(
    ("kind", "args"),
    [("deploy", {"url": "https://ctl/b.efb", "sha256": SHA, "size": 10}), ("rollback", {}), ("remove", {"name": "m"}),
     ("benchmark", {"runs": 100}), ("describe", {}), ("configure", {"telemetry_interval_s": 5})],
)
def test_command_roundtrip_for_every_kind(kind: str, args: dict) -> None:
    msg = p.command(kind, args, cmd_id="c-1", ttl_s=60)
    got = p.parse_command(p.encode(msg))
    assert (got["id"], got["kind"], got["args"]) == ("c-1", kind, args)
    assert got["expires"] > got["ts"]


def test_command_generates_unique_ids() -> None:
    assert p.command("describe")["id"] != p.command("describe")["id"]


def test_reply_roundtrip_ok_and_error() -> None:
    ok = p.parse_reply(p.encode(p.reply("c-1", "dev1", True, result={"installed": "mlp"})))
    assert ok["status"] == "ok" and ok["result"] == {"installed": "mlp"}
    msg = p.reply("c-1", "dev1", False, code="bundle.signature", message="untrusted", step="verify")
    err = p.parse_reply(p.encode(msg))
    assert err["error"] == {"code": "bundle.signature", "message": "untrusted", "step": "verify"}


def test_receipt_roundtrip_packs_seqs_into_ranges_per_boot_in_one_message() -> None:
    (one,) = p.receipts("dev1", telemetry={"b1": [5, 1, 2, 3, 9], "b0": [7]}, events={"b1": [4]},
                        replies=["c-2", "c-1", "c-2"])
    r = p.parse_receipt(p.encode(one))
    assert r["telemetry"] == {"b1": [[1, 3], [5, 5], [9, 9]], "b0": [[7, 7]]}
    assert r["events"] == {"b1": [[4, 4]]} and r["replies"] == ["c-1", "c-2"]
    assert p.seq_ranges([]) == [] and p.seq_ranges(range(10, 0, -1)) == [[1, 10]]


def test_receipts_split_to_stay_within_what_the_agent_accepts() -> None:
    odd = range(1, 2 * 2500, 2)  # 2,500 gaps: 2,500 ranges
    many = p.receipts("dev1", telemetry={"b1": odd, "b0": [1]}, events={"b1": [3]},
                      replies=[f"c{i}" for i in range(1500)])
    parsed = [p.parse_receipt(p.encode(m)) for m in many]
    got = {(k, b): [] for k in ("telemetry", "events") for b in ("b0", "b1")}
    for m in parsed:
        for k in ("telemetry", "events"):
            for b, ranges in m[k].items():
                got[(k, b)] += [s for lo, hi in ranges for s in range(lo, hi + 1)]
    assert sorted(got[("telemetry", "b1")]) == list(odd) and got[("telemetry", "b0")] == [1]
    assert got[("events", "b1")] == [3] and sum(len(m["replies"]) for m in parsed) == 1500
    assert len(parsed) == 3  # b1 telemetry needs 3 (2,500 ranges); b0, events and the replies ride along
    assert all(len(r) <= p.MAX_RECEIPT_RANGES for m in parsed for k in ("telemetry", "events")
               for r in m[k].values())
    assert len(p.receipts("dev1")) == 1  # nothing to say is still one (empty) receipt


# -- payloads: malformed ones are refused, naming the field ------------------------------------------------------

def _bad(builder_output: dict, **changes: object) -> bytes:
    d = json.loads(p.encode(builder_output))
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k, None)
        else:
            d[k] = v
    return json.dumps(d).encode()


_DROP = object()


def _cmd(kind: str, args: dict) -> bytes:
    return json.dumps({"v": 1, "id": "c1", "kind": kind, "args": args}).encode()

_STATUS = p.status("dev1", "online", boot="b")
_TELEMETRY = p.telemetry("dev1", "b", 1, [_model_entry([1.0])], interval_s=5.0)
_EVENT = p.event("dev1", "b", 1, "install", "ok")
_REPLY = p.reply("c-1", "dev1", True)
_RECEIPT = p.receipts("dev1", telemetry={"b": [1]})[0]


@pytest.mark.parametrize(
    ("parser", "payload", "fragment"),
    [
        (p.parse_status, _bad(_STATUS, device="a/b"), "status.device"),
        (p.parse_status, _bad(_STATUS, state="sleeping"), "status: state"),
        (p.parse_status, _bad(_STATUS, description=[1]), "status: description"),
        (p.parse_telemetry, _bad(_TELEMETRY, device="+"), "telemetry.device"),
        (p.parse_telemetry, _bad(_TELEMETRY, seq=-1), "field 'seq' must be >= 0"),
        (p.parse_telemetry, _bad(_TELEMETRY, seq=True), "field 'seq' has type bool"),
        (p.parse_telemetry, _bad(_TELEMETRY, boot=_DROP), "missing field 'boot'"),
        (p.parse_telemetry, _bad(_TELEMETRY, ts="now"), "field 'ts' has type str"),
        (p.parse_telemetry, _bad(_TELEMETRY, models={}), "field 'models' has type dict"),
        (p.parse_telemetry, _bad(_TELEMETRY, models=[1]), "telemetry.models[0]: must be an object"),
        (p.parse_telemetry, _bad(_TELEMETRY, models=[{**_model_entry([1.0]), "count": 2}]),
         "sketch holds 1 values but count is 2"),
        (p.parse_telemetry, _bad(_TELEMETRY, models=[{**_model_entry([1.0]), "providers": [1]}]),
         "providers must be strings"),
        (p.parse_telemetry, _bad(_TELEMETRY, models=[{**_model_entry([1.0]), "sketch": {"alpha": 0.01}}]),
         "invalid latency sketch"),
        (p.parse_telemetry, _bad(_TELEMETRY, process=[]), "process must be an object"),
        (p.parse_event, _bad(_EVENT, level="fatal"), "event: level"),
        (p.parse_event, _bad(_EVENT, kind=_DROP), "missing field 'kind'"),
        (p.parse_event, _bad(_EVENT, data=[]), "event: data"),
        (p.parse_command, json.dumps({"v": 1, "id": "c#1", "kind": "describe", "args": {}}).encode(), "cmd.id"),
        (p.parse_command, _cmd("reboot", {}), "unknown kind 'reboot'"),
        (p.parse_command, json.dumps({"v": 1, "id": "c1", "kind": "describe"}).encode(), "missing field 'args'"),
        (p.parse_command, _cmd("deploy", {"url": "https://x", "size": 1}),
         "missing field 'sha256'"),
        (p.parse_command, _cmd("deploy", {"url": "https://x", "sha256": "AB" * 32, "size": 1}), "sha256"),
        (p.parse_command, json.dumps({"v": 1, "id": "c1", "kind": "deploy",
                                      "args": {"url": "ftp://x", "sha256": SHA, "size": 1}}).encode(), "url must be"),
        (p.parse_command, _cmd("deploy", {"url": "https://x", "sha256": SHA, "size": 0}), "size must be > 0"),
        (p.parse_command, json.dumps({"v": 1, "id": "c1", "kind": "benchmark", "args": {"runs": 0}}).encode(), "runs"),
        (p.parse_command, json.dumps({"v": 1, "id": "c1", "kind": "configure",
                                      "args": {"telemetry_interval_s": 0}}).encode(), "telemetry_interval_s"),
        (p.parse_command, json.dumps({"v": 1, "id": "c1", "kind": "remove", "args": {"name": 3}}).encode(),
         "field 'name' has type int"),
        (p.parse_reply, _bad(_REPLY, status="maybe"), "reply: status"),
        (p.parse_reply, _bad(_REPLY, id=""), "reply.id"),
        (p.parse_reply, _bad(_REPLY, result=_DROP), "missing field 'result'"),
        (p.parse_reply, _bad(_REPLY, status="error"), "missing field 'error'"),
        (p.parse_receipt, _bad(_RECEIPT, device="#"), "receipt.device"),
        (p.parse_receipt, _bad(_RECEIPT, telemetry=[]), "field 'telemetry' has type list"),
        (p.parse_receipt, _bad(_RECEIPT, telemetry={"b": [[3, 1]]}), "first <= last"),
        (p.parse_receipt, _bad(_RECEIPT, telemetry={"b": [[1, 2, 3]]}), "a range must be"),
        (p.parse_receipt, _bad(_RECEIPT, telemetry={"b": [[True, 2]]}), "a range must be"),
        (p.parse_receipt, _bad(_RECEIPT, events={"b": [[0, 2**63]]}), "a range must be"),
        (p.parse_receipt, _bad(_RECEIPT, events={"b": [[1, 1]] * 1001}), "at most 1000 ranges"),
        (p.parse_receipt, _bad(_RECEIPT, replies=["a/b"]), "receipt.replies[]"),
        (p.parse_receipt, _bad(_RECEIPT, replies=_DROP), "missing field 'replies'"),
    ],
    ids=lambda v: v.__name__ if callable(v) else None,
)
def test_parsers_reject_malformed_payload_naming_the_field(parser, payload: bytes, fragment: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parser(payload)
    assert fragment in str(err.value)


@pytest.mark.parametrize("parser", [p.parse_status, p.parse_telemetry, p.parse_event, p.parse_command, p.parse_reply,
                                    p.parse_receipt])
def test_parsers_reject_wrong_version_non_json_non_object_and_oversized(parser) -> None:
    with pytest.raises(ProtocolError, match="unsupported version v=2"):
        parser(_bad(_STATUS, v=2))
    with pytest.raises(ProtocolError, match=r"unsupported version v=None"):
        parser(_bad(_STATUS, v=_DROP))
    with pytest.raises(ProtocolError, match="not JSON"):
        parser(b"{nope")
    with pytest.raises(ProtocolError, match="must be a JSON object"):
        parser(b"[1, 2]")
    with pytest.raises(ProtocolError, match="over the 262144-byte cap"):
        parser(b'{"v": 1, "pad": "' + b"x" * p.MAX_PAYLOAD + b'"}')


def test_decode_counts_bytes_not_characters_for_str_payloads() -> None:
    text = '{"v": 1, "pad": "' + "é" * (p.MAX_PAYLOAD // 2 + 10) + '"}'  # fewer chars than the cap, more bytes
    assert len(text) < p.MAX_PAYLOAD
    with pytest.raises(ProtocolError, match="byte cap"):
        p.decode(text)


def test_decode_rejects_nan_and_infinity() -> None:
    for const in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(ProtocolError, match="not JSON"):
            p.decode(f'{{"v": 1, "ts": {const}}}')


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        p.encode({"v": 1, "x": float(np.nan)})
