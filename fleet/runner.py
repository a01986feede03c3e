"""The I/O around the planner: check the artifact, create the rollout, send commands, route answers.

Order of every send: persist the command id (the execution is SENT) first, then publish. After a
crash, ``--resume`` (or the controller that adopts the rollout) re-sends the same id only to SENT
devices (devices drop a repeated id), and reads the retained states to credit devices that
finished while we were down. What an answer means is decided in :mod:`fleet.rollout`, for
deploys and operator rollbacks alike.

A runner given an ``owner`` drives under a lease (:meth:`fleet.store.Store.save` extends it in
every write and raises LeaseLost once another driver took over). When the database goes away
the runner pauses: it retries the write it could not make and publishes nothing until it
succeeds, then goes on where it was.
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgefleet.errors import ArtifactError, ConfigError, SignatureError
from edgefleet.manifest import Manifest, ManifestRef, check_model_file, load_manifest
from edgefleet.messages import (
    COMMAND_SCHEMA,
    MAX_COMMAND_BYTES,
    ExecState,
    RolloutState,
    decode,
    encode,
    make_command,
)
from edgefleet.mqtt import Message, MqttClient, Outgoing
from edgefleet.signing import Ed25519PrivateKey, canonical_bytes, load_private_key, sign_manifest
from edgefleet.statements import make_statement
from edgefleet.topics import all_devices, device_cmd_topic, fleet_reply_topic, parse_device_topic
from fleet.artifacts import manifest_url_beside
from fleet.registry import Device
from fleet.rollout import (
    Policy,
    apply_event,
    apply_reply,
    apply_state,
    cancel,
    decide,
    mark_sent,
    plan_waves,
    resend_due,
    resend_interval,
    summarize,
    unanswered,
    wave_command,
)
from fleet.store import Execution, Rollout, Store, StoreUnavailable

__all__ = [
    "EVENT_TOPICS",
    "LEASE_TTL_S",
    "Artifact",
    "RolloutRunner",
    "Stopped",
    "check_command_size",
    "check_signing",
    "command_id",
    "create_deploy",
    "create_rollback",
    "load_artifact",
]

EVENT_TOPICS = (all_devices("events"), all_devices("cmd/+/response"))
Progress = Callable[[Rollout, dict[str, int]], None]
COALESCE_S = 0.02  # once answers flow, read them in batches this often rather than one wake-up each, s
PLAN_COST_RATIO = 20.0  # the planner may use at most ~1/20 of the wall time while answers flow
MIN_PLAN_GAP_S = 0.25  # ... and runs at most this often then (a finished wave starts the next at once), s
IDLE_PLAN_S = 1.0  # longest a driver waits without planning while no answer calls for it, s ...
IDLE_COST_RATIO = 100.0  # ... unless a pass costs more than 1/100 of that (50,000 devices: ~25 ms) ...
LEASE_TTL_S = 10.0  # a driver that stops writing loses its rollout after this long, s
IDLE_PLAN_MAX_S = LEASE_TTL_S / 4  # ... and never longer than this, s
STATEMENT_MARGIN_S = 300.0  # a rollback statement outlives its command by this much (clock skew), s
_RETRY_MAX_S = 5.0  # longest pause between writes retried while the database is away, s


class Stopped(Exception):
    """The runner was asked to stop (the controller shuts down); the rollout stays for the next driver."""


class Artifact:
    """A checked artifact directory: manifest, the raw dict that is signed, signature, model path."""

    def __init__(self, directory: Path | None, manifest: Manifest, raw: dict[str, Any], signature: str | None) -> None:
        self.directory = directory
        self.manifest = manifest
        self.raw = raw
        self.signature = signature

    @property
    def model_path(self) -> Path:
        if self.directory is None:
            raise ArtifactError(f"{self.manifest.name}@{self.manifest.version}: uploaded, no local model file")
        return self.directory / self.manifest.model.file


def load_artifact(directory: Path | str, sign_key: Path | str | None = None, force: bool = False) -> Artifact:
    """Load and check an artifact before anything is sent.

    Raises:
        ArtifactError: no valid manifest, model file missing or not matching its sha256 / size,
            or ``deployable: false`` without ``force``.
        ConfigError: the signing key cannot be read.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: not a directory (expected an artifact dir from edge-convert)")
    manifest, raw, signature = load_manifest(directory)
    if not manifest.deployable and not force:
        raise ArtifactError(f"{directory}: manifest says deployable: false (the converter's checks failed; "
                            "see report.md, or pass --force)")
    check_model_file(directory / manifest.model.file, manifest.model)
    if sign_key is not None:
        signature = sign_manifest(raw, load_private_key(sign_key))
    return Artifact(directory, manifest, raw, signature)


