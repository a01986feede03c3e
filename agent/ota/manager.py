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
    UpdateRequest,
    admit_update,
    load_command,
    parse_rollback,
    parse_update,
    refuse_busy,
    rollback_target,
    save_command,
)
from agent.ota.crashpoints import crash_point
from agent.ota.download import DownloadPolicy, DownloadResult, download
from agent.ota.probation import run_probation
from agent.ota.recovery import BootAction, plan_boot, serving_order, with_served
from agent.ota.slots import Journal, Outcome, Pending, SlotStore, slot_name
from agent.ota.verify import DeviceFacts, check_contract, check_manifest, check_report, contract_of
from agent.ota.worker import Worker
from edgefleet.errors import ArtifactError, ConfigError, EdgefleetError, ModelError, TransportError
from edgefleet.manifest import (
    MANIFEST_NAME,
    Manifest,
    check_model_file,
    load_manifest,
    parse_manifest,
    sha256_file,
)
from edgefleet.messages import OtaState
from edgefleet.profiles import Profile, load_profile

__all__ = ["OtaManager"]

log = logging.getLogger(__name__)

_SERVING_CHANGED = frozenset({OtaState.COMMITTED, OtaState.ROLLED_BACK})


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
        download_timeout_s, download_retries, backoff_s: see :class:`~agent.ota.download.DownloadPolicy`.
        validate_timeout_s: limit for the child-process validation, s.
        golden_traffic: golden samples run through the live path at the start of probation.
        on_serving_changed: called once a ``committed`` or ``rolled_back`` outcome of an update or
            rollback has been reported, i.e. the served model changed (also when boot re-reports
            one). Exceptions are logged, never raised; like ``emit_event`` it must be quick.
    """

    def __init__(self, state_dir: Path, profile: Profile, trusted_keys: list[Any], host: Any,
                 emit_event: Callable[[dict[str, Any]], None], *, keep_versions: int = 3,
                 reserve_free_mb: float = 16.0, download_timeout_s: float = 10.0, download_retries: int = 4,
                 backoff_s: float = 0.25, validate_timeout_s: float = 60.0, golden_traffic: int = 8,
                 on_serving_changed: Callable[[], None] | None = None) -> None:
        if keep_versions < 2:
            raise ConfigError(f"keep_versions must be >= 2 (current and previous), got {keep_versions}")
        self.profile = profile
        self.trusted_keys = tuple(trusted_keys)
        self.host = host
        self.emit_event = emit_event
        self.on_serving_changed = on_serving_changed
        self.keep_versions = keep_versions
        self.validate_timeout_s = validate_timeout_s
        self.golden_traffic = golden_traffic
        self.policy = DownloadPolicy(
            max_bytes=int(profile.limits.max_download_mb * 1024 * 1024), timeout_s=download_timeout_s,
            retries=download_retries, backoff_s=backoff_s, reserve_bytes=int(reserve_free_mb * 1024 * 1024))
        self.store = SlotStore(Path(state_dir))
        self._lock = threading.RLock()  # guards the journal (command threads vs the worker)
        self._journal = Journal()
        self._idle = threading.Condition(self._lock)
        self._worker = Worker(self._idle, self._job_failed)
        self.timeline: list[tuple[float, str, str]] = []  # (monotonic s, version, state), for benchmarks
        self.last_revert_s: float | None = None
        self.boot_error: str | None = None

    # ================================================================== public API
    def boot(self) -> dict[str, str] | None:
        """Read the journal, finish or undo what was in flight, serve the committed model.

        Returns the served model's info, or None when nothing is installed yet or no kept slot can
        be loaded (then ``status()["boot_error"]`` says why, and the agent stays reachable so the
        fleet can send a fix instead of the device crash-looping).

        Raises:
            ConfigError: the journal is unreadable.
        """
        with self._lock:
            self._journal = self.store.read_journal()
            p = self._journal.pending
            command = load_command(self.store, p.rollout_id) if p is not None and p.kind == "update" else None
            plan = plan_boot(self._journal, command)
            if plan.outcome is not None:
                self._finish(plan.outcome, plan.reason)
            self.store.prune(plan.keep_slots, plan.keep_staging)
            info = self._activate_committed()
            self._report_outcome()
        self._worker.start()
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
                                   DeviceFacts(self.profile, self.trusted_keys, None, None), _resolve_profile)
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
        return info

    def handle_update(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Check an ``update`` command quickly, persist it as queued and hand it to the worker.

        Returns ``{"accepted": True, "state": "queued", ...}`` for the command reply.

        Raises:
            ConfigError: malformed command, or another update/rollback is in flight.
            ArtifactError / SignatureError: refused before any download (bad signature, not newer
                than the committed version, wrong device, oversize); a ``rejected`` event is sent too.
        """
        req = parse_update(cmd)
        with self._lock:
            duplicate = admit_update(self._journal, req)
            if duplicate is not None:
                return duplicate
            try:
                check_manifest(req, self._facts(), _resolve_profile)
            except ArtifactError as exc:
                self._report_rejection(req.rollout_id, req.version, str(exc))
                raise
            save_command(self.store, req)
            j = self._journal
            self._persist(j.with_pending(Pending("update", req.rollout_id, req.version, OtaState.QUEUED,
                                                 from_slot=j.active)))
            self._emit(req.rollout_id, req.version, OtaState.QUEUED)
            crash_point("queued")
        self._worker.start()
        self._worker.put(lambda: self._run_update(req))
        return {"accepted": True, "state": OtaState.QUEUED.value, "rollout_id": req.rollout_id,
                "version": req.version}

    def handle_rollback(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Roll back to the previous kept version, or to ``cmd["to"]`` if it is still kept.

        Raises:
            ConfigError: malformed, busy, or that version is not kept on this device.
        """
        req = parse_rollback(cmd)
        with self._lock:
            j = self._journal
            refuse_busy(j)
            try:
                target, version = rollback_target(j, req)
            except ConfigError as exc:
                self._emit(req.rollout_id, req.to or "", OtaState.FAILED, reason=str(exc), rollback=True)
                raise
            self._persist(j.with_pending(Pending("rollback", req.rollout_id, version, OtaState.INSTALLING,
                                                 slot=target, from_slot=j.active)))
            self._emit(req.rollout_id, version, OtaState.INSTALLING, rollback=True)
        self._worker.start()
        self._worker.put(self._run_rollback)
        return {"accepted": True, "state": OtaState.INSTALLING.value, "rollout_id": req.rollout_id,
                "version": version}

    def status(self) -> dict[str, Any]:
        """Active version, kept versions, what is in flight and the last outcome."""
        with self._lock:
            j = self._journal
            records = j.to_json()  # pending and outcome with their states as plain strings
            return {
                "active": {"slot": j.active, "version": self._version(j.active)} if j.active else None,
                "serving": self.host.model_info,
                "kept": [{"slot": s, "version": self._version(s)} for s in j.history],
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
        self._worker.close()

    # ================================================================== the update
    def _run_update(self, req: UpdateRequest) -> None:
        m = req.manifest
        staging = self.store.staging_dir(req.rollout_id)
        staging.mkdir(parents=True, exist_ok=True)
        staged = staging / m.model.file
        try:
            # A resumed update restarts at downloading from wherever it was (a move the table allows).
            self._step(OtaState.DOWNLOADING)
            result = self._download(req, staged)
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
                self._download(req, staged)
                check_model_file(staged, m.model, f"downloaded {m.model.file}")
            crash_point("verified")
            self._step(OtaState.VALIDATING)
            check_contract(m, self._active_contract())
            from agent.validation import validate_model

            report = validate_model(staged, profile=self.profile, manifest=m, timeout_s=self.validate_timeout_s)
            check_report(report)
            crash_point("validated")
        except (ArtifactError, TransportError, ConfigError, ModelError) as exc:
            self._finish(OtaState.REJECTED, str(exc))
            self.store.prune(self._journal.kept)
            return
        slot = slot_name(m.name, m.version, m.model.sha256)
        self._step(OtaState.INSTALLING, slot=slot)
        self.store.install(slot, staged, req.raw, req.signature, crash=crash_point)
        crash_point("slot-written")
        try:
            self.host.activate(self.store.model_path(slot), m, keep_previous=True)
        except EdgefleetError as exc:
            self._finish(OtaState.FAILED, f"cannot activate: {exc}")
            self.store.prune(self._journal.kept)
            return
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
            crash_point("commit-after-journal")
            self.host.release_previous()
            self._report_outcome(details=details)
        else:
            if self.host.previous_info is None:  # nothing committed before: nothing to return to
                self._finish(OtaState.FAILED, "probation failed and there is no previous model to return "
                             f"to: {verdict.reason}", details=details)
                return
            t0 = time.perf_counter()
            self.host.revert()
            self.last_revert_s = time.perf_counter() - t0
            crash_point("rollback-reverted")
            self._finish(OtaState.ROLLED_BACK, verdict.reason, details=details)
        self.store.prune(self._journal.kept)

    def _download(self, req: UpdateRequest, staged: Path) -> DownloadResult:
        first = [True]

        def on_chunk(total: int) -> None:
            if first[0]:
                first[0] = False
                crash_point("download-partial")
            self._worker.check_stop()

        return download(req.url, staged, req.manifest.model.size, self.policy, on_chunk=on_chunk)

    # ================================================================== rollback command
    def _run_rollback(self) -> None:
        with self._lock:
            p = self._journal.pending
        if p is None or p.kind != "rollback" or p.slot is None:
            return
        slot = p.slot
        try:
            manifest = self._slot_manifest(slot)
            self.host.activate(self.store.model_path(slot), manifest, name=_slot_label(slot))
        except EdgefleetError as exc:
            self._finish(OtaState.FAILED, f"cannot activate version {p.version}: {exc}", rollback=True)
            return
        crash_point("operator-rollback")
        outcome = Outcome(p.rollout_id, p.version, OtaState.COMMITTED, rollback=True)
        with self._lock:
            self._persist(self._journal.committed(slot, p.version, self.keep_versions, outcome))
        self._report_outcome()

    # ================================================================== helpers
    def _facts(self) -> DeviceFacts:
        j = self._journal
        return DeviceFacts(self.profile, self.trusted_keys, self._version(j.active) if j.active else None,
                           self.host.manifest)

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

    def _persist(self, journal: Journal) -> None:
        with self._lock:
            self.store.write_journal(journal)
            self._journal = journal
            self._idle.notify_all()

    def _emit(self, rollout_id: str, version: str, state: OtaState, **extra: Any) -> None:
        """Hand one event to the service; the state goes on the wire as its plain string."""
        self.timeline.append((time.monotonic(), version, state.value))
        event = {"event": "ota", "rollout_id": rollout_id, "version": version, "state": state.value}
        event.update({k: v for k, v in extra.items() if v is not None})
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
                details: dict[str, Any] | None = None) -> None:
        with self._lock:
            p = self._journal.pending
            assert p is not None
            self._persist(self._journal.finished(Outcome(p.rollout_id, p.version, state, reason,
                                                         rollback=rollback or p.kind == "rollback")))
            self._report_outcome(details=details)

    def _report_rejection(self, rollout_id: str, version: str, reason: str) -> None:
        self._persist(self._journal.finished(Outcome(rollout_id, version, OtaState.REJECTED, reason)))
        self._report_outcome()

    def _report_outcome(self, details: dict[str, Any] | None = None) -> None:
        """Emit the last outcome once (again after a crash that came before it was handed over)."""
        with self._lock:
            o = self._journal.outcome
            if o is None or o.reported:
                return
            self._emit(o.rollout_id, o.version, o.state, reason=o.reason,
                       rollback=True if o.rollback else None, probation=details)
            self._persist(replace(self._journal, outcome=replace(o, reported=True)))
            if o.state in _SERVING_CHANGED and self.on_serving_changed is not None:
                try:
                    self.on_serving_changed()
                except Exception:
                    log.exception("on_serving_changed failed after %s %s", o.rollout_id, o.state.value)

    def _activate_committed(self) -> dict[str, str] | None:
        """Serve the journal's active slot; fall back to a kept one if its file is damaged."""
        j = self._journal
        errors = []
        for slot in serving_order(j):
            try:
                manifest = self._slot_manifest(slot)
                model = self.store.model_path(slot)
                if manifest is not None:
                    check_model_file(model, manifest.model, manifest.model.file)
                info = self.host.activate(model, manifest, name=_slot_label(slot))
            except (EdgefleetError, OSError) as exc:
                errors.append(f"{slot}: {exc}")
                log.error("committed slot %s unusable: %s", slot, exc)
                continue
            if slot != j.active:
                self._persist(with_served(j, slot))
            return info
        if errors:
            self.boot_error = "no committed model can be served: " + "; ".join(errors)
            log.error("%s", self.boot_error)
        return None

    def _job_failed(self, exc: Exception) -> None:
        if self._journal.pending is not None:
            self._finish(OtaState.FAILED, f"internal error: {type(exc).__name__}: {exc}")
