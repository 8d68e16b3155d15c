"""edgefleet.sdk: what packager, agent and fleet share — bundle format, runtime, sketches, protocol, errors.

Application code on a device may import it directly::

    from edgefleet.sdk import Model, TrustedKeys
    model = Model.open("/var/lib/edgefleet/store/<digest>", TrustedKeys.from_paths(["fleet.pub"]))
    outputs = model.run({"input": array})

Names load lazily so ``import edgefleet.sdk`` stays cheap on small devices.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Manifest": "bundle", "TensorSpec": "bundle", "ProviderConfig": "bundle", "SessionConfig": "bundle",
    "Tolerance": "bundle", "ValidationSpec": "bundle", "write_bundle": "bundle", "verify_bundle": "bundle",
    "extract_bundle": "bundle", "read_manifest": "bundle", "read_installed": "bundle",
    "PrivateKey": "keys", "PublicKey": "keys", "TrustedKeys": "keys", "generate_keypair": "keys",
    "load_private_key": "keys", "load_public_key": "keys",
    "Model": "runtime", "ort_info": "runtime", "BenchmarkResult": "runtime", "SelfTestReport": "runtime",
    "DDSketch": "sketch", "LatencyRecorder": "sketch",
    "save_validation": "validation", "load_validation": "validation",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgefleet.sdk' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edgefleet.sdk.{module}"), name)
