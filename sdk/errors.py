"""The one error tree of edgefleet.

Every error edgefleet raises on purpose derives from :class:`EdgefleetError` and carries a stable, machine-readable
``code`` (used in MQTT replies, HTTP bodies and the CLI), so a fleet operator can count failures by kind::

    EdgefleetError                      edgefleet
    ├── ConfigError                     config           bad config file, profile or option value
    ├── InputError                      input            a tensor or request that does not match the model
    ├── BundleError                     bundle
    │   ├── BundleFormatError           bundle.format    not a bundle, truncated, unreadable, bad manifest
    │   ├── BundleSignatureError        bundle.signature no/unknown/invalid signature
    │   ├── BundleIntegrityError        bundle.integrity size or sha256 differs, file missing or unlisted
    │   ├── UnsafeArchiveError          bundle.unsafe    path traversal, links, special files, duplicates, bombs
    │   └── BundleCompatibilityError    bundle.compat    other target, ORT too old, older version than installed
    ├── ProviderError                   provider
    │   ├── ProviderUnavailableError    provider.unavailable  the preferred execution provider is not in this ORT
    │   └── ProviderFallbackError       provider.fallback     ORT would run (part of) the model on another EP
    ├── ModelError                      model            ORT could not load or run the model
    ├── SelfTestError                   selftest         outputs outside the bundle's tolerances on this device
    ├── PackagingError                  packaging        the packager could not produce a bundle
    │   └── AccuracyBudgetError         packaging.accuracy   no candidate within the accuracy budget
    ├── ProtocolError                   protocol         a message (MQTT payload, HTTP body) not matching its schema
    │   ├── ProtocolVersionError        protocol.version     another major protocol version (``"v"``)
    │   └── PayloadTooLargeError        protocol.size        over the size cap before it is even parsed
    ├── CommandError                    command
    │   ├── CommandSignatureError       command.signature   unsigned (where required), untrusted key, bad signature
    │   ├── CommandExpiredError         command.expired     past its ``expires`` time
    │   ├── CommandReplayError          command.replay      counter not above the last one this device accepted,
    │   │                                                   or a nonce it has seen
    │   └── CommandTargetError          command.target      for another device or fleet, or names none (signed)
    └── TransportError                  transport        broker, HTTP or download failures

Foreign exceptions are translated once, at the boundary: ``raise TransportError(f"...: {exc}") from exc``.
"""

from __future__ import annotations

__all__ = [
    "AccuracyBudgetError",
    "BundleCompatibilityError",
    "BundleError",
    "BundleFormatError",
    "BundleIntegrityError",
    "BundleSignatureError",
    "CommandError",
    "CommandExpiredError",
    "CommandReplayError",
    "CommandSignatureError",
    "CommandTargetError",
    "ConfigError",
    "EdgefleetError",
    "InputError",
    "ModelError",
    "PackagingError",
    "PayloadTooLargeError",
    "ProtocolError",
    "ProtocolVersionError",
    "ProviderError",
    "ProviderFallbackError",
    "ProviderUnavailableError",
    "SelfTestError",
    "TransportError",
    "UnsafeArchiveError",
]


class EdgefleetError(Exception):
    """Base of every error edgefleet raises on purpose; ``code`` is stable across releases."""

    code = "edgefleet"


class ConfigError(EdgefleetError, ValueError):
    """A config file, profile or option value is invalid."""

    code = "config"


class InputError(EdgefleetError, ValueError):
    """Input tensors or a request do not match what the model declares."""

    code = "input"


class BundleError(EdgefleetError):
    """A bundle could not be trusted or read."""

    code = "bundle"


class BundleFormatError(BundleError):
    """Not a bundle, truncated, or its manifest does not match the schema."""

    code = "bundle.format"


class BundleSignatureError(BundleError):
    """The manifest signature is missing, made by an untrusted key, or invalid."""

    code = "bundle.signature"


class BundleIntegrityError(BundleError):
    """A member's size or sha256 differs from the manifest, or a file is missing or unlisted."""

    code = "bundle.integrity"


class UnsafeArchiveError(BundleError):
    """A member would escape the extraction directory, is a link or special file, or the archive is a bomb."""

    code = "bundle.unsafe"


class BundleCompatibilityError(BundleError):
    """A valid bundle that this device must not install (other target, ORT too old, downgrade)."""

    code = "bundle.compat"


class ProviderError(EdgefleetError):
    """An execution provider problem."""

    code = "provider"


class ProviderUnavailableError(ProviderError):
    """The bundle's preferred execution provider is not offered by the installed ONNX Runtime."""

    code = "provider.unavailable"


class ProviderFallbackError(ProviderError):
    """ONNX Runtime would run the model (or part of it) on a provider other than the one asked for."""

    code = "provider.fallback"


class ModelError(EdgefleetError):
    """ONNX Runtime failed to load or run the model."""

    code = "model"


class SelfTestError(EdgefleetError):
    """The bundle's validation set gives outputs outside its tolerances on this device."""

    code = "selftest"


class PackagingError(EdgefleetError):
    """The packager could not produce a bundle."""

    code = "packaging"


class AccuracyBudgetError(PackagingError):
    """No candidate met the accuracy budget; the message lists each candidate's numbers."""

    code = "packaging.accuracy"


class ProtocolError(EdgefleetError, ValueError):
    """A message (MQTT payload, HTTP body) does not match its schema; the message names the field."""

    code = "protocol"


class ProtocolVersionError(ProtocolError):
    """A message of a protocol major version this edgefleet does not speak."""

    code = "protocol.version"


class PayloadTooLargeError(ProtocolError):
    """A message over the size cap, refused before it is parsed."""

    code = "protocol.size"


class CommandError(EdgefleetError):
    """A controller command this device refuses to execute (authenticity, freshness)."""

    code = "command"


class CommandSignatureError(CommandError):
    """A command without a required signature, signed by an untrusted key, or whose signature does not match."""

    code = "command.signature"


class CommandExpiredError(CommandError):
    """A command received or executed after its ``expires`` time."""

    code = "command.expired"


class CommandReplayError(CommandError):
    """A command whose counter is not above the last counter this device accepted (a replay or a rollback)."""

    code = "command.replay"


class CommandTargetError(CommandError):
    """A signed command for another device or fleet (a captured command replayed elsewhere), or one that names
    none where binding is required."""

    code = "command.target"


class TransportError(EdgefleetError):
    """The broker, an HTTP peer or a download failed."""

    code = "transport"
