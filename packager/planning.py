"""Planning: facts about the model, the offline optimization level, and the candidate list for a target.

The candidates come from the profile's ``precisions`` (its order is the expected speed order on that device), its
``[quantization]`` preset and the provider's policy (``policy.py``); the model decides between dynamic INT8 (weights
mostly in MatMul) and static QDQ (convolutions), and whether transformer fusion applies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.devices.profile import Profile
from edgefleet.sdk.bundle import TensorSpec
from edgefleet.sdk.errors import ConfigError

from .options import PRECISION_CHOICES
from .policy import CPU, OPENVINO, SIMPLICITY, TENSORRT, ProviderPolicy, dynamic_config, policy_for, static_config

__all__ = ["Candidate", "ModelFacts", "candidates_for", "inspect_model", "io_specs", "offline_level",
           "trt_shape_options"]

precision_choices = PRECISION_CHOICES


@dataclass(frozen=True)
class ModelFacts:
    """What the packager needs to know about a model to plan for it."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    ops: dict[str, int]
    matmul_share: float
    conv_share: float
    transformer: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        top = dict(sorted(self.ops.items(), key=lambda kv: -kv[1])[:12])
        return {"opset": self.opset, "top_ops": top, "matmul_weight_share": round(self.matmul_share, 3),
                "conv_weight_share": round(self.conv_share, 3), "transformer": self.transformer,
                "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.inputs],
                "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.outputs]}


def _dims(vi: Any) -> tuple[int | str | None, ...]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return ()
    out: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


def io_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs of a model as ORT reports them (initializers that are also inputs excluded)."""
    import onnxruntime as ort
    from edgefleet.sdk.runtime import dtype_from_ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=[CPU])

    def spec(a: Any) -> TensorSpec:
        dims = tuple(d if isinstance(d, int) else (d or None) for d in a.shape)
        return TensorSpec(a.name, dtype_from_ort(a.type), dims)

    return tuple(spec(i) for i in sess.get_inputs()), tuple(spec(o) for o in sess.get_outputs())


def inspect_model(path: Path) -> ModelFacts:
    """Op counts, where the weights are (MatMul/Gemm vs Conv) and whether it looks like a transformer."""
    import numpy as np
    import onnx

    m = onnx.load(str(path))
    g = m.graph
    ops = Counter(n.op_type for n in g.node)
    sizes = {i.name: int(np.prod(i.dims)) if i.dims else 1 for i in g.initializer}
    for n in g.node:  # Constant nodes carry weights too (common in exported models)
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.dims:
                    sizes[n.output[0]] = int(np.prod(a.t.dims))
    mm = conv = 0
    attention_matmul = 0
    for n in g.node:
        w = sum(sizes.get(i, 0) for i in n.input)
        if n.op_type in ("MatMul", "Gemm", "Attention", "MultiHeadAttention"):
            mm += w
            if n.op_type == "MatMul" and all(i not in sizes for i in n.input[:2]):
                attention_matmul += 1
        elif n.op_type in ("Conv", "ConvTranspose"):
            conv += w
    total = max(mm + conv, 1)
    layer_norm = ops.get("LayerNormalization", 0) + ops.get("SkipLayerNormalization", 0) + (
        1 if ops.get("ReduceMean", 0) >= 2 and ops.get("Sqrt", 0) >= 1 else 0)
    transformer = bool(ops.get("Attention", 0) or (attention_matmul >= 2 and ops.get("Softmax", 0) >= 1 and layer_norm))
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    inputs, outputs = io_specs(path)
    return ModelFacts(inputs, outputs, opset, dict(ops), mm / total, conv / total, transformer)


def offline_level(profile: Profile, host_cpu_profile: str | None) -> tuple[str, str]:
    """The ORT optimization level whose result may be saved into this target's bundle, and why.

    Layout-level ("all") results hold NCHWc kernels blocked for the build host's vector width: valid only for the
    CPU EP of the same ISA class. Other EPs get "basic" (EP-independent rewrites): extended fusions emit
    com.microsoft ops that OpenVINO, TensorRT and CoreML do not take, which would split the graph back onto the CPU EP.
    """
    level = profile.session.graph_optimization_level
    if policy_for(profile).offline != "profile":
        return "basic", (f"{profile.primary_provider} compiles the graph itself; only EP-independent (basic) rewrites "
                         f"are saved, the device applies the rest")
    if level in ("all", "layout"):
        if host_cpu_profile == profile.name:
            return level, (f"this host is a {profile.name} machine (same ISA class): "
                           f"layout-level results are valid there")
        return "extended", (f"layout-level results are tied to the build host's ISA ({host_cpu_profile or 'unknown'}), "
                            f"not {profile.name}'s; saved at extended, the device's session applies '{level}' at load")
    return level, f"the profile's level ({level})"


@dataclass
class Candidate:
    """One way to build the bundle for a target: extra steps after the base, provider option overrides, and the
    steps that make a CPU-EP stand-in for accuracy when the target's EP cannot run here.

    ``cpu_guard``: FP32 at the CPU EP's full optimization, the yardstick every target whose device also has the CPU
    EP must beat (it ships, with its own providers and session, when the target's provider loses to it)."""

    name: str
    precision: str
    steps: list[tuple[str, dict[str, Any]]]
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)
    proxy_steps: list[tuple[str, dict[str, Any]]] | None = None
    proxy_possible: bool = True
    why: str = ""
    int8: str = ""  # "static" | "dynamic" | ""
    last_resort: bool = False  # built only when no INT8 candidate before it is within budget
    cpu_guard: bool = False

    @property
    def lossy(self) -> bool:
        """Changes the arithmetic (anything but FP32): needs enough validation samples to be trusted."""
        return self.precision != "fp32"

    @property
    def simplicity(self) -> float:
        """Rung on the choice's ladder (``policy.SIMPLICITY``; lower: simpler and more accurate); the S8-activation
        variant of static INT8 sits just above the profile's default U8 (then names order equal rungs)."""
        if self.cpu_guard:
            key = "cpu-fp32"
        elif "-excl" in self.name:
            key = "mixed"
        else:
            key = f"int8-{self.int8}" if self.int8 else self.precision
        if key not in SIMPLICITY:
            raise ConfigError(f"candidate {self.name}: precision {key!r} has no rung in policy.SIMPLICITY")
        return SIMPLICITY[key] + (0.5 if "-s8" in self.name else 0.0)


def _ov_hint(profile: Profile, precision: str) -> dict[str, dict[str, str]]:
    import json

    ov = profile.extra.get("openvino", {})
    hints = dict(ov.get("precision_hints") or {"fp32": "f32"})
    device = str(ov.get("device") or next((p.options.get("device_type") for p in profile.providers
                                           if p.name == OPENVINO), "CPU") or "CPU")
    hint = hints.get(precision)
    if hint is None:
        raise ConfigError(f"profile {profile.name} has no OpenVINO precision hint for {precision!r} "
                          f"(has {sorted(hints)})")
    # load_config takes a JSON *string* in onnxruntime-openvino 1.24 (a file path is a JSON parse error, and the EP
    # then silently fails to register); the EP's own precision=FP16 is rejected on the CPU device.
    return {OPENVINO: {"load_config": json.dumps({device: {"INFERENCE_PRECISION_HINT": hint}}, sort_keys=True)}}


def _wanted(profile: Profile, policy: ProviderPolicy, precision: str, measurable: bool,
            notes: list[str]) -> list[str]:
    if precision == "auto":
        if measurable:
            return list(profile.precisions)
        keep = [p for p in profile.precisions if p in policy.conservative]
        dropped = [p for p in profile.precisions if p not in keep]
        if dropped:
            notes.append(f"{policy.provider} cannot be measured here: auto keeps the conservative "
                         f"{', '.join(keep) or 'fp32'} and never ships an untimed {', '.join(dropped)}")
        return keep or ["fp32"]
    alias = {"fp16": "f16"} if policy.hints else {}
    p = alias.get(precision, precision)
    if p not in profile.precisions:
        raise ConfigError(f"target {profile.name} does not support precision {precision!r} "
                          f"(it supports {', '.join(profile.precisions)})")
    return [p]


def candidates_for(
    profile: Profile, facts: ModelFacts, precision: str, have_calibration: bool, opt_level: str,
    measurable: bool = False, compare_cpu: bool = True,
) -> tuple[list[Candidate], list[str]]:
    """Candidates in expected-fastest-first order for ``precision`` (``auto`` = every precision the profile lists
    when the target's provider can be measured here, its policy's conservative precisions when not), and notes on
    what was skipped and why. ``measurable``: the target's EP runs here (in this interpreter or a worker), so
    variants whose speed cannot be predicted are worth building and timing (OpenVINO: S8 as well as U8
    activations). ``compare_cpu``: add FP32 on the CPU EP as a candidate for targets whose device has the CPU EP."""
    if precision not in precision_choices:
        raise ConfigError(f"precision must be one of {precision_choices}, got {precision!r}")
    policy = policy_for(profile)
    primary = policy.provider
    notes: list[str] = []
    wanted = _wanted(profile, policy, precision, measurable, notes)
    q = profile.quantization
    post_opt = [("optimize", {"level": opt_level})] if policy.reoptimize_after_quantization else []
    upgrade = [("upgrade_opset", {"opset": 13})] if q.per_channel and facts.opset < 13 else []
    out: list[Candidate] = []
    for p in wanted:
        if p == "int8":
            static = Candidate(
                "int8-static", "int8", [*upgrade, ("quantize_static", static_config(q, policy))],
                why=f"static {q.format.upper()} {q.activation_type}/{q.weight_type} "
                    f"{'per-channel ' if q.per_channel else ''}{q.calibration_method}"
                    f"{' reduce_range' if q.reduce_range else ''}: {q.reason}".rstrip(": "),
                int8="static")
            dyn_cfg = dynamic_config(q, facts.transformer)
            dynamic = Candidate(
                "int8-dynamic", "int8", [("quantize_dynamic", dyn_cfg)],
                why="dynamic INT8 on MatMul weights (activations quantized at run time)"
                    + (", per output channel (transformer encoder)" if dyn_cfg["per_channel"] else ""),
                int8="dynamic")
            order: list[Candidate] = []
            if "dynamic" in policy.int8:
                if facts.matmul_share >= 0.5:
                    order = [dynamic, static]
                elif facts.matmul_share >= 0.2:
                    order = [static, dynamic]
                elif facts.matmul_share > 0:
                    # last resort: static INT8 can collapse a model (measured: Magika's byte embedding) where
                    # weight-only MatMul INT8 keeps it; the gate and the timing decide
                    order = [static, dynamic]
                    dynamic.last_resort = True
                    dynamic.why += (f" (last resort: only {facts.matmul_share:.0%} of the weights are in MatMul; "
                                    f"the convolutions stay FP32)")
                else:
                    order = [static]
                    notes.append("int8-dynamic skipped: no MatMul weights to quantize")
            elif "static" in policy.int8:
                order = [static]  # QDQ is what OpenVINO and TensorRT turn into their own INT8 kernels
                if policy.time_activation_variants and measurable and q.activation_type == "uint8":
                    # measured here: the OpenVINO CPU plugin ran a BERT-style encoder 1.8x faster with symmetric S8
                    # activations than with U8, while U8 was slightly faster on a small conv net: so time both
                    s8 = Candidate("int8-static-s8", "int8", [*upgrade, ("quantize_static", static_config(
                        q, policy, activation_type="int8", symmetric_activations=True))],
                        why="static QDQ int8/int8 symmetric: the S8-activation variant, timed because OpenVINO's "
                            "choice between U8 and S8 kernels depends on the model", int8="static")
                    order.append(s8)
            else:
                notes.append(f"int8 is not built for {primary}")
            for c in order:
                if c.int8 == "static" and not have_calibration:
                    if precision == "int8":
                        raise ConfigError(f"static INT8 for {profile.name} needs calibration data (--calibration)")
                    notes.append(f"{c.name} skipped: no calibration data (--calibration)")
                    continue
                c.steps = [*c.steps, *post_opt]
                if primary == TENSORRT:
                    c.provider_options = {TENSORRT: {"trt_fp16_enable": "True"}}
                    c.why += "; explicit QDQ INT8 on TensorRT, FP16 for the layers left in float"
                if policy.hints:
                    # Layers left in float run at the fastest hint when that can be checked here; unmeasured, f32
                    # keeps the CPU stand-in's accuracy numbers true.
                    hints = (profile.extra.get("openvino") or {}).get("precision_hints") or {}
                    float_hint = next((h for h in ("bf16", "f16") if h in hints and h in profile.precisions), "fp32")
                    c.provider_options = _ov_hint(profile, float_hint if measurable else "fp32")
                    if measurable and float_hint != "fp32":
                        c.why += f"; layers left in float run at the {float_hint} hint"
                out.append(c)
        elif p == "fp32":
            opts: dict[str, dict[str, str]] = {}
            if policy.hints:
                opts = _ov_hint(profile, "fp32")
            elif primary == TENSORRT:
                opts = {TENSORRT: {"trt_fp16_enable": "False"}}
            out.append(Candidate("fp32", "fp32", list(post_opt), opts, why="FP32: the original precision"))
        elif p in ("bf16", "f16") and policy.hints:
            out.append(Candidate(f"{p}", p, [], _ov_hint(profile, p), proxy_possible=False,
                                 why=f"OpenVINO inference precision hint {p} through load_config (weights stay FP32)"))
        elif p == "fp16" and policy.fp16 == "builder_flag":
            out.append(Candidate("fp16", "fp16", [], {TENSORRT: {"trt_fp16_enable": "True"}},
                                 proxy_steps=[("fp16", {"keep_io_types": True})],
                                 why="TensorRT FP16 by builder flag (trt_fp16_enable) on FP32 weights: TensorRT "
                                     "picks per layer, no weight conversion"))
        elif p == "fp16" and policy.fp16 == "weights":
            out.append(Candidate("fp16", "fp16", [("fp16", {"keep_io_types": True})],
                                 why=f"FP16 weights and compute with FP32 inputs/outputs kept, for {primary}"))
        else:
            notes.append(f"precision {p} is not built for {primary}")
    if compare_cpu and primary != CPU and any(pr.name == CPU for pr in profile.providers) and measurable:
        out.append(Candidate(
            "cpu-fp32", "fp32", [], cpu_guard=True,
            why="FP32 on the CPU EP at full optimization (saved at basic, so any ONNX Runtime of the device loads it; "
                "its session applies 'all' at load), the yardstick: it ships instead when the target's provider is "
                "slower on this device"))
    if not out:
        raise ConfigError(f"no candidate to build for {profile.name} with precision {precision}: {'; '.join(notes)}")
    return out, notes


def trt_shape_options(inputs: Sequence[TensorSpec], sample: dict[str, Any], max_batch: int) -> dict[str, str]:
    """TensorRT optimization-profile options for inputs with symbolic dims (otherwise TRT rebuilds per shape).

    opt = the validation sample's shape; min/max = 1 and ``max_batch`` on a symbolic dim 0 (batch), the sample's
    value on other symbolic dims (a model with free spatial dims gets one fixed-size profile; say so if that matters).
    """
    mins, opts, maxs = [], [], []
    for t in inputs:
        if all(isinstance(d, int) for d in t.shape) or not t.shape:
            continue
        shape = list(sample[t.name].shape)
        batch = [i == 0 and not isinstance(d, int) for i, d in enumerate(t.shape)]
        lo = [1 if b else s for b, s in zip(batch, shape, strict=True)]
        hi = [max(max_batch, s) if b else s for b, s in zip(batch, shape, strict=True)]
        mins.append(f"{t.name}:{'x'.join(map(str, lo))}")
        opts.append(f"{t.name}:{'x'.join(map(str, shape))}")
        maxs.append(f"{t.name}:{'x'.join(map(str, hi))}")
    if not opts:
        return {}
    return {"trt_profile_min_shapes": ",".join(mins), "trt_profile_opt_shapes": ",".join(opts),
            "trt_profile_max_shapes": ",".join(maxs)}
