"""The MQTT contract: topic names outside tools depend on, ids, payloads and the state machines."""

from __future__ import annotations

import pytest

from edgefleet import ids, messages, topics
from edgefleet.errors import ConfigError
from edgefleet.manifest import parse_version
from edgefleet.messages import ExecState, OtaState, RolloutState, check_transition


def test_topic_names_are_the_documented_contract():
    assert topics.state_topic("pi-1") == "edgefleet/v1/devices/pi-1/state"
    assert topics.telemetry_topic("pi-1") == "edgefleet/v1/devices/pi-1/telemetry"
    assert topics.events_topic("pi-1") == "edgefleet/v1/devices/pi-1/events"
    assert topics.results_topic("pi-1") == "edgefleet/v1/devices/pi-1/results"
    assert topics.device_cmd_topic("pi-1", "update") == "edgefleet/v1/devices/pi-1/cmd/update"
    assert topics.group_cmd_topic("store-17", "rollback") == "edgefleet/v1/groups/store-17/cmd/rollback"
    assert topics.response_topic("pi-1", "status") == "edgefleet/v1/devices/pi-1/cmd/status/response"
    assert topics.all_devices("state") == "edgefleet/v1/devices/+/state"
    assert topics.fleet_reply_topic("ops") == "edgefleet/v1/fleet/ops/responses"
    assert topics.parse_device_topic("edgefleet/v1/devices/pi-1/cmd/status/response") == ("pi-1", "cmd/status/response")
    assert topics.parse_device_topic("other/pi-1/state") is None


def test_command_topics_parse_for_the_device_and_its_group_only():
    assert topics.parse_cmd_topic("edgefleet/v1/devices/pi-1/cmd/update", "pi-1", "g") == "update"
    assert topics.parse_cmd_topic("edgefleet/v1/groups/g/cmd/rollback", "pi-1", "g") == "rollback"
    assert topics.parse_cmd_topic("edgefleet/v1/devices/pi-2/cmd/update", "pi-1", "g") is None
    assert topics.parse_cmd_topic("edgefleet/v1/devices/pi-1/cmd/status/response", "pi-1", "g") is None
    assert topics.parse_cmd_topic("edgefleet/v1/devices/pi-1/cmd/", "pi-1", "g") is None


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "x" * 65, "with space", None, 3])
def test_ids_that_would_break_topics_are_refused(bad):
    assert not ids.is_valid_id(bad)
    with pytest.raises(ConfigError, match="expected 1-64 characters"):
        ids.validate_id(bad)


def test_decode_refuses_non_objects_and_oversize():
    with pytest.raises(ValueError):
        messages.decode(b"[1,2]")
    with pytest.raises(ValueError):
        messages.decode(b" " * (messages.MAX_PAYLOAD_BYTES + 1))
    assert messages.decode(messages.encode({"a": 1})) == {"a": 1}


def test_states_travel_as_their_documented_strings():
    assert messages.encode({"state": OtaState.ROLLED_BACK}) == b'{"state":"rolled_back"}'
    assert OtaState("committed") is OtaState.COMMITTED
    assert str(ExecState.TIMED_OUT) == "TIMED_OUT"


def test_every_state_machine_refuses_an_illegal_move():
    with pytest.raises(RuntimeError, match="queued -> committed"):
        check_transition(OtaState.QUEUED, OtaState.COMMITTED)
    with pytest.raises(RuntimeError, match="SUCCEEDED -> IN_PROGRESS"):
        check_transition(ExecState.SUCCEEDED, ExecState.IN_PROGRESS)
    with pytest.raises(RuntimeError, match="ABORTED -> IN_PROGRESS"):
        check_transition(RolloutState.ABORTED, RolloutState.IN_PROGRESS)
    assert check_transition(OtaState.PROBATION, OtaState.COMMITTED) is OtaState.COMMITTED
    assert check_transition(OtaState.PROBATION, OtaState.PROBATION) is OtaState.PROBATION


@pytest.mark.parametrize("machine", [OtaState, ExecState, RolloutState])
def test_every_state_can_reach_a_terminal_state(machine):
    table = {OtaState: messages.OTA_TRANSITIONS, ExecState: messages.EXEC_TRANSITIONS,
             RolloutState: messages.ROLLOUT_TRANSITIONS}[machine]
    assert set(table) == set(machine)
    for state in machine:
        seen, todo = set(), [state]
        while todo:
            s = todo.pop()
            seen.add(s)
            todo.extend(n for n in table[s] if n not in seen)
        assert any(s.terminal for s in seen), state


def test_versions_compare_numerically():
    assert parse_version("1.10") > parse_version("1.9")
    assert parse_version("2.0.0") == parse_version("2")
