"""ONNX models that hide a file reference in every place the ONNX proto allows, built with onnx.helper and raw
protobuf bytes. Shared by tests/hardening/test_onnx_external.py (the parser, and what ONNX Runtime itself does with
each model when nothing checks it) and tests/hardening/test_hostile_bundles.py (through the agent's installer).

Every runnable model takes ``x`` (float32 [8]) and returns ``y = x + T`` where ``T`` is read through the hidden
reference, so running it on zeros shows whether ONNX Runtime read the file: the secret files hold values no model
carries inline (:data:`SECRET_F32`, and int64 indices :data:`SECRET_I64` for the sparse-indices case).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper

SECRET_F32 = np.array([11, 22, 33, 44, 55, 66, 77, 88], np.float32)  # 32 bytes
SECRET_I64 = np.array([1, 3, 5, 7], np.int64)  # 32 bytes: sparse indices
N = 8
OPSET = 17
IR = 9  # functions with attribute defaults (attribute_proto) need IR 9; ORT 1.16 reads up to 9


@dataclass(frozen=True)
class Hostile:
    """One way to hide a file reference: ``build(location)`` → serialized model bytes.

    ``runs``: a CPU-EP session can run it (so a control run shows whether ORT reads the file); ``secret``: which
    secret file the location must name for the output to show the read ("f32" or "i64"); ``expect``: the output
    ``y`` when ORT read the secret, for x = zeros.
    """

    build: Callable[[str], bytes]
    runs: bool = True
    secret: str = "f32"
    expect: tuple[float, ...] = tuple(float(v) for v in SECRET_F32)


def ext_tensor(name: str, location: str, *, dtype: int | None = None, dims: tuple[int, ...] = (N,),
               data_location: bool = True, entries: list[tuple[str, str]] | None = None) -> TensorProto:
    """A TensorProto whose data is external at ``location`` (or with the given raw entries)."""
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.FLOAT if dtype is None else dtype
    t.dims.extend(dims)
    if data_location:
        t.data_location = TensorProto.EXTERNAL
    for k, v in entries if entries is not None else [("location", location)]:
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def _io() -> tuple[list, list]:
    return ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [N])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [N])])


def _model(nodes: list, inits: list | None = None, *, sparse: list | None = None, functions: list | None = None,
           extra_opsets: tuple[tuple[str, int], ...] = ()) -> bytes:
    inputs, outputs = _io()
    g = helper.make_graph(nodes, "hostile", inputs, outputs, inits or [], sparse_initializer=sparse or [])
    opsets = [helper.make_opsetid("", OPSET), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    m = helper.make_model(g, opset_imports=opsets, functions=functions or [], producer_name="edgefleet-hostile")
    m.ir_version = IR
    return m.SerializeToString()


def _add(t_name: str) -> object:
    return helper.make_node("Add", ["x", t_name], ["y"])


def _branch(nodes: list, out: str, inits: list | None = None) -> object:
    return helper.make_graph(nodes, "branch", [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, [N])],
                             inits or [])


def _zeros(name: str) -> object:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name + "_v", TensorProto.FLOAT, [N],
                                                                               [0.0] * N))


def _if(then_graph: object, out: str) -> list:
    cond = helper.make_node("Constant", [], [out + "_cond"], value=helper.make_tensor("c", TensorProto.BOOL, [],
                                                                                      [True]))
    return [cond, helper.make_node("If", [out + "_cond"], [out], then_branch=then_graph,
                                   else_branch=_branch([_zeros(out + "_e")], out + "_e"))]


# -- the hiding places ------------------------------------------------------------------------------------------------

def initializer(loc: str) -> bytes:
    return _model([_add("T")], [ext_tensor("T", loc)])


def sparse_values(loc: str) -> bytes:
    values = ext_tensor("T", loc, dims=(N,))
    indices = helper.make_tensor("T_idx", TensorProto.INT64, [N], list(range(N)))
    return _model([_add("T")], sparse=[helper.make_sparse_tensor(values, indices, [N])])


def sparse_indices(loc: str) -> bytes:
    values = helper.make_tensor("T", TensorProto.FLOAT, [4], [1.0, 1.0, 1.0, 1.0])
    indices = ext_tensor("T_idx", loc, dtype=TensorProto.INT64, dims=(4,))
    return _model([_add("T")], sparse=[helper.make_sparse_tensor(values, indices, [N])])


def constant_value(loc: str) -> bytes:
    return _model([helper.make_node("Constant", [], ["T"], value=ext_tensor("Tv", loc)), _add("T")])


def constant_sparse_value(loc: str) -> bytes:
    sp = helper.make_sparse_tensor(ext_tensor("Tv", loc), helper.make_tensor("Ti", TensorProto.INT64, [N],
                                                                             list(range(N))), [N])
    return _model([helper.make_node("Constant", [], ["T"], sparse_value=sp), _add("T")])


def if_branch_initializer(loc: str) -> bytes:
    then = _branch([helper.make_node("Identity", ["Tb"], ["t_out"])], "t_out", [ext_tensor("Tb", loc)])
    return _model([*_if(then, "T"), _add("T")])


def if_branch_constant(loc: str) -> bytes:
    then = _branch([helper.make_node("Constant", [], ["t_out"], value=ext_tensor("Tb", loc))], "t_out")
    return _model([*_if(then, "T"), _add("T")])


def nested_if_5_levels(loc: str) -> bytes:
    g = _branch([helper.make_node("Constant", [], ["l0"], value=ext_tensor("Tb", loc))], "l0")
    for level in range(1, 5):
        g = _branch(_if(g, f"l{level}"), f"l{level}")
    return _model([*_if(g, "T"), _add("T")])


def loop_body(loc: str) -> bytes:
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["Tb"], value=ext_tensor("Tv", loc)),
         helper.make_node("Add", ["v_in", "Tb"], ["v_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [N])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [N])])
    m = helper.make_tensor("M", TensorProto.INT64, [], [1])
    c = helper.make_tensor("C", TensorProto.BOOL, [], [True])
    return _model([helper.make_node("Loop", ["M", "C", "x"], ["y"], body=body)], [m, c])


def scan_body(loc: str) -> bytes:
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["Tb"], value=ext_tensor("Tv", loc)),
         helper.make_node("Add", ["s_in", "Tb"], ["s_out"]),
         helper.make_node("Identity", ["e_in"], ["e_out"])],
        "body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [N]),
         helper.make_tensor_value_info("e_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [N]),
         helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1])])
    seq = helper.make_tensor("seq", TensorProto.FLOAT, [1, 1], [0.0])
    return _model([helper.make_node("Scan", ["x", "seq"], ["y", "ys"], body=body, num_scan_inputs=1)], [seq])


def _function(nodes: list, *, attributes: list[str] = (), defaults: list | None = None) -> object:  # type: ignore[assignment]
    f = helper.make_function("local", "F", ["fx"], ["fy"], nodes, [helper.make_opsetid("", OPSET)],
                             attributes=list(attributes))
    if defaults:
        f.attribute_proto.extend(defaults)
    return f


def _call(**attrs: object) -> object:
    return helper.make_node("F", ["x"], ["y"], domain="local", **attrs)


def function_body_constant(loc: str) -> bytes:
    f = _function([helper.make_node("Constant", [], ["c"], value=ext_tensor("Tv", loc)),
                   helper.make_node("Add", ["fx", "c"], ["fy"])])
    return _model([_call()], functions=[f], extra_opsets=(("local", 1),))


def function_attribute_default(loc: str) -> bytes:
    """Issue 18's case: the tensor is the default of a function attribute (FunctionProto.attribute_proto); the body's
    Constant refers to it, and the call site does not set it."""
    const = helper.make_node("Constant", [], ["c"])
    ref = const.attribute.add()
    ref.name, ref.ref_attr_name, ref.type = "value", "w", AttributeProto.TENSOR
    default = helper.make_attribute("w", ext_tensor("Tv", loc))
    f = _function([const, helper.make_node("Add", ["fx", "c"], ["fy"])], defaults=[default])
    return _model([_call()], functions=[f], extra_opsets=(("local", 1),))


def function_call_attribute(loc: str) -> bytes:
    const = helper.make_node("Constant", [], ["c"])
    ref = const.attribute.add()
    ref.name, ref.ref_attr_name, ref.type = "value", "w", AttributeProto.TENSOR
    f = _function([const, helper.make_node("Add", ["fx", "c"], ["fy"])], attributes=["w"])
    return _model([_call(w=ext_tensor("Tv", loc))], functions=[f], extra_opsets=(("local", 1),))


def function_body_if(loc: str) -> bytes:
    then = _branch([helper.make_node("Constant", [], ["t_out"], value=ext_tensor("Tb", loc))], "t_out")
    f = _function([*_if(then, "c"), helper.make_node("Add", ["fx", "c"], ["fy"])])
    return _model([_call()], functions=[f], extra_opsets=(("local", 1),))


def training_info_initialization(loc: str) -> bytes:
    m = onnx.ModelProto.FromString(_model([_add("T")], [helper.make_tensor("T", 1, [N], [0.0] * N)]))
    ti = m.training_info.add()
    ti.initialization.CopyFrom(_branch([helper.make_node("Identity", ["Ti"], ["ti_out"])], "ti_out",
                                       [ext_tensor("Ti", loc)]))
    return m.SerializeToString()


def _custom_attr_model(**attrs: object) -> bytes:
    node = helper.make_node("Hide", ["x"], ["y"], domain="evil.custom", **attrs)
    return _model([node], extra_opsets=(("evil.custom", 1),))


def tensors_attribute(loc: str) -> bytes:
    return _custom_attr_model(ts=[helper.make_tensor("ok", 1, [1], [1.0]), ext_tensor("Tv", loc)])


def graphs_attribute(loc: str) -> bytes:
    g = _branch([helper.make_node("Identity", ["Tg"], ["g_out"])], "g_out", [ext_tensor("Tg", loc)])
    return _custom_attr_model(gs=[g])


def sparse_tensors_attribute(loc: str) -> bytes:
    sp = helper.make_sparse_tensor(ext_tensor("Tv", loc), helper.make_tensor("Ti", TensorProto.INT64, [N],
                                                                             list(range(N))), [N])
    return _custom_attr_model(sps=[sp])


def epcontext_cache_path(loc: str) -> bytes:
    node = helper.make_node("EPContext", ["x"], ["y"], domain="com.microsoft", name="ctx", embed_mode=0,
                            ep_cache_context=loc.encode(), source="OpenVINOExecutionProvider", main_context=1)
    return _model([node], extra_opsets=(("com.microsoft", 1),))


def epcontext_embed_mode_without_value(loc: str) -> bytes:
    """``embed_mode`` present but with no value: protobuf (and so ORT) reads it as 0, a path."""
    node = helper.make_node("EPContext", ["x"], ["y"], domain="com.microsoft", name="ctx",
                            ep_cache_context=loc.encode(), source="OpenVINOExecutionProvider")
    a = node.attribute.add()
    a.name, a.type = "embed_mode", AttributeProto.INT
    return _model([node], extra_opsets=(("com.microsoft", 1),))


def epcontext_onnx_model_filename(loc: str) -> bytes:
    node = helper.make_node("EPContext", ["x"], ["y"], domain="com.microsoft", name="ctx", embed_mode=1,
                            ep_cache_context=b"\x00blob", onnx_model_filename=loc, source="TensorrtExecutionProvider")
    return _model([node], extra_opsets=(("com.microsoft", 1),))


def entries_without_data_location(loc: str) -> bytes:
    """external_data entries while data_location stays DEFAULT (ORT then reads the inline data; refused anyway)."""
    t = helper.make_tensor("T", 1, [N], [0.0] * N)
    e = t.external_data.add()
    e.key, e.value = "location", loc
    return _model([_add("T")], [t])


def data_location_unknown_enum_after_external(loc: str) -> bytes:
    """data_location EXTERNAL, then an unknown value 7 in the same tensor's bytes: protobuf keeps the unknown value
    as an unknown field, so the tensor stays EXTERNAL. A reader that takes the last value sees DEFAULT."""
    t = ext_tensor("T", loc)
    raw = t.SerializeToString() + bytes([14 << 3 | 0, 7])
    return _model_with_raw_initializer(raw)


def external_without_location(loc: str) -> bytes:
    return _model([_add("T")], [ext_tensor("T", loc, entries=[("offset", "0")])])


def duplicate_location_key(loc: str) -> bytes:
    return _model([_add("T")], [ext_tensor("T", loc, entries=[("location", "w.bin"), ("location", loc)])])


def prepacked_key(loc: str) -> bytes:
    return _model([_add("T")], [ext_tensor("T", loc, entries=[("location", "w.bin"),
                                                              ("prepacked_1", f"k|{1 << 40};16;0")])])


def memory_address_tag(loc: str) -> bytes:
    """ORT's in-memory tag: the "offset" would be read as a pointer (never run)."""
    return _model([_add("T")], [ext_tensor("T", loc, entries=[("location", "*/_ORT_MEM_ADDR_/*"),
                                                              ("offset", "4096"), ("length", "32")])])


