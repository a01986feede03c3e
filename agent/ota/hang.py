"""A committed model that later hangs: record it, so the restart serves the previous kept model.

Probation (:mod:`agent.ota.probation`) catches a model that hangs while it is watched. One that
hangs on an input first seen after its commit leaves an interpreter call stuck inside the
runtime, where no thread can stop it. :class:`HangGuard` polls the active engine's
``stuck_calls()``; once a call has run longer than ``limit_deadlines`` x its deadline,
:func:`hung_reason` decides (pure) whether the active slot is to blame and may be given up, and
:func:`give_up_hung` writes one journal entry (:meth:`agent.ota.slots.Journal.demoted`): the previous kept
slot becomes active, the hung one is dropped. The service then exits so systemd starts a clean
process on that slot (docs/ota.md, "A model that hangs after its commit", says why a restart
rather than a swap in this process).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from agent.ota.crashpoints import crash_point
from agent.ota.slots import Journal
from edgefleet.errors import StorageError
from edgefleet.messages import OtaState

if TYPE_CHECKING:
    from agent.ota.manager import OtaManager

__all__ = ["HANG_LIMIT_DEADLINES", "HangGuard", "give_up_hung", "hung_reason"]

log = logging.getLogger(__name__)

HANG_LIMIT_DEADLINES = 3.0
"""A call stuck this many deadlines after the commit means the model hangs (one deadline is
already 20 x the latency budget, so three rule out a slow board)."""


def hung_reason(journal: Journal, stuck: Any, serving_sha256: str | None, limit_deadlines: float) -> str | None:
    """Why the active slot is to be given up, or None to leave it serving.

    Only a model an update committed, still the one serving, with a previous kept slot to return
    to: never the operator's own model, a rollback target (the operator chose it), a fallback
    boot served instead of the active slot, or the last model on the device.
    """
    if not stuck.count or stuck.oldest_s <= limit_deadlines * stuck.deadline_s:
        return None
    o, active = journal.outcome, journal.active
    if active is None or not journal.history or o is None:
        return None
    if o.state is not OtaState.COMMITTED or o.rollback or journal.versions.get(active) != o.version:
        return None
    if not serving_sha256 or not active.endswith("-" + serving_sha256[:12]):
        return None
    previous = journal.versions.get(journal.history[0], "?")
    return (f"version {o.version} hung after its commit: {stuck.count} inference call(s) stuck for "
            f"{stuck.oldest_s:.1f} s (more than {limit_deadlines:g} x the {stuck.deadline_s:g} s deadline); "
            f"restarting onto the previous kept version {previous}")


class HangGuard:
    """Polls ``engine().stuck_calls()`` every ``every_s`` and calls ``on_stuck(report)`` while any is stuck.

    A thread of its own, off the request path: the hot path pays nothing for it.
    """

    def __init__(self, engine: Callable[[], Any], on_stuck: Callable[[Any], None], every_s: float = 0.5) -> None:
        self._engine = engine
        self._on_stuck = on_stuck
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ota-hang-guard", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            report = getattr(self._engine(), "stuck_calls", None)
            if report is None:
                continue
            stuck = report()
            if stuck.count:
                try:
                    self._on_stuck(stuck)
                except Exception:
                    log.exception("hang guard: handling a stuck call failed")


def give_up_hung(ota: OtaManager, stuck: Any) -> None:
    """The hang guard saw a stuck call: give up a hung committed model (one journal write).

    Probation judges its own model; a record that cannot be written is retried at the next
    poll (restarting without it would serve the hung model again).
    """
    ledger = ota._ledger
    with ledger.lock:
        if ota._trial is not None or ota.hung is not None:
            return
        info = ota.host.model_info
        reason = hung_reason(ledger.journal, stuck, info.get("sha256") if info else None,
                             ota.hang_limit_deadlines)
        o = ledger.journal.outcome
        if reason is None or o is None:
            return
        outcome = replace(o, state=OtaState.ROLLED_BACK, reason=reason, reported=False, hung=True)
        try:
            ledger.persist(ledger.journal.demoted(outcome))
        except StorageError as exc:
            log.error("cannot record the hung model: %s", exc)
            return
        ota.hung = reason
    crash_point("hung-recorded")
    log.error("%s", reason)
    ledger.hand_over({"event": "model_error", "reason": reason})
    if ota.on_hung is not None:
        ota.on_hung(reason)
