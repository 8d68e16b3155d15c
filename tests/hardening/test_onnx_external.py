"""The model-file check (``sdk/_onnx_external.py``): every place the ONNX proto can reference a file is found, what
ONNX Runtime itself reads from each place when nothing checks it, the schema table against the installed onnx, and
fuzzing (random bytes, mutated hostile models compared with protobuf's own parser, pathological nesting).

Runs on ORT 1.32 (``.venv``) and ORT 1.16.3 (``make test-ort-oldest``). The same hostile models go through the
agent's real installer in test_hostile_bundles.py.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _hostile_onnx import HOSTILE, MALFORMED, SECRET_F32, _varint, write_secrets
from edgefleet.sdk._onnx_external import (
    MAX_DEPTH,
    SCHEMA,
    check_external_data,
    external_refs,
    external_refs_in,
)
from edgefleet.sdk.bundle import version_key
from edgefleet.sdk.errors import BundleError, BundleFormatError, ModelError, UnsafeArchiveError
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CI_EXAMPLES, LONG_EXAMPLES = 200, 10_000
OLD_ORT = version_key(ort.__version__) < version_key("1.17")
# Refused for their form, wherever they point (strictness a lenient reader would miss): never "found".
STRICT = {"duplicate_location_key": (BundleFormatError, "key 'location' given twice"),
          "constant_value_given_twice": (ModelError, "field 5 given twice"),
          "unknown_field_with_tensor": (ModelError, "has no field 99")}
CLEAN = (BundleError, ModelError)  # what the walk may raise, whatever the bytes


# -- the schema table -----------------------------------------------------------------------------------------------

def _descriptor_schema() -> dict[str, dict[int, str]]:
    """The installed onnx's ModelProto schema in SCHEMA's notation."""
    out: dict[str, dict[int, str]] = {}

    def visit(d: Any) -> None:
        name = d.full_name.removeprefix("onnx.")
        if name in out:
            return
        out[name] = {}
        for f in d.fields:
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                child = f.message_type.full_name.removeprefix("onnx.")
                repeated = f.is_repeated if hasattr(f, "is_repeated") else f.label == FieldDescriptor.LABEL_REPEATED
                out[name][f.number] = child if repeated else child + "!"
                visit(f.message_type)
            else:
                out[name][f.number] = ""
    visit(onnx.ModelProto.DESCRIPTOR)
    return out


def test_schema_table_holds_every_field_of_the_installed_onnx() -> None:
    """Every message and field the installed onnx knows is in SCHEMA with the same kind (with onnx 1.23, the table
    is exactly the schema; older onnx builds, as in the ORT 1.16 venv, know a subset)."""
    installed = _descriptor_schema()
    for msg, fields in installed.items():
        assert msg in SCHEMA, f"{msg} missing from SCHEMA"
        for num, kind in fields.items():
            assert SCHEMA[msg].get(num) == kind, f"{msg}.{num}: SCHEMA has {SCHEMA[msg].get(num)!r}, onnx {kind!r}"
    if version_key(onnx.__version__) >= version_key("1.23"):
        assert installed == SCHEMA


# -- every hiding place ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(HOSTILE))
def test_every_hiding_place_is_found_or_refused(name: str, tmp_path: Path) -> None:
    loc = "../../outside/secret_f32.bin"
    data = HOSTILE[name].build(loc)
    if name in STRICT:
        error, match = STRICT[name]
        with pytest.raises(error, match=match):
            external_refs_in(data)
        return
    refs = external_refs_in(data)
    assert [r.location for r in refs] == [loc], refs
    # and through the bundle-level check: refused as unsafe before anything reads the file
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.onnx").write_bytes(data)
    with pytest.raises(UnsafeArchiveError, match="not a plain path inside the bundle"):
        check_external_data(tmp_path, "model/model.onnx", {"model/model.onnx": {}})


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_references_are_refused_whatever_they_point_at(name: str, tmp_path: Path) -> None:
    (tmp_path / "w.bin").write_bytes(SECRET_F32.tobytes())
    (tmp_path / "model.onnx").write_bytes(MALFORMED[name]("w.bin"))
    files = {"model.onnx": {}, "w.bin": {}, "*/_ORT_MEM_ADDR_/*": {}}
    with pytest.raises(CLEAN):
        check_external_data(tmp_path, "model.onnx", files)


def test_memory_address_tag_is_refused_even_when_the_manifest_lists_such_a_name(tmp_path: Path) -> None:
    """The bundle's path rules allow '*' in names; a model at the bundle root naming ORT's tag must still fail."""
    (tmp_path / "model.onnx").write_bytes(MALFORMED["memory_address_tag"]("x"))
    with pytest.raises(UnsafeArchiveError, match="in-memory address tag"):
        check_external_data(tmp_path, "model.onnx", {"model.onnx": {}, "*/_ORT_MEM_ADDR_/*": {}})


@pytest.mark.parametrize("loc", ["/etc/passwd", "../w.bin", "a/../../w.bin", "./w.bin", "a//w.bin", "w.bin\\..",
                                 "C:/w.bin", "w.bin\x00", "w\x1b.bin", "unlisted.bin", ""])
def test_location_rules(loc: str, tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(SECRET_F32.tobytes())
    (tmp_path / "model" / "model.onnx").write_bytes(HOSTILE["initializer"].build(loc))
    with pytest.raises(BundleError):
        check_external_data(tmp_path, "model/model.onnx", {"model/model.onnx": {}, "model/w.bin": {}})


def test_listed_file_next_to_the_model_passes_and_ranges_are_checked(tmp_path: Path) -> None:
    from _hostile_onnx import ext_tensor

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(SECRET_F32.tobytes())
    files = {"model/model.onnx": {}, "model/w.bin": {}}
    for name in ("initializer", "function_attribute_default", "nested_if_5_levels", "epcontext_cache_path"):
        (tmp_path / "model" / "model.onnx").write_bytes(HOSTILE[name].build("w.bin"))
        assert [r.location for r in check_external_data(tmp_path, "model/model.onnx", files)] == ["w.bin"]
    from _hostile_onnx import _add, _model

    for entries, ok in (([("location", "w.bin"), ("offset", "0"), ("length", "32")], True),
                        ([("location", "w.bin"), ("offset", "32")], True),
                        ([("location", "w.bin"), ("offset", "33")], False),
                        ([("location", "w.bin"), ("offset", "16"), ("length", "17")], False),
                        ([("location", "w.bin"), ("offset", "-1")], False),
                        ([("location", "w.bin"), ("length", "1e3")], False),
                        ([("location", "w.bin"), ("offset", "99999999999999999999")], False),
                        ([("location", "w.bin"), ("checksum", "abc")], True)):
        (tmp_path / "model" / "model.onnx").write_bytes(_model([_add("T")], [ext_tensor("T", "", entries=entries)]))
        if ok:
            check_external_data(tmp_path, "model/model.onnx", files)
        else:
            with pytest.raises(BundleFormatError):
                check_external_data(tmp_path, "model/model.onnx", files)


def test_ort_format_models_are_refused(tmp_path: Path) -> None:
    (tmp_path / "model.ort").write_bytes(HOSTILE["initializer"].build("w.bin"))
    with pytest.raises(BundleFormatError, match="ORT-format"):
        check_external_data(tmp_path, "model.ort", {"model.ort": {}})
    with pytest.raises(BundleFormatError, match="ORT-format"):
        external_refs_in(b"\x14\x00\x00\x00ORTM" + bytes(64))


def test_real_models_pass_with_no_references(tmp_path: Path, mlp_model: Path, figures: Any) -> None:
    """No false refusals: the shipped pretrained models (magika, silero-vad, nudenet's YOLOv8n) and the test MLP."""
    import importlib.util

    models = [mlp_model]
    for pkg, pattern in (("magika", "**/*.onnx"), ("silero_vad", "**/*.onnx"), ("nudenet", "**/*.onnx")):
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            models += sorted(Path(next(iter(spec.submodule_search_locations))).glob(pattern))
    assert len(models) >= 3, "the shipped models are installed by make setup"
    took = {}
    for m in models:
        t0 = time.perf_counter()
        assert external_refs(m) == []
        took[m.name] = {"bytes": m.stat().st_size, "ms": round((time.perf_counter() - t0) * 1000, 2)}
    figures.add("onnx_external", "real_models", took)


# -- what ONNX Runtime does with each model when nothing checks it --------------------------------------------------

def _ort_reads(model: Path, expect: tuple[float, ...]) -> str:
    try:
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": np.zeros(8, np.float32)})[0]
    except Exception as exc:  # noqa: BLE001 - recorded: ORT refusing is one of the outcomes
        return "refused: " + str(exc).splitlines()[0][-160:]
    return "READ" if np.allclose(y, expect) else "ran without reading it"


def test_what_onnxruntime_itself_reads_outside_the_model_dir(tmp_path: Path, figures: Any) -> None:
    """The control: each runnable hostile model, pointing out of its directory (``../../outside/``), handed straight
    to ONNX Runtime. Recorded per ORT version; on 1.16 ORT reads the outside file through a graph initializer, a
    Constant, and a model-local function's attribute default (issue 18), which is what the check must stop."""
    secrets = write_secrets(tmp_path / "outside")
    (tmp_path / "bundle" / "model").mkdir(parents=True)
    outcomes = {}
    for name, h in HOSTILE.items():
        if not h.runs:
            continue
        path = tmp_path / "bundle" / "model" / f"{name}.onnx"
        path.write_bytes(h.build(f"../../outside/{secrets[h.secret].name}"))
        outcomes[name] = _ort_reads(path, h.expect)
    figures.add("onnx_external", f"ort_{ort.__version__}_unchecked", outcomes)
    read = sorted(n for n, o in outcomes.items() if o == "READ")
    if OLD_ORT:
        assert {"initializer", "constant_value", "function_attribute_default", "function_body_constant"} <= set(read)
    for name in read:  # whatever this ORT reads, the check refuses (as unsafe, or as malformed for the strict cases)
        with pytest.raises(UnsafeArchiveError if name not in STRICT else STRICT[name][0]):
            check_external_data(tmp_path / "bundle", f"model/{name}.onnx", {f"model/{name}.onnx": {}})


@pytest.mark.parametrize("name", [n for n, h in HOSTILE.items() if h.runs and n not in STRICT])
def test_each_hiding_place_installs_and_serves_when_its_file_is_listed(
    name: str, tmp_path: Path, signing_key: Any, trusted: Any
) -> None:
    """No blanket refusal: the same models with their data in a listed file next to the model install through the
    agent's installer and serve the data (y = x + T)."""
    from edgefleet.agent.installer import Installer
    from edgefleet.agent.registry import Registry
    from edgefleet.agent.store import Store
    from edgefleet.sdk.testing import build_test_bundle

    h = HOSTILE[name]
    if name == "sparse_initializer_indices" and OLD_ORT:
        pytest.skip("ONNX Runtime 1.16 cannot load sparse indices from external data at all")
    src = tmp_path / "src"
    secrets = write_secrets(src)
    (src / "model.onnx").write_bytes(h.build(secrets[h.secret].name))
    bundle = build_test_bundle(src / "model.onnx", tmp_path / "b.efb", signing_key,
                               extra_files={f"model/{secrets[h.secret].name}": secrets[h.secret]})
    inst = Installer(Store(tmp_path / "data"), Registry(), trusted, targets=("x86-cpu",))
    import hashlib

    data = bundle.read_bytes()
    inst.install(bundle.as_uri(), hashlib.sha256(data).hexdigest(), len(data))
    model = inst.registry.get("testmodel")
    assert model is not None
    expect = h.expect if name not in ("training_info_initialization", "entries_without_data_location") else (0.0,) * 8
    np.testing.assert_allclose(model.run({"x": np.zeros(8, np.float32)})["y"], expect)


# -- fuzzing --------------------------------------------------------------------------------------------------------

def _run(long_run: bool, figures: Any, name: str, strategy: st.SearchStrategy[Any], check: Any) -> None:
    n = LONG_EXAMPLES if long_run else CI_EXAMPLES
    count = 0

    @settings(max_examples=n, deadline=None, database=None, derandomize=not long_run,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                     HealthCheck.large_base_example])
    @given(strategy)
    def fuzz(x: Any) -> None:
        nonlocal count
        count += 1
        check(x)

    t0 = time.perf_counter()
    fuzz()
    figures.add("fuzz", name, {"examples": count, "seconds": round(time.perf_counter() - t0, 2),
                               "mode": "long" if long_run else "ci"})


