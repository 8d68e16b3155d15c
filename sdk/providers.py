"""How ONNX Runtime execution providers are named for people: ``TensorrtExecutionProvider`` → ``TensorRT``.

ORT's identifiers spell the vendors' names its own way (``Tensorrt``, ``CoreML``, ``OpenVINO``); every human-facing
table (``devices list``, the demo, reports) uses the vendors' spelling from this one table.
"""

from __future__ import annotations

__all__ = ["PROVIDER_LABELS", "provider_label"]

PROVIDER_LABELS: dict[str, str] = {
    "CPUExecutionProvider": "CPU",
    "CUDAExecutionProvider": "CUDA",
    "TensorrtExecutionProvider": "TensorRT",
    "NvTensorRTRTXExecutionProvider": "TensorRT RTX",
    "OpenVINOExecutionProvider": "OpenVINO",
    "CoreMLExecutionProvider": "CoreML",
    "DmlExecutionProvider": "DirectML",
    "ROCMExecutionProvider": "ROCm",
    "MIGraphXExecutionProvider": "MIGraphX",
    "QNNExecutionProvider": "QNN",
    "XnnpackExecutionProvider": "XNNPACK",
    "ACLExecutionProvider": "ACL",
    "ArmNNExecutionProvider": "ArmNN",
    "WebGpuExecutionProvider": "WebGPU",
}
"""ORT provider id → the vendor's spelling."""


def provider_label(name: str) -> str:
    """The name people know an ORT provider by (``OpenVINOExecutionProvider`` → ``OpenVINO``); unknown ids lose only
    the ``ExecutionProvider`` suffix."""
    return PROVIDER_LABELS.get(name, name.removesuffix("ExecutionProvider"))
