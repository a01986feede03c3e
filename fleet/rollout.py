"""The rollout planner: pure decisions over executions, no MQTT, no clock of its own.

A rollout is a canary batch (wave 0) and then waves that grow by a factor. After every batch of
device answers :func:`decide` looks at all executions and says what to do next: send the next
wave, time out silent devices, abort (failure threshold passed, or any canary failed), roll back
the devices that already run the new model, or finish. :mod:`fleet.runner` does the I/O around it.

This is the one place executions change state, for deploys and operator rollbacks alike, and
every move is checked against ``EXEC_TRANSITIONS`` (a RuntimeError from there is a bug here;
device input that does not fit is ignored)::

    QUEUED -> SENT            mark_sent: command id recorded, then published (SENT again on resume)
    SENT -> IN_PROGRESS       apply_reply ok, or apply_event with a non-final OTA state
    SENT | IN_PROGRESS -> SUCCEEDED (committed), REJECTED (rejected, reply ok: false),
                          FAILED (failed, rolled_back), TIMED_OUT (decide: nothing final in time)
    QUEUED -> CANCELED        decide: the rollout aborted before this device's wave

The rollback sent to committed devices on abort has its own sub-state (``rollback_state``:
IN_PROGRESS, then SUCCEEDED, FAILED or TIMED_OUT).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from edgefleet.errors import ConfigError
from edgefleet.messages import ExecState, OtaState, RolloutState, check_transition
from fleet.store import Execution, Rollout

__all__ = [
    "Decision",
    "Policy",
    "apply_event",
    "apply_reply",
    "apply_state",
    "cancel",
    "decide",
    "mark_sent",
    "parse_canary",
    "plan_waves",
    "resend_due",
    "resend_interval",
    "summarize",
    "unanswered",
    "wave_command",
]

_E, _O, _R = ExecState, OtaState, RolloutState
_AWAITING = frozenset({_E.SENT, _E.IN_PROGRESS})  # sent, nothing final yet
# What a final OTA state makes of the wave command, per rollout kind (an operator rollback fails
# whichever way the device could not go back).
_OUTCOMES: dict[str, dict[str, ExecState]] = {
    "deploy": {_O.COMMITTED: _E.SUCCEEDED, _O.REJECTED: _E.REJECTED, _O.FAILED: _E.FAILED, _O.ROLLED_BACK: _E.FAILED},
    "rollback": {_O.COMMITTED: _E.SUCCEEDED, _O.REJECTED: _E.FAILED, _O.FAILED: _E.FAILED, _O.ROLLED_BACK: _E.FAILED},
}


@dataclass(frozen=True)
class Policy:
    """How a rollout proceeds. Percentages are 0-100; times in seconds."""

    canary: int = 1                # devices in wave 0; any failure there aborts
    wave_base: int = 5             # devices in the first wave after the canary
    wave_factor: float = 2.0       # each later wave is this many times larger
    max_failure_pct: float = 10.0  # abort when failures exceed this share of executed devices ...
    min_executed: int = 5          # ... once at least this many finished
    device_timeout_s: float = 300.0  # a device with no terminal answer by then is TIMED_OUT
    rollback_on_abort: bool = True

    def __post_init__(self) -> None:
        if self.canary < 0 or self.wave_base < 1 or self.wave_factor < 1:
            raise ConfigError("rollout waves: expected --canary >= 0, --wave-base >= 1, --wave-factor >= 1")
        if not 0 <= self.max_failure_pct <= 100 or self.min_executed < 1 or self.device_timeout_s <= 0:
            raise ConfigError("rollout thresholds: expected 0 <= --max-failure-pct <= 100, "
                              "--min-executed >= 1, --device-timeout > 0")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Policy:
        return cls(**data)


@dataclass(frozen=True)
class Decision:
    """What the runner must do now. ``changed`` holds executions the decision itself changed."""

    state: RolloutState
    current_wave: int
    reason: str | None
    changed: tuple[Execution, ...] = ()
    send_update: tuple[str, ...] = ()
    send_rollback: tuple[str, ...] = ()


def parse_canary(text: str | int, total: int) -> int:
    """``"3"`` -> 3, ``"10%"`` -> ceil(10% of total) (at least 1 when the share is positive)."""
    value = str(text).strip()
    try:
        if value.endswith("%"):
            pct = float(value[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return min(total, max(1 if pct > 0 else 0, math.ceil(total * pct / 100)))
        count = int(value)
        if count < 0:
            raise ValueError
        return min(total, count)
    except ValueError as exc:
        raise ConfigError(f"--canary {text!r}: expected a device count N or a share N%") from exc


def plan_waves(device_ids: Sequence[str], canary: int, wave_base: int, wave_factor: float) -> list[list[str]]:
    """Split targets into the canary batch and growing waves, in the given order."""
    ids = list(device_ids)
    waves: list[list[str]] = []
    if canary > 0:
        waves.append(ids[:canary])
        ids = ids[canary:]
    size = float(wave_base)
    while ids:
        n = max(1, round(size))
        waves.append(ids[:n])
        ids = ids[n:]
        size *= wave_factor
    return waves


def wave_command(kind: str) -> str:
    """The command a rollout's waves send: ``update`` for a deploy, ``rollback`` for an operator rollback."""
    return "rollback" if kind == "rollback" else "update"


