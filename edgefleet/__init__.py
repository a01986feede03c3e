"""edgefleet: the contract between the converter, the agent and the fleet tool.

What crosses a wire or a disk lives here: errors and exit codes, id rules, topics, messages and
state machines, manifests, signatures, device profiles, quantization, atomic writes, the CLI
error mapping and the MQTT client. ``agent``, ``converter`` and ``fleet`` import this package and
never each other (tests/test_layout.py checks it). Nothing here imports TensorFlow.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("edgefleet")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"
