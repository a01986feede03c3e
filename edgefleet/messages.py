"""What travels in MQTT payloads: the JSON codec, commands, and the three state machines.

Every payload is a UTF-8 JSON object of bounded size. The state machines are data: each is an
enum and a table of legal transitions, and code that moves a state asks :func:`check_transition`
first, so an illegal move fails loudly instead of being written down:

* :class:`OtaState`: one update or rollback on a device (docs/ota.md);
* :class:`ExecState`: one device's part in a rollout, as the fleet tool sees it (names follow
  AWS IoT Jobs, plus ``SENT``);
* :class:`RolloutState`: a whole rollout.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from enum import Enum
from typing import Any, TypeVar

from edgefleet.errors import ConfigError

__all__ = [
    "AGENT_UPGRADE_HINT",
    "COMMANDS",
    "COMMAND_SCHEMA",
    "DEFAULT_COMMAND_TTL_S",
    "EXEC_TRANSITIONS",
    "MAX_COMMAND_BYTES",
    "MAX_COMMAND_TTL_S",
    "MAX_PAYLOAD_BYTES",
    "OTA_TRANSITIONS",
    "ROLLOUT_TRANSITIONS",
    "SCHEMA_TOO_NEW",
    "ExecState",
    "OtaState",
    "RolloutState",
    "check_transition",
    "decode",
    "encode",
    "make_command",
    "parse_json",
]

MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
"""Largest payload either side accepts (an old-style update command carried the whole manifest)."""

COMMANDS = ("status", "update", "rollback", "config", "cancel")

MAX_COMMAND_BYTES = 8 * 1024
"""Largest command the fleet tool sends, encoded (bytes). Managed brokers cap a message (AWS IoT
Core at 128 KB, Azure IoT Hub at 256 KB), so an update names its manifest by URL instead of carrying it."""
COMMAND_SCHEMA = 2
"""Highest command schema this code understands. A command's ``schema`` (absent: 1, the update
carries its manifest inline; 2: the update names it by URL, sha256 and size) above it is refused."""
SCHEMA_TOO_NEW = "command schema {schema} is newer than this agent understands (1-{known}): upgrade edge-agent"
"""The refusal of a too-new command (``str.format`` with ``schema`` and ``known``)."""
AGENT_UPGRADE_HINT = "upgrade edge-agent"
"""The part of a refusal the fleet tool counts as "this device needs a newer agent"."""

DEFAULT_COMMAND_TTL_S = 300.0
"""Time to live the fleet tool gives a command it sends (seconds)."""
MAX_COMMAND_TTL_S = 86_400.0
"""Longest time to live a device honours; a command without ``ttl_s`` gets this one (seconds)."""


class _State(str, Enum):
    """A state that is also its JSON string (``OtaState.COMMITTED == "committed"``)."""

    def __str__(self) -> str:
        return str(self.value)


class OtaState(_State):
    """One update or rollback on a device, in the order it normally moves."""

    QUEUED = "queued"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    VALIDATING = "validating"
    INSTALLING = "installing"
    PROBATION = "probation"
    COMMITTED = "committed"
    REJECTED = "rejected"        # refused before it was ever served (bad signature, golden mismatch)
    FAILED = "failed"            # could not be carried out (download, disk, activation)
    ROLLED_BACK = "rolled_back"  # served on probation, judged unhealthy, the previous model is back

    @property
    def terminal(self) -> bool:
        return not OTA_TRANSITIONS[self]

    @property
    def failure(self) -> bool:
        return self in (OtaState.REJECTED, OtaState.FAILED, OtaState.ROLLED_BACK)


_O = OtaState
OTA_TRANSITIONS: Mapping[OtaState, frozenset[OtaState]] = {
    _O.QUEUED: frozenset({_O.DOWNLOADING, _O.REJECTED, _O.FAILED}),
    _O.DOWNLOADING: frozenset({_O.VERIFYING, _O.REJECTED, _O.FAILED}),
    # Boot resumes an update interrupted after its download by checking the staged file again.
    _O.VERIFYING: frozenset({_O.VALIDATING, _O.DOWNLOADING, _O.REJECTED, _O.FAILED}),
    _O.VALIDATING: frozenset({_O.INSTALLING, _O.DOWNLOADING, _O.REJECTED, _O.FAILED}),
    # A rollback command starts at installing (the kept slot) and ends committed without probation.
    _O.INSTALLING: frozenset({_O.PROBATION, _O.COMMITTED, _O.FAILED, _O.ROLLED_BACK}),
    _O.PROBATION: frozenset({_O.COMMITTED, _O.ROLLED_BACK, _O.FAILED}),
    _O.COMMITTED: frozenset(),
    _O.REJECTED: frozenset(),
    _O.FAILED: frozenset(),
    _O.ROLLED_BACK: frozenset(),
}


class ExecState(_State):
    """One device's part in a rollout."""

    QUEUED = "QUEUED"            # planned; no command sent yet
    SENT = "SENT"                # the command id is recorded and the command published; no answer yet
    IN_PROGRESS = "IN_PROGRESS"  # the device answered and is working on it
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    REJECTED = "REJECTED"
    TIMED_OUT = "TIMED_OUT"
    CANCELED = "CANCELED"

    @property
    def terminal(self) -> bool:
        return not EXEC_TRANSITIONS[self]

    @property
    def failure(self) -> bool:
        return self in (ExecState.FAILED, ExecState.REJECTED, ExecState.TIMED_OUT)


