"""Per-node quantization sensitivity: which quantized nodes add the most error.

Both models (FP32 and quantized) are run once with every intermediate float tensor exposed. For each node of a
quantizable type, its sensitivity is the relative error of its output in the quantized model minus the largest
relative error among its inputs: the error the node *adds*, not the error it inherits. The most sensitive nodes are
then excluded from quantization and the candidate is rebuilt (cf. NNCF's accuracy-controlled quantization).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DATA_MOVEMENT",
    "QUANTIZABLE",
    "WEIGHTED",
    "FloatSearch",
    "activation_tensors",
    "float_error",
    "keep_float",
    "output_tail",
    "rank_nodes",
    "search_float_tensors",
    "tail_tensors",
    "with_data_movement_successors",
]

# Consumers that would quantize an excluded node's output again at once, so they follow it out of quantization:
# ops that only move or reshape data, and Concat, which ORT's QDQ quantizer gives one scale shared by all its inputs
# (measured on YOLOv8n: keeping the score Sigmoid in float does nothing while the Concat that joins the scores to the
# pixel-scale boxes re-quantizes them with the boxes' step of 320/255).
DATA_MOVEMENT = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split", "Gather",
                 "Concat")

# Static QDQ quantizes more than the weighted ops: Concat, Add, Mul, Sigmoid... carry Q/DQ pairs too, and a Concat
# that joins boxes (0-320) with scores (0-1) under one scale is exactly where a detector's scores collapse.
QUANTIZABLE: tuple[str, ...] | None = None


def _exposed(path: Path, out_path: Path) -> list[str]:
    import onnx
    from onnx import TensorProto, helper, shape_inference

    m = onnx.load(str(path))
    try:
        m = shape_inference.infer_shapes(m, strict_mode=False)
    except Exception:  # noqa: BLE001 - best effort: tensors without types are skipped
        pass
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(m.graph.value_info) + list(m.graph.output)}
    existing = {o.name for o in m.graph.output}
    added = []
    for n in m.graph.node:
        for o in n.output:
            if o and o not in existing and types.get(o) == TensorProto.FLOAT:
                m.graph.output.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, None))
                existing.add(o)
                added.append(o)
    onnx.save(m, str(out_path))
    return [o.name for o in m.graph.output]


def _outputs(path: Path, samples: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(names, dict(s)), strict=True)) for s in samples]


def _rel(a: list[np.ndarray], b: list[np.ndarray], floor: float) -> float:
    """Relative L2 error; for tensors of rank >= 3 the worst channel's (axis 1), since one tensor may mix scales
    (boxes in pixels next to scores in 0-1) and a whole-tensor error would hide the small-scale channels' loss.
    Channels peaking below ``floor`` are skipped, as the accuracy gate skips them: noise there is not a loss."""
    if a[0].shape != b[0].shape:
        return 0.0
    if b[0].ndim >= 3 and b[0].shape[1] > 1:
        c = b[0].shape[1]
        x = np.concatenate([np.moveaxis(t, 1, 0).reshape(c, -1) for t in a], axis=1).astype(np.float64)
        y = np.concatenate([np.moveaxis(t, 1, 0).reshape(c, -1) for t in b], axis=1).astype(np.float64)
        num = np.sqrt(np.sum((x - y) ** 2, axis=1))
        den = np.sqrt(np.sum(y**2, axis=1))
        live = (den > 0) & (np.max(np.abs(y), axis=1) >= floor)
        return float(np.max(num[live] / den[live])) if live.any() else 0.0
    num = sum(float(np.sum((x.astype(np.float64) - y.astype(np.float64)) ** 2)) for x, y in zip(a, b, strict=True))
    den = sum(float(np.sum(y.astype(np.float64) ** 2)) for y in b)
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def rank_nodes(fp32: Path, quantized: Path, samples: Sequence[Mapping[str, np.ndarray]], work: Path,
               op_types: Sequence[str] | None = QUANTIZABLE, channel_floor: float = 0.05) -> list[tuple[str, float]]:
    """Nodes of ``fp32`` (by name; all op types unless ``op_types`` says) ordered from most to least sensitive,
    with the relative error each adds."""
    import onnx

    work.mkdir(parents=True, exist_ok=True)
    _exposed(fp32, work / "fp32.onnx")
    _exposed(quantized, work / "q.onnx")
    ref = _outputs(work / "fp32.onnx", samples)
    got = _outputs(work / "q.onnx", samples)
    # Compare what consumers see: in a QDQ model a tensor X reaches its consumers as X_DequantizeLinear_Output,
    # while X itself may be a pre-quantization value (e.g. a Conv output whose Relu the quantizer folded away).
    seen = {name: (name + "_DequantizeLinear_Output" if name + "_DequantizeLinear_Output" in got[0] else name)
            for name in ref[0]}
    common = {name for name, q in seen.items() if q in got[0]}
    err: dict[str, float] = {}

    def rel(name: str) -> float:
        if name not in err:
            err[name] = (_rel([g[seen[name]] for g in got], [r[name] for r in ref], channel_floor)
                         if name in common else 0.0)
        return err[name]

    m: Any = onnx.load(str(fp32), load_external_data=False)
    scores = []
    for n in m.graph.node:
        if (op_types is not None and n.op_type not in op_types) or not n.output or n.output[0] not in common:
            continue
        inherited = max((rel(i) for i in n.input if i in common), default=0.0)
        scores.append((n.name, rel(n.output[0]) - inherited))
    scores.sort(key=lambda kv: -kv[1])
    return scores


def with_data_movement_successors(model: Path, names: Sequence[str]) -> list[str]:
    """``names`` plus every node of :data:`DATA_MOVEMENT` fed (directly or through other such nodes) by one of them."""
    import onnx

    m: Any = onnx.load(str(model), load_external_data=False)
    consumers: dict[str, list[Any]] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    by_name = {n.name: n for n in m.graph.node}
    out = list(dict.fromkeys(names))
    todo = [by_name[n] for n in out if n in by_name]
    while todo:
        node = todo.pop()
        for o in node.output:
            for c in consumers.get(o, []):
                if c.op_type in DATA_MOVEMENT and c.name not in out:
                    out.append(c.name)
                    todo.append(c)
    return out


# -- mixed precision by measurement: tensors kept in float in the quantized model itself ---------------------------

# Ops that carry a layer's weights: the output tail of a model is what lies between its last such op and its outputs.
WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def output_tail(model: Path) -> list[str]:
    """Nodes of ``model`` between its outputs and the last weighted ops before them (Sigmoid/Softmax/Concat/DFL-like
    decoding, found structurally from the graph outputs back to the first Conv/MatMul/Gemm on every path): they mix
    scales (boxes in pixels next to scores in 0-1) and feed the outputs directly, so INT8 there costs accuracy for
    next to no speed."""
    import onnx

    g = onnx.load(str(model), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    out: list[str] = []
    seen: set[str] = set()
    todo = [o.name for o in g.output]
    while todo:
        n = producer.get(todo.pop())
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        if n.op_type not in WEIGHTED:
            out.append(n.name)
            todo.extend(n.input)
    return out


def activation_tensors(quantized: Path, order_from: Path | None = None) -> list[str]:
    """Float activation tensors that a QDQ model quantizes (the inputs of its QuantizeLinear nodes that are not
    initializers), in the topological order of ``order_from`` (the float model; default the QDQ model itself)."""
    import onnx

    q = onnx.load(str(quantized), load_external_data=False).graph
    inits = {i.name for i in q.initializer}
    const = {o for n in q.node if n.op_type == "Constant" for o in n.output}
    names = list(dict.fromkeys(n.input[0] for n in q.node if n.op_type == "QuantizeLinear"
                               and n.input[0] not in inits and n.input[0] not in const))
    ref = onnx.load(str(order_from), load_external_data=False).graph if order_from else q
    pos = {i.name: -1 for i in ref.input}
    for k, n in enumerate(ref.node):
        for o in n.output:
            pos.setdefault(o, k)
    return sorted(names, key=lambda t: (pos.get(t, len(ref.node)), t))


def keep_float(quantized: Path, tensors: Sequence[str], out: Path) -> list[str]:
    """Write ``quantized`` with the Q/DQ pairs of ``tensors`` removed (their consumers see the float tensor again,
    every other tensor keeps its calibrated scale); returns the tensors actually found."""
    import onnx
    from onnx import helper

    m: Any = onnx.load(str(quantized))
    g = m.graph
    want = set(tensors)
    q_nodes = {n.output[0]: n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] in want}
    found = sorted({n.input[0] for n in q_nodes.values()})
    keep = []
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.output[0] in q_nodes:
            continue
        if n.op_type == "DequantizeLinear" and n.input[0] in q_nodes:
            # an Identity keeps the DQ output's name, so consumers and graph outputs need no rewiring
            keep.append(helper.make_node("Identity", [q_nodes[n.input[0]].input[0]], [n.output[0]],
                                         name=n.name + "_float"))
            continue
        keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(out))
    return found


def _error(got: list[dict[str, np.ndarray]], ref: list[dict[str, np.ndarray]], floor: float) -> float:
    """The worst output's relative error over the samples (per channel for rank >= 3 outputs, as :func:`_rel`).
    Pooled, not per sample: measured on Magika, minimizing the worst search sample chased one sample's noise and
    left the validation set's worst sample worse than the pooled error did."""
    return max((_rel([g[k] for g in got], [r[k] for r in ref], floor) for k in ref[0]
                if np.issubdtype(ref[0][k].dtype, np.floating)), default=0.0)


