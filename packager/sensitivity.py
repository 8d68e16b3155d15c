"""Per-node quantization sensitivity: which quantized nodes add the most error.

Both models (FP32 and quantized) are run once with every intermediate float tensor exposed. For each node of a
quantizable type, its sensitivity is the relative error of its output in the quantized model minus the largest
relative error among its inputs: the error the node *adds*, not the error it inherits. The most sensitive nodes are
then excluded from quantization and the candidate is rebuilt (cf. NNCF's accuracy-controlled quantization).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DATA_MOVEMENT", "QUANTIZABLE", "rank_nodes", "with_data_movement_successors"]

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
