"""A store written before SENT was a state (QUEUED + command id + ``answered``) opens, migrates and resumes."""

from __future__ import annotations

import json
import queue
import sqlite3
import time
from pathlib import Path
from typing import Any

from edgefleet.messages import ExecState, RolloutState, encode
from edgefleet.mqtt import Message
from edgefleet.topics import events_topic, parse_device_topic
from fleet.rollout import Policy
from fleet.runner import RolloutRunner, command_id
from fleet.store import Store

RID = "r20260101-000000-abcdef"

# The schema and rows exactly as the fleet tool wrote them before ExecState.SENT existed.
OLD_SCHEMA = """
CREATE TABLE rollouts(
  id TEXT PRIMARY KEY, kind TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
  state TEXT NOT NULL, reason TEXT, artifact_dir TEXT, name TEXT, version TEXT, sha256 TEXT,
  manifest TEXT, signature TEXT, artifact_url TEXT, serve TEXT, policy TEXT NOT NULL,
  current_wave INTEGER NOT NULL, waves INTEGER NOT NULL, broker TEXT);
CREATE TABLE executions(
  rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, wave INTEGER NOT NULL, state TEXT NOT NULL,
  ota_state TEXT, command_id TEXT, sent_ts REAL, answered INTEGER NOT NULL DEFAULT 0,
  updated_ts REAL, reason TEXT, prev_version TEXT,
  rollback_state TEXT, rollback_id TEXT, rollback_sent_ts REAL,
  PRIMARY KEY(rollout_id, device_id));
CREATE TABLE history(
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, rollout_id TEXT, device_id TEXT,
  event TEXT NOT NULL, detail TEXT);
"""
# device: (state, sent?, answered, ota_state)
OLD_ROWS = {
    "a": ("QUEUED", False, 0, None),            # planned, never sent
    "b": ("QUEUED", True, 0, None),             # sent, no answer: the old "QUEUED with a command id"
    "c": ("IN_PROGRESS", True, 1, "installing"),
    "d": ("SUCCEEDED", True, 1, "committed"),
    "e": ("QUEUED", True, 1, None),             # answered but still QUEUED: counts as working on it
}


def _write_old_store(data_dir: Path, now: float) -> None:
    db = sqlite3.connect(data_dir / "fleet.db")
    db.executescript(OLD_SCHEMA)
    policy = Policy(canary=0, wave_base=5, device_timeout_s=60).to_json()
    db.execute("INSERT INTO rollouts VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
               (RID, "deploy", now - 30, now - 5, "IN_PROGRESS", None, None, "demo", "2", "ab" * 32,
                json.dumps({"name": "demo", "version": "2"}), None, "http://127.0.0.1:1/m/model.tflite", None,
                json.dumps(policy), 0, 1, "mqtt://127.0.0.1:1"))
    for did, (state, sent, answered, ota) in OLD_ROWS.items():
        db.execute("INSERT INTO executions(rollout_id, device_id, wave, state, ota_state, command_id, sent_ts, "
                   "answered, updated_ts, prev_version) VALUES(?,?,?,?,?,?,?,?,?,?)",
                   (RID, did, 0, state, ota, command_id(RID, did, "update") if sent else None,
                    now - 20 if sent else None, answered, now - 10, "1"))
    db.commit()
    db.close()


class _LoopbackClient:
    """Stands in for the MQTT connection: every update is answered at once with a committed event."""

    client_id = "edge-fleet-test"

    def __init__(self) -> None:
        self.messages: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.published: list[tuple[str, str]] = []  # (device, command id)

    def subscribe(self, topics: Any) -> None:
        pass

    def publish(self, topic: str, payload: dict[str, Any], **kw: Any) -> None:
        device = parse_device_topic(topic)[0]  # type: ignore[index]
        self.published.append((device, payload["id"]))
        self.committed(device)

    def committed(self, device: str) -> None:
        self.messages.put(Message(events_topic(device), encode(
            {"event": "ota", "rollout_id": RID, "version": "2", "state": "committed"}), False))

    def publish_all(self, messages: Any, stall_s: float) -> None:
        for m in messages:
            self.publish(m.topic, m.payload, response_topic=m.response_topic, correlation=m.correlation)


def test_an_old_store_migrates_sent_and_answered_into_states(tmp_path):
    _write_old_store(tmp_path, time.time())
    store = Store.open(tmp_path)
    states = {e.device_id: e.state for e in store.executions(RID)}
    assert states == {"a": ExecState.QUEUED, "b": ExecState.SENT, "c": ExecState.IN_PROGRESS,
                      "d": ExecState.SUCCEEDED, "e": ExecState.IN_PROGRESS}
    assert store.executions(RID)[1].command_id == command_id(RID, "b", "update"), "the id survives"
    columns = {row[1] for row in store._db.execute("PRAGMA table_info(executions)")}
    assert "answered" not in columns
    store.close()
    again = Store.open(tmp_path)  # a second open changes nothing
    assert {e.device_id: e.state for e in again.executions(RID)} == states
    again.close()


def test_an_old_store_resumes_resending_the_same_id_only_to_the_unanswered(tmp_path):
    _write_old_store(tmp_path, time.time())
    store = Store.open(tmp_path)
    rollout = store.rollout(RID)
    client = _LoopbackClient()
    for device in ("c", "e"):  # they committed while the fleet tool was down
        client.committed(device)
    runner = RolloutRunner(store, client, rollout, store.executions(RID), tick_s=0.01)  # type: ignore[arg-type]
    final = runner.run()
    assert final.state is RolloutState.SUCCEEDED
    assert client.published == [("b", command_id(RID, "b", "update")), ("a", command_id(RID, "a", "update"))], \
        "b gets its stored id again, a (never sent) its first; c, d, e answered and get nothing"
    assert {e.state for e in store.executions(RID)} == {ExecState.SUCCEEDED}
    store.close()
