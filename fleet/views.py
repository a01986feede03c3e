"""What ``status`` shows, as JSON-ready dicts: built once here for the CLI and the controller's API."""

from __future__ import annotations

from typing import Any

from edgefleet.messages import ExecState
from fleet.rollout import summarize
from fleet.store import Store

__all__ = ["device_history", "listing", "summary"]


def summary(store: Store, rollout_id: str) -> dict[str, Any]:
    """One rollout with every execution. Raises ConfigError for an unknown id."""
    r = store.rollout(rollout_id)
    execs = store.executions(rollout_id)
    lease = store.lease(rollout_id)
    return {"rollout_id": r.id, "kind": r.kind, "state": r.state.value, "reason": r.reason, "name": r.name,
            "version": r.version, "waves": r.waves, "current_wave": r.current_wave, "created": r.created,
            "updated": r.updated, "artifact_url": r.artifact_url, "policy": r.policy, "target": r.target,
            "driver": lease.driver, "lease_until": lease.lease_until, "cancel_requested": lease.cancel_requested,
            "counts": dict(summarize(execs)),
            "rolled_back": sum(1 for e in execs if e.rollback_state is ExecState.SUCCEEDED),
            "executions": [{"device_id": e.device_id, "wave": e.wave, "state": e.state.value,
                            "ota_state": e.ota_state, "rollback": e.rollback_state and e.rollback_state.value,
                            "reason": e.reason, "prev_version": e.prev_version} for e in execs]}


def listing(store: Store, limit: int = 50) -> list[dict[str, Any]]:
    """The newest rollouts with their counts (one grouped query, however large the rollouts)."""
    rollouts = store.rollouts(limit)
    counts = store.counts([r.id for r in rollouts])
    out = []
    for r in rollouts:
        c = counts[r.id]
        failures = sum(n for state, n in c.items() if ExecState(state).failure)
        out.append({"rollout_id": r.id, "kind": r.kind, "state": r.state.value, "name": r.name,
                    "version": r.version, "created": r.created, "updated": r.updated, "target": r.target,
                    "devices": sum(c.values()), "succeeded": c.get(ExecState.SUCCEEDED.value, 0),
                    "failures": failures, "counts": c, "reason": r.reason})
    return out


def device_history(store: Store, rollout_id: str, device_id: str) -> list[dict[str, Any]]:
    """One device's story in a rollout, between the rollout's own transitions.

    Raises:
        ConfigError: unknown rollout, or the device has no history in it.
    """
    from edgefleet.errors import ConfigError

    store.rollout(rollout_id)
    rows = [h for h in store.history(rollout_id) if h["device_id"] in (device_id, None)]
    if not any(h["device_id"] == device_id for h in rows):
        raise ConfigError(f"device {device_id!r} has no history in rollout {rollout_id}")
    return rows
