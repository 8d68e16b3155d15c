"""JSON Schemas (draft 2020-12) generated from the protocol classes, and the field reference in the docs.

``sdk/schemas/<name>.json`` is the published contract: one file per MQTT channel payload and per HTTP API body,
committed and shipped in the wheel. ``python -m edgefleet.sdk.protocol write`` regenerates them and the generated
sections of docs/mqtt-protocol.md and docs/api.md; ``--check`` fails on any difference (tests/sdk/test_schemas.py
runs it), so code, schemas and docs cannot drift apart.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import msgspec

from . import _limits as L
from . import api, messages

__all__ = ["API_SCHEMAS", "MQTT_SCHEMAS", "check", "markdown_reference", "schemas", "write"]

MQTT_SCHEMAS: dict[str, type[msgspec.Struct]] = {
    "status": messages.Status, "telemetry": messages.Telemetry, "events": messages.Event, "cmd": messages.Command,
    "reply": messages.Reply, "receipt": messages.Receipt,
}
"""Schema file name (the channel) -> payload class."""

API_SCHEMAS: dict[str, type[msgspec.Struct]] = {
    "api-device-list": api.DeviceList, "api-device": api.DeviceRow, "api-windows": api.WindowList,
    "api-versions": api.VersionList, "api-events": api.EventList, "api-ingest": api.IngestCounters,
    "api-deployment-list": api.DeploymentList, "api-deployment": api.Deployment,
    "api-deployment-request": api.DeploymentRequest, "api-rollback-request": api.RollbackRequest,
    "api-rollback-sent": api.RollbackSent, "api-bundle-uploaded": api.BundleUploaded, "api-error": api.ApiError,
    "api-command-request": api.CommandRequest, "api-command": api.CommandStatus, "api-tokens": api.ApiTokenList,
    "api-variants": api.VariantList, "api-captures": api.CaptureList, "api-capture-stored": api.CaptureStored,
}
"""Schema file name -> HTTP body class (docs/api.md says which endpoint sends which)."""

_DRAFT = "https://json-schema.org/draft/2020-12/schema"
_SDK = Path(__file__).resolve().parents[1]  # sdk/ in the source tree, edgefleet/sdk/ in an installed wheel


def _schema(name: str, cls: type[msgspec.Struct]) -> dict[str, Any]:
    extra: list[type[msgspec.Struct]] = list(messages.COMMAND_ARGS.values()) if cls is messages.Command else []
    (top, *_), defs = msgspec.json.schema_components([cls, *extra], ref_template="#/$defs/{name}")
    if cls is messages.Command:
        # args depend on kind: say which class each kind's args are (msgspec cannot express a tag in the parent).
        defs["Command"]["allOf"] = [
            {"if": {"properties": {"kind": {"const": kind}}, "required": ["kind"]},
             "then": {"properties": {"args": {"$ref": f"#/$defs/{args.__name__}"}}}}
            for kind, args in messages.COMMAND_ARGS.items()]
    for d in defs.values():  # msgspec 0.23 dedents docstrings, 0.22 does not: the same text from either
        if isinstance(d.get("description"), str):
            d["description"] = inspect.cleandoc(d["description"])
    kind = "MQTT payload" if name in MQTT_SCHEMAS else "HTTP API body"
    return {"$schema": _DRAFT, "title": f"edgefleet v{L.VERSION} {name}",
            "$comment": f"{kind}, generated from edgefleet.sdk.protocol.{cls.__name__}; do not edit: "
                        "python -m edgefleet.sdk.protocol write",
            **top, "$defs": defs}


def schemas() -> dict[str, dict[str, Any]]:
    """Every published schema by file stem."""
    return {name: _schema(name, cls) for name, cls in {**MQTT_SCHEMAS, **API_SCHEMAS}.items()}


def _dump(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# -- the field reference in the docs --------------------------------------------------------------------------------

def _type(s: dict[str, Any]) -> str:
    if "$ref" in s:
        return str(s["$ref"]).rsplit("/", 1)[1]
    if "anyOf" in s:
        return " \\| ".join(_type(x) for x in s["anyOf"])
    if "enum" in s:
        return " \\| ".join(json.dumps(v) for v in s["enum"])
    if "const" in s:
        return json.dumps(s["const"])
    t = s.get("type", "any")
    if t == "array":
        if "prefixItems" in s:
            return "[" + ", ".join(_type(x) for x in s["prefixItems"]) + "]"
        return f"[{_type(s.get('items', {}))}]"
    if t == "object" and "additionalProperties" in s and isinstance(s["additionalProperties"], dict):
        return f"{{string: {_type(s['additionalProperties'])}}}"
    return str(t)


def _limits(s: dict[str, Any]) -> str:
    out = []
    for x in s.get("anyOf", [s]):
        for key, fmt in (("minimum", ">= {}"), ("exclusiveMinimum", "> {}"), ("maximum", "<= {}"),
                         ("exclusiveMaximum", "< {}"), ("minLength", "length >= {}"), ("maxLength", "length <= {}"),
                         ("minItems", ">= {} items"), ("maxItems", "<= {} items"),
                         ("maxProperties", "<= {} keys"), ("pattern", "`{}`")):
            if key in x:
                v = x[key]
                if isinstance(v, float) and v.is_integer() and abs(v) < 1e16:
                    v = int(v)
                out.append(fmt.format(v))
    return ", ".join(out)


def markdown_reference(names: list[str]) -> str:
    """One table per class reachable from the named schemas: field, type, required, limits, meaning."""
    every = schemas()
    defs: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for name in names:
        s = every[name]
        for def_name, d in s["$defs"].items():
            if def_name not in defs:
                defs[def_name] = d
                order.append(def_name)
    lines: list[str] = []
    for def_name in order:
        d = defs[def_name]
        where = [n for n in names if every[n]["$ref"].endswith(f"/{def_name}")]
        title = f"#### `{def_name}`" + (f" — `sdk/schemas/{where[0]}.json`" if where else "")
        lines += [title, ""]
        if d.get("description"):
            lines += [" ".join(d["description"].split()), ""]
        props = d.get("properties", {})
        if not props:
            lines += ["(no fields)", ""]
            continue
        lines += ["| field | type | required | limits | meaning |", "|---|---|---|---|---|"]
        required = set(d.get("required", []))
        for field, p in props.items():
            desc = " ".join(str(p.get("description", "")).split())
            for x in p.get("anyOf", []):
                if not desc and x.get("description"):
                    desc = " ".join(x["description"].split())
            lines.append(f"| `{field}` | {_type(p)} | {'yes' if field in required else 'no'} | {_limits(p)} "
                         f"| {desc} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


_BEGIN = "<!-- BEGIN GENERATED: {} (python -m edgefleet.sdk.protocol write) -->"
_END = "<!-- END GENERATED: {} -->"


def _with_section(text: str, key: str, body: str) -> str:
    begin, end = _BEGIN.format(key), _END.format(key)
    if begin not in text or end not in text:
        raise ValueError(f"the document has no generated section {key!r} ({begin} ... {end})")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}{end}{tail}"


_DOCS = {"mqtt-protocol.md": ("payloads", list(MQTT_SCHEMAS)), "api.md": ("api", list(API_SCHEMAS))}


def _outputs(schema_dir: Path, docs_dir: Path | None) -> dict[Path, str]:
    out = {schema_dir / f"{name}.json": _dump(s) for name, s in schemas().items()}
    if docs_dir is not None:
        for doc, (key, names) in _DOCS.items():
            path = docs_dir / doc
            out[path] = _with_section(path.read_text(encoding="utf-8"), key, markdown_reference(names))
    return out


def _default_dirs() -> tuple[Path, Path | None]:
    docs = _SDK.parent / "docs"  # only in a source tree (editable install); a wheel ships the schemas alone
    return _SDK / "schemas", docs if (docs / "mqtt-protocol.md").is_file() else None


def write(schema_dir: Path | None = None, docs_dir: Path | None = None) -> list[Path]:
    """Write the schemas (and the docs' generated sections); returns the files that changed."""
    sd, dd = _default_dirs()
    changed = []
    for path, text in _outputs(schema_dir or sd, docs_dir or dd).items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            changed.append(path)
    return changed


def check(schema_dir: Path | None = None, docs_dir: Path | None = None) -> list[Path]:
    """The files that differ from what the code generates (empty: schemas and docs are current)."""
    sd, dd = _default_dirs()
    stale = [path for path, text in _outputs(schema_dir or sd, docs_dir or dd).items()
             if not path.exists() or path.read_text(encoding="utf-8") != text]
    known = set(schemas())
    stale += [p for p in sorted((schema_dir or sd).glob("*.json")) if p.stem not in known]  # a schema we no longer make
    return stale
