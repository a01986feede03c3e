"""How often the rollout driver plans: once per wave when answers only move devices along, at once when
a wave finishes (whatever the fleet's size), soon after a failure. A planner pass is O(devices), so a
large fleet answering slowly must not pay one per batch of answers."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import pytest

import fleet.runner as runner_module
from edgefleet.messages import ExecState, RolloutState, encode
from edgefleet.mqtt import Message
from edgefleet.topics import events_topic, parse_device_topic
from fleet.rollout import Policy, plan_waves
from fleet.runner import RolloutRunner
from fleet.store import Execution, Rollout, Store

RID = "r20261203-000000-pacing"


class _AnsweringClient:
    """Stands in for the MQTT connection: every update is answered, committed or failed, at
    ``per_s`` answers a second (a broker delivering one message at a time), or at once."""

    client_id = "edge-fleet-pacing"

    def __init__(self, failing: frozenset[str] = frozenset(), per_s: float = 0.0) -> None:
        self.messages: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.failing = failing
        self.sent = 0
        self._gap = 1.0 / per_s if per_s else 0.0
        self._answers: queue.SimpleQueue[Message] = queue.SimpleQueue()
        threading.Thread(target=self._deliver, daemon=True).start()

    def _deliver(self) -> None:
        due = time.monotonic()
        while True:
            msg = self._answers.get()
            due = max(due + self._gap, time.monotonic())
            time.sleep(max(0.0, due - time.monotonic()))
            self.messages.put(msg)

    def subscribe(self, topics: Any) -> None:
        pass

    def publish_all(self, messages: Any, stall_s: float) -> None:
        for m in messages:
            device = parse_device_topic(m.topic)[0]  # type: ignore[index]
            self.sent += 1
            state = "failed" if device in self.failing else "committed"
            self._answers.put(Message(events_topic(device), encode(
                {"event": "ota", "rollout_id": RID, "version": "2", "state": state, "reason": "test"}), False))


def _rollout(store: Store, devices: int, policy: Policy) -> tuple[Rollout, list[Execution]]:
    now = time.time()
    waves = plan_waves([f"dev-{i:05d}" for i in range(devices)], policy.canary, policy.wave_base,
                       policy.wave_factor)
    execs = [Execution(RID, did, w, prev_version="1", updated_ts=now) for w, ids in enumerate(waves) for did in ids]
    rollout = Rollout(id=RID, kind="deploy", created=now, updated=now, state=RolloutState.IN_PROGRESS,
                      policy=policy.to_json(), current_wave=0, waves=len(waves), name="demo", version="2",
                      artifact_url="http://127.0.0.1:1/m/model.tflite", manifest={"name": "demo", "version": "2"})
    store.create(rollout, execs, [(RID, None, "created", None)], owner=None, lease_ttl_s=10.0, force=False, now=now)
    return rollout, execs


@pytest.fixture
def planner_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    passes: list[int] = []
    real = runner_module.decide

    def counted(*args: Any, **kwargs: Any) -> Any:
        passes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_module, "decide", counted)
    return passes


def test_a_large_fleet_starts_each_wave_on_its_last_answer_not_on_a_timer(tmp_path, planner_passes):
    # 3,000 devices: above the size where the driver once stopped checking for a finished wave
    # itself and waited for the planner's next timed pass (up to a second per wave)
    store = Store.open(tmp_path)
    rollout, execs = _rollout(store, 3000, Policy(canary=1, wave_base=150, wave_factor=2.0))
    client = _AnsweringClient(per_s=3000)  # a second of answers trickling in
    started = time.monotonic()
    final = RolloutRunner(store, client, rollout, execs, tick_s=0.05).run()  # type: ignore[arg-type]
    took = time.monotonic() - started
    assert final.state is RolloutState.SUCCEEDED
    assert client.sent == 3000
    # one pass per wave (and the last), plus the idle passes for timeouts: none per batch of answers
    most = rollout.waves + 1 + int(took / runner_module.IDLE_PLAN_S)
    assert len(planner_passes) <= most, f"{len(planner_passes)} passes for {rollout.waves} waves in {took:.1f}s"
    assert took < 1.0 + rollout.waves * 0.5, f"a wave waited for a timed pass ({took:.1f}s)"
    store.close()


def test_a_failure_is_planned_on_soon_and_aborts_the_rollout(tmp_path, planner_passes):
    store = Store.open(tmp_path)
    policy = Policy(canary=1, wave_base=150, wave_factor=2.0, max_failure_pct=10.0, min_executed=5,
                    rollback_on_abort=False)
    rollout, execs = _rollout(store, 3000, policy)
    wave1 = [e.device_id for e in execs if e.wave == 1]
    client = _AnsweringClient(failing=frozenset(wave1[:40]), per_s=3000)  # 40 of the wave's 150 fail: above 10 %
    final = RolloutRunner(store, client, rollout, execs, tick_s=0.05).run()  # type: ignore[arg-type]
    assert final.state is RolloutState.ABORTED, final.reason
    assert "above --max-failure-pct" in (final.reason or "")
    assert client.sent == 1 + 150, "no device beyond the failing wave got the update"
    states = {e.state for e in store.executions(RID) if e.wave >= 2}
    assert states == {ExecState.CANCELED}
    store.close()