def constant_value_twice(loc: str) -> bytes:
    """A Constant whose singular attribute ``t`` appears twice in the bytes: protobuf (and so ORT) merges the two
    copies into one external tensor (shape from the first, external location from the second)."""
    good = onnx.TensorProto(name="Tv", data_type=1, dims=[N])  # no data of its own: the second copy brings it
    attr = helper.make_attribute("value", good).SerializeToString()
    attr += _field(5, ext_tensor("Tv", loc, dims=()).SerializeToString())  # dims repeat: only the first has them
    node = helper.make_node("Constant", [], ["T"]).SerializeToString() + _field(5, attr)
    assert onnx.NodeProto.FromString(node).attribute[0].t.data_location == 1  # protobuf accepts and merges it
    m = onnx.ModelProto.FromString(_model([_add("T")]))
    graph = _field(1, node) + m.graph.SerializeToString()  # the Constant first: repeated fields keep byte order
    m.ClearField("graph")
    return m.SerializeToString() + _field(7, graph)


def unknown_field_with_tensor(loc: str) -> bytes:
    """An unknown ModelProto field (99) whose bytes are an external TensorProto: protobuf keeps it as unknown."""
    return _model([_add("T")], [_inline_t()]) + _field(99, ext_tensor("T", loc).SerializeToString())


