"""The journal in memory and on disk, and the events that report its transitions.

Every OTA step goes through :class:`Ledger`: the new journal is written first (temp file, fsync,
rename, by :class:`~agent.ota.slots.SlotStore`), then adopted, then reported, so a crash between
any two of those leaves the device on a committed model and an outcome still to report. One
lock guards the journal for the command threads and the worker; ``idle`` is notified on every
change so ``wait_idle`` sees the work end.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from agent.ota.slots import Journal, Outcome, SlotStore
from edgefleet.errors import StorageError
from edgefleet.messages import OtaState

__all__ = ["Ledger"]

log = logging.getLogger(__name__)

_SERVING_CHANGED = frozenset({OtaState.COMMITTED, OtaState.ROLLED_BACK})


class Ledger:
    """Persist, then adopt, then report each journal transition.

    Args:
        store: where the journal is written.
        emit_event: gets each event dict; exceptions are logged, never raised.
        on_serving_changed: called once a ``committed``/``rolled_back`` outcome has been reported.
    """

    def __init__(self, store: SlotStore, emit_event: Callable[[dict[str, Any]], None],
                 on_serving_changed: Callable[[], None] | None) -> None:
        self.store = store
        self.emit_event = emit_event
        self.on_serving_changed = on_serving_changed
        self.lock = threading.RLock()  # guards the journal (command threads vs the worker)
        self.idle = threading.Condition(self.lock)
        self.journal = Journal()
        self.cancel: str | None = None  # rollout id a cancel command asked to stop
        self.timeline: list[tuple[float, str, str]] = []  # (monotonic s, version, state), for benchmarks

    def version(self, slot: str | None) -> str:
        return self.journal.versions.get(slot or "", "?")

    def persist(self, journal: Journal, best_effort: bool = False) -> None:
        """Write the journal, then adopt it. ``best_effort``: adopt it even if the disk refuses it.

        Raises:
            StorageError: the write failed and ``best_effort`` is False.
        """
        with self.lock:
            try:
                self.store.write_journal(journal)
            except StorageError as exc:
                if not best_effort:
                    raise
                log.error("%s; going on with the journal in memory only", exc)
            self.journal = journal
            self.idle.notify_all()

    def emit(self, rollout_id: str, version: str, state: OtaState, **extra: Any) -> None:
        """Hand one event to the service; the state goes on the wire as its plain string."""
        log.info("ota %s v%s: %s", rollout_id, version, state.value)
        self.timeline.append((time.monotonic(), version, state.value))
        event = {"event": "ota", "rollout_id": rollout_id, "version": version, "state": state.value}
        event.update({k: v for k, v in extra.items() if v is not None})
        self.hand_over(event)

    def hand_over(self, event: dict[str, Any]) -> None:
        try:
            self.emit_event(event)
        except Exception:
            log.exception("emit_event failed for %s", event)

    def step(self, state: OtaState, **changes: Any) -> None:
        """Persist the new state of the work in flight (a legal move, see Journal.step), then report it."""
        with self.lock:
            self.persist(self.journal.step(state, **changes))
            p = self.journal.pending
        assert p is not None
        self.emit(p.rollout_id, p.version, state, rollback=True if p.kind == "rollback" else None)

    def finish(self, state: OtaState, reason: str | None, rollback: bool = False,
               details: dict[str, Any] | None = None, best_effort: bool = False) -> None:
        """End the work in flight with ``state`` and report it."""
        with self.lock:
            p = self.journal.pending
            assert p is not None
            self.persist(self.journal.finished(Outcome(p.rollout_id, p.version, state, reason,
                                                       rollback=rollback or p.kind == "rollback")),
                         best_effort=best_effort)
            self.cancel = None
            self.report_outcome(details=details)

    def report_rejection(self, rollout_id: str, version: str, reason: str) -> None:
        self.persist(self.journal.finished(Outcome(rollout_id, version, OtaState.REJECTED, reason)),
                     best_effort=True)
        self.report_outcome()

    def report_outcome(self, details: dict[str, Any] | None = None) -> None:
        """Emit the last outcome once (again after a crash that came before it was handed over)."""
        with self.lock:
            o = self.journal.outcome
            if o is None or o.reported:
                return
            self.emit(o.rollout_id, o.version, o.state, reason=o.reason,
                      rollback=True if o.rollback else None, probation=details)
            self.persist(replace(self.journal, outcome=replace(o, reported=True)), best_effort=True)
            if o.state in _SERVING_CHANGED and self.on_serving_changed is not None:
                try:
                    self.on_serving_changed()
                except Exception:
                    log.exception("on_serving_changed failed after %s %s", o.rollout_id, o.state.value)