def check_signing(artifact: Artifact, devices: Sequence[Device]) -> None:
    """Refuse an unsigned artifact when a target device says it only takes signed updates.

    Raises:
        SignatureError: unsigned and at least one device advertises ``signed_updates: true``.
    """
    if artifact.signature:
        return
    strict = [d.device_id for d in devices if d.signed_updates is True]
    if strict:
        where = artifact.directory or "the artifact"
        raise SignatureError(f"{len(strict)} target device(s) require signed updates (e.g. {strict[0]}) and "
                             f"{where} has no manifest.json.sig: pass --sign-key")


def command_id(rollout_id: str, device_id: str, kind: str) -> str:
    """The one command id for (rollout, device, kind): the same on every re-send."""
    return hashlib.sha256(f"{rollout_id}/{device_id}/{kind}".encode()).hexdigest()[:32]


def check_command_size(cmd: dict[str, Any]) -> dict[str, Any]:
    """Return ``cmd`` when it fits :data:`MAX_COMMAND_BYTES` encoded (managed brokers cap messages).

    Raises:
        ConfigError: it does not fit (nothing was sent).
    """
    size = len(encode(cmd))
    if size > MAX_COMMAND_BYTES:
        raise ConfigError(f"{cmd.get('rollout_id', 'a')} command is {size} bytes, expected at most "
                          f"{MAX_COMMAND_BYTES} (MAX_COMMAND_BYTES; AWS IoT Core refuses messages over 128 KB)")
    return cmd


def new_rollout_id() -> str:
    return time.strftime("r%Y%m%d-%H%M%S-", time.gmtime()) + uuid.uuid4().hex[:6]


def create_deploy(store: Store, artifact: Artifact, devices: Sequence[Device], policy: Policy,
                  artifact_url: str | None, serve: str | None, broker: str, force: bool = False,
                  now: float | None = None, owner: str | None = None,
                  target: str | None = None) -> tuple[Rollout, list[Execution]]:
    """Persist a new rollout and its executions; devices already on the target are SUCCEEDED at once.

    ``owner`` takes the rollout's lease at once; ``force`` also cancels running rollouts that
    share devices with this one.

    Raises:
        RolloutBusy: a running rollout shares devices with this one, and not ``force``.
    """
    now = time.time() if now is None else now
    rid = new_rollout_id()
    m = artifact.manifest
    # online devices first, so the canary is made of devices that can answer now
    order = sorted(devices, key=lambda d: (not d.online, d.device_id))
    waves = plan_waves([d.device_id for d in order], policy.canary, policy.wave_base, policy.wave_factor)
    by_id = {d.device_id: d for d in devices}
    execs = []
    for w, ids in enumerate(waves):
        for did in ids:
            dev = by_id[did]
            e = Execution(rid, did, w, prev_version=dev.model_version, updated_ts=now)
            if not force and dev.model_sha256 == m.model.sha256 and dev.model_version == m.version:
                e = replace(e, state=ExecState.SUCCEEDED, reason="already running this version")
            execs.append(e)
    rollout = Rollout(id=rid, kind="deploy", created=now, updated=now, state=RolloutState.IN_PROGRESS,
                      policy=policy.to_json(), current_wave=0, waves=len(waves),
                      artifact_dir=str(artifact.directory.resolve()) if artifact.directory else None,
                      name=m.name, version=m.version,
                      sha256=m.model.sha256, manifest=artifact.raw, signature=artifact.signature,
                      artifact_url=artifact_url, serve=serve, broker=broker, target=target)
    _create(store, rollout, execs, {"devices": len(execs), "waves": [len(w) for w in waves]}, owner, force, now)
    return rollout, execs


