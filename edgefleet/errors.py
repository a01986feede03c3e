"""The exception tree shared by the agent, the converter and the fleet tool.

One root per source of fault, so callers can tell who is to blame::

    EdgefleetError
    ├── ConfigError        a profile, agent.yaml or command-line value is wrong (the user's file)
    ├── ArtifactError      a manifest, signature or model file is bad (the publisher's data)
    │   └── SignatureError the manifest signature is missing or does not verify
    ├── ModelError         a model cannot be loaded or run by this runtime
    ├── InputError         an inference input has the wrong shape, dtype or values
    ├── TransportError     the broker or an HTTP server could not be reached
    └── ConversionError    the converter could not produce a model

Library exceptions are translated at the boundary (``raise ModelError(...) from exc``) and the
command-line programs turn any of these into one ``error:`` line (see :mod:`edgefleet.cli`).
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "ConfigError",
    "ConversionError",
    "EdgefleetError",
    "InputError",
    "ModelError",
    "SignatureError",
    "TransportError",
]


class EdgefleetError(Exception):
    """Root of every error this project raises on purpose."""

    exit_code = 2


class ConfigError(EdgefleetError):
    """A configuration file, profile or option is invalid."""


class ArtifactError(EdgefleetError):
    """An artifact (manifest, signature, model file) is malformed or does not match."""


class SignatureError(ArtifactError):
    """A manifest signature is missing, malformed or made by an untrusted key."""


class ModelError(EdgefleetError):
    """A model file cannot be loaded, allocated or invoked."""


class InputError(EdgefleetError):
    """An inference input does not fit the model."""


class TransportError(EdgefleetError):
    """A network peer (MQTT broker, HTTP server) could not be reached or answered badly."""


class ConversionError(EdgefleetError):
    """The converter failed to produce a model."""
