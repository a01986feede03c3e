"""The exception tree shared by the agent, the converter and the fleet tool.

One root per source of fault, so callers can tell who is to blame::

    EdgefleetError         (exit 2 unless said otherwise)
    ├── ConfigError        a profile, agent.yaml or command-line value is wrong (the user's file)
    ├── ArtifactError      a manifest, signature or model file is bad (the publisher's data)
    │   └── SignatureError the manifest signature is missing or does not verify
    ├── ModelError         a model cannot be loaded or run by this runtime
    ├── InputError         an inference input has the wrong shape, dtype or values
    ├── StorageError       the device's own disk is full or cannot be written (nobody's artifact)
    ├── TransportError     the broker or an HTTP server could not be reached (exit 4)
    └── ConversionError    the converter could not produce a model

Library exceptions are translated at the boundary (``raise ModelError(...) from exc``) and the
command-line programs turn any of these into one ``error:`` line (see :mod:`edgefleet.cli`) and
the process exit code its class names (``exit_code``, one of :class:`ExitCode`).
"""

from __future__ import annotations

import enum

__all__ = [
    "ArtifactError",
    "ConfigError",
    "ConversionError",
    "EdgefleetError",
    "ExitCode",
    "InputError",
    "ModelError",
    "SignatureError",
    "StorageError",
    "TransportError",
]


class ExitCode(enum.IntEnum):
    """The exit codes of edge-convert, edge-agent and edge-fleet: the same number means the same thing.

    A script (or systemd's ``RestartPreventExitStatus=``) can tell "retrying cannot help" (2) from
    "the peer may be back later" (4) from "it ran and the outcome is a failure" (1).
    """

    OK = 0
    FAILED = 1  # it ran and failed: a rollout aborted or failed, a model does not validate
    USAGE = 2  # bad arguments, configuration, input or artifact: running it again cannot help
    NOT_DEPLOYABLE = 3  # edge-convert: the artifact was written but misses its targets
    TRANSPORT = 4  # the MQTT broker or an HTTP server could not be reached: try again later
    BUG = 70  # an unexpected internal error (sysexits' EX_SOFTWARE); --debug shows the traceback
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class EdgefleetError(Exception):
    """Root of every error this project raises on purpose."""

    exit_code: int = ExitCode.USAGE


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


class StorageError(EdgefleetError):
    """The local disk is full, read-only or failing: the device is at fault, not the artifact or the network.

    Kept apart from :class:`ArtifactError` so an update that hits a full disk ends ``failed``
    (retry once space is free), never ``rejected`` (the artifact is fine).
    """


class TransportError(EdgefleetError):
    """A network peer (MQTT broker, HTTP server) could not be reached or answered badly."""

    exit_code = ExitCode.TRANSPORT


class ConversionError(EdgefleetError):
    """The converter failed to produce a model."""
