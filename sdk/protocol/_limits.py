"""Every limit of the protocol, in one place, each with its reason (STYLE 14: bounded by default).

Integers are bounded so that no sum the controller computes can overflow a 64-bit column: a window counts at most
``MAX_COUNT`` = 2^40 requests (a 1-hour window at 300 million requests/s), so 2^23 windows — 8 million records —
can be added before a 64-bit sum could overflow, and the store saturates at ``INT64_MAX`` beyond that anyway
(``edgefleet.sdk.sketch.saturating_add``; aggregate queries use floating-point totals). Floats are finite by
construction (msgspec refuses JSON numbers with no float, like ``1e999``; ``NaN``/``Infinity`` are not JSON) and
bounded where they are summed or compared.
"""

from __future__ import annotations

import math

VERSION = 1
"""Protocol major version: the ``v`` of every payload and the ``v1`` of every topic."""

MAX_PAYLOAD = 256 * 1024
"""Bytes of one MQTT payload or HTTP JSON body; refused before parsing."""

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
"""What a 64-bit storage integer (SQLite INTEGER, PostgreSQL BIGINT) holds."""

MAX_COUNT = 2**40
"""Requests (or errors, or sketch bucket counts) in one telemetry window: see the module docstring."""

MAX_BYTES = 2**50
"""Memory, file and bundle sizes (1 PiB)."""

MAX_TS = 4_102_444_800.0
"""Timestamps (seconds since the epoch) before 2100-01-01."""

MAX_FUTURE_SKEW_S = 300.0
"""How far a device's clock may run ahead of the controller's before its status and telemetry are refused
(:func:`edgefleet.sdk.protocol.check_clock`): a timestamp from the future would win over every later status of the
real device and never age out of retention. The past is not limited: an outbox holds records for as long as the
broker is away."""

MAX_INTERVAL_S = 86_400.0
"""Telemetry window length."""

MAX_MS = 1e9
"""Latency values in milliseconds (11.6 days): beyond any inference."""

MIN_SKETCH_VALUE = 1e-6
"""Sketch values below this (ms) count in the zero bucket (as in :class:`edgefleet.sdk.sketch.DDSketch`)."""

SKETCH_ALPHA = 0.01
"""Relative accuracy of every latency sketch in telemetry (what agents record and the fleet merges)."""

MAX_BINS = 4096
"""Dense buckets in one sketch (DDSketch folds the lowest ones beyond)."""

_GAMMA_LN = math.log((1 + SKETCH_ALPHA) / (1 - SKETCH_ALPHA))
MIN_KEY = math.floor(math.log(MIN_SKETCH_VALUE) / _GAMMA_LN) - 1
MAX_KEY = math.ceil(math.log(MAX_MS) / _GAMMA_LN) + 1
"""Bucket keys a sketch of values in [MIN_SKETCH_VALUE, MAX_MS] can have (about -692..1038)."""

MAX_NAME = 128
"""Model names, versions, provider names, dict keys."""

MAX_TEXT = 4096
"""Messages, reasons, free-form strings."""

MAX_URL = 2048
"""Bundle URLs."""

MAX_MODELS = 64
"""Model windows in one telemetry record, models in a description."""

MAX_LIST = 512
"""Other lists (providers, tags, CPU flags, profile reasons)."""

MAX_DEPTH = 8
"""Nesting of free-form objects (event data, reply results, command args)."""

MAX_ITEMS = 1024
"""Keys or items of one free-form object or list."""

MAX_RECEIPT_RANGES = 1000
"""Seq ranges per boot and kind, and reply ids, in one receipt (a controller batch of 500 messages needs 500)."""

MAX_RECEIPT_BOOTS = 256
"""Boots per kind in one receipt."""

ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
"""Fleet, device, command and share-group ids: never an MQTT wildcard (``+``, ``#``) nor a level (``/``)."""

BOOT_PATTERN = r"^[A-Za-z0-9_.-]{0,64}$"
"""An agent run's id (may be empty in a status of an unknown run)."""

KIND_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
"""Event kinds, error codes, steps."""
