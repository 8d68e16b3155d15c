"""Per-provider policy, as one table: what can be built for each execution provider, how it is quantized, how its
accuracy and speed can be known on the build host, and how much margin its device tolerances get.

Device *profiles* (``devices/profiles/*.toml``) say what a class of device is and how to quantize for its CPU; this
table says what each *provider* can do with that. Planning reads both; nothing else in the packager branches on a
provider name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgefleet.devices.profile import Profile, Quantization
from edgefleet.sdk.errors import ConfigError

__all__ = [
    "COREML",
    "CPU",
    "CUDA",
    "OPENVINO",
    "POLICIES",
    "SIMPLICITY",
    "TENSORRT",
    "ProviderPolicy",
    "dynamic_config",
    "policy_for",
    "static_config",
]

CPU = "CPUExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
COREML = "CoreMLExecutionProvider"

# The ladder of the choice (choosing.py), simplest and most accurate first: a candidate ships over a simpler one only
# when it is faster with confidence. FP32 on the CPU EP runs on every ORT build of the device, so it is the simplest;
# then the provider's own FP32; reduced float precisions (rounding only); dynamic INT8 (weights only, activations
# quantized per call from their own range); static INT8 (activation ranges fixed by calibration data); mixed
# precision (static INT8 with searched float islands: the most moving parts). Equal ranks are ordered by name.
SIMPLICITY = {"cpu-fp32": 0, "fp32": 1, "bf16": 2, "f16": 2, "fp16": 2, "int8-dynamic": 3, "int8-static": 4,
              "mixed": 5}


@dataclass(frozen=True)
class ProviderPolicy:
    """What the packager does for one execution provider, and why."""

    provider: str
    flavour: str
    contrib_ops: bool
    offline: str
    fp16: str | None
    hints: bool
    int8: tuple[str, ...]
    time_activation_variants: bool
    symmetric_activations: bool
    reoptimize_after_quantization: bool
    conservative: tuple[str, ...]
    stand_in: Mapping[str, str] = field(default_factory=dict)
    margin_measured: float = 2.0
    margin_stand_in: float = 4.0
    unverified_rel: float = 0.05
    int8_op_types: tuple[str, ...] = ()  # static QDQ only around these ops (empty: every op ORT can quantize)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON form for reports."""
        d = dict(self.__dict__)
        d["stand_in"] = dict(self.stand_in)
        return d


POLICIES: dict[str, ProviderPolicy] = {p.provider: p for p in (
    ProviderPolicy(
        CPU, "cpu", contrib_ops=True, offline="profile", fp16="weights", hints=False, int8=("dynamic", "static"),
        time_activation_variants=False, symmetric_activations=False, reoptimize_after_quantization=True,
        conservative=("fp32",),
        reason="runs in every ONNX Runtime, so it is always measured here; dynamic INT8 for MatMul-heavy models "
               "(transformer encoders), static QDQ for convolutions, never ConvInteger (slower than FP32 on every "
               "CPU measured)"),
    ProviderPolicy(
        OPENVINO, "openvino", contrib_ops=False, offline="basic", fp16=None, hints=True, int8=("static",),
        time_activation_variants=True, symmetric_activations=False, reoptimize_after_quantization=False,
        conservative=("fp32",), stand_in={"int8": "cpu", "fp32": "cpu"},
        # measured here (1 thread, vs FP32 on the CPU EP, f32 hint): QDQ only around the weighted ops ran YOLOv8n at
        # 1.85x instead of 1.25x with ORT's default QDQ on every op, PP-OCRv4 rec at 2.11x instead of 1.01x, and kept
        # YOLOv8n's class scores from collapsing (the output Concat is no longer quantized)
        int8_op_types=("Conv", "ConvTranspose", "MatMul", "Gemm"),
        reason="OpenVINO compiles the graph itself and takes standard ops only; precision goes through its inference "
               "precision hint (load_config), INT8 through QDQ it folds into its own kernels; bf16/f16 hints cannot "
               "be estimated without OpenVINO, so unmeasured it ships the f32 hint"),
    ProviderPolicy(
        TENSORRT, "cuda", contrib_ops=False, offline="basic", fp16="builder_flag", hints=False, int8=("static",),
        time_activation_variants=False, symmetric_activations=True, reoptimize_after_quantization=False,
        conservative=("fp16", "fp32"), stand_in={"fp16": "fp16-weights", "int8": "cpu", "fp32": "cpu"},
        reason="TensorRT picks per-layer precision itself: FP16 is a builder flag on FP32 weights, its worst case "
               "(every layer rounded) is estimated on a CPU stand-in; INT8 only as symmetric S8S8 QDQ, never shipped "
               "untimed by auto"),
    ProviderPolicy(
        CUDA, "cuda", contrib_ops=True, offline="basic", fp16="weights", hints=False, int8=("static",),
        time_activation_variants=False, symmetric_activations=True, reoptimize_after_quantization=False,
        conservative=("fp16", "fp32"), stand_in={"fp16": "cpu", "int8": "cpu", "fp32": "cpu"},
        reason="CUDA EP: FP16 weights (FP32 IO kept); its accuracy is estimated on a CPU stand-in"),
    ProviderPolicy(
        COREML, "cpu", contrib_ops=False, offline="basic", fp16="weights", hints=False, int8=(),
        time_activation_variants=False, symmetric_activations=False, reoptimize_after_quantization=False,
        conservative=("fp16", "fp32"), stand_in={"fp16": "cpu", "fp32": "cpu"},
        reason="CoreML takes standard ops only; FP16 is what the Neural Engine runs, its accuracy estimated on a "
               "CPU stand-in; INT8 is rarely faster there"),
)}


def policy_for(profile: Profile) -> ProviderPolicy:
    """The policy of a profile's primary provider (a ConfigError for a provider the packager has no policy for)."""
    try:
        return POLICIES[profile.primary_provider]
    except KeyError:
        raise ConfigError(f"profile {profile.name}: the packager has no policy for {profile.primary_provider} "
                          f"(known: {', '.join(POLICIES)})") from None


def static_config(q: Quantization, policy: ProviderPolicy, **overrides: Any) -> dict[str, Any]:
    """The quantize_static step config for a profile's [quantization] preset on a provider: the one place where
    static quantization settings are made (candidates, sensitivity retries and the bench all come through here)."""
    cfg: dict[str, Any] = {"format": q.format, "activation_type": q.activation_type, "weight_type": q.weight_type,
                           "per_channel": q.per_channel, "reduce_range": q.reduce_range,
                           "method": q.calibration_method, "symmetric_activations": policy.symmetric_activations}
    if policy.int8_op_types:
        cfg["op_types"] = list(policy.int8_op_types)
    cfg.update(overrides)
    return cfg


def dynamic_config(q: Quantization, transformer: bool, **overrides: Any) -> dict[str, Any]:
    """The quantize_dynamic step config: S8 weights from the profile, per output channel for transformer encoders
    (one scale per row of a projection keeps the outlier rows of attention/FFN weights from flattening the rest)."""
    cfg: dict[str, Any] = {"weight_type": q.weight_type, "reduce_range": q.reduce_range, "per_channel": transformer}
    cfg.update(overrides)
    return cfg
