"""Command handling: parse, refuse what is stale or unknown, never execute an id twice.

Deciding is separate from doing: :class:`CommandProcessor` validates a request and decides the
reply; the handlers (status, update, rollback, config) are plain callables given by the service.
Every request gets exactly one reply with the same ``id`` (``null`` when the request had none):

* malformed JSON, no ``id``, unknown command -> ``ok: false`` and the agent keeps running;
* ``ts + ttl_s`` in the past -> refused as expired (a command queued while the device was offline
  must not fire hours later);
* an ``id`` seen before -> the stored reply again, not executed again. The memory of recent ids is
  bounded and written to ``state_dir`` atomically after each command, so a restart does not
  re-execute;
* more than the rate limit -> refused (not remembered, so a retry later runs).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.atomic import atomic_write_json
from edgefleet.errors import EdgefleetError
from edgefleet.messages import decode

__all__ = ["CommandProcessor", "CommandRejected", "Handler"]

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]
"""Takes the command payload, returns the ``result`` dict; raises EdgefleetError to refuse."""


class CommandRejected(EdgefleetError):
    """A handler refuses a command (bad fields, not available); the message is the reply's error."""


class CommandProcessor:
    """Turns ``(name, payload bytes)`` into a reply dict. Thread-safe."""

    def __init__(self, device_id: str, handlers: dict[str, Handler], memory_path: Path | None = None,
                 remember: int = 256, rate_per_min: float = 60.0, burst: int = 10,
                 max_ttl_s: float = 86_400.0, clock: Callable[[], float] = time.time) -> None:
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
        self._seen: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self.executed = 0
        self._load()

    def _load(self) -> None:
        if self.memory_path is None or not self.memory_path.is_file():
            return
        try:
            entries = json.loads(self.memory_path.read_text())
            for cid, reply in entries[-self.remember:]:
                self._seen[str(cid)] = dict(reply)
        except (OSError, ValueError, TypeError) as exc:
            # A damaged memory costs at most a re-execution of a recent id; do not refuse to boot.
            log.warning("%s: ignoring unreadable command memory (%s)", self.memory_path, exc)

    def _save(self) -> None:
        if self.memory_path is not None:
            atomic_write_json(self.memory_path, [[cid, reply] for cid, reply in self._seen.items()])

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
            if cid in self._seen:
                return dict(self._seen[cid])
            reply = self._decide(name, cid, cmd)
            if reply is None:
                if not self._take_token():
                    return self._reply(cid, False, error="rate limited: too many commands, retry later")
                reply = self._execute(name, cid, cmd)
            self._seen[cid] = reply
            while len(self._seen) > self.remember:
                self._seen.popitem(last=False)
            try:
                self._save()
            except OSError as exc:
                log.warning("cannot persist command memory: %s", exc)
            return dict(reply)

    def _decide(self, name: str, cid: str, cmd: dict[str, Any]) -> dict[str, Any] | None:
        """A refusal reply, or None when the command should run."""
        if name not in self.handlers:
            return self._reply(cid, False, error=f"unknown command {name!r}: expected one of "
                                                 f"{', '.join(sorted(self.handlers))}")
        ts, ttl = cmd.get("ts"), cmd.get("ttl_s")
        if not isinstance(ts, (int, float)) or isinstance(ts, bool):
            return self._reply(cid, False, error="malformed command: expected a numeric 'ts' (epoch seconds)")
        if ttl is None:
            ttl = self.max_ttl_s
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0:
            return self._reply(cid, False, error="malformed command: 'ttl_s' must be a positive number")
        ttl = min(float(ttl), self.max_ttl_s)
        now = self._clock()
        if ts + ttl < now:
            return self._reply(cid, False, error=f"expired: sent {now - ts:.0f}s ago with ttl_s {ttl:g}")
        return None

    def _execute(self, name: str, cid: str, cmd: dict[str, Any]) -> dict[str, Any]:
        self.executed += 1
        try:
            return self._reply(cid, True, result=self.handlers[name](cmd))
        except EdgefleetError as exc:
            return self._reply(cid, False, error=str(exc))
        except Exception as exc:  # a handler bug: answer, log, keep running
            log.exception("command %s %s failed", name, cid)
            return self._reply(cid, False, error=f"internal error: {type(exc).__name__}: {exc}")
