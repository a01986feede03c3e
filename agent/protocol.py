"""The MQTT contract between devices and the fleet tool (documented in docs/protocol.md).

Topic root ``edgefleet/v1``. Devices publish ``state`` (retained, with a retained Last Will),
``telemetry`` and ``events``; they subscribe to commands addressed to them or to their group.
Every payload is UTF-8 JSON. Outside tools depend on these names: change them only with a new
root version.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from agent.errors import ConfigError

__all__ = [
    "COMMANDS",
    "ID_RULE",
    "MAX_PAYLOAD_BYTES",
    "OTA_FAILURE_STATES",
    "OTA_STATES",
    "OTA_TERMINAL_STATES",
    "ROOT",
    "decode",
    "device_cmd_topic",
    "encode",
    "events_topic",
    "group_cmd_topic",
    "make_command",
    "parse_device_topic",
    "response_topic",
    "state_topic",
    "telemetry_topic",
    "validate_id",
]

ROOT = "edgefleet/v1"
MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
"""Largest payload either side accepts (an update command carries the manifest with golden samples)."""

COMMANDS = ("status", "update", "rollback", "config")

OTA_STATES = ("queued", "downloading", "verifying", "validating", "installing", "probation",
              "committed", "rejected", "failed", "rolled_back")
OTA_TERMINAL_STATES = frozenset({"committed", "rejected", "failed", "rolled_back"})
OTA_FAILURE_STATES = frozenset({"rejected", "failed", "rolled_back"})

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ID_RULE = "1-64 characters of letters, digits, '_', '.', '-', starting with a letter or digit"


def validate_id(value: str, what: str = "device_id") -> str:
    """Device ids and group names become topic levels: no wildcards, slashes or spaces."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ConfigError(f"{what} {value!r}: expected {ID_RULE}")
    return value


def state_topic(device_id: str) -> str:
    return f"{ROOT}/devices/{device_id}/state"


def telemetry_topic(device_id: str) -> str:
    return f"{ROOT}/devices/{device_id}/telemetry"


def events_topic(device_id: str) -> str:
    return f"{ROOT}/devices/{device_id}/events"


def device_cmd_topic(device_id: str, name: str) -> str:
    return f"{ROOT}/devices/{device_id}/cmd/{name}"


def group_cmd_topic(group: str, name: str) -> str:
    return f"{ROOT}/groups/{group}/cmd/{name}"


def response_topic(device_id: str, name: str) -> str:
    """Where a device answers a command when the request named no MQTT 5 Response Topic."""
    return f"{ROOT}/devices/{device_id}/cmd/{name}/response"


def parse_device_topic(topic: str) -> tuple[str, str] | None:
    """``edgefleet/v1/devices/{id}/{kind...}`` -> ``(id, kind)``; None for anything else."""
    prefix = f"{ROOT}/devices/"
    if not topic.startswith(prefix):
        return None
    device_id, _, kind = topic[len(prefix):].partition("/")
    if not device_id or not kind:
        return None
    return device_id, kind


def make_command(name: str, ttl_s: float = 300.0, **fields: Any) -> dict[str, Any]:
    """A command payload with a fresh id, a timestamp and a time to live."""
    if name not in COMMANDS:
        raise ConfigError(f"unknown command {name!r}: expected one of {', '.join(COMMANDS)}")
    return {"id": uuid.uuid4().hex, "ts": time.time(), "ttl_s": ttl_s, **fields}


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")


def decode(data: bytes) -> dict[str, Any]:
    """Parse a payload; raises ValueError for anything that is not a bounded JSON object."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    obj = json.loads(data.decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004 (callers catch ValueError for any bad payload)
    return obj
