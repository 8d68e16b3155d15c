"""edgefleet.fleet: the controller (ingest, store, deployments, dashboard, API) and the operator's tools.

Modules, one idea each: ``store`` (the Store interface in ``store.base``, one module per backend: ``store.sqlite``),
``ingest`` (MQTT into the store), ``rollout`` (the deployment state machine: selectors, canary verdicts, the rollout
driver, target state rules), ``bundles`` (the verified bundle library), ``http`` (dashboard, REST, SSE, /metrics,
bundle downloads), ``controller`` (one process wiring them), ``top`` (terminal view from MQTT), ``simulate``
(simulated devices), ``enroll`` (broker credentials), ``cli``. Imports ``edgefleet.sdk`` only; names load lazily so
``import edgefleet.fleet`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "BundleLibrary",
    "Controller",
    "ControllerConfig",
    "Deployer",
    "Ingestor",
    "RolloutPolicy",
    "SQLiteStore",
    "Selector",
    "Simulator",
    "Store",
    "open_store",
]

_WHERE = {
    "BundleLibrary": "bundles", "Controller": "controller", "ControllerConfig": "controller", "Deployer": "rollout",
    "RolloutPolicy": "rollout", "Selector": "rollout", "Ingestor": "ingest", "SQLiteStore": "store", "Store": "store",
    "open_store": "store", "Simulator": "simulate",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'edgefleet.fleet' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
