"""The rollout planner: pure decisions over executions, no MQTT, no clock of its own.

A rollout is a canary batch (wave 0) and then waves that grow by a factor. After every batch of
device answers :func:`decide` looks at all executions and says what to do next: send the next
wave, time out silent devices, abort (failure threshold passed, or any canary failed), roll back
the devices that already run the new model, or finish. :mod:`fleet.runner` does the I/O around it.

Device answers become execution states through :func:`apply_event` and :func:`apply_reply`
(OTA ``committed`` -> SUCCEEDED, ``rejected`` -> REJECTED, ``failed``/``rolled_back`` -> FAILED).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from edgefleet.errors import ConfigError
from fleet.store import EXEC_FAILURES, Execution, Rollout

__all__ = [
    "Decision",
    "Policy",
    "apply_event",
    "apply_reply",
    "decide",
    "parse_canary",
    "plan_waves",
    "summarize",
    "unanswered",
]

_OTA_TO_EXEC = {"committed": "SUCCEEDED", "rejected": "REJECTED", "failed": "FAILED", "rolled_back": "FAILED"}


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

    state: str
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


def apply_event(e: Execution, event: dict[str, Any], now: float) -> Execution | None:
    """Fold one ``ota`` event of this rollout into the execution; None when nothing changes."""
    state = event.get("state")
    if not isinstance(state, str):
        return None
    reason = event.get("reason")
    if event.get("rollback"):
        if e.rollback_state not in (None, "IN_PROGRESS"):
            return None
        if state == "committed":
            return replace(e, rollback_state="SUCCEEDED", updated_ts=now)
        if state in ("failed", "rejected", "rolled_back"):
            return replace(e, rollback_state="FAILED", updated_ts=now,
                           reason=f"rollback failed: {reason or state}")
        return None
    if e.terminal:
        # late news from a device already counted (e.g. TIMED_OUT): remember what it runs now
        return replace(e, ota_state=state, updated_ts=now) if state != e.ota_state else None
    if state in _OTA_TO_EXEC:
        new_reason = None
        if state != "committed":
            new_reason = f"{state}: {reason}" if reason else state
        return replace(e, state=_OTA_TO_EXEC[state], ota_state=state, answered=True, updated_ts=now,
                       reason=new_reason)
    return replace(e, state="IN_PROGRESS", ota_state=state, answered=True, updated_ts=now)


def apply_reply(e: Execution, reply: dict[str, Any], kind: str, now: float) -> Execution | None:
    """Fold a command reply (``update`` or ``rollback``) into the execution."""
    ok = bool(reply.get("ok"))
    error = str(reply.get("error") or "refused")
    if kind == "rollback":
        if ok or e.rollback_state != "IN_PROGRESS":
            return None
        return replace(e, rollback_state="FAILED", reason=f"rollback refused: {error}", updated_ts=now)
    if e.terminal:
        return None
    if ok:
        if e.answered:
            return None
        return replace(e, answered=True, state="IN_PROGRESS", updated_ts=now)
    return replace(e, answered=True, state="REJECTED", reason=f"command refused: {error}", updated_ts=now)


def unanswered(execs: Sequence[Execution]) -> tuple[list[str], list[str]]:
    """Devices to re-send to after a restart: (updates, rollbacks) that were sent but never answered.

    The same command id goes out again and devices drop repeated ids; a device that answered
    anything is never sent its update again.
    """
    updates = [e.device_id for e in execs if e.state == "QUEUED" and e.command_id is not None and not e.answered]
    rollbacks = [e.device_id for e in execs if e.rollback_state == "IN_PROGRESS"]
    return updates, rollbacks


def summarize(execs: Sequence[Execution]) -> dict[str, int]:
    """Counts per execution state, plus executed / failures."""
    counts: dict[str, int] = {}
    for e in execs:
        counts[e.state] = counts.get(e.state, 0) + 1
    counts["executed"] = sum(v for k, v in counts.items() if k in ("SUCCEEDED", *EXEC_FAILURES))
    counts["failures"] = sum(v for k, v in counts.items() if k in EXEC_FAILURES)
    return counts


def _timeouts(execs: Sequence[Execution], policy: Policy, now: float) -> dict[str, Execution]:
    changed: dict[str, Execution] = {}
    limit = policy.device_timeout_s
    for e in execs:
        new = e
        if e.state in ("QUEUED", "IN_PROGRESS") and e.sent_ts is not None and now - e.sent_ts > limit:
            new = replace(new, state="TIMED_OUT", updated_ts=now,
                          reason=f"no final OTA state within {limit:g}s (last: {e.ota_state or 'no answer'})")
        if (new.rollback_state == "IN_PROGRESS" and new.rollback_sent_ts is not None
                and now - new.rollback_sent_ts > limit):
            new = replace(new, rollback_state="TIMED_OUT", updated_ts=now)
        if new is not e:
            changed[e.device_id] = new
    return changed


def _abort_reason(execs: Sequence[Execution], policy: Policy) -> str | None:
    if policy.canary > 0:
        canary = [e for e in execs if e.wave == 0]
        bad = [e for e in canary if e.state in EXEC_FAILURES]
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
    current = [changed.get(e.device_id, e) for e in execs]
    state, wave, reason = rollout.state, rollout.current_wave, rollout.reason
    send: list[str] = []

    if state == "IN_PROGRESS":
        abort = _abort_reason(current, policy)
        if abort:
            state, reason = "ABORTING", abort
        else:
            send = [e.device_id for e in current if e.wave <= wave and e.state == "QUEUED" and e.command_id is None]
            started = [e for e in current if e.wave <= wave]
            while all(e.terminal for e in started) and not send:
                if wave + 1 < rollout.waves:
                    wave += 1
                    send = [e.device_id for e in current if e.wave == wave and e.state == "QUEUED"]
                    started = [e for e in current if e.wave <= wave]
                else:
                    counts = summarize(current)
                    executed, failures = counts["executed"], counts["failures"]
                    if failures == 0 or failures * 100.0 <= policy.max_failure_pct * max(executed, 1):
                        state = "SUCCEEDED"
                        reason = f"{counts.get('SUCCEEDED', 0)} succeeded, {failures} failed"
                    else:
                        state = "FAILED"
                        reason = (f"{failures} of {executed} device(s) failed, "
                                  f"above --max-failure-pct {policy.max_failure_pct:g}")
                    break

    rollback: list[str] = []
    if state == "ABORTING":
        for i, e in enumerate(current):
            if e.state == "QUEUED" and e.command_id is None:
                current[i] = changed[e.device_id] = replace(e, state="CANCELED", updated_ts=now,
                                                            reason="rollout aborted before this device's wave")
        if policy.rollback_on_abort:
            rollback = [e.device_id for e in current
                        if e.ota_state == "committed" and e.rollback_state is None
                        and e.prev_version != rollout.version]
        pending = any(not e.terminal or e.rollback_state == "IN_PROGRESS" for e in current)
        if not pending and not rollback:
            state = "ABORTED"
    return Decision(state, wave, reason, tuple(changed.values()), tuple(send), tuple(rollback))