@dataclass
class FloatSearch:
    """The result of :func:`search_float_tensors`: tensors to keep in float, the error before and after, and the
    steps taken (each: what was tried and the error it left)."""

    tensors: list[str]
    error_before: float
    error_after: float
    evaluations: int
    trail: list[dict[str, Any]]


def search_float_tensors(quantized: Path, src: Path, samples: Sequence[Mapping[str, np.ndarray]], work: Path,
                         start: Sequence[str] = (), chunks: int = 8, deadline: float | None = None,
                         channel_floor: float = 0.05) -> FloatSearch:
    """One greedy step of accuracy-aware mixed precision, measured end to end on the outputs.

    The quantized tensors (in topological order) are cut into ``chunks`` contiguous runs; each run is put back in
    float (on top of ``start``) and the model's output error measured on ``samples``; the run that removes the most
    error is then halved as long as one half keeps (within 10%) the error reduction of the whole. Everything is
    measured on the QDQ model itself (no re-calibration), so what is measured is what ships."""
    import time as _time

    all_t = activation_tensors(quantized, src)
    cur = [t for t in start if t in set(all_t)]
    ref = _outputs(src, samples)
    n_eval = 0

    def err(extra: Sequence[str]) -> float:
        nonlocal n_eval
        n_eval += 1
        p = work / f"try{n_eval}.onnx"
        keep_float(quantized, [*cur, *extra], p)
        e = _error(_outputs(p, samples), ref, channel_floor)
        p.unlink(missing_ok=True)
        return e

    work.mkdir(parents=True, exist_ok=True)
    e0 = err([])
    trail: list[dict[str, Any]] = [{"float": len(cur), "error": round(e0, 5)}]
    rest = [t for t in all_t if t not in set(cur)]
    if not rest or e0 == 0.0:
        return FloatSearch(cur, e0, e0, n_eval, trail)
    size = max(1, math.ceil(len(rest) / chunks))
    runs = [rest[i:i + size] for i in range(0, len(rest), size)]
    scored: list[tuple[float, list[str]]] = []
    for r in runs:
        if deadline is not None and _time.monotonic() > deadline and scored:
            break
        scored.append((err(r), r))
    best_e, best = min(scored, key=lambda s: round(s[0], 6))  # rounded: equal errors resolve to the first run
    trail.append({"tried": f"{len(scored)} runs of {size}", "best": best[0], "error": round(best_e, 5)})
    gain = e0 - best_e
    while len(best) > 1 and gain > 0 and (deadline is None or _time.monotonic() < deadline):
        half = len(best) // 2
        a, b = best[:half], best[half:]
        ea, eb = err(a), err(b)
        e_half, h = (ea, a) if round(ea, 6) <= round(eb, 6) else (eb, b)
        if e0 - e_half < 0.9 * gain:
            break
        best, best_e = h, e_half
        trail.append({"halved": len(best), "first": best[0], "error": round(best_e, 5)})
    if best_e >= e0:
        return FloatSearch(cur, e0, e0, n_eval, trail)
    return FloatSearch([*cur, *best], e0, best_e, n_eval, trail)


