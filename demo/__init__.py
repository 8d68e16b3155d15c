"""edgefleet.demo: ``edgefleet demo`` (``make demo``) — the whole story on one machine, outside the product components.

``harness`` starts Mosquitto, the controller and three agents, packages Magika with the packager as a user would, and
drives load; ``_magika_inputs`` makes real inputs for that model from files on this machine. Not a component: it may
import any of them (tests/test_boundaries.py), and none imports it.
"""

from __future__ import annotations

__all__: list[str] = []
