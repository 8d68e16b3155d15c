"""PyTorch input: export to ONNX for the ONNX pipeline, and a native Core ML ``.mlpackage`` (FP16) for Apple targets.

A model is a TorchScript file (``.pt``/``.pth``/``.ts``/``.torchscript``, loaded on the CPU) or ``module:factory``
(an importable callable returning an ``nn.Module``). Input shapes are given explicitly, as ONNX export and Core ML
conversion both trace the model with example inputs. torch and coremltools are imported only here, only when asked
for. On Linux the ``.mlpackage`` is converted and its spec checked (inputs, outputs, FP16 compute, FP32 IO); it can
only be *run* on macOS.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgefleet.sdk.errors import ConfigError, InputError, PackagingError

__all__ = ["TORCH_SUFFIXES", "check_mlpackage", "convert_mlpackage", "export_onnx", "is_torch_spec",
           "load_torch_model", "parse_input_shapes"]

TORCH_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
_DIMS_RE = re.compile(r"^[1-9]\d*(?:[x,][1-9]\d*)*$")


def is_torch_spec(model: str | Path) -> bool:
    """True for a TorchScript file name or a ``module:factory`` reference."""
    s = str(model)
    return s.endswith(TORCH_SUFFIXES) or (":" in s and not Path(s).exists() and not s.endswith(".onnx"))


def parse_input_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``NAME=1x3x224x224`` (or ``NAME=1,3,224,224``) items into a dict, in order; every dim >= 1."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.strip().rpartition("=")
        if not sep or not name or not _DIMS_RE.match(dims):
            raise ConfigError(f"input shape {item!r}: expected NAME=DxDx... (or NAME=D,D,...) with every dim >= 1, "
                              f"e.g. image=1x3x224x224")
        if name in out:
            raise ConfigError(f"input shape for {name!r} given twice")
        out[name] = tuple(int(d) for d in re.split(r"[x,]", dims))
    return out


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ConfigError("a PyTorch model needs torch installed (pip install torch)") from exc
    return torch


def load_torch_model(spec: str | Path) -> Any:
    """The ``nn.Module`` (or ScriptModule) behind ``spec``, in eval mode on the CPU."""
    torch = _torch()
    s = str(spec)
    if s.endswith(TORCH_SUFFIXES):
        p = Path(s)
        if not p.is_file():
            raise InputError(f"PyTorch model {p} does not exist")
        try:
            module = torch.jit.load(str(p), map_location="cpu")
        except Exception as exc:
            raise InputError(f"{p}: not a TorchScript model: {str(exc).splitlines()[0]}") from exc
    else:
        mod_name, _, attr = s.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise InputError(f"cannot import {s!r}: {exc}") from exc
        module = factory()
        if not isinstance(module, torch.nn.Module):
            raise InputError(f"{s} returned {type(module).__name__}, not a torch.nn.Module")
    return module.eval()


def _examples(shapes: Mapping[str, tuple[int, ...]]) -> tuple[Any, ...]:
    torch = _torch()
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.rand(s, generator=gen) for s in shapes.values())


def export_onnx(module: Any, shapes: Mapping[str, tuple[int, ...]], out: Path, opset: int = 17) -> Path:
    """``torch.onnx.export`` (TorchScript-based exporter, which also takes ScriptModules) with a symbolic batch dim."""
    torch = _torch()
    if not shapes:
        raise ConfigError("a PyTorch model needs its input shapes (--input-shape NAME=1x3x224x224)")
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(shapes)
    try:
        with torch.no_grad():
            outputs = module(*_examples(shapes))
        n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
        out_names = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
        torch.onnx.export(module, _examples(shapes), str(out), input_names=names, output_names=out_names,
                          opset_version=opset, dynamo=False,
                          dynamic_axes={n: {0: "batch"} for n in [*names, *out_names]})
    except Exception as exc:
        raise PackagingError(f"ONNX export of the PyTorch model failed: {str(exc).splitlines()[0]}") from exc
    return out


def convert_mlpackage(module: Any, shapes: Mapping[str, tuple[int, ...]], out: Path) -> Path:
    """A Core ML ML Program (FP16 compute, FP32 inputs and outputs, macOS 13+) saved as ``out`` (a folder)."""
    torch = _torch()
    try:
        import coremltools as ct
        import numpy as np
    except ImportError as exc:
        raise ConfigError("the Core ML .mlpackage needs coremltools (pip install coremltools)") from exc
    examples = _examples(shapes)
    traced = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.trace(module, examples)
    with torch.no_grad():
        result = traced(*examples)
    n_out = len(result) if isinstance(result, (tuple, list)) else 1
    try:
        # FP32 inputs and outputs (Core ML inserts the casts), FP16 compute: callers see no change
        ml = ct.convert(traced, inputs=[ct.TensorType(name=n, shape=s, dtype=np.float32) for n, s in shapes.items()],
                        outputs=[ct.TensorType(dtype=np.float32) for _ in range(n_out)],
                        convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                        minimum_deployment_target=ct.target.macOS13)
        ml.save(str(out))
    except Exception as exc:
        raise PackagingError(f"Core ML conversion failed: {str(exc).splitlines()[0]}") from exc
    return out


def check_mlpackage(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Read the .mlpackage's spec (no model load: Core ML runs only on macOS) and check inputs and precision."""
    import coremltools as ct

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise PackagingError(f"{path}: expected an ML Program, got {spec.WhichOneof('Type')}")
    fp32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    inputs = {i.name: tuple(i.type.multiArrayType.shape) for i in spec.description.input}
    if inputs != {k: tuple(v) for k, v in shapes.items()}:
        raise PackagingError(f"{path}: inputs {inputs} differ from the requested {dict(shapes)}")
    io_types = [t.type.multiArrayType.dataType for t in [*spec.description.input, *spec.description.output]]
    program = str(spec.mlProgram)
    fp16_ops = program.count("FLOAT16")
    if fp16_ops == 0:
        raise PackagingError(f"{path}: no FP16 tensors in the program: compute precision is not FP16")
    return {"format": "mlprogram", "specification_version": spec.specificationVersion,
            "inputs": {k: list(v) for k, v in inputs.items()},
            "outputs": [o.name for o in spec.description.output], "fp32_io": all(t == fp32 for t in io_types),
            "fp16_tensor_types": fp16_ops, "run": "not run: Core ML runs only on macOS"}
