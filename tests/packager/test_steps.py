"""Packager steps on their own: the plan table, load/check refusals, opset upgrade, fusion, FP16."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgefleet.packager.steps import (
    STEPS,
    CheckConfig,
    CheckModel,
    ConvertFloat16,
    Float16Config,
    FuseConfig,
    FuseTransformer,
    UpgradeConfig,
    UpgradeOpset,
    make_plan,
    run_plan,
)
from edgefleet.sdk.errors import ConfigError, InputError
from onnx import TensorProto, helper, numpy_helper
from packager_models import shipped_model


def test_steps_table_lists_every_step_by_name() -> None:
    assert set(STEPS) == {"check", "fix_shapes", "upgrade_opset", "fuse_transformer", "optimize", "quantize_dynamic",
                          "quantize_static", "keep_float", "fp16"}
    assert all(cls.name == name for name, cls in STEPS.items())


def test_make_plan_refuses_unknown_step() -> None:
    with pytest.raises(ConfigError, match="unknown packager step 'shrink'"):
        make_plan([("shrink", {})])


def test_make_plan_refuses_unknown_config_key() -> None:
    with pytest.raises(ConfigError, match=r"step optimize: unknown config key\(s\) \['lvl'\]"):
        make_plan([("optimize", {"lvl": "basic"})])


def test_make_plan_refuses_bad_value() -> None:
    with pytest.raises(ConfigError, match=r"optimize\.level"):
        make_plan([("optimize", {"level": "max"})])


def test_quantize_static_plan_refuses_missing_calibration() -> None:
    with pytest.raises(ConfigError, match="calibration"):
        make_plan([("quantize_static", {})])


def test_check_refuses_non_onnx_file(tmp_path: Path) -> None:
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model")
    with pytest.raises(InputError, match="not an ONNX model"):
        CheckModel().run(bad, tmp_path / "out", CheckConfig())


def test_check_refuses_truncated_model(tmp_path: Path, convnet: Path) -> None:
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(convnet.read_bytes()[: convnet.stat().st_size // 2])
    with pytest.raises(InputError, match=str(cut)):
        CheckModel().run(cut, tmp_path / "out", CheckConfig())
    assert not (tmp_path / "out" / "model.onnx").exists()


def _tiny(opset: int) -> onnx.ModelProto:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def test_check_refuses_unsupported_opset(tmp_path: Path) -> None:
    p = tmp_path / "future.onnx"
    onnx.save(_tiny(99), str(p))
    with pytest.raises(InputError, match="opset 99 is not supported"):
        CheckModel().run(p, tmp_path / "out", CheckConfig())


def test_check_refuses_external_data_outside_model_folder(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(np.ones(16, np.float32).tobytes())
    onnx.external_data_helper.set_external_data(m.graph.initializer[0], location="../secret.bin")
    m.graph.initializer[0].ClearField("raw_data")
    p = folder / "model.onnx"
    onnx.save(m, str(p))
    with pytest.raises(InputError, match="outside the model folder"):
        CheckModel().run(p, tmp_path / "out", CheckConfig())


def test_check_keeps_external_data_inside_model_folder(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    p = tmp_path / "m.onnx"
    onnx.save(m, str(p), save_as_external_data=True, location="m.weights", size_threshold=0)
    step = CheckModel()
    out = step.run(p, tmp_path / "out", CheckConfig())
    assert step.notes["external_data"] == ["m.weights"]
    x = np.arange(4, dtype=np.float32)[None]
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, x)


def test_check_names_unnamed_nodes(tmp_path: Path) -> None:
    p = tmp_path / "anon.onnx"
    onnx.save(_tiny(17), str(p))
    out = CheckModel().run(p, tmp_path / "out", CheckConfig())
    assert [n.name for n in onnx.load(str(out)).graph.node] == ["Relu_0"]


def test_upgrade_opset_converts_old_model_and_keeps_outputs(tmp_path: Path) -> None:
    from packager_models import make_convnet

    old = make_convnet(tmp_path / "old.onnx", opset=11)
    step = UpgradeOpset()
    out = step.run(old, tmp_path / "up", UpgradeConfig(opset=13))
    assert step.notes == {"opset": 13, "from_opset": 11, "converted": True}
    assert next(o.version for o in onnx.load(str(out)).opset_import if o.domain == "") == 13
    x = {"image": np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)}
    a = ort.InferenceSession(str(old), providers=["CPUExecutionProvider"]).run(None, x)[0]
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fuse_transformer_gives_attention_skiplayernorm_and_gelu(tmp_path: Path, encoder: Path,
                                                               encoder_data: list) -> None:
    step = FuseTransformer()
    out = step.run(encoder, tmp_path / "fused", FuseConfig())
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops
    assert step.notes["fused"]["Attention"] == 2
    a = ort.InferenceSession(str(encoder), providers=["CPUExecutionProvider"]).run(None, encoder_data[0])[0]
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, encoder_data[0])[0]
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_fp16_keeps_float32_io_and_converts_weights(tmp_path: Path, convnet: Path, photos: list) -> None:
    out = ConvertFloat16().run(convnet, tmp_path / "fp16", Float16Config())
    m = onnx.load(str(out))
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert {i.data_type for i in m.graph.initializer if i.name.endswith(".w")} == {TensorProto.FLOAT16}
    a = ort.InferenceSession(str(convnet), providers=["CPUExecutionProvider"]).run(None, photos[0])[0]
    b = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, photos[0])[0]
    np.testing.assert_allclose(a, b, atol=2e-3)


def test_run_plan_records_each_step(tmp_path: Path, convnet: Path) -> None:
    final, records = run_plan(convnet, tmp_path / "work", make_plan([("check", {}), ("optimize", {"level": "basic"})]))
    assert [r.name for r in records] == ["check", "optimize"]
    assert records[1].config == {"level": "basic"}
    assert final.is_file() and records[-1].size == final.stat().st_size


# -- fix_shapes (--input-shape on an ONNX model) -----------------------------------------------------------------------

def _dims(vi: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def test_fix_shapes_makes_the_input_static_everywhere_and_outputs_do_not_change(encoder, encoder_data, tmp_path):
    x = encoder_data[0]["x"]
    shape = tuple(int(d) for d in x.shape)
    out, [_, rec] = run_plan(encoder, tmp_path, make_plan([("check", {}), ("fix_shapes", {"shapes": {"x": shape}})]))
    m = onnx.load(str(out))
    assert _dims(m.graph.input[0]) == list(shape)
    assert _dims(m.graph.output[0]) == list(shape)  # the output shares the dim names batch and seq: fixed too
    assert rec.notes["same_dim_name_also_fixed_in"] == ["hidden"]
    inferred = [vi for vi in m.graph.value_info if vi.type.HasField("tensor_type")]
    assert inferred and all(all(isinstance(d, int) and d > 0 for d in _dims(vi)) for vi in inferred)
    fixed = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    orig = ort.InferenceSession(str(encoder), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(fixed.run(None, {"x": x})[0], orig.run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
    longer = np.concatenate([x, x[:, :1]], axis=1)
    with pytest.raises(Exception, match="dimension"):  # the static model takes only the fixed shape
        fixed.run(None, {"x": longer})


@pytest.mark.parametrize(("shapes", "message"), [
    ({"input": (1, 64)}, r"names \['input'\], not inputs of the model \(its inputs: image\)"),
    ({"image": (1, 3, 64)}, r"image=1x3x64: the model's input has rank 4 \(batchx3x64x64\), not 3"),
    ({"image": (1, 4, 64, 64)}, r"image: dim 1 is 3 in the model \(batchx3x64x64\), not 4"),
])
def test_fix_shapes_refuses_a_shape_the_model_cannot_take_in_one_line(convnet, tmp_path, shapes, message):
    with pytest.raises(InputError, match=message) as err:
        run_plan(convnet, tmp_path, make_plan([("fix_shapes", {"shapes": shapes})]))
    assert "\n" not in str(err.value)


def test_fix_shapes_refuses_silero_vad_chunk_that_onnx_runtime_cannot_load(tmp_path):
    # silero-vad branches on its sr input; its 8 kHz branch cannot take a 16 kHz chunk once the size is static
    shapes = {"input": (1, 576), "state": (2, 1, 128)}
    with pytest.raises(InputError, match="ONNX Runtime refuses the model with these shapes") as err:
        run_plan(shipped_model("silero-vad"), tmp_path, make_plan([("fix_shapes", {"shapes": shapes})]))
    assert "\n" not in str(err.value)
