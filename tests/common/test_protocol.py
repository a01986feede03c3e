"""The MQTT contract: topic names outside tools depend on."""

from __future__ import annotations

import pytest

from agent import protocol
from edgefleet.errors import ConfigError
from edgefleet.manifest import parse_version


def test_topic_names_are_the_documented_contract():
    assert protocol.state_topic("pi-1") == "edgefleet/v1/devices/pi-1/state"
    assert protocol.telemetry_topic("pi-1") == "edgefleet/v1/devices/pi-1/telemetry"
    assert protocol.events_topic("pi-1") == "edgefleet/v1/devices/pi-1/events"
    assert protocol.device_cmd_topic("pi-1", "update") == "edgefleet/v1/devices/pi-1/cmd/update"
    assert protocol.group_cmd_topic("store-17", "rollback") == "edgefleet/v1/groups/store-17/cmd/rollback"
    assert protocol.response_topic("pi-1", "status") == "edgefleet/v1/devices/pi-1/cmd/status/response"
    assert protocol.parse_device_topic("edgefleet/v1/devices/pi-1/cmd/status/response") == ("pi-1", "cmd/status/response")
    assert protocol.parse_device_topic("other/pi-1/state") is None


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "x" * 65, "with space"])
def test_ids_that_would_break_topics_are_refused(bad):
    with pytest.raises(ConfigError):
        protocol.validate_id(bad)


def test_decode_refuses_non_objects_and_oversize():
    with pytest.raises(ValueError):
        protocol.decode(b"[1,2]")
    with pytest.raises(ValueError):
        protocol.decode(b" " * (protocol.MAX_PAYLOAD_BYTES + 1))
    assert protocol.decode(protocol.encode({"a": 1})) == {"a": 1}


def test_versions_compare_numerically():
    assert parse_version("1.10") > parse_version("1.9")
    assert parse_version("2.0.0") == parse_version("2")
