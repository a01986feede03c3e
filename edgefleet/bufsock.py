"""A read buffer under paho's socket: one recv() per burst of packets instead of three per packet.

paho-mqtt reads each packet with separate ``recv()`` calls for the command byte, every byte of
the remaining length, and the body. When a broker delivers thousands of small messages a
second (answers to a rollout, telemetry into the exporter) those system calls are most of the
network thread's CPU. :class:`ReadBufferedSocket` reads up to 64 KB at once and serves the small
reads from memory; its ``pending()`` tells paho's loop that bytes wait here (the hook paho has
for TLS), so the loop does not block in ``select()`` while a packet sits in the buffer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ReadBufferedSocket"]

_CHUNK = 65536


class ReadBufferedSocket:
    """Wraps a connected (plain or TLS) socket; everything but ``recv`` and ``pending`` is the socket's."""

    __slots__ = ("_buf", "_pos", "_sock")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` bytes: from the buffer, else one large read of the socket.

        Raises what the socket's ``recv`` raises (BlockingIOError when nothing is there); returns
        b"" once the peer closed, like a socket.
        """
        if self._pos >= len(self._buf):
            data = self._sock.recv(max(bufsize, _CHUNK))
            if len(data) <= bufsize:
                return data
            self._buf, self._pos = data, 0
        start = self._pos
        self._pos = min(start + bufsize, len(self._buf))
        return self._buf[start:self._pos]

    def pending(self) -> int:
        """Bytes readable without touching the network: ours, plus a TLS socket's decrypted ones."""
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._buf) - self._pos + inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
