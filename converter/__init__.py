"""edgefleet converter: trained TensorFlow/Keras model -> checked, signed TFLite artifact for a device profile.

Host side only (imports TensorFlow). The agent never imports this package; the contract it
shares with the agent (profiles, manifest, signing, quantization) lives in :mod:`edgefleet`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EXIT_NOT_DEPLOYABLE", "ConvertOptions", "ConvertResult", "convert"]


def __getattr__(name: str) -> Any:
    # Importing TensorFlow takes seconds; `edge-convert --list-profiles` and --help should not pay it.
    if name == "ConvertOptions":
        from converter.options import ConvertOptions
        return ConvertOptions
    if name in __all__:
        from converter import pipeline
        return getattr(pipeline, name)
    raise AttributeError(name)
