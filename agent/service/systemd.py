"""systemd readiness and watchdog over the ``NOTIFY_SOCKET`` datagram socket (no dependency).

Outside systemd (no ``NOTIFY_SOCKET``) every call is a quiet no-op, so the same binary runs in a
terminal, in tests and under the unit in ``deploy/edge-agent.service``.

``WATCHDOG=1`` means "this device still answers", not "the main loop still runs": a model that
hangs inside the runtime leaves every Python thread but one alive. So the ping is sent only on
evidence of progress (:class:`ProgressWatch`): an inference finished recently, or, when no
traffic comes, a canary inference did; never while an interpreter call is past its deadline.
Without the ping systemd restarts the agent, the one way to get a hung interpreter back.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["ProgressWatch", "sd_notify", "serve_until"]

log = logging.getLogger(__name__)


def sd_notify(message: str) -> bool:
    """Tell systemd ``message`` (READY=1, WATCHDOG=1, STOPPING=1); False outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        log.debug("sd_notify failed: %s", exc)
        return False


class ProgressWatch:
    """Decides, each watchdog tick, whether the active engine has shown it still answers.

    ``alive(now)`` is False while any call is past its deadline. Otherwise it is True when a call
    finished since the last tick, or a canary finished within ``window_s``. After ``window_s / 2``
    without evidence it starts one canary (:meth:`Engine.canary`) on a helper thread, never on
    the caller's: a canary that hangs must stop the pings, not the loop (SIGTERM still works).
    No engine (no model yet) counts as alive: a restart would not bring one.
    """

    def __init__(self, engine: Callable[[], Any], window_s: float) -> None:
        self._engine = engine
        self.window_s = window_s
        self._seen: tuple[int, int] = (0, -1)  # (id of the engine, its finished_calls) at the last tick
        self._evidence_at = time.monotonic()  # start-up counts as evidence until the first window ends
        self._canary: threading.Thread | None = None
        self._withheld = False

    def alive(self, now: float) -> bool:
        engine = self._engine()
        if engine is None:
            return True
        stuck = engine.stuck_calls(now)
        if stuck.count:
            self._report(False, f"{stuck.count} inference call(s) stuck for {stuck.oldest_s:.1f} s "
                                f"(deadline {stuck.deadline_s:g} s)")
            return False
        seen = (id(engine), engine.finished_calls)
        if seen != self._seen:
            if seen[0] == self._seen[0]:
                self._evidence_at = now
            self._seen = seen
        if now - self._evidence_at >= self.window_s / 2:
            self._start_canary(engine)
        ok = now - self._evidence_at <= self.window_s
        self._report(ok, f"no inference or canary finished in the last {self.window_s:g} s")
        return ok

    def _start_canary(self, engine: Any) -> None:
        if self._canary is not None and self._canary.is_alive():
            return  # still running: if it hangs, stuck_calls says so once it passes the deadline

        def run() -> None:
            try:
                engine.canary()
            except Exception as exc:  # noqa: BLE001 - no evidence is the verdict; the reason is for the log
                log.warning("watchdog canary inference failed: %s", exc)
                return
            self._evidence_at = time.monotonic()

        self._canary = threading.Thread(target=run, name="watchdog-canary", daemon=True)
        self._canary.start()

    def _report(self, ok: bool, why: str) -> None:
        """Log when the pings stop and when they resume (not every tick)."""
        if not ok and not self._withheld:
            log.error("watchdog: withholding WATCHDOG=1: %s", why)
        elif ok and self._withheld:
            log.warning("watchdog: progress again; WATCHDOG=1 resumes")
        self._withheld = not ok


def serve_until(stop: threading.Event, engine: Callable[[], Any] | None = None) -> None:
    """READY=1, then WATCHDOG=1 on evidence of progress until ``stop``, then STOPPING=1.

    ``engine()`` returns the active engine (None before a model serves). The loop ticks four
    times per ``WatchdogSec`` (at most every second); evidence must be at most half of
    ``WatchdogSec`` old, so systemd acts within about 1.5 x ``WatchdogSec`` of the last progress.
    """
    sd_notify("READY=1")
    watchdog_s = int(os.environ.get("WATCHDOG_USEC", "0") or 0) / 1e6
    tick = min(1.0, watchdog_s / 4) if watchdog_s else 1.0
    watch = ProgressWatch(engine, watchdog_s / 2) if engine is not None and watchdog_s else None
    while not stop.wait(tick):
        if watchdog_s and (watch is None or watch.alive(time.monotonic())):
            sd_notify("WATCHDOG=1")
    sd_notify("STOPPING=1")
