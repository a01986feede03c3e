"""Over-the-air model updates: signed, verified, crash-safe, with probation and rollback.

One module per step: :mod:`~agent.ota.download` (bounded, resumable fetch),
:mod:`~agent.ota.verify` (pure checks), :mod:`~agent.ota.slots` (slots + journal),
:mod:`~agent.ota.probation` (watch, shadow, verdict), :mod:`~agent.ota.manager` (the state machine
and :class:`OtaManager`, the one entry point the service uses). See ``docs/ota.md``.
"""

from __future__ import annotations

from agent.ota.manager import OtaManager

__all__ = ["OtaManager"]
