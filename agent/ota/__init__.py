"""Over-the-air model updates: signed, verified, crash-safe, with probation and rollback.

One module per job: :mod:`~agent.ota.commands` (parse and admit update/rollback commands),
:mod:`~agent.ota.download` (bounded, resumable fetch), :mod:`~agent.ota.verify` (pure checks),
:mod:`~agent.ota.slots` (slots + journal, with the state machine's order guard),
:mod:`~agent.ota.ledger` (persist each transition, then report it),
:mod:`~agent.ota.probation` (watch, shadow, verdict), :mod:`~agent.ota.hang` (a committed model
that hangs later), :mod:`~agent.ota.recovery` (what boot does with interrupted work),
:mod:`~agent.ota.boot` (read or rebuild the journal, serve with fallback),
:mod:`~agent.ota.initial` (the first model, from agent.yaml), :mod:`~agent.ota.update` (the
update's steps), :mod:`~agent.ota.rollback` (the rollback command and its authorisation),
:mod:`~agent.ota.worker` (the OTA thread) and :mod:`~agent.ota.manager` (the order of the steps,
and :class:`OtaManager`, the one entry point the service uses). See ``docs/ota.md``.
"""

from __future__ import annotations

from agent.ota.manager import OtaManager

__all__ = ["OtaManager"]
