"""OtaManager: the device side of an update, as a list of persisted steps.

::

    queued -> downloading -> verifying -> validating -> installing -> probation -> committed
       any failure before the new model serves ............................... -> rejected
       the new model cannot be activated ..................................... -> failed
       probation misses a threshold (or the agent restarted during it) ....... -> rolled_back
    rollback command: installing (kept slot) -> committed (event has "rollback": true)

Every transition is written to the journal (:mod:`agent.ota.slots`) before it takes effect and is
then reported through ``emit_event``. The checks are pure functions in :mod:`agent.ota.verify`
and :mod:`agent.ota.probation`; this module only does the I/O around them, on one worker thread,
so live inference never waits on the network or the disk.

The jobs around it live beside it: commands are parsed and admitted in :mod:`agent.ota.commands`,
what boot does with interrupted work is decided in :mod:`agent.ota.recovery` (this module only
carries the plan out), and probation runs in :mod:`agent.ota.probation`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from agent.ota.commands import (
    RollbackRequest,
    UpdateRequest,
    admit_update,
    claimed_ids,
    load_command,
    parse_rollback,
    parse_update,
    refuse_busy,
    resolve_manifest,
    rollback_target,
    save_command,
)
from agent.ota.crashpoints import crash_point
from agent.ota.download import DownloadPolicy, DownloadResult, download
from agent.ota.hang import HANG_LIMIT_DEADLINES, HangGuard, hung_reason
from agent.ota.probation import run_probation
from agent.ota.recovery import MAX_BOOTS, RESUMABLE, BootAction, journal_from_slots, plan_boot, serving_order
from agent.ota.slots import Journal, Outcome, Pending, SlotStore, slot_name
from agent.ota.verify import (
    DeviceFacts,
    check_contract,
    check_manifest,
    check_report,
    check_rollback,
    contract_of,
)
from agent.ota.worker import Worker
from edgefleet.errors import (
    ArtifactError,
    ConfigError,
    EdgefleetError,
    ModelError,
    StorageError,
    TransportError,
)
from edgefleet.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    Manifest,
    check_model_file,
    load_manifest,
    parse_manifest,
    sha256_file,
)
from edgefleet.messages import OtaState
from edgefleet.profiles import Profile, load_profile
from edgefleet.signing import verify_manifest
from edgefleet.statements import NonceLedger

__all__ = ["OtaManager"]

log = logging.getLogger(__name__)

_SERVING_CHANGED = frozenset({OtaState.COMMITTED, OtaState.ROLLED_BACK})
NONCES_NAME = "statements.json"
"""Burnt nonces of accepted rollback statements, beside the journal."""
_SLOT_READ_TRIES = (0.05, 0.2, 0.5)  # waits before re-reading a slot that failed to load at boot, s
FETCHED_MANIFEST = "manifest.fetched.json"
"""A schema-2 update's manifest in its staging directory, as fetched (checked again on resume)."""


class Canceled(Exception):
    """A ``cancel`` command stopped the update in flight (it ends ``failed``)."""


def _slot_label(slot: str) -> str:
    """The model name part of ``<name>-v<version>-<sha12>`` (for bare models without a manifest)."""
    return slot.rsplit("-", 2)[0]


def _resolve_profile(name: str) -> Profile | None:
    try:
        return load_profile(name)
    except ConfigError:
        return None