def _move(e: Execution, state: ExecState, now: float, **changes: Any) -> Execution:
    return replace(e, state=check_transition(e.state, state), updated_ts=now, **changes)


def _move_rollback(e: Execution, state: ExecState, now: float, **changes: Any) -> Execution:
    """The abort rollback's sub-state: None (never sent) -> IN_PROGRESS -> SUCCEEDED / FAILED / TIMED_OUT."""
    if e.rollback_state is None:
        if state is not _E.IN_PROGRESS:
            raise RuntimeError(f"illegal rollback transition (not sent) -> {state.value}")
    else:
        check_transition(e.rollback_state, state)
    return replace(e, rollback_state=state, updated_ts=now, **changes)


def mark_sent(e: Execution, command_id: str, now: float, rollback: bool = False) -> Execution:
    """The wave command (QUEUED -> SENT, or SENT again on resume) or the abort rollback is sent.

    Persist the result before publishing: a crash in between re-sends the same id.
    """
    if rollback:
        return _move_rollback(e, _E.IN_PROGRESS, now, rollback_id=command_id, rollback_sent_ts=now)
    return _move(e, _E.SENT, now, command_id=command_id, sent_ts=now)


def _final_reason(kind: str, state: str, event: dict[str, Any]) -> str | None:
    reason = event.get("reason")
    if kind == "rollback":
        return f"now on {event.get('version')}" if state == _O.COMMITTED else str(reason or state)
    if state == _O.COMMITTED:
        return None
    return f"{state}: {reason}" if reason else state


def apply_event(e: Execution, event: dict[str, Any], now: float, kind: str = "deploy") -> Execution | None:
    """Fold one ``ota`` event of this rollout into the execution; None when nothing changes.

    In a deploy, events with ``rollback: true`` answer the rollback sent on abort; an operator
    rollback (``kind="rollback"``) counts only those.
    """
    state = event.get("state")
    if not isinstance(state, str):
        return None
    is_rollback = bool(event.get("rollback"))
    if kind == "deploy" and is_rollback:
        return _fold_abort_rollback(e, state, event, now)
    if kind == "rollback" and not is_rollback:
        return None  # not from the rollback this rollout sent
    if e.state is _E.QUEUED:
        return None  # never sent: not an answer to this rollout's command
    if e.terminal:
        # late news from a device already counted (e.g. TIMED_OUT): remember what it runs now,
        # so an abort rolls a late commit back
        return replace(e, ota_state=state, updated_ts=now) if kind == "deploy" and state != e.ota_state else None
    outcome = _OUTCOMES[kind].get(state)
    if outcome is None:
        return _move(e, _E.IN_PROGRESS, now, ota_state=state)
    return _move(e, outcome, now, ota_state=state, reason=_final_reason(kind, state, event))


