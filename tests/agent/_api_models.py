"""Small ONNX models for the local API's tests, built with onnx.helper: strings, a sum, and two ways to hang."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _save(graph, path: Path, opset: int = 17, ml: bool = False) -> Path:  # type: ignore[no-untyped-def]
    import onnx
    from onnx import helper

    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("ai.onnx.ml", 3)] if ml else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgefleet-tests")
    model.ir_version = 9 if opset >= 20 else 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def strings_model(path: Path) -> Path:
    """text [n] (string) -> shout [n] (string: text + "!", StringConcat) and label [n] (int64: cat 1, dog 2, else -1).

    Locale-free string ops only (StringNormalizer needs an installed en_US.UTF-8 locale)."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("StringConcat", ["text", "bang"], ["shout"]),
        helper.make_node("LabelEncoder", ["text"], ["label"], domain="ai.onnx.ml", keys_strings=["cat", "dog"],
                         values_int64s=[1, 2], default_int64=-1),
    ]
    graph = helper.make_graph(nodes, "strings", [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
                              [helper.make_tensor_value_info("shout", TensorProto.STRING, ["n"]),
                               helper.make_tensor_value_info("label", TensorProto.INT64, ["n"])],
                              [helper.make_tensor("bang", TensorProto.STRING, [], [b"!"])])
    return _save(graph, path, opset=20, ml=True)


def sum_model(path: Path) -> Path:
    """x [n] float32 -> total [] (ReduceSum): a big input, a tiny output, no big intermediate tensors."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)], "sum",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])])
    return _save(graph, path)


def loop_model(path: Path) -> Path:
    """n [] int64 -> y [1]: a Loop of n iterations adding 1. n = 2**62 runs for ever; ``terminate`` stops it
    between two iterations."""
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "one"], ["acc_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "cond", "zero"], ["y"], body=body)], "loop",
        [helper.make_tensor_value_info("n", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [helper.make_tensor("cond", TensorProto.BOOL, [], [True]),
         helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])])
    return _save(graph, path)


def nms_model(path: Path) -> Path:
    """n [] int64 -> kept [2]: NonMaxSuppression over n disjoint boxes of equal score — one kernel doing O(n²) work
    in O(n) memory (n = 100 000 takes seconds). ``terminate`` is checked only between kernels: it cannot stop this."""
    from onnx import TensorProto, helper

    def c(name: str, dtype: int, dims: list[int], vals: list[float]):  # type: ignore[no-untyped-def]
        return helper.make_tensor(name, dtype, dims, vals)

    nodes = [
        helper.make_node("Range", ["zero", "n", "one"], ["r"]),
        helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["rf", "two"], ["x0"]),
        helper.make_node("Add", ["x0", "onef"], ["x1"]),
        helper.make_node("Mul", ["rf", "zerof"], ["y0"]),
        helper.make_node("Add", ["y0", "onef"], ["y1"]),
        *[helper.make_node("Unsqueeze", [v, "ax1"], [f"{v}u"]) for v in ("y0", "x0", "y1", "x1")],
        helper.make_node("Concat", ["y0u", "x0u", "y1u", "x1u"], ["b2"], axis=1),
        helper.make_node("Unsqueeze", ["b2", "ax0"], ["boxes"]),
        helper.make_node("Unsqueeze", ["y1", "ax01"], ["scores"]),
        helper.make_node("NonMaxSuppression", ["boxes", "scores", "n", "iou"], ["sel"]),
        helper.make_node("Shape", ["sel"], ["kept"]),
    ]
    graph = helper.make_graph(
        nodes, "nms", [helper.make_tensor_value_info("n", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("kept", TensorProto.INT64, [2])],
        [c("zero", TensorProto.INT64, [], [0]), c("one", TensorProto.INT64, [], [1]),
         c("two", TensorProto.FLOAT, [], [2.0]), c("onef", TensorProto.FLOAT, [], [1.0]),
         c("zerof", TensorProto.FLOAT, [], [0.0]), c("ax1", TensorProto.INT64, [1], [1]),
         c("ax0", TensorProto.INT64, [1], [0]), c("ax01", TensorProto.INT64, [2], [0, 1]),
         c("iou", TensorProto.FLOAT, [], [0.5])])
    return _save(graph, path)


def scalar_samples(name: str = "n", values: tuple[int, ...] = (3, 10)) -> list[dict[str, np.ndarray]]:
    """Validation inputs for the models taking one int64 scalar."""
    return [{name: np.array(v, dtype=np.int64)} for v in values]