@functools.lru_cache(maxsize=1)
def _seeds() -> list[bytes]:
    seeds = [h.build("../../outside/secret_f32.bin") for h in HOSTILE.values()]
    seeds += [b("w.bin") for b in MALFORMED.values()]
    seeds.append(HOSTILE["initializer"].build("w.bin"))
    return seeds


@st.composite
def _mutated_model(draw: st.DrawFn) -> bytes:
    """A hostile or legit model's bytes with 1..6 edits: byte flips, inserted/deleted/duplicated spans, a varint
    grown or shrunk, truncation; sometimes spliced with another model."""
    seeds = _seeds()
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "dup", "truncate", "splice", "varint"]))
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "dup":
            j = min(len(data), i + draw(st.integers(1, 64)))
            data[j:j] = data[i:j]
        elif op == "truncate":
            del data[i:]
        elif op == "splice":
            other = draw(st.sampled_from(seeds))
            data[i:] = other[draw(st.integers(0, len(other) - 1)):]
        elif op == "varint":
            data[i:i + 1] = _varint(draw(st.integers(0, 1 << 70)))
    return bytes(data)


def _reference_refs(m: onnx.ModelProto) -> list[str]:
    """Every external tensor and EPContext file reference in a model parsed by protobuf (the reference parser),
    found by walking every message field of every message through the descriptors."""
    found: list[str] = []

    def visit(msg: Any) -> None:
        if isinstance(msg, onnx.TensorProto):
            if msg.data_location == onnx.TensorProto.EXTERNAL or len(msg.external_data):
                found.append(next((e.value for e in msg.external_data if e.key == "location"), ""))
        if isinstance(msg, onnx.NodeProto) and msg.op_type == "EPContext":
            attrs = {a.name: a for a in msg.attribute}
            embed = attrs["embed_mode"].i if "embed_mode" in attrs else 1
            if embed == 0 and "ep_cache_context" in attrs:
                found.append(attrs["ep_cache_context"].s.decode("utf-8", "replace"))
            if "onnx_model_filename" in attrs and attrs["onnx_model_filename"].s:
                found.append(attrs["onnx_model_filename"].s.decode("utf-8", "replace"))
        for field, value in msg.ListFields():
            if field.type != FieldDescriptor.TYPE_MESSAGE:
                continue
            for v in (value if _repeated(field) else [value]):
                visit(v)
    visit(m)
    return found