def _create(store: Store, rollout: Rollout, execs: Sequence[Execution], detail: dict[str, Any],
            owner: str | None, force: bool, now: float) -> None:
    canceled = store.create(rollout, execs, [(rollout.id, None, "created", detail)], owner=owner,
                            lease_ttl_s=LEASE_TTL_S, force=force, now=now)
    if canceled:
        store.save(None, (), [(rollout.id, None, "canceled", {"rollouts": canceled})], now=now)


def create_rollback(store: Store, devices: Sequence[Device], to: str | None, broker: str,
                    timeout_s: float, now: float | None = None, owner: str | None = None,
                    target: str | None = None, force: bool = False) -> tuple[Rollout, list[Execution]]:
    """Persist an operator rollback (one wave, no canary).

    Raises:
        RolloutBusy: a running rollout shares devices with this one, and not ``force``.
    """
    now = time.time() if now is None else now
    rid = new_rollout_id()
    # never aborts (min_executed above the fleet size); any failure makes the result FAILED
    policy = Policy(canary=0, wave_base=max(1, len(devices)), device_timeout_s=timeout_s,
                    max_failure_pct=0, min_executed=len(devices) + 1, rollback_on_abort=False)
    execs = [Execution(rid, d.device_id, 0, prev_version=d.model_version, updated_ts=now) for d in devices]
    rollout = Rollout(id=rid, kind="rollback", created=now, updated=now, state=RolloutState.IN_PROGRESS,
                      policy=policy.to_json(), current_wave=0, waves=1, version=to, broker=broker, target=target)
    _create(store, rollout, execs, {"devices": len(execs), "to": to}, owner, force, now)
    return rollout, execs


