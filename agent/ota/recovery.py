"""What boot does with an interrupted update: a pure function of the journal (docs/ota.md).

:func:`plan_boot` decides; :meth:`agent.ota.manager.OtaManager.boot` only carries the plan out.
The rules, and why:

- an update still before ``installing`` (queued, downloading, verifying, validating) is
  **resumed** from its staged command; every check runs again. When the command is lost it is
  finished as ``rejected``: there is nothing left to resume from;
- an update ``installing`` or in ``probation`` is **rolled back** (the committed slot serves): the
  new model may be what killed the agent, and retrying it in a loop is worse than reporting;
- a rollback command is **finished**: the operator asked for it, and its target is a kept slot;
- but work that ``max_boots`` boots in a row found in the same state is **given up** (Mender's
  rule): it crashed the agent each time, and resuming it again would loop for ever.

:func:`serving_order` decides which committed slot to serve (the active one, then the kept ones);
:func:`journal_from_slots` rebuilds a journal from verified slots when the journal is unreadable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from agent.ota.commands import UpdateRequest
from agent.ota.slots import Journal, highest_version
from edgefleet.manifest import parse_version
from edgefleet.messages import OtaState

__all__ = ["MAX_BOOTS", "RESUMABLE", "BootAction", "BootPlan", "journal_from_slots", "plan_boot",
           "serving_order"]

RESUMABLE = frozenset({OtaState.QUEUED, OtaState.DOWNLOADING, OtaState.VERIFYING, OtaState.VALIDATING})
"""States an interrupted update is resumed from: the new model has not served yet."""
MAX_BOOTS = 3
"""Boots in a row that may find the same work in the same state before it is given up."""


class BootAction(str, Enum):
    NOTHING = "nothing"                  # nothing was in flight
    RESUME_UPDATE = "resume_update"      # run the update again from its staged command
    REJECT = "reject"                    # finish the update as rejected (command lost, or crash loop)
    ROLL_BACK = "roll_back"              # finish the update as rolled_back; the committed slot serves
    FINISH_ROLLBACK = "finish_rollback"  # run the rollback command to its end
    GIVE_UP_ROLLBACK = "give_up_rollback"  # finish the rollback command as failed (crash loop)


_OUTCOME = {BootAction.REJECT: OtaState.REJECTED, BootAction.ROLL_BACK: OtaState.ROLLED_BACK,
            BootAction.GIVE_UP_ROLLBACK: OtaState.FAILED}


@dataclass(frozen=True)
class BootPlan:
    action: BootAction
    reason: str | None = None              # the outcome's reason for REJECT / ROLL_BACK / GIVE_UP_ROLLBACK
    request: UpdateRequest | None = None   # what RESUME_UPDATE runs
    keep_slots: frozenset[str] = frozenset()    # slot directories to keep; the rest are crash leftovers
    keep_staging: frozenset[str] = frozenset()  # staging directories to keep (the work that goes on)
    journal: Journal | None = None         # to persist before acting (this boot counted), if changed

    @property
    def outcome(self) -> OtaState | None:
        """The terminal state the interrupted work is finished with at boot, if any."""
        return _OUTCOME.get(self.action)


def plan_boot(journal: Journal, command: UpdateRequest | None, max_boots: int = MAX_BOOTS) -> BootPlan:
    """Decide about the work in flight when the agent starts.

    ``command`` is the update kept in the pending rollout's staging directory (None when it is
    missing or unreadable); it is only used when the update is resumed.
    """
    p = journal.pending
    if p is None:
        return BootPlan(BootAction.NOTHING, keep_slots=journal.kept)
    goes_on = frozenset({p.rollout_id})
    rollback = p.kind == "rollback"
    if not rollback and p.state not in RESUMABLE:
        committed = journal.versions.get(journal.active or "", "?")
        return BootPlan(BootAction.ROLL_BACK, f"agent restarted during {p.state.value}; kept the committed "
                        f"version {committed}", keep_slots=journal.kept)
    if not rollback and command is None:
        return BootPlan(BootAction.REJECT, "agent restarted and the update command was lost",
                        keep_slots=journal.kept)
    boots = p.boots + 1 if p.boot_state is p.state else 1
    if boots >= max_boots:
        reason = f"crashed the agent {boots} times in {p.state.value}; not resuming it again"
        return BootPlan(BootAction.GIVE_UP_ROLLBACK if rollback else BootAction.REJECT, reason,
                        keep_slots=journal.kept)
    counted = journal.with_pending(replace(p, boots=boots, boot_state=p.state))
    if rollback:
        target = frozenset({p.slot} if p.slot else ())
        return BootPlan(BootAction.FINISH_ROLLBACK, keep_slots=journal.kept | target, keep_staging=goes_on,
                        journal=counted)
    return BootPlan(BootAction.RESUME_UPDATE, request=command, keep_slots=journal.kept, keep_staging=goes_on,
                    journal=counted)


def serving_order(journal: Journal) -> tuple[str, ...]:
    """Committed slots to try serving at boot, best first: the active one, then the kept history."""
    return tuple(s for s in (journal.active, *journal.history) if s)


def journal_from_slots(verified: dict[str, str], keep: int) -> Journal:
    """A journal for the slots that still verify (slot -> version), when the journal itself is lost.

    The highest version serves and is the floor (the safe guess: an operator rollback recorded
    only in the lost journal is forgotten, a downgrade is not allowed).
    """
    order = sorted(verified, key=lambda s: parse_version(verified[s]), reverse=True)[:max(keep, 1)]
    return Journal(active=order[0] if order else None, history=tuple(order[1:]),
                   versions={s: verified[s] for s in order}, floor=highest_version(*verified.values()))
