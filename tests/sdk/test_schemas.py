"""The published contract cannot drift: committed schemas and docs match the code, and the docs' examples validate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from edgefleet.sdk import protocol
from edgefleet.sdk.protocol import schemas

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra")

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "sdk" / "schemas"


def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_committed_schemas_and_generated_docs_match_the_code() -> None:
    stale = schemas.check(SCHEMAS, ROOT / "docs")
    assert stale == [], f"regenerate with: python -m edgefleet.sdk.protocol write (stale: {stale})"


def test_check_notices_a_changed_schema_and_a_hand_edited_doc(tmp_path: Path) -> None:
    for p in SCHEMAS.glob("*.json"):
        (tmp_path / "schemas").mkdir(exist_ok=True)
        (tmp_path / "schemas" / p.name).write_text(p.read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("mqtt-protocol.md", "api.md"):
        (docs / name).write_text((ROOT / "docs" / name).read_text())
    assert schemas.check(tmp_path / "schemas", docs) == []
    t = tmp_path / "schemas" / "telemetry.json"
    t.write_text(t.read_text().replace('"maxItems": 64', '"maxItems": 65'))
    doc = docs / "mqtt-protocol.md"
    doc.write_text(doc.read_text().replace("| `seq` | integer |", "| `sequence` | integer |", 1))
    (tmp_path / "schemas" / "old.json").write_text("{}")
    assert {p.name for p in schemas.check(tmp_path / "schemas", docs)} == {"telemetry.json", "mqtt-protocol.md",
                                                                              "old.json"}


def test_every_schema_is_valid_draft_2020_12() -> None:
    for p in SCHEMAS.glob("*.json"):
        schema = json.loads(p.read_text())
        assert schema["$schema"].endswith("/draft/2020-12/schema"), p.name
        jsonschema.Draft202012Validator.check_schema(schema)


_HEADINGS = {"status (retained)": "status", "telemetry": "telemetry", "events": "events", "cmd and reply": None,
             "receipt (controller → agent)": "receipt"}


def _doc_examples() -> list[tuple[str, dict]]:
    """Every ```json block of docs/mqtt-protocol.md with the section it is in."""
    text = (ROOT / "docs" / "mqtt-protocol.md").read_text()
    out = []
    section = ""
    for part in re.split(r"(^### [^\n]*$|```json\n.*?```)", text, flags=re.M | re.S):
        if part.startswith("### "):
            section = part[4:].strip()
        elif part.startswith("```json"):
            out.append((section, json.loads(part[len("```json\n"):-3])))
    return out


def test_the_examples_in_the_protocol_doc_validate_against_the_schemas_and_the_model() -> None:
    examples = _doc_examples()
    assert len(examples) >= 7
    for section, example in examples:
        name = _HEADINGS[section]
        if name is None:  # a cmd and a reply under one heading
            name = "cmd" if "kind" in example else "reply"
        errors = [e.message for e in _validator(name).iter_errors(example)]
        assert errors == [], (section, errors)
        protocol.CHANNEL_TYPES[name].from_dict(example)


def test_the_schema_refuses_what_the_model_refuses() -> None:
    v = _validator("cmd")
    ok = protocol.command("deploy", {"url": "https://x/b.efb", "sha256": "a" * 64, "size": 1}).to_dict()
    assert list(v.iter_errors(ok)) == []
    assert list(v.iter_errors({**ok, "args": {"url": "ftp://x", "sha256": "a" * 64, "size": 1}}))  # if/then
    assert list(v.iter_errors({**ok, "v": 2}))
    assert list(v.iter_errors({k: x for k, x in ok.items() if k != "v"}))
    t = _validator("telemetry")
    rec = json.loads(json.dumps(json.load(open(ROOT / "tests" / "sdk" / "data" / "v1_payloads_0.1.0.json"))[
        "telemetry"]))
    assert list(t.iter_errors(rec)) == []
    rec["models"][0]["count"] = 2**40 + 1
    assert list(t.iter_errors(rec))


def test_the_wheel_ships_the_schemas() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert '"edgefleet.sdk.schemas" = ["*.json"]' in text  # tests/test_packaging.py builds the wheel and looks
    assert {p.stem for p in SCHEMAS.glob("*.json")} == set(schemas.schemas())
