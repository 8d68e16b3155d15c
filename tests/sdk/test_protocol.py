"""The protocol model: topics and ids, round trips, validation of types and ranges naming the field, compatibility
with what edgefleet 0.1.0 wrote and reads."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from edgefleet.sdk import protocol as p
from edgefleet.sdk.errors import PayloadTooLargeError, ProtocolError, ProtocolVersionError
from edgefleet.sdk.sketch import DDSketch

sys.path.insert(0, str(Path(__file__).parent))
import _protocol_v1_0 as v1_0

DATA = Path(__file__).parent / "data" / "v1_payloads_0.1.0.json"

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


# -- round trips ----------------------------------------------------------------------------------------------------

def _window(values: list[float], **kw: object) -> p.ModelWindow:
    sk = DDSketch()
    for v in values:
        sk.add(v)
    return p.ModelWindow(name="mlp", version="1.0.0", count=len(values), errors=0,
                         providers=["CPUExecutionProvider"], sketch=sk.to_wire(), **kw)


def _messages() -> dict[str, p.Message]:
    return {
        "status": p.Status(device="dev1", state="online", boot="b1", description={"profile": "x86-cpu"}),
        "status (will)": p.Status(device="dev1", state="offline", boot="b1", reason="connection lost"),
        "telemetry": p.Telemetry(device="dev1", boot="b1", seq=3, interval_s=10.0, models=[_window([1.0, 2.0, 4.0])],
                                 process={"rss_bytes": 1}),
        "event": p.Event(device="dev1", boot="b1", seq=1, kind="install", message="installed mlp 1.0.0",
                         level="warning", data={"digest": SHA, "nested": {"a": [1, 2.5, None, True]}}),
        "cmd": p.command("deploy", {"url": "https://ctl/b.efb", "sha256": SHA, "size": 10}, cmd_id="c-1", ttl_s=60),
        "reply": p.Reply.failed("c-1", "dev1", "bundle.signature", "untrusted", "verify"),
        "reply (ok)": p.Reply.ok("c-2", "dev1", {"installed": "mlp"}),
        "receipt": p.receipts("dev1", telemetry={"b1": [5, 1, 2, 3, 9]}, events={"b1": [4]}, replies=["c-1"])[0],
    }


@pytest.mark.parametrize("name", list(_messages()))
def test_every_message_round_trips_through_json_and_dicts(name: str) -> None:
    msg = _messages()[name]
    cls = type(msg)
    assert cls.from_json(msg.to_json()) == msg
    assert cls.from_dict(msg.to_dict()) == msg
    assert json.loads(msg.to_json())["v"] == 1  # the version is always on the wire
    channel = {"event": "events"}.get(name.split()[0], name.split()[0])
    assert p.decode(channel, msg.to_json()) == msg


def test_telemetry_keeps_a_mergeable_sketch_and_constructors_coerce_nested_dicts() -> None:
    t = p.Telemetry.from_json(_messages()["telemetry"].to_json())
    sk = DDSketch.from_wire(t.models[0].sketch)
    assert sk.count == 3 and sk.quantile(1.0) == pytest.approx(4.0, rel=0.01)
    st = p.Status(device="d", state="online", description={"profile": "x86-cpu", "tags": ["a"]})
    assert isinstance(st.description, p.Description) and st.description.tags == ["a"]


def test_receipts_pack_seqs_into_ranges_per_boot_in_one_message() -> None:
    r = p.Receipt.from_json(_messages()["receipt"].to_json())
    assert r.telemetry == {"b1": [[1, 3], [5, 5], [9, 9]]} and r.events == {"b1": [[4, 4]]}
    assert r.replies == ["c-1"]
    assert p.seq_ranges([]) == [] and p.seq_ranges(range(10, 0, -1)) == [[1, 10]]


def test_receipts_split_to_stay_within_what_the_agent_accepts() -> None:
    odd = range(1, 2 * 2500, 2)  # 2,500 gaps: 2,500 ranges
    many = p.receipts("dev1", telemetry={"b1": odd, "b0": [1]}, events={"b1": [3]},
                      replies=[f"c{i}" for i in range(1500)])
    parsed = [p.Receipt.from_json(m.to_json()) for m in many]
    got: dict[tuple[str, str], list[int]] = {(k, b): [] for k in ("telemetry", "events") for b in ("b0", "b1")}
    for m in parsed:
        for k in ("telemetry", "events"):
            for b, ranges in getattr(m, k).items():
                got[(k, b)] += [s for lo, hi in ranges for s in range(lo, hi + 1)]
    assert sorted(got[("telemetry", "b1")]) == list(odd) and got[("telemetry", "b0")] == [1]
    assert got[("events", "b1")] == [3] and sum(len(m.replies) for m in parsed) == 1500
    assert len(parsed) == 3  # b1 telemetry needs 3 (2,500 ranges); b0, events and the replies ride along
    assert len(p.receipts("dev1")) == 1  # nothing to say is still one (empty) receipt
    boots = p.receipts("dev1", telemetry={f"b{i}": [1] for i in range(600)})
    assert len(boots) == 3 and all(len(r.telemetry) <= 256 for r in boots)


def test_command_args_are_typed_per_kind() -> None:
    cmd = _messages()["cmd"]
    assert isinstance(cmd, p.Command)
    args = cmd.args_as(p.DeployArgs)
    assert (args.sha256, args.size) == (SHA, 10) and cmd.typed_args() == args
    with pytest.raises(ProtocolError, match="a deploy command has no RollbackArgs"):
        cmd.args_as(p.RollbackArgs)
    assert p.command("benchmark").args_as(p.BenchmarkArgs).runs == 100
    assert p.command("describe").id != p.command("describe").id


# -- validation: types and ranges, one line naming the field --------------------------------------------------------

def _edit(msg: p.Message, path: str, value: object) -> bytes:
    d = msg.to_dict()
    *parents, last = path.split(".")
    node: object = d
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]  # type: ignore[index]
    if value is _DROP:
        del node[last]  # type: ignore[attr-defined]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value  # type: ignore[index]
    return json.dumps(d).encode()


_DROP = object()
_M = _messages()


@pytest.mark.parametrize(
    ("name", "path", "value", "fragment"),
    [
        ("status", "device", "a/b", "status.device: Expected `str` matching regex"),
        ("status", "state", "sleeping", "status.state: Invalid enum value 'sleeping'"),
        ("status", "description", [1], "status.description: Expected `object | null`, got `array`"),
        ("status", "description.tags", ["x" * 65], "status.description.tags[0]"),
        ("status", "ts", 5e9, "status.ts: Expected `float` <= 4102444800.0"),
        ("telemetry", "device", "+", "telemetry.device"),
        ("telemetry", "seq", -1, "telemetry.seq: Expected `int` >= 0"),
        ("telemetry", "seq", True, "telemetry.seq: Expected `int`, got `bool`"),
        ("telemetry", "seq", 2**63, "telemetry.seq: Expected `int` <= 9223372036854775807"),
        ("telemetry", "boot", _DROP, "Object missing required field `boot`"),
        ("telemetry", "ts", "now", "telemetry.ts: Expected `float`, got `str`"),
        ("telemetry", "interval_s", 0, "telemetry.interval_s: Expected `float` > 0.0"),
        ("telemetry", "models", {}, "telemetry.models: Expected `array`, got `object`"),
        ("telemetry", "models", [1], "telemetry.models[0]: Expected `object`"),
        ("telemetry", "models", _M["telemetry"].to_dict()["models"] * 65,
         "telemetry.models: Expected `array` of length <= 64"),
        ("telemetry", "models.0.count", 2, "telemetry.models[0]: sketch holds 3 values but count is 2"),
        ("telemetry", "models.0.count", 2**40 + 1, "telemetry.models[0].count: Expected `int` <= 1099511627776"),
        ("telemetry", "models.0.providers", [1], "telemetry.models[0].providers[0]: Expected `str`"),
        ("telemetry", "models.0.name", "n" * 129, "telemetry.models[0].name: Expected `str` of length <= 128"),
        ("telemetry", "models.0.sketch", {"alpha": 0.01}, "telemetry.models[0].sketch: Object missing required"),
        ("telemetry", "models.0.sketch.alpha", 0.02, "telemetry.models[0].sketch: alpha must be 0.01"),
        ("telemetry", "models.0.sketch.sum", -1.0, "telemetry.models[0].sketch.sum: Expected `float` >= 0.0"),
        ("telemetry", "models.0.sketch.offset", 10**6, "telemetry.models[0].sketch.offset: Expected `int` <="),
        ("telemetry", "models.0.sketch.counts", [1] * 4097, "sketch.counts: Expected `array` of length <= 4096"),
        ("telemetry", "process", [], "telemetry.process: Expected `object`, got `array`"),
        ("telemetry", "process.rss_bytes", 2**60, "telemetry.process.rss_bytes: Expected `int` <="),
        ("event", "level", "fatal", "event.level"),
        ("event", "kind", _DROP, "Object missing required field `kind`"),
        ("event", "data", [], "event.data: Expected `object`, got `array`"),
        ("event", "data.command", "a/b", "event: data.command must be a command id"),
        ("event", "message", "m" * 4097, "event.message: Expected `str` of length <= 4096"),
        ("cmd", "id", "c#1", "cmd.id"),
        ("cmd", "kind", "reboot", "cmd.kind: Invalid enum value 'reboot'"),
        ("cmd", "args", _DROP, "Object missing required field `args`"),
        ("cmd", "args.sha256", "AB" * 32, "cmd: args.sha256: Expected `str` matching regex"),
        ("cmd", "args.url", "ftp://x", "cmd: args.url"),
        ("cmd", "args.size", 0, "cmd: args.size: Expected `int` >= 1"),
        ("cmd", "counter", 0, "cmd.counter: Expected `int` >= 1"),
        ("cmd", "signature", {"alg": "rsa", "keyid": "0" * 16, "sig": ""}, "cmd.signature.alg"),
        ("reply", "status", "maybe", "reply.status"),
        ("reply", "id", "", "reply.id"),
        ("reply", "error", _DROP, "reply: an error reply carries an error"),
        ("reply (ok)", "result", _DROP, "reply: an ok reply carries a result"),
        ("receipt", "device", "#", "receipt.device"),
        ("receipt", "telemetry", [], "receipt.telemetry: Expected `object`, got `array`"),
        ("receipt", "telemetry", {"b": [[3, 1]]}, "range [3, 1] is not [first, last]"),
        ("receipt", "telemetry", {"b": [[1, 2, 3]]}, "receipt.telemetry[...][0]: Expected `array` of length <= 2"),
        ("receipt", "telemetry", {"b": [[True, 2]]}, "Expected `int`, got `bool`"),
        ("receipt", "events", {"b": [[0, 2**63]]}, "Expected `int` <= 9223372036854775807"),
        ("receipt", "events", {"b": [[1, 1]] * 1001}, "Expected `array` of length <= 1000"),
        ("receipt", "replies", ["a/b"], "receipt.replies[0]"),
        ("receipt", "replies", _DROP, "Object missing required field `replies`"),
    ],
)
def test_malformed_payloads_are_refused_naming_the_field(name: str, path: str, value: object, fragment: str) -> None:
    msg = _M[name]
    with pytest.raises(ProtocolError) as err:
        type(msg).from_json(_edit(msg, path, value))
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)  # one line


@pytest.mark.parametrize("cls", [p.Status, p.Telemetry, p.Event, p.Command, p.Reply, p.Receipt])
def test_wrong_version_non_json_non_object_oversized_and_non_finite_are_refused(cls: type[p.Message]) -> None:
    with pytest.raises(ProtocolVersionError, match="unsupported version"):
        cls.from_json(b'{"v": 2}')
    with pytest.raises(ProtocolVersionError, match="unsupported version"):
        cls.from_json(b'{"device": "d"}')
    with pytest.raises(ProtocolError, match="not JSON"):
        cls.from_json(b"{nope")
    with pytest.raises(ProtocolError, match="Expected `object`, got `array`"):
        cls.from_json(b"[1, 2]")
    with pytest.raises(PayloadTooLargeError, match="over the 262144-byte cap"):
        cls.from_json(b'{"v": 1, "pad": "' + b"x" * p.MAX_PAYLOAD + b'"}')
    text = '{"v": 1, "pad": "' + "é" * (p.MAX_PAYLOAD // 2 + 10) + '"}'  # fewer chars than the cap, more bytes
    assert len(text) < p.MAX_PAYLOAD
    with pytest.raises(PayloadTooLargeError):
        cls.from_json(text)
    for const in ("NaN", "Infinity", "-Infinity", "1e999"):
        with pytest.raises(ProtocolError):
            cls.from_json(f'{{"v": 1, "ts": {const}}}')


@pytest.mark.parametrize(
    ("data", "fragment"),
    [({"z": 2**64}, "data.z: integer 18446744073709551616 is outside 64 bits"),
     ({"deep": json.loads("[" * 12 + "]" * 12)}, "nested deeper than 8 levels"),
     ({"long": "x" * 5000}, "data.long: string of 5000 chars, over 4096"),
     ({"many": list(range(1025))}, "data.many: 1025 items, over 1024"),
     ({"k" * 129: 1}, "is not a string of at most 128 chars")],
)
def test_free_form_data_is_bounded_too(data: dict, fragment: str) -> None:
    ev = _M["event"].to_dict()
    with pytest.raises(ProtocolError, match="event") as err:
        p.Event.from_json(json.dumps({**ev, "data": data}))
    assert fragment in str(err.value)


def test_building_a_message_validates_it_like_decoding_does() -> None:
    with pytest.raises(ProtocolError, match=r"telemetry.seq: Expected `int` <= 9223372036854775807"):
        p.Telemetry(device="d", boot="b", seq=2**64, interval_s=1.0, models=[])
    with pytest.raises(ProtocolError, match=r"status\.state"):
        p.Status(device="d", state="sideways")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="not a finite number"):
        p.Event(device="d", boot="b", seq=1, kind="k", message="m", data={"x": math.nan})
    with pytest.raises(ProtocolError, match="sketch holds 3 values but count is 4"):
        _window([1.0, 2.0, 3.0]).__class__(name="m", version="1", count=4, errors=0, providers=[],
                                            sketch=_window([1.0, 2.0, 3.0]).sketch)
    with pytest.raises(ProtocolError, match=r"cmd\.kind: unknown kind .reboot."):
        p.command("reboot")


def test_check_clock_refuses_a_timestamp_from_the_future_only() -> None:
    p.check_clock(1000.0, now=1000.0 - 299, what="status")
    p.check_clock(0.0, now=2e9, what="telemetry")  # the past is fine (an outbox drains after an outage)
    with pytest.raises(ProtocolError, match=r"status.ts: 301 s ahead of this controller's clock"):
        p.check_clock(1301.0, now=1000.0, what="status")


# -- compatibility: 0.1.0's payloads and reader ---------------------------------------------------------------------

_V1_0 = json.loads(DATA.read_text())
_READERS = {"status": v1_0.parse_status, "telemetry": v1_0.parse_telemetry, "event": v1_0.parse_event,
            "cmd": v1_0.parse_command, "reply": v1_0.parse_reply, "receipt": v1_0.parse_receipt}
_CLASSES = {"status": p.Status, "telemetry": p.Telemetry, "event": p.Event, "cmd": p.Command, "reply": p.Reply,
            "receipt": p.Receipt}


def _understood(old: object, obj: object, where: str) -> None:
    """Every field of ``old`` is a field of the parsed ``obj`` with the same value (free-form dicts as they are)."""
    if isinstance(obj, p.Model):
        assert isinstance(old, dict), where
        for key, value in old.items():
            assert key == "v" or key in obj.__struct_fields__, f"{where}.{key} is not a field of {type(obj).__name__}"
            if key != "v":
                _understood(value, getattr(obj, key), f"{where}.{key}")
    elif isinstance(obj, list) and obj and isinstance(obj[0], p.Model):
        assert isinstance(old, list) and len(old) == len(obj), where
        for i, (o, x) in enumerate(zip(old, obj, strict=True)):
            _understood(o, x, f"{where}[{i}]")
    else:
        assert old == obj, where


@pytest.mark.parametrize("name", list(_V1_0))
def test_payloads_written_by_0_1_0_parse_with_the_model(name: str) -> None:
    old = _V1_0[name]
    cls = _CLASSES[name.split()[0]]
    msg = cls.from_json(json.dumps(old))
    _understood(old, msg, cls._what)  # every field 0.1.0 wrote is understood, with its value
    assert cls.from_json(msg.to_json()) == msg


@pytest.mark.parametrize("name", list(_messages()))
def test_what_the_model_writes_parses_with_the_0_1_0_reader(name: str) -> None:
    msg = _messages()[name]
    _READERS[name.split()[0]](msg.to_json())


def test_a_payload_from_a_newer_v1_writer_is_accepted_and_its_new_fields_ignored() -> None:
    new = dict(_V1_0["telemetry"])
    new["gpu"] = {"util_percent": 40}  # a field a future v1 agent might add
    new["models"] = [{**new["models"][0], "energy_j": 1.5}]
    got = p.Telemetry.from_json(json.dumps(new))
    assert got == p.Telemetry.from_json(json.dumps(_V1_0["telemetry"]))
    assert "gpu" not in json.loads(got.to_json())


def test_a_signature_covers_fields_the_agent_does_not_know(signing_key, trusted) -> None:
    cmd = p.sign_command(p.command("describe", cmd_id="c-9"), signing_key, counter=5, ttl_s=60)
    assert p.verify_command(cmd, trusted) == signing_key.public.key_id
    raw = cmd.to_dict()
    raw["priority"] = "high"  # signed by a newer controller: part of what it signed
    raw["signature"] = signing_key.sign(p.signed_part(raw))
    payload = json.dumps(raw).encode()
    parsed = p.Command.from_json(payload)
    assert p.verify_command(parsed, trusted, payload=payload) == signing_key.public.key_id
    tampered = json.dumps({**raw, "priority": "low"}).encode()
    with pytest.raises(Exception, match="signature"):
        p.verify_command(p.Command.from_json(tampered), trusted, payload=tampered)