def _inline_t() -> object:
    return helper.make_tensor("T", 1, [N], [0.0] * N)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _model_with_raw_initializer(raw_tensor: bytes) -> bytes:
    """A model whose graph holds ``raw_tensor`` (bytes of a TensorProto) as an initializer."""
    m = onnx.ModelProto.FromString(_model([_add("T")]))
    graph = m.graph.SerializeToString() + _field(5, raw_tensor)
    m.ClearField("graph")
    return m.SerializeToString() + _field(7, graph)


HOSTILE: dict[str, Hostile] = {
    "initializer": Hostile(initializer),
    "sparse_initializer_values": Hostile(sparse_values),
    "sparse_initializer_indices": Hostile(sparse_indices, secret="i64",
                                          expect=(0, 1, 0, 1, 0, 1, 0, 1)),
    "constant_value": Hostile(constant_value),
    "constant_sparse_value": Hostile(constant_sparse_value),
    "if_branch_initializer": Hostile(if_branch_initializer),
    "if_branch_constant": Hostile(if_branch_constant),
    "nested_if_5_levels": Hostile(nested_if_5_levels),
    "loop_body_constant": Hostile(loop_body),
    "scan_body_constant": Hostile(scan_body),
    "function_body_constant": Hostile(function_body_constant),
    "function_attribute_default": Hostile(function_attribute_default),
    "function_call_attribute": Hostile(function_call_attribute),
    "function_body_if_branch": Hostile(function_body_if),
    "training_info_initialization": Hostile(training_info_initialization),
    "tensors_attribute": Hostile(tensors_attribute, runs=False),
    "graphs_attribute": Hostile(graphs_attribute, runs=False),
    "sparse_tensors_attribute": Hostile(sparse_tensors_attribute, runs=False),
    "epcontext_cache_path": Hostile(epcontext_cache_path, runs=False),
    "epcontext_embed_mode_without_value": Hostile(epcontext_embed_mode_without_value, runs=False),
    "epcontext_onnx_model_filename": Hostile(epcontext_onnx_model_filename, runs=False),
    "entries_without_data_location": Hostile(entries_without_data_location),
    "data_location_unknown_enum_after_external": Hostile(data_location_unknown_enum_after_external),
    "duplicate_location_key": Hostile(duplicate_location_key),
    "constant_value_given_twice": Hostile(constant_value_twice),
    "unknown_field_with_tensor": Hostile(unknown_field_with_tensor),
}
def metadata_ort_config(loc: str) -> bytes:
    """Session options inside the model (ORT applies them with ORT_LOAD_CONFIG_FROM_MODEL=1): profiling on."""
    m = onnx.ModelProto.FromString(initializer(loc))
    helper.set_model_props(m, {"ort_config": '{"session_options": {"enable_profiling": true}}'})
    return m.SerializeToString()


# Refused for what they are, whatever the location: never run (the memory tag would make ORT read an address).
MALFORMED: dict[str, Callable[[str], bytes]] = {
    "external_without_location": external_without_location,
    "prepacked_key": prepacked_key,
    "memory_address_tag": memory_address_tag,
    "metadata_ort_config": metadata_ort_config,
}


def write_secrets(directory: object) -> dict[str, object]:
    """Write the secret files into ``directory`` (a Path); returns {"f32": path, "i64": path}."""
    from pathlib import Path

    d = Path(str(directory))
    d.mkdir(parents=True, exist_ok=True)
    (d / "secret_f32.bin").write_bytes(SECRET_F32.tobytes())
    (d / "secret_i64.bin").write_bytes(SECRET_I64.tobytes())
    return {"f32": d / "secret_f32.bin", "i64": d / "secret_i64.bin"}
