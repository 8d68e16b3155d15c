"""edgefleet.agent: the device daemon — installs bundles from MQTT commands, serves them locally, reports latency.

``edgefleet agent run --config agent.toml``; see docs/agent.md. Names load lazily so importing the package (or
``edgefleet agent --help``) never loads ONNX Runtime, paho or numpy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Agent": "daemon", "AgentConfig": "config", "load_config": "config", "Store": "store", "Installer": "installer",
    "InstallError": "installer", "ApiServer": "api", "MqttLink": "mqtt", "Spool": "spool",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edgefleet.agent' has no attribute {name!r}")
    return getattr(importlib.import_module(f"edgefleet.agent.{module}"), name)
