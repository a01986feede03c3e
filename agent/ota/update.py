"""The update worker's steps: fetch, verify, validate, install, probation, commit or roll back.

Runs on the OTA worker thread (:mod:`agent.ota.worker`). Each step is persisted before it takes
effect (:class:`~agent.ota.ledger.Ledger`); the checks are the pure ones in
:mod:`agent.ota.verify` and :mod:`agent.ota.probation`, run again on resume because a resumed
update may run much later than it was queued.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.ota.commands import UpdateRequest, resolve_manifest
from agent.ota.crashpoints import crash_point
from agent.ota.download import DownloadPolicy, DownloadResult, download
from agent.ota.probation import run_probation
from agent.ota.slots import Outcome, slot_name
from agent.ota.verify import check_contract, check_report, contract_of
from edgefleet.errors import (
    ArtifactError,
    ConfigError,
    EdgefleetError,
    ModelError,
    StorageError,
    TransportError,
)
from edgefleet.manifest import MAX_MANIFEST_BYTES, check_model_file
from edgefleet.messages import OtaState

if TYPE_CHECKING:
    from agent.ota.manager import OtaManager

__all__ = ["FETCHED_MANIFEST", "Canceled", "abandon", "check_cancel", "run_update"]

log = logging.getLogger(__name__)

FETCHED_MANIFEST = "manifest.fetched.json"
"""A schema-2 update's manifest in its staging directory, as fetched (checked again on resume)."""


class Canceled(Exception):
    """A ``cancel`` command stopped the update in flight (it ends ``failed``)."""


def run_update(ota: OtaManager, req: UpdateRequest) -> None:
    """The update job: faults that are nobody's artifact (full disk, cancel) end it ``failed``."""
    ota._wake.clear()
    try:
        _update(ota, req)
    except Canceled:
        abandon(ota, OtaState.FAILED, "canceled by command")
    except StorageError as exc:
        abandon(ota, OtaState.FAILED, str(exc))


def _update(ota: OtaManager, req: UpdateRequest) -> None:
    ledger = ota._ledger
    staging = ota.store.staging_dir(req.rollout_id)
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create the staging directory: {exc.strerror or exc}") from exc
    try:
        req, staged = _fetch_and_check(ota, req, staging)
    except (ArtifactError, TransportError, ConfigError, ModelError) as exc:
        ota.store.prune(ledger.journal.kept)  # tidy before the outcome is reported: it says we are done
        ledger.finish(OtaState.REJECTED, str(exc))
        return
    m = req.verified
    slot = slot_name(m.name, m.version, m.model.sha256)
    ledger.step(OtaState.INSTALLING, slot=slot)
    ota.store.install(slot, staged, req.raw, req.signature, crash=crash_point, move=True)
    crash_point("slot-written")
    try:
        ota.host.activate(ota.store.model_path(slot), m, keep_previous=True)
    except EdgefleetError as exc:
        ota.store.prune(ledger.journal.kept)
        ledger.finish(OtaState.FAILED, f"cannot activate: {exc}")
        return
    ota._trial = slot
    crash_point("activated")
    ledger.step(OtaState.PROBATION)
    _probation(ota, req, slot)


def _fetch_and_check(ota: OtaManager, req: UpdateRequest, staging: Path) -> tuple[UpdateRequest, Path]:
    """Downloading, verifying and validating: the staged model, checked, before it may be installed.

    Raises:
        ArtifactError / TransportError / ConfigError / ModelError: the update is to be rejected.
    """
    # A resumed update restarts at downloading from wherever it was (a move the table allows).
    ota._ledger.step(OtaState.DOWNLOADING)
    if req.ref is not None:
        req = _fetch_manifest(ota, req, staging / FETCHED_MANIFEST)
        ota._check_manifest(req)  # before a byte of the model
    m = req.verified
    staged = staging / m.model.file
    result = _download(ota, req.rollout_id, req.url, staged, m.model.size)
    crash_point("downloaded")
    ota._ledger.step(OtaState.VERIFYING)
    ota._check_manifest(req)  # again: a resume may run much later
    try:
        check_model_file(staged, m.model, f"downloaded {m.model.file}")
    except ArtifactError:
        if not result.resumed_from:
            raise
        staged.unlink(missing_ok=True)  # the resumed part may be stale: one clean retry
        _download(ota, req.rollout_id, req.url, staged, m.model.size)
        check_model_file(staged, m.model, f"downloaded {m.model.file}")
    crash_point("verified")
    check_cancel(ota, req.rollout_id)
    ota._ledger.step(OtaState.VALIDATING)
    check_contract(m, _active_contract(ota))
    from agent.validation import validate_model

    report = validate_model(staged, profile=ota.profile, manifest=m, timeout_s=ota.validate_timeout_s)
    check_report(report)
    crash_point("validated")
    check_cancel(ota, req.rollout_id)
    return req, staged


