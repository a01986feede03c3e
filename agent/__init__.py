"""edgefleet agent: runs TFLite models on the device, reports over MQTT, takes OTA updates.

Importing ``agent`` is cheap; ``agent.Engine`` loads the inference engine on first use.
Nothing in this package imports TensorFlow (tests/agent/test_no_tensorflow.py checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgefleet import __version__

__all__ = ["Engine", "__version__"]

if TYPE_CHECKING:
    from agent.engine import Engine


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from agent.engine import Engine

        return Engine
    raise AttributeError(f"module 'agent' has no attribute {name!r}")
