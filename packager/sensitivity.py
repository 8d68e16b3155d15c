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

__all__ = ["QUANTIZABLE", "rank_nodes"]

QUANTIZABLE = ("Conv", "MatMul", "Gemm", "ConvTranspose", "Attention", "Gather")


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


def _rel(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    num = sum(float(np.sum((x.astype(np.float64) - y.astype(np.float64)) ** 2)) for x, y in zip(a, b, strict=True))
    den = sum(float(np.sum(y.astype(np.float64) ** 2)) for y in b)
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def rank_nodes(fp32: Path, quantized: Path, samples: Sequence[Mapping[str, np.ndarray]], work: Path,
               op_types: Sequence[str] = QUANTIZABLE) -> list[tuple[str, float]]:
    """Nodes of ``fp32`` (by name) ordered from most to least sensitive, with the relative error each adds."""
    import onnx

    work.mkdir(parents=True, exist_ok=True)
    _exposed(fp32, work / "fp32.onnx")
    _exposed(quantized, work / "q.onnx")
    ref = _outputs(work / "fp32.onnx", samples)
    got = _outputs(work / "q.onnx", samples)
    common = set(ref[0]) & set(got[0])
    err: dict[str, float] = {}

    def rel(name: str) -> float:
        if name not in err:
            err[name] = _rel([g[name] for g in got], [r[name] for r in ref]) if name in common else 0.0
        return err[name]

    m: Any = onnx.load(str(fp32), load_external_data=False)
    scores = []
    for n in m.graph.node:
        if n.op_type not in op_types or not n.output or n.output[0] not in common:
            continue
        inherited = max((rel(i) for i in n.input if i in common), default=0.0)
        scores.append((n.name, rel(n.output[0]) - inherited))
    scores.sort(key=lambda kv: -kv[1])
    return scores