def _probation(ota: OtaManager, req: UpdateRequest, slot: str) -> None:
    """Watch the new model serve, then commit it or swap the previous one back in."""
    ledger, host, m = ota._ledger, ota.host, req.verified
    verdict, counters = run_probation(host, m, ota.profile, ota.golden_traffic, ota._worker.check_stop)
    details = asdict(counters)
    if verdict.decision == "commit":
        crash_point("commit-before-journal")
        outcome = Outcome(req.rollout_id, m.version, OtaState.COMMITTED, verdict.reason)
        with ledger.lock:
            ledger.persist(ledger.journal.committed(slot, m.version, ota.keep_versions, outcome))
            ota._trial = None
        crash_point("commit-after-journal")
        host.release_previous()
        ota.store.prune(ledger.journal.kept)  # staging and older slots go before the outcome is reported
        ledger.report_outcome(details=details)
        return
    if host.previous_info is None:  # nothing committed before: nothing to return to
        ota._trial = None
        ota.store.prune(ledger.journal.kept)
        ledger.finish(OtaState.FAILED, "probation failed and there is no previous model to return "
                      f"to: {verdict.reason}", details=details)
        return
    t0 = time.perf_counter()
    host.revert()
    ota._trial = None
    ota.last_revert_s = time.perf_counter() - t0
    crash_point("rollback-reverted")
    ota.store.prune(ledger.journal.kept)
    ledger.finish(OtaState.ROLLED_BACK, verdict.reason, details=details)


def _fetch_manifest(ota: OtaManager, req: UpdateRequest, dest: Path) -> UpdateRequest:
    """A schema-2 update's manifest: fetched like the model (bounded by its announced size), then verified.

    Raises:
        TransportError / StorageError: as for the model's download.
        ArtifactError / SignatureError: not the announced bytes, not strict JSON, not signed.
    """
    ref = req.ref
    assert ref is not None
    dest.with_name(dest.name + ".part").unlink(missing_ok=True)  # small: fetched whole, never resumed
    _download(ota, req.rollout_id, ref.url, dest, ref.size, replace(ota.policy, max_bytes=MAX_MANIFEST_BYTES),
              what="manifest")
    try:
        data = dest.read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read the fetched manifest: {exc.strerror or exc}") from exc
    try:
        return resolve_manifest(req, data, ota.trusted_keys)
    except ArtifactError:
        dest.unlink(missing_ok=True)  # a resume fetches it again rather than trusting it
        raise


def _download(ota: OtaManager, rollout_id: str, url: str, dest: Path, size: int,
              policy: DownloadPolicy | None = None, what: str = "artifact") -> DownloadResult:
    """Download, stopping at the next chunk or retry wait once close() or a cancel asked."""
    first = [True]

    def on_chunk(total: int) -> None:
        if first[0]:
            first[0] = False
            crash_point("download-partial")
        ota._worker.check_stop()
        check_cancel(ota, rollout_id)

    def pause(seconds: float) -> None:
        ota._wake.wait(seconds)
        ota._worker.check_stop()
        check_cancel(ota, rollout_id)

    return download(url, dest, size, policy or ota.policy, on_chunk=on_chunk, sleep=pause, what=what)


def check_cancel(ota: OtaManager, rollout_id: str) -> None:
    """Raises Canceled once a cancel command named this update."""
    if ota._ledger.cancel == rollout_id:
        raise Canceled()


def _active_contract(ota: OtaManager) -> Any:
    """What the new model must stay compatible with: the served manifest, else the engine's tensors."""
    if ota.host.manifest is not None:
        return ota.host.manifest
    engine = ota.host.engine
    if engine is None:
        return None
    return contract_of(engine.input_details), contract_of(engine.output_details)


def abandon(ota: OtaManager, state: OtaState, reason: str) -> None:
    """End the work in flight after a fault in the device itself; never raises: the worker lives on.

    The model on probation (if any) is swapped back out first; staging and half-built slots are
    deleted *before* the journal write, which frees what a full disk needs for that write.
    """
    ledger = ota._ledger
    with ledger.lock:
        if ledger.journal.pending is None:
            return
        if ota._trial is not None and ota.host.previous_info is not None:
            ota.host.revert()
        ota._trial = None
        try:
            ota.store.prune(ledger.journal.kept)
        except OSError as exc:
            log.error("cannot clean the staging area: %s", exc)
        ledger.finish(state, reason, best_effort=True)