_E = ExecState
_E_DONE = frozenset({_E.SUCCEEDED, _E.FAILED, _E.REJECTED, _E.TIMED_OUT})
EXEC_TRANSITIONS: Mapping[ExecState, frozenset[ExecState]] = {
    _E.QUEUED: frozenset({_E.SENT, _E.CANCELED}),
    _E.SENT: frozenset({_E.IN_PROGRESS, _E.SENT}) | _E_DONE,  # SENT -> SENT: re-sent after a restart
    _E.IN_PROGRESS: _E_DONE,
    _E.SUCCEEDED: frozenset(),
    _E.FAILED: frozenset(),
    _E.REJECTED: frozenset(),
    _E.TIMED_OUT: frozenset(),
    _E.CANCELED: frozenset(),
}


class RolloutState(_State):
    IN_PROGRESS = "IN_PROGRESS"
    ABORTING = "ABORTING"    # a failure threshold was crossed: cancel the rest, roll back the committed
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ABORTED = "ABORTED"

    @property
    def terminal(self) -> bool:
        return not ROLLOUT_TRANSITIONS[self]


_R = RolloutState
ROLLOUT_TRANSITIONS: Mapping[RolloutState, frozenset[RolloutState]] = {
    _R.IN_PROGRESS: frozenset({_R.ABORTING, _R.SUCCEEDED, _R.FAILED}),
    _R.ABORTING: frozenset({_R.ABORTED}),
    _R.SUCCEEDED: frozenset(),
    _R.FAILED: frozenset(),
    _R.ABORTED: frozenset(),
}

S = TypeVar("S", OtaState, ExecState, RolloutState)


def check_transition(current: S, new: S) -> S:
    """Return ``new`` when the machine may move there from ``current``.

    Staying in the same state is always allowed (a repeated event changes nothing).

    Raises:
        RuntimeError: the move is not in the machine's table (a bug, never bad input).
    """
    table: Mapping[Any, frozenset[Any]]
    table = {OtaState: OTA_TRANSITIONS, ExecState: EXEC_TRANSITIONS, RolloutState: ROLLOUT_TRANSITIONS}[type(current)]
    if new != current and new not in table[current]:
        raise RuntimeError(f"illegal {type(current).__name__} transition {current.value} -> {new.value}")
    return new


def make_command(name: str, ttl_s: float = DEFAULT_COMMAND_TTL_S, **fields: Any) -> dict[str, Any]:
    """A command payload with a fresh id, a timestamp and a time to live.

    Raises:
        ConfigError: ``name`` is not one of :data:`COMMANDS`.
    """
    if name not in COMMANDS:
        raise ConfigError(f"unknown command {name!r}: expected one of {', '.join(COMMANDS)}")
    return {"id": uuid.uuid4().hex, "ts": time.time(), "ttl_s": ttl_s, **fields}


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes | str) -> Any:
    """Strict JSON: ``NaN`` and ``Infinity`` are refused, and so is nesting too deep to parse.

    They are not JSON, and a NaN in a timestamp or a bound makes every comparison with it false.

    Raises:
        ValueError: not strict JSON (UnicodeDecodeError, a ValueError, for bytes that are not UTF-8).
    """
    try:
        return json.loads(data, parse_constant=_refuse_constant)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def decode(data: bytes) -> dict[str, Any]:
    """Parse a payload; raises ValueError for anything that is not a bounded strict JSON object."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    obj = parse_json(data.decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004 (callers catch ValueError for any bad payload)
    return obj