def _repeated(field: Any) -> bool:
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == FieldDescriptor.LABEL_REPEATED


def test_fuzz_mutated_models_never_hide_a_reference_protobuf_sees(long_run: bool, figures: Any) -> None:
    """Property, against protobuf's own parser: the walk returns or raises a clean error (BundleError, or
    ModelError for bytes that are no ONNX protobuf), never anything else; and
    whenever it accepts a model, every file reference protobuf's parse holds (external tensors anywhere, EPContext
    paths) is among the ones it reports."""
    stats = {"accepted": 0, "refused": 0, "protobuf_rejects": 0, "refs_seen": 0}

    def check(data: bytes) -> None:
        try:
            ours = external_refs_in(data)
        except CLEAN:
            stats["refused"] += 1
            return
        stats["accepted"] += 1
        try:
            m = onnx.ModelProto.FromString(data)
        except Exception:  # noqa: BLE001 - protobuf refusing what the walk accepted hides nothing from ORT
            stats["protobuf_rejects"] += 1
            return
        theirs = _reference_refs(m)
        stats["refs_seen"] += len(theirs)
        # ours may hold more (any data_location other than DEFAULT counts), never fewer
        assert not Counter(theirs) - Counter(r.location or "" for r in ours), (theirs, ours)

    _run(long_run, figures, "onnx_external.mutated_models", _mutated_model(), check)
    figures.add("fuzz", "onnx_external.mutated_models.outcomes", stats)
    assert stats["refused"] and stats["accepted"]


