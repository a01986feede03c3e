"""OtaManager: the device side of an update, as a list of persisted steps.

::

    queued -> downloading -> verifying -> validating -> installing -> probation -> committed
       any failure before the new model serves ............................... -> rejected
       the new model cannot be activated ..................................... -> failed
       probation misses a threshold (or the agent restarted during it) ....... -> rolled_back
    rollback command: installing (kept slot) -> committed (event has "rollback": true)

Every transition is written to the journal before it takes effect and is then reported
(:mod:`agent.ota.ledger`). This module is the facade and the order of the steps; each job lives
beside it: commands are parsed and admitted in :mod:`agent.ota.commands`, boot's plan is decided
in :mod:`agent.ota.recovery` and carried out with :mod:`agent.ota.boot`, the first model is
installed by :mod:`agent.ota.initial`, the update's steps run on the worker thread in
:mod:`agent.ota.update` (probation in :mod:`agent.ota.probation`), the rollback command in
:mod:`agent.ota.rollback`, and a committed model that hangs is handled by :mod:`agent.ota.hang`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.ota.boot import boot_problem, read_journal, serve_committed, slot_manifest
from agent.ota.commands import (
    UpdateRequest,
    admit_update,
    claimed_ids,
    load_command,
    parse_rollback,
    parse_update,
    save_command,
)
from agent.ota.crashpoints import crash_point
from agent.ota.download import DownloadPolicy
from agent.ota.hang import HANG_LIMIT_DEADLINES, HangGuard, give_up_hung
from agent.ota.initial import install_initial
from agent.ota.ledger import Ledger
from agent.ota.recovery import MAX_BOOTS, RESUMABLE, BootAction, plan_boot
from agent.ota.rollback import queue_rollback, run_rollback
from agent.ota.slots import Pending, SlotStore
from agent.ota.update import abandon, run_update
from agent.ota.verify import DeviceFacts, check_manifest
from agent.ota.worker import Worker
from edgefleet.errors import ArtifactError, ConfigError, StorageError
from edgefleet.manifest import Manifest, check_model_file
from edgefleet.messages import OtaState
from edgefleet.profiles import Profile, load_profile
from edgefleet.statements import NonceLedger

__all__ = ["OtaManager"]

NONCES_NAME = "statements.json"
"""Burnt nonces of accepted rollback statements, beside the journal."""


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
        self._ledger = Ledger(self.store, emit_event, on_serving_changed)
        self._lock = self._ledger.lock  # guards the journal (command threads vs the worker)
        self._idle = self._ledger.idle
        self._worker = Worker(self._idle, self._job_failed)
        self._wake = threading.Event()   # ends a retry wait early (cancel, close)
        self._trial: str | None = None   # slot serving on probation, not committed yet
        self.timeline = self._ledger.timeline  # (monotonic s, version, state), for benchmarks
        self.last_revert_s: float | None = None
        self.boot_error: str | None = None
        if not hang_limit_deadlines > 0:
            raise ConfigError(f"hang_limit_deadlines must be > 0, got {hang_limit_deadlines}")
        self.hang_limit_deadlines = hang_limit_deadlines
        self.on_hung = on_hung
        self.hung: str | None = None  # set once this process gave up a hung model
        self._guard = HangGuard(lambda: self.host.engine, lambda stuck: give_up_hung(self, stuck))

    # ================================================================== public API
    def boot(self) -> dict[str, str] | None:
        """Read the journal, finish or undo what was in flight, serve the committed model.

        Returns the served model's info, or None when nothing is installed yet or no kept slot can
        be loaded (then ``status()["boot_error"]`` says why, and the agent stays reachable so the
        fleet can send a fix instead of the device crash-looping). A damaged journal is set aside
        and rebuilt from the slots that still verify (reported as ``boot_error`` and a
        ``model_error`` event), never silently replaced by an empty one.
        """
        ledger = self._ledger
        with self._lock:
            ledger.journal = read_journal(self)
            p = ledger.journal.pending
            command = (load_command(self.store, p.rollout_id, self.trusted_keys)
                       if p is not None and p.kind == "update" else None)
            plan = plan_boot(ledger.journal, command, self.max_boots)
            if plan.journal is not None:
                ledger.persist(plan.journal, best_effort=True)  # count this boot before resuming
                crash_point("boot-counted")
            if plan.outcome is not None:
                ledger.finish(plan.outcome, plan.reason, best_effort=True)
            self.store.prune(plan.keep_slots, plan.keep_staging)
            info = serve_committed(self)
            o = ledger.journal.outcome
            if o is not None and o.hung and not o.reported:
                boot_problem(self, f"the last run gave up a hung model: {o.reason}")
            ledger.report_outcome()
        self._start()
        req = plan.request
        if plan.action is BootAction.RESUME_UPDATE and req is not None:
            self._worker.put(lambda: run_update(self, req))
        elif plan.action is BootAction.FINISH_ROLLBACK:
            self._worker.put(lambda: run_rollback(self))
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
        ledger = self._ledger
        with self._lock:
            if ledger.journal.active is None:
                ledger.journal = self.store.read_journal()
            if ledger.journal.active is not None:
                return None
            info = install_initial(self, Path(path))
        self._start()
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
        ledger = self._ledger
        try:
            req = parse_update(cmd, self.trusted_keys)
        except ArtifactError as exc:  # unsigned, forged or not plain JSON: say so, touch nothing
            ids = claimed_ids(cmd)
            if ids is not None:
                ledger.emit(*ids, OtaState.REJECTED, reason=str(exc))
            raise
        with self._lock:
            duplicate = admit_update(ledger.journal, req)
            if duplicate is not None:
                return duplicate
            try:
                if req.manifest is not None:  # a manifest by URL is checked once the worker fetched it
                    self._check_manifest(req)
            except ArtifactError as exc:
                ledger.report_rejection(req.rollout_id, req.version, str(exc))
                raise
            try:
                save_command(self.store, req)
                j = ledger.journal
                ledger.persist(j.with_pending(Pending("update", req.rollout_id, req.version, OtaState.QUEUED,
                                                      from_slot=j.active)))
            except StorageError:
                self.store.prune(ledger.journal.kept)  # nothing of it may linger on a full disk
                raise
            ledger.cancel = None
            ledger.emit(req.rollout_id, req.version, OtaState.QUEUED)
            crash_point("queued")
        self._worker.start()
        self._worker.put(lambda: run_update(self, req))
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
        version = queue_rollback(self, req)
        self._worker.start()
        self._worker.put(lambda: run_rollback(self))
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
            p = self._ledger.journal.pending
            if p is None or (rid is not None and rid != p.rollout_id):
                raise ConfigError(f"nothing to cancel: {rid or 'no update'} is not in flight")
            if p.kind != "update" or p.state not in RESUMABLE:
                raise ConfigError(f"too late to cancel: {p.kind} {p.rollout_id} is {p.state.value}; "
                                  "send a rollback once it ends")
            self._ledger.cancel = p.rollout_id
            self._wake.set()
        return {"accepted": True, "state": p.state.value, "rollout_id": p.rollout_id, "canceling": True}

    def status(self) -> dict[str, Any]:
        """Active version, kept versions, the anti-downgrade floor, what is in flight and the last outcome."""
        with self._lock:
            j, version = self._ledger.journal, self._ledger.version
            records = j.to_json()  # pending and outcome with their states as plain strings
            return {
                "active": {"slot": j.active, "version": version(j.active)} if j.active else None,
                "serving": self.host.model_info,
                "kept": [{"slot": s, "version": version(s)} for s in j.history],
                "floor": j.floor,
                "pending": records["pending"],
                "last": records["outcome"],
                "boot_error": self.boot_error,
            }

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until nothing is in flight (tests, scripts); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._ledger.journal.pending is not None or self._worker.busy:
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

    # ================================================================== helpers for the steps
    def _start(self) -> None:
        self._worker.start()
        self._guard.start()

    def _facts(self) -> DeviceFacts:
        return DeviceFacts(self.profile, self.trusted_keys, self._ledger.journal.floor, self.host.manifest,
                           self._clock(), device_id=self.device_id, group=self.group, fleet=self.fleet)

    def _check_manifest(self, req: UpdateRequest, floor: bool = True) -> None:
        """Check ``req``'s manifest against this device now; ``floor=False`` for the operator's own model."""
        with self._lock:
            facts = self._facts()
            check_manifest(req, facts if floor else replace(facts, floor=None), _resolve_profile)

    def _checked_slot(self, slot: str) -> tuple[Path, Manifest | None]:
        """A kept slot's model file and manifest, its sha256 checked again before it may serve.

        Boot's retry loop (:mod:`agent.ota.boot`) calls it here, where the fault tests inject a
        failed read through this module's ``check_model_file``.
        """
        manifest = slot_manifest(self.store, slot)
        model = self.store.model_path(slot)
        if manifest is not None:
            check_model_file(model, manifest.model, manifest.model.file)
        return model, manifest

    def _job_failed(self, exc: Exception) -> None:
        abandon(self, OtaState.FAILED, f"internal error: {type(exc).__name__}: {exc}")
