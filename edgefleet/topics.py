"""Every MQTT topic of the contract, built and parsed here only (documented in docs/protocol.md).

Topic root ``edgefleet/v1``. Devices publish ``state`` (retained, with a retained Last Will),
``telemetry`` and ``events``; they subscribe to commands addressed to them or to their group.
Outside tools depend on these names: change them only with a new root version.
"""

from __future__ import annotations

__all__ = [
    "ROOT",
    "all_devices",
    "device_cmd_topic",
    "device_topic",
    "events_topic",
    "fleet_reply_topic",
    "group_cmd_topic",
    "is_fleet_reply_topic",
    "parse_cmd_topic",
    "parse_device_topic",
    "response_topic",
    "results_topic",
    "state_topic",
    "telemetry_topic",
]

ROOT = "edgefleet/v1"


def device_topic(device_id: str, kind: str) -> str:
    """``edgefleet/v1/devices/{id}/{kind}``: the one place device topics are spelled."""
    return f"{ROOT}/devices/{device_id}/{kind}"


def state_topic(device_id: str) -> str:
    return device_topic(device_id, "state")


def telemetry_topic(device_id: str) -> str:
    return device_topic(device_id, "telemetry")


def events_topic(device_id: str) -> str:
    return device_topic(device_id, "events")


def results_topic(device_id: str) -> str:
    return device_topic(device_id, "results")


def all_devices(kind: str) -> str:
    """A subscription over every device: ``all_devices("state")``, ``all_devices("cmd/+/response")``."""
    return f"{ROOT}/devices/+/{kind}"


def fleet_reply_topic(client_id: str) -> str:
    """Where one fleet tool connection asks devices to answer (its MQTT 5 Response Topic)."""
    return f"{ROOT}/fleet/{client_id}/responses"


def device_cmd_topic(device_id: str, name: str) -> str:
    return device_topic(device_id, f"cmd/{name}")


def group_cmd_topic(group: str, name: str) -> str:
    return f"{ROOT}/groups/{group}/cmd/{name}"


def response_topic(device_id: str, name: str) -> str:
    """Where a device answers a command when the request named no MQTT 5 Response Topic."""
    return device_topic(device_id, f"cmd/{name}/response")


def parse_device_topic(topic: str) -> tuple[str, str] | None:
    """``edgefleet/v1/devices/{id}/{kind...}`` -> ``(id, kind)``; None for anything else."""
    prefix = f"{ROOT}/devices/"
    if not topic.startswith(prefix):
        return None
    device_id, _, kind = topic[len(prefix):].partition("/")
    if not device_id or not kind:
        return None
    return device_id, kind


def is_fleet_reply_topic(topic: object) -> bool:
    """A topic a command may ask its reply on: ``edgefleet/v1/fleet/{client}/responses`` only."""
    if not isinstance(topic, str) or not topic.startswith(f"{ROOT}/fleet/") or not topic.endswith("/responses"):
        return False
    client = topic[len(f"{ROOT}/fleet/"):-len("/responses")]
    return bool(client) and not any(c in client for c in "/+#\0")


def parse_cmd_topic(topic: str, device_id: str, group: str) -> str | None:
    """The command name when ``topic`` is a command for this device or its group, else None."""
    for prefix in (device_cmd_topic(device_id, ""), group_cmd_topic(group, "")):
        if topic.startswith(prefix):
            name = topic[len(prefix):]
            return name if name and "/" not in name else None
    return None
