"""edgefleet.packager: optimize, quantize and validate an ONNX model into one signed bundle per target device.

Build-host only: this package imports onnx and the ONNX Runtime quantization tools; the agent never imports it.
"""

from .accuracy import Budget, CandidateAccuracy, OutputMetrics, evaluate, parse_budget
from .api import PackageOptions, PackageResult, package
from .steps import STEPS, make_plan, run_plan

__all__ = [
    "STEPS",
    "Budget",
    "CandidateAccuracy",
    "OutputMetrics",
    "PackageOptions",
    "PackageResult",
    "evaluate",
    "make_plan",
    "package",
    "parse_budget",
    "run_plan",
]
