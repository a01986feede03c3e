"""Command handling: parse, refuse what is stale or unknown, never execute an id twice.

Deciding is separate from doing: :class:`CommandProcessor` validates a request and decides the
reply; the handlers (status, update, rollback, config) are plain callables given by the agent
(or by the simulator, which therefore cannot drift from it). Every request gets exactly one reply
with the same ``id`` (``null`` when the request had none):

* malformed JSON, no ``id``, unknown command -> ``ok: false`` and the agent keeps running;
* ``schema`` (absent: 1) above :data:`~edgefleet.messages.COMMAND_SCHEMA` -> refused: upgrade edge-agent;
* ``ts`` and ``ttl_s`` must be finite numbers; ``ts`` may not lie more than
  :data:`MAX_CLOCK_SKEW_S` in the future; ``ts + ttl_s`` in the past -> refused as expired (a
  command queued while the device was offline must not fire hours later). ``ttl_s`` is capped at
  ``max_ttl_s``, and a command without one gets ``max_ttl_s``;
* an ``id`` seen before -> the stored reply again, not executed again. An id is remembered until
  its command expires: after that a replay is refused as expired anyway. Only commands that were
  executed are remembered, so a flood of refused commands cannot push a real one out; when the
  memory is full of unexpired ids, new commands are refused as busy rather than forgetting one
  (a replay stays a replay). The memory is written to ``state_dir`` atomically after each
  executed command, so a restart does not re-execute;
* more than the rate limit -> refused (not remembered, so a retry later runs).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.atomic import atomic_write_json
from edgefleet.errors import EdgefleetError
from edgefleet.messages import COMMAND_SCHEMA, MAX_COMMAND_TTL_S, SCHEMA_TOO_NEW, decode
from edgefleet.topics import is_fleet_reply_topic, response_topic

__all__ = ["MAX_CLOCK_SKEW_S", "CommandProcessor", "CommandRejected", "Handler", "reply_topic"]

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]
"""Takes the command payload, returns the ``result`` dict; raises EdgefleetError to refuse."""

MAX_CLOCK_SKEW_S = 300.0
"""How far in the future a command's ``ts`` may be (the sender's clock runs ahead), s."""


def reply_topic(data: bytes, mqtt5_response_topic: str | None, device_id: str, name: str) -> str:
    """Where the reply to a command goes, the same on MQTT 5 and 3.1.1.

    The MQTT 5 Response Topic when the broker carried one; else the payload's ``reply_to``
    (how a 3.1.1 fleet tool asks), when it is a fleet reply topic; else the device's own
    ``.../cmd/{name}/response``. A command cannot make a device publish anywhere else.
    """
    if mqtt5_response_topic:
        return mqtt5_response_topic
    try:
        asked = decode(data).get("reply_to")
    except (ValueError, UnicodeDecodeError):
        asked = None
    return asked if is_fleet_reply_topic(asked) else response_topic(device_id, name)


class CommandRejected(EdgefleetError):
    """A handler refuses a command (bad fields, not available); the message is the reply's error."""


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class CommandProcessor:
    """Turns ``(name, payload bytes)`` into a reply dict. Thread-safe.

    ``remember`` bounds how many unexpired command ids are kept; ``rate_per_min`` and ``burst``
    bound how often commands execute; ``max_ttl_s`` bounds how long one stays valid (seconds).
    """

    def __init__(self, device_id: str, handlers: dict[str, Handler], memory_path: Path | None = None,
                 remember: int = 4096, rate_per_min: float = 60.0, burst: int = 10,
                 max_ttl_s: float = MAX_COMMAND_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self.device_id = device_id
        self.handlers = dict(handlers)
        self.memory_path = memory_path
        self.remember = remember
        self.rate_per_s = rate_per_min / 60.0
        self.burst = float(burst)
        self.max_ttl_s = max_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._refilled = time.monotonic()
        # command id -> (expires at, epoch s; the reply sent), oldest first
        self._seen: collections.OrderedDict[str, tuple[float, dict[str, Any]]] = collections.OrderedDict()
        self.executed = 0
        self._load()

    def _load(self) -> None:
        if self.memory_path is None or not self.memory_path.is_file():
            return
        try:
            entries = json.loads(self.memory_path.read_text())
            for entry in entries[-self.remember:]:
                if len(entry) == 2:  # written before ids carried their expiry: keep them the longest
                    cid, reply = entry
                    expires = self._clock() + self.max_ttl_s
                else:
                    cid, expires, reply = entry
                self._seen[str(cid)] = (float(expires), dict(reply))
        except (OSError, ValueError, TypeError) as exc:
            # A damaged memory costs at most a re-execution of a recent id; do not refuse to boot.
            log.warning("%s: ignoring unreadable command memory (%s)", self.memory_path, exc)

    def _save(self) -> None:
        if self.memory_path is not None:
            atomic_write_json(self.memory_path, [[cid, exp, reply] for cid, (exp, reply) in self._seen.items()])

    def _reply(self, cid: str | None, ok: bool, result: dict[str, Any] | None = None,
               error: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": cid, "ok": ok, "device_id": self.device_id}
        if ok:
            out["result"] = result or {}
        else:
            out["error"] = (error or "failed").splitlines()[0][:500]
        return out

    def _take_token(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.rate_per_s)
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _forget_expired(self, now: float) -> None:
        for cid in [cid for cid, (expires, _) in self._seen.items() if expires < now]:
            del self._seen[cid]

    def handle(self, name: str, data: bytes) -> dict[str, Any]:
        """Decide and (at most once per id) execute; always returns the reply to send."""
        try:
            cmd = decode(data)
        except (ValueError, UnicodeDecodeError) as exc:
            return self._reply(None, False, error=f"malformed command: {exc}")
        cid = cmd.get("id")
        if not isinstance(cid, str) or not cid or len(cid) > 128:
            return self._reply(None, False, error="malformed command: expected a string 'id' of 1-128 characters")
        with self._lock:
            now = self._clock()
            self._forget_expired(now)
            if cid in self._seen:
                return dict(self._seen[cid][1])
            decided = self._decide(name, cid, cmd, now)
            if isinstance(decided, dict):
                return decided
            if len(self._seen) >= self.remember:
                return self._reply(cid, False, error=f"busy: {len(self._seen)} unexpired commands remembered, "
                                                     "retry when older ones expire")
            if not self._take_token():
                return self._reply(cid, False, error="rate limited: too many commands, retry later")
            reply = self._execute(name, cid, cmd)
            self._seen[cid] = (decided, reply)
            try:
                self._save()
            except OSError as exc:
                log.warning("cannot persist command memory: %s", exc)
            return dict(reply)

    def _decide(self, name: str, cid: str, cmd: dict[str, Any], now: float) -> dict[str, Any] | float:
        """A refusal reply, or the epoch second the command expires when it should run."""
        if name not in self.handlers:
            return self._reply(cid, False, error=f"unknown command {name!r}: expected one of "
                                                 f"{', '.join(sorted(self.handlers))}")
        schema = cmd.get("schema", 1)
        if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
            return self._reply(cid, False, error="malformed command: 'schema' must be a positive integer")
        if schema > COMMAND_SCHEMA:
            return self._reply(cid, False, error=SCHEMA_TOO_NEW.format(schema=schema, known=COMMAND_SCHEMA))
        ts, ttl = cmd.get("ts"), cmd.get("ttl_s")
        if not _finite_number(ts):
            return self._reply(cid, False, error="malformed command: expected a finite numeric 'ts' (epoch seconds)")
        if ttl is None:
            ttl = self.max_ttl_s
        if not _finite_number(ttl) or ttl <= 0:
            return self._reply(cid, False, error="malformed command: 'ttl_s' must be a positive finite number")
        if ts > now + MAX_CLOCK_SKEW_S:
            return self._reply(cid, False, error=f"refused: 'ts' is {ts - now:.0f}s in the future "
                                                 f"(at most {MAX_CLOCK_SKEW_S:g}s of clock skew)")
        ttl = min(float(ttl), self.max_ttl_s)
        if ts + ttl < now:
            return self._reply(cid, False, error=f"expired: sent {now - ts:.0f}s ago with ttl_s {ttl:g}")
        return float(ts) + ttl

    def _execute(self, name: str, cid: str, cmd: dict[str, Any]) -> dict[str, Any]:
        self.executed += 1
        try:
            return self._reply(cid, True, result=self.handlers[name](cmd))
        except EdgefleetError as exc:
            return self._reply(cid, False, error=str(exc))
        except Exception as exc:  # a handler bug: answer, log, keep running
            log.exception("command %s %s failed", name, cid)
            return self._reply(cid, False, error=f"internal error: {type(exc).__name__}: {exc}")