def tail_tensors(quantized: Path, src: Path) -> list[str]:
    """The quantized activation tensors that the output tail of ``src`` (:func:`output_tail`) reads or writes,
    found in the QDQ model by node name (the quantizer keeps the names of the nodes it wraps)."""
    import onnx

    tail = set(output_tail(src))
    g = onnx.load(str(quantized), load_external_data=False).graph
    dq_src = {}  # DQ output -> the float tensor its Q read
    q_in = {n.output[0]: n.input[0] for n in g.node if n.op_type == "QuantizeLinear"}
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in q_in:
            dq_src[n.output[0]] = q_in[n.input[0]]
    quantized_set = set(activation_tensors(quantized))
    out: list[str] = []
    for n in g.node:
        if n.name not in tail:
            continue
        for t in [*n.input, *n.output]:
            t = dq_src.get(t, t)
            if t in quantized_set and t not in out:
                out.append(t)
    return out


def float_error(quantized: Path, src: Path, samples: Sequence[Mapping[str, np.ndarray]], tensors: Sequence[str],
                work: Path, channel_floor: float = 0.05) -> float:
    """The output error (as :func:`search_float_tensors` measures it) of ``quantized`` with ``tensors`` in float."""
    work.mkdir(parents=True, exist_ok=True)
    p = work / "float-error.onnx"
    keep_float(quantized, tensors, p)
    try:
        return _error(_outputs(p, samples), _outputs(src, samples), channel_floor)
    finally:
        p.unlink(missing_ok=True)