class OtaManager:
    """Take ``update`` and ``rollback`` commands and apply them crash-safely to a ModelHost.

    Args:
        state_dir: where slots, staging and the journal live (one per agent).
        profile: this device's profile (limits, probation thresholds, latency budget).
        trusted_keys: Ed25519 public keys; when non-empty every update must be signed by one.
        host: the ModelHost that serves inferences.
        emit_event: called with ``{"event": "ota", "rollout_id", "version", "state", ...}`` after each
            persisted transition (the service adds seq/ts and publishes it). Must not block long.
        keep_versions: committed versions kept on disk (>= 2: current and previous).
        reserve_free_mb: free disk space that must remain after a download, MB.
        download_timeout_s, download_retries, backoff_s: see :class:`~agent.ota.download.DownloadPolicy`
            (``download_retries`` None: the policy's cap; the retry *time* budget is what bounds it).
        download_policy: the whole download policy instead (its ``max_bytes`` is capped by the profile).
        validate_timeout_s: limit for the child-process validation, s.
        golden_traffic: golden samples run through the live path at the start of probation.
        on_serving_changed: called once a ``committed`` or ``rolled_back`` outcome of an update or
            rollback has been reported, i.e. the served model changed (also when boot re-reports
            one). Exceptions are logged, never raised; like ``emit_event`` it must be quick.
        device_id, group, fleet: who this device is: manifests naming another fleet or group are
            refused, and a rollback statement must name this device or its group.
        max_boots: boots in a row that may find the same work in the same state before it is
            given up as a crash loop.
        clock: epoch seconds (manifest expiry, statement expiry); tests pass a fake one.
        hang_limit_deadlines: a call stuck this many deadlines in a model an update committed
            means it hangs: the journal gives it up for the previous kept model (:mod:`agent.ota.hang`).
        on_hung: called with the reason once that is recorded; the service exits so systemd
            restarts it onto the previous model. Without it the record takes effect at the next start.
    """

    def __init__(self, state_dir: Path, profile: Profile, trusted_keys: list[Any], host: Any,
                 emit_event: Callable[[dict[str, Any]], None], *, keep_versions: int = 3,
                 reserve_free_mb: float = 16.0, download_timeout_s: float = 10.0,
                 download_retries: int | None = None, backoff_s: float = 0.5, validate_timeout_s: float = 60.0,
                 golden_traffic: int = 8, on_serving_changed: Callable[[], None] | None = None,
                 download_policy: DownloadPolicy | None = None, device_id: str = "device",
                 group: str = "default", fleet: str | None = None, max_boots: int = MAX_BOOTS,
                 clock: Callable[[], float] = time.time,
                 nonces: Callable[[], NonceLedger] | None = None,
                 hang_limit_deadlines: float = HANG_LIMIT_DEADLINES,
                 on_hung: Callable[[str], None] | None = None) -> None:
        if keep_versions < 2:
            raise ConfigError(f"keep_versions must be >= 2 (current and previous), got {keep_versions}")
        self.profile = profile
        # The device's one ledger of spent statement nonces (the service shares it with the config
        # command); standalone, one beside the journal. Raises ArtifactError when it is damaged.
        self._nonces = nonces or (lambda: NonceLedger(self.store.root / NONCES_NAME))
        self.trusted_keys = tuple(trusted_keys)
        self.host = host
        self.emit_event = emit_event
        self.on_serving_changed = on_serving_changed
        self.keep_versions = keep_versions
        self.validate_timeout_s = validate_timeout_s
        self.golden_traffic = golden_traffic
        self.device_id, self.group, self.fleet = device_id, group, fleet
        self.max_boots = max_boots
        self._clock = clock
        max_bytes = int(profile.limits.max_download_mb * 1024 * 1024)
        if download_policy is None:
            download_policy = DownloadPolicy(max_bytes=max_bytes, timeout_s=download_timeout_s, backoff_s=backoff_s,
                                             reserve_bytes=int(reserve_free_mb * 1024 * 1024))
            if download_retries is not None:
                download_policy = replace(download_policy, retries=download_retries)
        self.policy = replace(download_policy, max_bytes=min(download_policy.max_bytes, max_bytes))
        self.store = SlotStore(Path(state_dir))
        self._lock = threading.RLock()  # guards the journal (command threads vs the worker)
        self._journal = Journal()
        self._idle = threading.Condition(self._lock)
        self._worker = Worker(self._idle, self._job_failed)
        self._cancel: str | None = None  # rollout id a cancel command asked to stop
        self._wake = threading.Event()   # ends a retry wait early (cancel, close)
        self._trial: str | None = None   # slot serving on probation, not committed yet
        self.timeline: list[tuple[float, str, str]] = []  # (monotonic s, version, state), for benchmarks
        self.last_revert_s: float | None = None
        self.boot_error: str | None = None
        if not hang_limit_deadlines > 0:
            raise ConfigError(f"hang_limit_deadlines must be > 0, got {hang_limit_deadlines}")
        self.hang_limit_deadlines = hang_limit_deadlines
        self.on_hung = on_hung
        self.hung: str | None = None  # set once this process gave up a hung model
        self._guard = HangGuard(lambda: self.host.engine, self._on_stuck)

    # ================================================================== public API
    def boot(self) -> dict[str, str] | None:
        """Read the journal, finish or undo what was in flight, serve the committed model.

        Returns the served model's info, or None when nothing is installed yet or no kept slot can
        be loaded (then ``status()["boot_error"]`` says why, and the agent stays reachable so the
        fleet can send a fix instead of the device crash-looping). A damaged journal is set aside
        and rebuilt from the slots that still verify (reported as ``boot_error`` and a
        ``model_error`` event), never silently replaced by an empty one.
        """
        with self._lock:
            try:
                self._journal = self.store.read_journal()
            except ConfigError as exc:
                self._journal = self._rebuild_journal(str(exc))
            p = self._journal.pending
            command = (load_command(self.store, p.rollout_id, self.trusted_keys)
                       if p is not None and p.kind == "update" else None)
            plan = plan_boot(self._journal, command, self.max_boots)
            if plan.journal is not None:
                self._persist(plan.journal, best_effort=True)  # count this boot before resuming
                crash_point("boot-counted")
            if plan.outcome is not None:
                self._finish(plan.outcome, plan.reason, best_effort=True)
            self.store.prune(plan.keep_slots, plan.keep_staging)
            info = self._activate_committed()
            o = self._journal.outcome
            if o is not None and o.hung and not o.reported:
                self._boot_problem(f"the last run gave up a hung model: {o.reason}")
            self._report_outcome()
        self._worker.start()
        self._guard.start()
        req = plan.request
        if plan.action is BootAction.RESUME_UPDATE and req is not None:
            self._worker.put(lambda: self._run_update(req))
        elif plan.action is BootAction.FINISH_ROLLBACK:
            self._worker.put(self._run_rollback)
        return info

    def install_initial(self, path: Path | str) -> dict[str, str] | None:
        """Install ``path`` (artifact dir or bare .tflite) as the committed model, without probation.

        A model from agent.yaml is the operator's own configuration: its hash is checked against its
        manifest, and its signature when there is one. Does nothing (returns None) if a committed
        model already exists.

        Raises:
            ArtifactError / ModelError: the file is missing, does not match its manifest or cannot load.
            StorageError: the disk is full or failed.
        """
        path = Path(path)
        with self._lock:
            self._journal = self.store.read_journal() if self._journal.active is None else self._journal
            if self._journal.active is not None:
                return None
            if path.is_dir():
                manifest, raw, sig = load_manifest(path)
                if sig is not None:
                    check_manifest(UpdateRequest("initial", manifest, raw, sig, path.as_uri()),
                                   replace(self._facts(), floor=None), _resolve_profile)
                model = path / manifest.model.file
                if not model.is_file():
                    raise ArtifactError(f"{path}: manifest names {manifest.model.file}, which is missing")
                check_model_file(model, manifest.model, manifest.model.file)
                name, version, sha = manifest.name, manifest.version, manifest.model.sha256
            elif path.is_file():
                manifest, raw, sig, model = None, None, None, path
                name, version, sha = (path.stem or "model"), "0", sha256_file(path)
            else:
                raise ArtifactError(f"{path}: no such model file or artifact directory")
            safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in name)[:64] or "model"
            slot = slot_name(safe, version, sha)
            self.store.install(slot, model, raw, sig)
            info = self.host.activate(self.store.model_path(slot), manifest, name=safe)
            # Not a move of the work in flight: a resumed update (if any) stays where it is.
            outcome = Outcome("initial", version, OtaState.COMMITTED, reported=True)
            committed = self._journal.with_pending(None).committed(slot, version, self.keep_versions, outcome)
            self._persist(committed.with_pending(self._journal.pending))
        self._worker.start()
        self._guard.start()
        return info

    def handle_update(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Check an ``update`` command quickly, persist it as queued and hand it to the worker.

        Returns ``{"accepted": True, "state": "queued", ...}`` for the command reply.

        Raises:
            ConfigError: malformed command, or another update/rollback is in flight.
            ArtifactError / SignatureError: refused before any download (bad signature, not plain
                JSON, expired or meant for another fleet/group, not above the anti-downgrade
                floor, wrong device, oversize); a ``rejected`` event is sent too when the command
                could be parsed.
            StorageError: the command cannot be kept (full disk).
        """
        try:
            req = parse_update(cmd, self.trusted_keys)
        except ArtifactError as exc:  # unsigned, forged or not plain JSON: say so, touch nothing
            ids = claimed_ids(cmd)
            if ids is not None:
                self._emit(*ids, OtaState.REJECTED, reason=str(exc))
            raise
        with self._lock:
            duplicate = admit_update(self._journal, req)
            if duplicate is not None:
                return duplicate
            try:
                if req.manifest is not None:  # a manifest by URL is checked once the worker fetched it
                    check_manifest(req, self._facts(), _resolve_profile)
            except ArtifactError as exc:
                self._report_rejection(req.rollout_id, req.version, str(exc))
                raise
            try:
                save_command(self.store, req)
                j = self._journal
                self._persist(j.with_pending(Pending("update", req.rollout_id, req.version, OtaState.QUEUED,
                                                     from_slot=j.active)))
            except StorageError:
                self.store.prune(self._journal.kept)  # nothing of it may linger on a full disk
                raise
            self._cancel = None
            self._emit(req.rollout_id, req.version, OtaState.QUEUED)
            crash_point("queued")
        self._worker.start()
        self._worker.put(lambda: self._run_update(req))
        return {"accepted": True, "state": OtaState.QUEUED.value, "rollout_id": req.rollout_id,
                "version": req.version}

    def handle_rollback(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Roll back to the previous kept version, or to ``cmd["to"]`` if it is still kept.

        Below the anti-downgrade floor the command must carry a signed rollback statement
        (``statement``, ``statement_signature``) for this device or its group and that version;
        its nonce is burnt, so it works once. The floor itself never goes down.

        Raises:
            ConfigError: malformed, busy, or that version is not kept on this device.
            SignatureError / ArtifactError: below the floor without a valid, unused statement.
        """
        req = parse_rollback(cmd)
        with self._lock:
            j = self._journal
            refuse_busy(j)
            try:
                target, version = rollback_target(j, req)
                self._authorize_rollback(req, version)
            except EdgefleetError as exc:
                self._emit(req.rollout_id, req.to or "", OtaState.FAILED, reason=str(exc), rollback=True)
                raise
            self._persist(j.with_pending(Pending("rollback", req.rollout_id, version, OtaState.INSTALLING,
                                                 slot=target, from_slot=j.active)))
            self._emit(req.rollout_id, version, OtaState.INSTALLING, rollback=True)
        self._worker.start()
        self._worker.put(self._run_rollback)
        return {"accepted": True, "state": OtaState.INSTALLING.value, "rollout_id": req.rollout_id,
                "version": version}

    def handle_cancel(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Stop the update in flight before it is installed; it ends ``failed`` ("canceled by command").

        ``cmd["rollout_id"]`` (optional) names the update meant. The download stops at its next
        chunk or retry wait, validation at its end; an update already installing or in probation
        cannot be canceled (send a rollback once it ends).

        Raises:
            ConfigError: nothing (or another rollout) is in flight, or it is too late to cancel.
        """
        rid = cmd.get("rollout_id") if isinstance(cmd, dict) else None
        with self._lock:
            p = self._journal.pending
            if p is None or (rid is not None and rid != p.rollout_id):
                raise ConfigError(f"nothing to cancel: {rid or 'no update'} is not in flight")
            if p.kind != "update" or p.state not in RESUMABLE:
                raise ConfigError(f"too late to cancel: {p.kind} {p.rollout_id} is {p.state.value}; "
                                  "send a rollback once it ends")
            self._cancel = p.rollout_id
            self._wake.set()
        return {"accepted": True, "state": p.state.value, "rollout_id": p.rollout_id, "canceling": True}

    def status(self) -> dict[str, Any]:
        """Active version, kept versions, the anti-downgrade floor, what is in flight and the last outcome."""
        with self._lock:
            j = self._journal
            records = j.to_json()  # pending and outcome with their states as plain strings
            return {
                "active": {"slot": j.active, "version": self._version(j.active)} if j.active else None,
                "serving": self.host.model_info,
                "kept": [{"slot": s, "version": self._version(s)} for s in j.history],
                "floor": j.floor,
                "pending": records["pending"],
                "last": records["outcome"],
                "boot_error": self.boot_error,
            }

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until nothing is in flight (tests, scripts); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._journal.pending is not None or self._worker.busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.1))
        return True

    def close(self) -> None:
        """Stop the worker; an update in flight stays in the journal for the next boot."""
        self._guard.close()
        self._wake.set()
        self._worker.close()

    # ================================================================== the update
    def _run_update(self, req: UpdateRequest) -> None:
        """The update job: faults that are nobody's artifact (full disk, cancel) end it ``failed``."""
        self._wake.clear()
        try:
            self._update(req)
        except Canceled:
            self._abandon(OtaState.FAILED, "canceled by command")
        except StorageError as exc:
            self._abandon(OtaState.FAILED, str(exc))

    def _update(self, req: UpdateRequest) -> None:
        staging = self.store.staging_dir(req.rollout_id)
        try:
            staging.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the staging directory: {exc.strerror or exc}") from exc
        try:
            # A resumed update restarts at downloading from wherever it was (a move the table allows).
            self._step(OtaState.DOWNLOADING)
            if req.ref is not None:
                req = self._fetch_manifest(req, staging / FETCHED_MANIFEST)
                with self._lock:
                    check_manifest(req, self._facts(), _resolve_profile)  # before a byte of the model
            m = req.verified
            staged = staging / m.model.file
            result = self._download(req.rollout_id, req.url, staged, m.model.size)
            crash_point("downloaded")
            self._step(OtaState.VERIFYING)
            with self._lock:
                check_manifest(req, self._facts(), _resolve_profile)  # again: a resume may run much later
            try:
                check_model_file(staged, m.model, f"downloaded {m.model.file}")
            except ArtifactError:
                if not result.resumed_from:
                    raise
                staged.unlink(missing_ok=True)  # the resumed part may be stale: one clean retry
                self._download(req.rollout_id, req.url, staged, m.model.size)
                check_model_file(staged, m.model, f"downloaded {m.model.file}")
            crash_point("verified")
            self._check_cancel(req.rollout_id)
            self._step(OtaState.VALIDATING)
            check_contract(m, self._active_contract())
            from agent.validation import validate_model

            report = validate_model(staged, profile=self.profile, manifest=m, timeout_s=self.validate_timeout_s)
            check_report(report)
            crash_point("validated")
            self._check_cancel(req.rollout_id)
        except (ArtifactError, TransportError, ConfigError, ModelError) as exc:
            self._finish(OtaState.REJECTED, str(exc))
            self.store.prune(self._journal.kept)
            return
        slot = slot_name(m.name, m.version, m.model.sha256)
        self._step(OtaState.INSTALLING, slot=slot)
        self.store.install(slot, staged, req.raw, req.signature, crash=crash_point, move=True)
        crash_point("slot-written")
        try:
            self.host.activate(self.store.model_path(slot), m, keep_previous=True)
        except EdgefleetError as exc:
            self._finish(OtaState.FAILED, f"cannot activate: {exc}")
            self.store.prune(self._journal.kept)
            return
        self._trial = slot
        crash_point("activated")
        self._step(OtaState.PROBATION)
        verdict, counters = run_probation(self.host, m, self.profile, self.golden_traffic,
                                          self._worker.check_stop)
        details = asdict(counters)
        if verdict.decision == "commit":
            crash_point("commit-before-journal")
            outcome = Outcome(req.rollout_id, m.version, OtaState.COMMITTED, verdict.reason)
            with self._lock:
                self._persist(self._journal.committed(slot, m.version, self.keep_versions, outcome))
                self._trial = None
            crash_point("commit-after-journal")
            self.host.release_previous()
            self._report_outcome(details=details)
        else:
            if self.host.previous_info is None:  # nothing committed before: nothing to return to
                self._trial = None
                self._finish(OtaState.FAILED, "probation failed and there is no previous model to return "
                             f"to: {verdict.reason}", details=details)
                return
            t0 = time.perf_counter()
            self.host.revert()
            self._trial = None
            self.last_revert_s = time.perf_counter() - t0
            crash_point("rollback-reverted")
            self._finish(OtaState.ROLLED_BACK, verdict.reason, details=details)
        self.store.prune(self._journal.kept)

    def _fetch_manifest(self, req: UpdateRequest, dest: Path) -> UpdateRequest:
        """A schema-2 update's manifest: fetched like the model (bounded by its announced size), then verified.

        Raises:
            TransportError / StorageError: as for the model's download.
            ArtifactError / SignatureError: not the announced bytes, not strict JSON, not signed.
        """
        ref = req.ref
        assert ref is not None
        dest.with_name(dest.name + ".part").unlink(missing_ok=True)  # small: fetched whole, never resumed
        self._download(req.rollout_id, ref.url, dest, ref.size, replace(self.policy, max_bytes=MAX_MANIFEST_BYTES),
                       what="manifest")
        try:
            data = dest.read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read the fetched manifest: {exc.strerror or exc}") from exc
        try:
            return resolve_manifest(req, data, self.trusted_keys)
        except ArtifactError:
            dest.unlink(missing_ok=True)  # a resume fetches it again rather than trusting it
            raise

    def _download(self, rollout_id: str, url: str, dest: Path, size: int, policy: DownloadPolicy | None = None,
                  what: str = "artifact") -> DownloadResult:
        first = [True]

        def on_chunk(total: int) -> None:
            if first[0]:
                first[0] = False
                crash_point("download-partial")
            self._worker.check_stop()
            self._check_cancel(rollout_id)

        def pause(seconds: float) -> None:
            self._wake.wait(seconds)
            self._worker.check_stop()
            self._check_cancel(rollout_id)

        return download(url, dest, size, policy or self.policy, on_chunk=on_chunk, sleep=pause, what=what)

    def _check_cancel(self, rollout_id: str) -> None:
        """Raises Canceled once a cancel command named this update."""
        if self._cancel == rollout_id:
            raise Canceled()

    # ================================================================== rollback command
    def _authorize_rollback(self, req: RollbackRequest, version: str) -> None:
        """Below the floor: verify the rollback statement and burn its nonce (it works once)."""
        facts = self._facts()
        statement = check_rollback(req, version, facts)
        if statement is not None:
            try:
                self._nonces().consume(statement, facts.now)
            except OSError as exc:
                raise StorageError(f"cannot record the statement's nonce: {exc.strerror or exc}") from exc

    def _run_rollback(self) -> None:
        with self._lock:
            p = self._journal.pending
        if p is None or p.kind != "rollback" or p.slot is None:
            return
        slot = p.slot
        try:
            manifest = self._slot_manifest(slot)
            self.host.activate(self.store.model_path(slot), manifest, name=_slot_label(slot))
        except (EdgefleetError, OSError) as exc:
            self._finish(OtaState.FAILED, f"cannot activate version {p.version}: {exc}", rollback=True)
            return
        crash_point("operator-rollback")
        outcome = Outcome(p.rollout_id, p.version, OtaState.COMMITTED, rollback=True)
        with self._lock:
            # Best effort: the target serves now; if the disk refuses the write, the rollback
            # still in the journal on disk is finished again at the next boot.
            self._persist(self._journal.committed(slot, p.version, self.keep_versions, outcome), best_effort=True)
        self._report_outcome()

    # ================================================================== helpers
    def _facts(self) -> DeviceFacts:
        return DeviceFacts(self.profile, self.trusted_keys, self._journal.floor, self.host.manifest, self._clock(),
                           device_id=self.device_id, group=self.group, fleet=self.fleet)

    def _active_contract(self) -> Any:
        if self.host.manifest is not None:
            return self.host.manifest
        engine = self.host.engine
        if engine is None:
            return None
        return contract_of(engine.input_details), contract_of(engine.output_details)

    def _version(self, slot: str | None) -> str:
        return self._journal.versions.get(slot or "", "?")

    def _slot_manifest(self, slot: str) -> Manifest | None:
        path = self.store.slot_dir(slot) / MANIFEST_NAME
        return parse_manifest(path.read_bytes(), str(path)) if path.is_file() else None

    def _persist(self, journal: Journal, best_effort: bool = False) -> None:
        """Write the journal, then adopt it. ``best_effort``: adopt it even if the disk refuses it.

        Raises:
            StorageError: the write failed and ``best_effort`` is False.
        """
        with self._lock:
            try:
                self.store.write_journal(journal)
            except StorageError as exc:
                if not best_effort:
                    raise
                log.error("%s; going on with the journal in memory only", exc)
            self._journal = journal
            self._idle.notify_all()

    def _emit(self, rollout_id: str, version: str, state: OtaState, **extra: Any) -> None:
        """Hand one event to the service; the state goes on the wire as its plain string."""
        log.info("ota %s v%s: %s", rollout_id, version, state.value)
        self.timeline.append((time.monotonic(), version, state.value))
        event = {"event": "ota", "rollout_id": rollout_id, "version": version, "state": state.value}
        event.update({k: v for k, v in extra.items() if v is not None})
        self._hand_over(event)

    def _hand_over(self, event: dict[str, Any]) -> None:
        try:
            self.emit_event(event)
        except Exception:
            log.exception("emit_event failed for %s", event)

    def _step(self, state: OtaState, **changes: Any) -> None:
        """Persist the new state of the work in flight (a legal move, see Journal.step), then report it."""
        with self._lock:
            self._persist(self._journal.step(state, **changes))
            p = self._journal.pending
        assert p is not None
        self._emit(p.rollout_id, p.version, state, rollback=True if p.kind == "rollback" else None)

    def _finish(self, state: OtaState, reason: str | None, rollback: bool = False,
                details: dict[str, Any] | None = None, best_effort: bool = False) -> None:
        with self._lock:
            p = self._journal.pending
            assert p is not None
            self._persist(self._journal.finished(Outcome(p.rollout_id, p.version, state, reason,
                                                         rollback=rollback or p.kind == "rollback")),
                          best_effort=best_effort)
            self._cancel = None
            self._report_outcome(details=details)

    def _abandon(self, state: OtaState, reason: str) -> None:
        """End the work in flight after a fault in the device itself; never raises: the worker lives on.

        The model on probation (if any) is swapped back out first; staging and half-built slots are
        deleted *before* the journal write, which frees what a full disk needs for that write.
        """
        with self._lock:
            if self._journal.pending is None:
                return
            if self._trial is not None and self.host.previous_info is not None:
                self.host.revert()
            self._trial = None
            try:
                self.store.prune(self._journal.kept)
            except OSError as exc:
                log.error("cannot clean the staging area: %s", exc)
            self._finish(state, reason, best_effort=True)

    def _report_rejection(self, rollout_id: str, version: str, reason: str) -> None:
        self._persist(self._journal.finished(Outcome(rollout_id, version, OtaState.REJECTED, reason)),
                      best_effort=True)
        self._report_outcome()

    def _report_outcome(self, details: dict[str, Any] | None = None) -> None:
        """Emit the last outcome once (again after a crash that came before it was handed over)."""
        with self._lock:
            o = self._journal.outcome
            if o is None or o.reported:
                return
            self._emit(o.rollout_id, o.version, o.state, reason=o.reason,
                       rollback=True if o.rollback else None, probation=details)
            self._persist(replace(self._journal, outcome=replace(o, reported=True)), best_effort=True)
            if o.state in _SERVING_CHANGED and self.on_serving_changed is not None:
                try:
                    self.on_serving_changed()
                except Exception:
                    log.exception("on_serving_changed failed after %s %s", o.rollout_id, o.state.value)

    # ================================================================== boot
    def _boot_problem(self, reason: str) -> None:
        """Say what boot had to work around: ``status()["boot_error"]`` and a ``model_error`` event."""
        self.boot_error = reason if self.boot_error is None else f"{self.boot_error}; {reason}"
        log.error("%s", reason)
        self._hand_over({"event": "model_error", "reason": reason})

    def _rebuild_journal(self, damage: str) -> Journal:
        """A journal from the slots whose manifest signature and model sha256 still verify."""
        verified: dict[str, str] = {}
        for entry in sorted(self.store.slots.iterdir()):
            if entry.name.endswith(".tmp"):
                continue  # a slot whose install never finished
            try:
                manifest, raw, sig = load_manifest(entry)
                verify_manifest(raw, sig, list(self.trusted_keys))
                check_model_file(self.store.model_path(entry.name), manifest.model, manifest.model.file)
            except (EdgefleetError, OSError):
                continue
            verified[entry.name] = manifest.version
        journal = journal_from_slots(verified, self.keep_versions)
        try:
            aside = self.store.set_aside_journal().name
        except OSError:
            aside = "nowhere (it could not be copied)"
        crash_point("journal-set-aside")
        served = (f"serving version {journal.versions[journal.active]}" if journal.active else "no slot verifies")
        damage = damage.replace(str(self.store.journal_path), self.store.journal_path.name)  # no device paths
        # Reported before the write: a crash in between rebuilds (and reports) again, never silently.
        self._boot_problem(f"{damage}; set aside as {aside} and rebuilt from {len(verified)} verified slot(s): "
                           f"{served}, floor {journal.floor}")
        self._persist(journal, best_effort=True)
        crash_point("journal-rebuilt")
        return journal

    def _activate_committed(self) -> dict[str, str] | None:
        """Serve the journal's active slot, else a kept one, without rewriting the journal.

        A slot that fails to load is tried again a few times (one bad read must not cost the
        device its newer model); if it still fails, a kept slot serves for now, the journal keeps
        naming the active one (nothing is deleted), and the next boot tries it again.
        """
        j = self._journal
        errors = []
        for slot in serving_order(j):
            try:
                info = self._serve_slot(slot)
            except (EdgefleetError, OSError) as exc:
                errors.append(f"{slot}: {exc}")
                continue
            if slot != j.active:
                self._boot_problem(f"active slot {j.active} cannot be served ({'; '.join(errors)}); serving the "
                                   f"kept version {self._version(slot)} for now, the newer slot is kept")
            return info
        if errors:
            self._boot_problem("no committed model can be served: " + "; ".join(errors))
        return None

    def _serve_slot(self, slot: str) -> dict[str, str]:
        """Check and activate one slot, retrying a failed read a few times (a transient I/O error)."""
        for wait in (*_SLOT_READ_TRIES, None):
            try:
                manifest = self._slot_manifest(slot)
                model = self.store.model_path(slot)
                if manifest is not None:
                    check_model_file(model, manifest.model, manifest.model.file)
                return dict(self.host.activate(model, manifest, name=_slot_label(slot)))
            except (EdgefleetError, OSError) as exc:
                if wait is None:
                    raise
                log.warning("slot %s failed to load (%s); reading it again in %g s", slot, exc, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    # ================================================================== a committed model that hangs
    def _on_stuck(self, stuck: Any) -> None:
        """The hang guard saw a stuck call: give up a hung committed model (one journal write).

        Probation judges its own model; a record that cannot be written is retried at the next
        poll (restarting without it would serve the hung model again).
        """
        with self._lock:
            if self._trial is not None or self.hung is not None:
                return
            info = self.host.model_info
            reason = hung_reason(self._journal, stuck, info.get("sha256") if info else None,
                                 self.hang_limit_deadlines)
            o = self._journal.outcome
            if reason is None or o is None:
                return
            outcome = replace(o, state=OtaState.ROLLED_BACK, reason=reason, reported=False, hung=True)
            try:
                self._persist(self._journal.demoted(outcome))
            except StorageError as exc:
                log.error("cannot record the hung model: %s", exc)
                return
            self.hung = reason
        crash_point("hung-recorded")
        log.error("%s", reason)
        self._hand_over({"event": "model_error", "reason": reason})
        if self.on_hung is not None:
            self.on_hung(reason)

    def _job_failed(self, exc: Exception) -> None:
        self._abandon(OtaState.FAILED, f"internal error: {type(exc).__name__}: {exc}")