def _fold_abort_rollback(e: Execution, state: str, event: dict[str, Any], now: float) -> Execution | None:
    if e.rollback_state is not _E.IN_PROGRESS:
        return None
    if state == _O.COMMITTED:
        return _move_rollback(e, _E.SUCCEEDED, now)
    if state in (_O.FAILED, _O.REJECTED, _O.ROLLED_BACK):
        return _move_rollback(e, _E.FAILED, now, reason=f"rollback failed: {event.get('reason') or state}")
    return None


def apply_reply(e: Execution, reply: dict[str, Any], command: str, now: float,
                kind: str = "deploy") -> Execution | None:
    """Fold the reply to ``command`` (the wave command, or a deploy's abort rollback) into the execution."""
    ok = bool(reply.get("ok"))
    error = str(reply.get("error") or "refused")
    if command != wave_command(kind):
        if ok or e.rollback_state is not _E.IN_PROGRESS:
            return None
        return _move_rollback(e, _E.FAILED, now, reason=f"rollback refused: {error}")
    if e.state not in _AWAITING:
        return None  # never sent, or already final
    if ok:
        return _move(e, _E.IN_PROGRESS, now) if e.state is _E.SENT else None
    return _move(e, _E.REJECTED, now, reason=f"command refused: {error}")


def apply_state(e: Execution, state: dict[str, Any], rollout: Rollout, now: float) -> Execution | None:
    """Credit a device whose retained state runs the deployed version (it finished while nobody listened)."""
    model = state.get("model") or {}
    if (rollout.kind == "deploy" and e.state in _AWAITING and isinstance(model, dict)
            and model.get("sha256") == rollout.sha256 and model.get("version") == rollout.version):
        return _move(e, _E.SUCCEEDED, now, ota_state=_O.COMMITTED.value,
                     reason="running the new version (from its retained state)")
    return None


def unanswered(execs: Sequence[Execution]) -> tuple[list[str], list[str]]:
    """Devices to re-send to after a restart: (wave commands, abort rollbacks) sent but never answered.

    The same command id goes out again and devices drop repeated ids; a device that answered
    anything is never sent its update again.
    """
    updates = [e.device_id for e in execs if e.state is _E.SENT]
    rollbacks = [e.device_id for e in execs if e.rollback_state is _E.IN_PROGRESS]
    return updates, rollbacks


def resend_due(execs: Sequence[Execution], sent_order: Mapping[str, int], last_sent: Mapping[str, float],
               policy: Policy, now: float) -> list[str]:
    """Devices whose wave command looks lost: no answer at all for a quarter of the device timeout,
    while a device sent after it has answered.

    A broker can lose a message (a node lost before it replicated, a session dropped): the same
    command id goes out again, up to three times before the device times out. ``sent_order``
    numbers the publishes; a command is only sent again once a later one was answered, so a
    broker that is merely behind (it delivers in order) is not buried under re-sends. A device
    that answered anything is never sent the command again; one that already ran it replies with
    its stored answer and runs nothing twice.
    """
    every = resend_interval(policy)
    answered = max((sent_order.get(e.device_id, -1) for e in execs if e.state not in (_E.SENT, _E.QUEUED)),
                   default=-1)
    return [e.device_id for e in execs
            if e.state is _E.SENT and sent_order.get(e.device_id, answered) < answered
            and now - last_sent.get(e.device_id, e.sent_ts or now) >= every]


def resend_interval(policy: Policy) -> float:
    """How long a sent command may go unanswered before it is sent again, s."""
    return max(2.0, policy.device_timeout_s / 4)


def summarize(execs: Sequence[Execution]) -> dict[str, int]:
    """Counts per execution state (keyed by its string), plus executed / failures."""
    by_state = Counter(e.state for e in execs)
    counts = {state.value: n for state, n in by_state.items()}
    failures = sum(n for state, n in by_state.items() if state.failure)
    counts["executed"] = by_state[_E.SUCCEEDED] + failures
    counts["failures"] = failures
    return counts


def _timeouts(execs: Sequence[Execution], policy: Policy, now: float) -> dict[str, Execution]:
    changed: dict[str, Execution] = {}
    limit = policy.device_timeout_s
    for e in execs:
        new = e
        if e.state in _AWAITING and e.sent_ts is not None and now - e.sent_ts > limit:
            new = _move(new, _E.TIMED_OUT, now,
                        reason=f"no final OTA state within {limit:g}s (last: {e.ota_state or 'no answer'})")
        if (new.rollback_state is _E.IN_PROGRESS and new.rollback_sent_ts is not None
                and now - new.rollback_sent_ts > limit):
            new = _move_rollback(new, _E.TIMED_OUT, now)
        if new is not e:
            changed[e.device_id] = new
    return changed


