"""edgefleet.packager: optimize, quantize and validate an ONNX model into one signed bundle per target device.

Build-host only: this package imports onnx and the ONNX Runtime quantization tools; the agent never imports it.
Modules by idea: ``options`` (the one options object), ``policy`` (per-provider table), ``planning`` (model facts,
candidates), ``steps`` (the passes), ``accuracy`` (the gate), ``worker`` (runs candidates in the target's runtime),
``choosing`` (the decision), ``orchestration`` (one target, top to bottom), ``bundling`` and ``reporting``, and
``api`` (``package()``).
"""

from .accuracy import Budget, CandidateAccuracy, OutputMetrics, evaluate, parse_budget
from .api import package
from .options import PackageOptions, PackageResult, ProgressEvent
from .policy import POLICIES, ProviderPolicy
from .steps import STEPS, make_plan, run_plan

__all__ = [
    "POLICIES",
    "STEPS",
    "Budget",
    "CandidateAccuracy",
    "OutputMetrics",
    "PackageOptions",
    "PackageResult",
    "ProgressEvent",
    "ProviderPolicy",
    "evaluate",
    "make_plan",
    "package",
    "parse_budget",
    "run_plan",
]
