"""Model validation in a child process: a bad model cannot take the agent down with it.

``validate_model`` (the parent side) is what the agent calls; the child, which imports the engine,
runs as ``python -m agent.validation.child`` and is never imported by the parent.
"""

from __future__ import annotations

from agent.validation.parent import validate_model
from agent.validation.report import ValidationReport

__all__ = ["ValidationReport", "validate_model"]