def _abort_reason(execs: Sequence[Execution], policy: Policy) -> str | None:
    if policy.canary > 0:
        canary = [e for e in execs if e.wave == 0]
        bad = [e for e in canary if e.state.failure]
        if bad:
            return (f"canary failed on {len(bad)} of {len(canary)} device(s): "
                    f"{bad[0].device_id}: {bad[0].reason or bad[0].state}")
    counts = summarize(execs)
    executed, failures = counts["executed"], counts["failures"]
    if executed >= policy.min_executed and failures * 100.0 > policy.max_failure_pct * executed:
        return (f"{failures} of {executed} executed device(s) failed ({100.0 * failures / executed:.0f}%), "
                f"above --max-failure-pct {policy.max_failure_pct:g}")
    return None


def decide(rollout: Rollout, execs: Sequence[Execution], policy: Policy, now: float) -> Decision:
    """The next step of a rollout, from its executions alone (call it after every batch of answers)."""
    if rollout.terminal:
        return Decision(rollout.state, rollout.current_wave, rollout.reason)
    changed = _timeouts(execs, policy, now)
    current = [changed.get(e.device_id, e) for e in execs] if changed else list(execs)
    state, wave, reason = rollout.state, rollout.current_wave, rollout.reason
    send: list[str] = []

    if state is _R.IN_PROGRESS:
        abort = _abort_reason(current, policy)
        if abort:
            state, reason = check_transition(state, _R.ABORTING), abort
        else:
            send = [e.device_id for e in current if e.wave <= wave and e.state is _E.QUEUED]
            started = [e for e in current if e.wave <= wave]
            while all(e.terminal for e in started) and not send:
                if wave + 1 < rollout.waves:
                    wave += 1
                    send = [e.device_id for e in current if e.wave == wave and e.state is _E.QUEUED]
                    started = [e for e in current if e.wave <= wave]
                else:
                    counts = summarize(current)
                    executed, failures = counts["executed"], counts["failures"]
                    if failures == 0 or failures * 100.0 <= policy.max_failure_pct * max(executed, 1):
                        state = check_transition(state, _R.SUCCEEDED)
                        reason = f"{counts.get(_E.SUCCEEDED, 0)} succeeded, {failures} failed"
                    else:
                        state = check_transition(state, _R.FAILED)
                        reason = (f"{failures} of {executed} device(s) failed, "
                                  f"above --max-failure-pct {policy.max_failure_pct:g}")
                    break

    rollback: list[str] = []
    if state is _R.ABORTING:
        for i, e in enumerate(current):
            if e.state is _E.QUEUED:
                current[i] = changed[e.device_id] = _move(e, _E.CANCELED, now,
                                                          reason="rollout aborted before this device's wave")
        if policy.rollback_on_abort:
            rollback = [e.device_id for e in current
                        if e.ota_state == _O.COMMITTED and e.rollback_state is None
                        and e.prev_version != rollout.version]
        pending = any(not e.terminal or e.rollback_state is _E.IN_PROGRESS for e in current)
        if not pending and not rollback:
            state = check_transition(state, _R.ABORTED)
    return Decision(state, wave, reason, tuple(changed.values()), tuple(send), tuple(rollback))


def cancel(rollout: Rollout, policy: Policy, reason: str) -> tuple[Rollout, Policy]:
    """A running rollout canceled by a newer one (``--force``): abort it, rolling nothing back.

    The newer rollout takes the devices over, so rolling them back would fight it; unsent waves
    are CANCELED by :func:`decide` and devices already working finish. An ending rollout is left alone.
    """
    if rollout.state is not _R.IN_PROGRESS:
        return rollout, policy
    kept = replace(policy, rollback_on_abort=False)
    return replace(rollout, state=check_transition(rollout.state, _R.ABORTING), reason=reason,
                   policy=kept.to_json()), kept
