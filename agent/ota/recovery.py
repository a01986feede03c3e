"""What boot does with an interrupted update: a pure function of the journal (docs/ota.md).

:func:`plan_boot` decides; :meth:`agent.ota.manager.OtaManager.boot` only carries the plan out.
The rules, and why:

- an update still before ``installing`` (queued, downloading, verifying, validating) is
  **resumed** from its staged command; every check runs again. When the command is lost it is
  finished as ``rejected``: there is nothing left to resume from;
- an update ``installing`` or in ``probation`` is **rolled back** (the committed slot serves): the
  new model may be what killed the agent, and retrying it in a loop is worse than reporting;
- a rollback command is **finished**: the operator asked for it, and its target is a kept slot.

:func:`serving_order` and :func:`with_served` decide which committed slot to serve when the
active one is damaged (the most recent kept one that loads).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from agent.ota.commands import UpdateRequest
from agent.ota.slots import Journal
from edgefleet.messages import OtaState

__all__ = ["RESUMABLE", "BootAction", "BootPlan", "plan_boot", "serving_order", "with_served"]

RESUMABLE = frozenset({OtaState.QUEUED, OtaState.DOWNLOADING, OtaState.VERIFYING, OtaState.VALIDATING})
"""States an interrupted update is resumed from: the new model has not served yet."""


class BootAction(str, Enum):
    NOTHING = "nothing"                  # nothing was in flight
    RESUME_UPDATE = "resume_update"      # run the update again from its staged command
    REJECT = "reject"                    # finish the update as rejected (its command is lost)
    ROLL_BACK = "roll_back"              # finish the update as rolled_back; the committed slot serves
    FINISH_ROLLBACK = "finish_rollback"  # run the rollback command to its end


_OUTCOME = {BootAction.REJECT: OtaState.REJECTED, BootAction.ROLL_BACK: OtaState.ROLLED_BACK}


@dataclass(frozen=True)
class BootPlan:
    action: BootAction
    reason: str | None = None              # the outcome's reason for REJECT / ROLL_BACK
    request: UpdateRequest | None = None   # what RESUME_UPDATE runs
    keep_slots: frozenset[str] = frozenset()    # slot directories to keep; the rest are crash leftovers
    keep_staging: frozenset[str] = frozenset()  # staging directories to keep (the work that goes on)

    @property
    def outcome(self) -> OtaState | None:
        """The terminal state the interrupted work is finished with at boot, if any."""
        return _OUTCOME.get(self.action)


def plan_boot(journal: Journal, command: UpdateRequest | None) -> BootPlan:
    """Decide about the work in flight when the agent starts.

    ``command`` is the update kept in the pending rollout's staging directory (None when it is
    missing or unreadable); it is only used when the update is resumed.
    """
    p = journal.pending
    if p is None:
        return BootPlan(BootAction.NOTHING, keep_slots=journal.kept)
    goes_on = frozenset({p.rollout_id})
    if p.kind == "rollback":
        target = frozenset({p.slot} if p.slot else ())
        return BootPlan(BootAction.FINISH_ROLLBACK, keep_slots=journal.kept | target, keep_staging=goes_on)
    if p.state in RESUMABLE:
        if command is None:
            return BootPlan(BootAction.REJECT, "agent restarted and the update command was lost",
                            keep_slots=journal.kept)
        return BootPlan(BootAction.RESUME_UPDATE, request=command, keep_slots=journal.kept,
                        keep_staging=goes_on)
    committed = journal.versions.get(journal.active or "", "?")
    return BootPlan(BootAction.ROLL_BACK, f"agent restarted during {p.state.value}; kept the committed "
                    f"version {committed}", keep_slots=journal.kept)


def serving_order(journal: Journal) -> tuple[str, ...]:
    """Committed slots to try serving at boot, best first: the active one, then the kept history."""
    return tuple(s for s in (journal.active, *journal.history) if s)


def with_served(journal: Journal, slot: str) -> Journal:
    """The journal once ``slot`` (a kept one) serves instead of a damaged active slot."""
    if slot == journal.active:
        return journal
    return replace(journal, active=slot, history=tuple(s for s in journal.history if s != slot))
