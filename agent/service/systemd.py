"""systemd readiness and watchdog over the ``NOTIFY_SOCKET`` datagram socket (no dependency).

Outside systemd (no ``NOTIFY_SOCKET``) every call is a quiet no-op, so the same binary runs in a
terminal, in tests and under the unit in ``deploy/edge-agent.service``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

__all__ = ["sd_notify", "serve_until"]

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


def serve_until(stop: threading.Event) -> None:
    """READY=1, then WATCHDOG=1 at half the unit's ``WatchdogSec`` until ``stop``, then STOPPING=1."""
    sd_notify("READY=1")
    watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    tick = min(1.0, watchdog_usec / 2e6) if watchdog_usec else 1.0
    while not stop.wait(tick):
        if watchdog_usec:
            sd_notify("WATCHDOG=1")
    sd_notify("STOPPING=1")