def test_fuzz_random_bytes_raise_only_clean_errors(long_run: bool, figures: Any) -> None:
    def check(data: bytes) -> None:
        try:
            external_refs_in(data)
        except CLEAN:
            pass

    strategy = st.one_of(st.binary(max_size=512),
                         st.lists(st.tuples(st.integers(0, 1 << 35), st.binary(max_size=40)), max_size=20).map(
                             lambda fs: b"".join(_varint(k) + _varint(len(v)) + v for k, v in fs)))
    _run(long_run, figures, "onnx_external.random_bytes", strategy, check)


def _nested_graphs(depth: int) -> bytes:
    """A model whose graph holds a node whose attribute holds a graph ... ``depth`` times (raw bytes, built in
    linear time: sizes bottom-up, then bytes top-down)."""
    sizes = []  # per level from the inside: (attr body, node body, graph body) sizes
    graph = 0  # the innermost graph is empty
    for _ in range(depth):
        attr = 1 + 1 + 1 + 1 + len(_varint(graph)) + graph  # name "g", then g=<graph>
        node = 1 + 1 + 2 + 1 + len(_varint(attr)) + attr  # op_type "If", then attribute=[attr]
        sizes.append((attr, node, graph))
        graph = 1 + len(_varint(node)) + node  # node=[node]
    out = [bytes([7 << 3 | 2]), _varint(graph)]
    for attr, node, inner in reversed(sizes):
        out += [bytes([1 << 3 | 2]), _varint(node), bytes([4 << 3 | 2, 2]), b"If", bytes([5 << 3 | 2]), _varint(attr),
                bytes([1 << 3 | 2, 1]), b"g", bytes([6 << 3 | 2]), _varint(inner)]
    return b"".join(out)


def test_nested_graph_builder_is_what_protobuf_reads() -> None:
    m = onnx.ModelProto.FromString(_nested_graphs(3))
    assert m.graph.node[0].attribute[0].g.node[0].attribute[0].g.node[0].attribute[0].g == onnx.GraphProto()


@pytest.mark.parametrize("depth", [10, (MAX_DEPTH - 1) // 3, (MAX_DEPTH - 1) // 3 + 1, 5_000, 300_000])
def test_deep_nesting_is_refused_cleanly_or_read(depth: int) -> None:
    """The innermost (empty) graph sits 3·depth + 1 messages down (model → graph → node → attribute → graph ...)."""
    data = _nested_graphs(depth)
    if 3 * depth + 1 <= MAX_DEPTH:
        assert external_refs_in(data) == []
    else:
        with pytest.raises(ModelError, match="nested deeper"):
            external_refs_in(data)