class RolloutRunner:
    """Drive one rollout to a final state over an open MQTT connection.

    With ``owner`` every write extends that owner's lease (taken before); ``stop`` ends
    :meth:`run` with :class:`Stopped` at the next tick; ``notice`` hears about pauses.
    ``manifest`` is where the update commands send devices for the manifest (the fleet's server,
    :func:`fleet.artifacts.serve_manifest`, or a checked hosted copy); without it, the manifest's
    canonical JSON beside the model (the ``--artifact-url`` layout).
    """

    def __init__(self, store: Store, client: MqttClient, rollout: Rollout, executions: Sequence[Execution],
                 progress: Progress | None = None, tick_s: float = 0.2, batch: int = 20000,
                 owner: str | None = None, stop: threading.Event | None = None,
                 notice: Callable[[str], None] | None = None, sign_key: Ed25519PrivateKey | None = None,
                 manifest: ManifestRef | None = None) -> None:
        self.store = store
        self.manifest = manifest
        self.sign_key = sign_key  # signs the rollback statements that let a device go below its floor
        self.owner = owner
        self.stop = stop or threading.Event()
        self.notice = notice
        self.client = client
        self.rollout = rollout
        self.policy = Policy.from_json(rollout.policy)
        self.execs: dict[str, Execution] = {e.device_id: e for e in executions}
        self._open = Counter(e.wave for e in executions if not e.terminal)  # unfinished executions per wave
        self.progress = progress
        self.tick_s = tick_s
        self.batch = batch
        self.reply_topic = fleet_reply_topic(client.client_id)
        self._cmds: dict[str, tuple[str, str]] = {}  # command id -> (device, command)
        for e in executions:
            for command in {wave_command(rollout.kind), "rollback"}:
                self._cmds[command_id(rollout.id, e.device_id, command)] = (e.device_id, command)
        self._last_summary: dict[str, int] | None = None
        self._last_sent: dict[str, float] = {}  # device -> when its wave command last went out (clock())
        self._sent_order: dict[str, int] = {}   # device -> number of its wave command's last publish
        self._publishes = itertools.count()
        self._resend_checked = 0.0
        self.resent = 0
        self.sent_updates = 0
        self.sent_rollbacks = 0

    # -- sending ----------------------------------------------------------------------------
    def _payload(self, e: Execution, command: str, rollback: bool) -> dict[str, Any]:
        if command == "rollback":  # an operator rollback's wave goes to --to; an abort's to the old version
            to = e.prev_version if rollback else self.rollout.version
            cmd = make_command("rollback", ttl_s=self.policy.device_timeout_s, rollout_id=self.rollout.id, to=to)
            if self.sign_key is not None and to is not None:
                cmd["statement"], cmd["statement_signature"] = make_statement(
                    "rollback", self.sign_key, device=e.device_id, version=to,
                    lifetime_s=self.policy.device_timeout_s + STATEMENT_MARGIN_S)
        else:
            ref = self._manifest_ref()
            cmd = make_command("update", ttl_s=self.policy.device_timeout_s, rollout_id=self.rollout.id,
                               version=self.rollout.version, manifest_url=ref.url, manifest_sha256=ref.sha256,
                               manifest_size=ref.size, signature=self.rollout.signature,
                               artifact_url=self.rollout.artifact_url)
        cmd["schema"] = COMMAND_SCHEMA
        cmd["id"] = command_id(self.rollout.id, e.device_id, command)
        cmd["reply_to"] = self.reply_topic  # 3.1.1 brokers carry no Response Topic property
        return check_command_size(cmd)

    def _manifest_ref(self) -> ManifestRef:
        if self.manifest is None:
            self.manifest = ManifestRef.of(manifest_url_beside(str(self.rollout.artifact_url)),
                                         canonical_bytes(self.rollout.manifest or {}))
        return self.manifest

    def _send(self, ids: Sequence[str], rollback: bool, now: float) -> list[Execution]:
        """Persist ids and send times, then publish. Returns the changed executions (already saved)."""
        if not ids:
            return []
        command = "rollback" if rollback else wave_command(self.rollout.kind)
        changed = []
        for did in ids:
            e = mark_sent(self.execs[did], command_id(self.rollout.id, did, command), now, rollback=rollback)
            self._put(e)
            changed.append(e)
        event = "send_rollback" if rollback else "send_update"
        payloads = [self._payload(e, command, rollback) for e in changed]  # one too large: nothing is recorded
        self._save(None, changed, [(self.rollout.id, None, event, {"devices": len(changed)})], now=now)
        self._publish(changed, payloads, command, now)
        if rollback:
            self.sent_rollbacks += len(changed)
        else:
            self.sent_updates += len(changed)
        return changed

    def _publish(self, execs: Sequence[Execution], payloads: Sequence[dict[str, Any]], command: str,
                 now: float) -> None:
        """Publish (paced, every one acknowledged) and remember when each wave command went out."""
        # generous stall: a cluster that lost a node acknowledges again only once it has a new leader
        self.client.publish_all((Outgoing(device_cmd_topic(e.device_id, command), payload, self.reply_topic,
                                          payload["id"].encode()) for e, payload in zip(execs, payloads)),
                                stall_s=60.0)
        if command == wave_command(self.rollout.kind):
            for e in execs:
                self._last_sent[e.device_id] = now
                self._sent_order[e.device_id] = next(self._publishes)

    def _resend_silent(self, now: float) -> None:
        """The same wave command again to devices that never answered it (see :func:`resend_due`)."""
        if now - self._resend_checked < min(IDLE_PLAN_S * 5, resend_interval(self.policy)):
            return
        self._resend_checked = now
        if self.rollout.state is not RolloutState.IN_PROGRESS:
            return
        due = resend_due(list(self.execs.values()), self._sent_order, self._last_sent, self.policy, now)
        if not due:
            return
        command = wave_command(self.rollout.kind)
        execs = [self.execs[did] for did in due]
        self._save(None, (), [(self.rollout.id, None, "resend_" + command, {"devices": len(due)})], now=now)
        self._publish(execs, [self._payload(e, command, rollback=False) for e in execs], command, now)
        self.resent += len(due)

    def _resend_unanswered(self, now: float) -> None:
        """On resume: the same command id again to devices that never answered; nobody else."""
        updates, rollbacks = unanswered(list(self.execs.values()))
        self._send(updates, rollback=False, now=now)
        self._send(rollbacks, rollback=True, now=now)

    # -- receiving --------------------------------------------------------------------------
    def _fold(self, msg: Message, now: float) -> Execution | None:
        """Route one message to its execution and let the planner fold it in."""
        parsed = parse_device_topic(msg.topic)
        kind = self.rollout.kind
        if msg.topic == self.reply_topic or (parsed is not None and parsed[1].endswith("/response")):
            reply = _decode(msg.payload)
            cid = (msg.correlation or b"").decode("utf-8", "replace") or str((reply or {}).get("id", ""))
            found = self._cmds.get(cid)
            if reply is None or found is None or found[0] not in self.execs:
                return None
            return apply_reply(self.execs[found[0]], reply, found[1], now, kind)
        if parsed is None or parsed[0] not in self.execs:
            return None
        e, topic_kind = self.execs[parsed[0]], parsed[1]
        payload = _decode(msg.payload)
        if payload is None:
            return None
        if topic_kind == "events":
            if payload.get("event") != "ota" or payload.get("rollout_id") != self.rollout.id:
                return None
            return apply_event(e, payload, now, kind)
        if topic_kind == "state":
            return apply_state(e, payload, self.rollout, now)
        return None

    # -- the loop ---------------------------------------------------------------------------
    def start(self, clock: Callable[[], float] = time.time) -> int:
        """Send the first batch and return how many devices got it, without following answers."""
        now = clock()
        d = decide(self.rollout, list(self.execs.values()), self.policy, now)
        return len(self._send(d.send_update, rollback=False, now=now))

    def run(self, clock: Callable[[], float] = time.time) -> Rollout:
        """Drive the rollout until it reaches SUCCEEDED, FAILED or ABORTED; returns the final rollout."""
        self.client.subscribe((self.reply_topic,) + EVENT_TOPICS)
        self._resend_unanswered(clock())
        while True:
            started = time.monotonic()
            now = clock()
            d = decide(self.rollout, list(self.execs.values()), self.policy, now)
            cost = time.monotonic() - started  # the O(devices) part; sending is paid per device anyway
            for e in d.changed:
                self._put(e)
            history: list[tuple[str | None, str | None, str, dict[str, Any] | None]] = [
                (self.rollout.id, e.device_id, e.state.value, {"reason": e.reason}) for e in d.changed]
            if (d.state, d.current_wave) != (self.rollout.state, self.rollout.current_wave):
                history.append((self.rollout.id, None, d.state.value, {"wave": d.current_wave, "reason": d.reason}))
            self.rollout = replace(self.rollout, state=d.state, current_wave=d.current_wave, reason=d.reason,
                                   updated=now)
            self._save(self.rollout, d.changed, history, now=now)
            self._send(d.send_update, rollback=False, now=now)
            self._send(d.send_rollback, rollback=True, now=now)
            self._resend_silent(now)
            mark = time.monotonic()
            self._report()
            cost += time.monotonic() - mark
            if self.rollout.terminal:
                if self.owner is not None:
                    self.store.release(self.rollout.id, self.owner)
                return self.rollout
            idle_s = min(IDLE_PLAN_MAX_S, max(IDLE_PLAN_S, cost * IDLE_COST_RATIO))
            self._await_answers(gap_s=min(idle_s, max(MIN_PLAN_GAP_S, cost * PLAN_COST_RATIO)), idle_s=idle_s,
                                clock=clock)

    def _await_answers(self, gap_s: float, idle_s: float, clock: Callable[[], float]) -> None:
        """Fold answers until the planner should run again.

        That is when a wave just finished; when an answer may call for a decision (a device
        failed: the rollout may have to abort; any answer while it aborts), but not before
        ``gap_s`` (at least MIN_PLAN_GAP_S, and PLAN_COST_RATIO times the last pass's planning
        cost: a pass over 50,000 devices costs tens of ms, and answers trickling in from a slow
        broker must not pay one each); and every ``idle_s`` for timeouts, progress and the lease
        (IDLE_PLAN_S, longer for a fleet whose pass costs over 1/IDLE_COST_RATIO of it). Answers
        that only move devices along their wave wait for one of those.
        """
        planned = time.monotonic()
        urgent = False
        while True:
            got, wave_finished, failed = self._receive(clock)
            urgent = urgent or failed or (got > 0 and self.rollout.state is not RolloutState.IN_PROGRESS)
            waited = time.monotonic() - planned
            if wave_finished or waited >= idle_s or (urgent and waited >= gap_s):
                break
            if self.stop.is_set():
                raise Stopped(self.rollout.id)
        if self.stop.is_set():
            raise Stopped(self.rollout.id)

    def _receive(self, clock: Callable[[], float]) -> tuple[int, bool, bool]:
        """Fold every answer that arrives within one tick, then save them in one transaction.

        Returns how many executions changed, whether the current wave just finished, and whether
        a device failed.

        The planner runs at most once per tick, not once per message (see :meth:`_await_answers`):
        its O(devices) pass stays at a few per second however many answers a large fleet sends, and
        ``_put`` keeps the counts that tell a finished wave in O(waves). After the first answer the queue is
        drained every COALESCE_S: a broker that delivers answers one TCP segment at a time (NATS)
        would otherwise wake this thread once per message.
        """
        deadline = time.monotonic() + self.tick_s
        changed: dict[str, Execution] = {}
        history: list[tuple[str | None, str | None, str, dict[str, Any] | None]] = []
        n = 0
        wave_finished = failed = False
        now = clock()
        messages = self.client.messages
        while n < self.batch:
            try:
                msg = messages.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if n:  # drain in batches: a wake-up per answer costs more CPU than the answer
                    time.sleep(min(left, COALESCE_S))
                    continue
                try:
                    msg = messages.get(timeout=left)
                except queue.Empty:
                    break
            n += 1
            new = self._fold(msg, now)
            if new is None:
                continue
            old = self._put(new)
            changed[new.device_id] = new
            if new.state != old.state or new.rollback_state != old.rollback_state:
                event = new.state.value if new.state != old.state else f"rollback_{new.rollback_state}"
                history.append((self.rollout.id, new.device_id, event,
                                {"ota_state": new.ota_state, "reason": new.reason}))
            failed = failed or (new.state.failure and not old.state.failure)
            if new.terminal and not old.terminal and self._wave_done():
                wave_finished = True
                break  # the planner can start the next wave now
        if changed:
            self._save(None, list(changed.values()), history, now=now)
        return len(changed), wave_finished, failed

    def _save(self, rollout: Rollout | None, changed: Sequence[Execution],
              history: Sequence[tuple[str | None, str | None, str, dict[str, Any] | None]], now: float) -> None:
        """Write (under the lease), retrying while the database is away; apply a cancel request.

        Nothing is published until this returns, so a database outage pauses the rollout
        instead of sending commands nobody recorded. LeaseLost and Stopped end the driving.
        """
        lease = (self.rollout.id, self.owner, LEASE_TTL_S) if self.owner is not None else None
        delay = 0.2
        while True:
            try:
                cancel_reason = self.store.save(rollout, changed, history, now=now, lease=lease)
                break
            except StoreUnavailable as exc:
                if self.notice is not None:
                    self.notice(f"rollout {self.rollout.id} paused, nothing is sent until the database is back: {exc}")
                if self.stop.wait(delay):
                    raise Stopped(self.rollout.id) from exc
                delay = min(_RETRY_MAX_S, delay * 2)
        if cancel_reason and not self.rollout.terminal:
            self.rollout, self.policy = cancel(self.rollout, self.policy, cancel_reason)

    def _put(self, e: Execution) -> Execution:
        """Keep a changed execution (and the count of unfinished ones per wave); returns the one it replaces."""
        old = self.execs[e.device_id]
        if old.terminal != e.terminal:  # an execution never changes wave
            self._open[e.wave] += -1 if e.terminal else 1
        self.execs[e.device_id] = e
        return old

    def _wave_done(self) -> bool:
        """Every device of the current wave and the waves before it has finished: O(waves), any fleet size."""
        return not any(self._open[w] for w in range(self.rollout.current_wave + 1))

    def _report(self) -> None:
        if self.progress is None:
            return
        summary = summarize(list(self.execs.values()))
        summary["rolled_back"] = sum(1 for e in self.execs.values() if e.rollback_state is ExecState.SUCCEEDED)
        summary["wave"] = self.rollout.current_wave
        key = dict(summary, state=self.rollout.state)  # type: ignore[arg-type]
        if key != self._last_summary:
            self._last_summary = key
            self.progress(self.rollout, summary)


def _decode(data: bytes) -> dict[str, Any] | None:
    """A payload, or None for anything a device should not have sent (or a cleared retained state)."""
    try:
        return decode(data) if data else None
    except (ValueError, UnicodeDecodeError):
        return None


def resume_check(rollout: Rollout) -> None:
    """Raises ConfigError when a rollout cannot be resumed."""
    if rollout.terminal:
        raise ConfigError(f"rollout {rollout.id} already ended ({rollout.state}); nothing to resume")
