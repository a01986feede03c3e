"""The rollback command's I/O: authorise a target below the floor, then serve the kept slot.

Which slot is meant and whether a statement is needed is decided in :mod:`agent.ota.commands`
and :mod:`agent.ota.verify`; this burns the statement's nonce (so it works once) and activates
the slot. The anti-downgrade floor itself never goes down.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.ota.boot import slot_label, slot_manifest
from agent.ota.commands import RollbackRequest, refuse_busy, rollback_target
from agent.ota.crashpoints import crash_point
from agent.ota.slots import Outcome, Pending
from agent.ota.verify import check_rollback
from edgefleet.errors import EdgefleetError, StorageError
from edgefleet.messages import OtaState

if TYPE_CHECKING:
    from agent.ota.manager import OtaManager

__all__ = ["authorize_rollback", "queue_rollback", "run_rollback"]


def authorize_rollback(ota: OtaManager, req: RollbackRequest, version: str) -> None:
    """Below the floor: verify the rollback statement and burn its nonce (it works once).

    Raises:
        SignatureError / ArtifactError: below the floor without a valid, unused statement.
        StorageError: the spent nonce cannot be recorded.
    """
    facts = ota._facts()
    statement = check_rollback(req, version, facts)
    if statement is not None:
        try:
            ota._nonces().consume(statement, facts.now)
        except OSError as exc:
            raise StorageError(f"cannot record the statement's nonce: {exc.strerror or exc}") from exc


def queue_rollback(ota: OtaManager, req: RollbackRequest) -> str:
    """Admit the command and persist it as ``installing``; returns the target version.

    Raises:
        ConfigError: busy, or that version is not kept on this device.
        SignatureError / ArtifactError / StorageError: as for :func:`authorize_rollback`.
    """
    ledger = ota._ledger
    with ledger.lock:
        j = ledger.journal
        refuse_busy(j)
        try:
            target, version = rollback_target(j, req)
            authorize_rollback(ota, req, version)
        except EdgefleetError as exc:
            ledger.emit(req.rollout_id, req.to or "", OtaState.FAILED, reason=str(exc), rollback=True)
            raise
        ledger.persist(j.with_pending(Pending("rollback", req.rollout_id, version, OtaState.INSTALLING,
                                              slot=target, from_slot=j.active)))
        ledger.emit(req.rollout_id, version, OtaState.INSTALLING, rollback=True)
    return version


def run_rollback(ota: OtaManager) -> None:
    """The rollback job: serve the kept slot, then commit it (finished again at boot if cut short)."""
    ledger = ota._ledger
    with ledger.lock:
        p = ledger.journal.pending
    if p is None or p.kind != "rollback" or p.slot is None:
        return
    slot = p.slot
    try:
        manifest = slot_manifest(ota.store, slot)
        ota.host.activate(ota.store.model_path(slot), manifest, name=slot_label(slot))
    except (EdgefleetError, OSError) as exc:
        ledger.finish(OtaState.FAILED, f"cannot activate version {p.version}: {exc}", rollback=True)
        return
    crash_point("operator-rollback")
    outcome = Outcome(p.rollout_id, p.version, OtaState.COMMITTED, rollback=True)
    with ledger.lock:
        # Best effort: the target serves now; if the disk refuses the write, the rollback
        # still in the journal on disk is finished again at the next boot.
        ledger.persist(ledger.journal.committed(slot, p.version, ota.keep_versions, outcome), best_effort=True)
    ledger.report_outcome()
