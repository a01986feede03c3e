"""A read buffer under paho's socket: one recv() per burst of packets instead of three per packet.

paho-mqtt reads each packet with separate ``recv()`` calls for the command byte, every byte of
the remaining length, and the body. When a broker delivers thousands of small messages a
second (answers to a rollout, telemetry into the exporter) those system calls are most of the
network thread's CPU. :class:`ReadBufferedSocket` reads up to 64 KB at once and serves the small
reads from memory; its ``pending()`` tells paho's loop that bytes wait here (the hook paho has
for TLS), so the loop does not block in ``select()`` while a packet sits in the buffer.

Some brokers deliver one message per TCP segment however fast they come (NATS's MQTT gateway):
then every message still costs a wake-up of paho's loop, a ``select()``, a read and a write, and
the fleet tool spent a third more CPU per device on NATS than on Mosquitto. With ``linger_s``, a
read that brought only a few small messages is followed by a short wait before the next one, so
what arrives meanwhile is read, handled and acknowledged in one pass. Only after publishes:
a read of acknowledgements does not wait, because those pace our own publishing (an MQTT 5
broker's Receive Maximum, Mosquitto's 20) and a wait there would throttle it.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["ReadBufferedSocket"]

_CHUNK = 65536
_DRIBBLE_BYTES = 1024  # a read smaller than this that holds a PUBLISH: the next read waits linger_s
_PUBLISH = 3  # MQTT control packet type of PUBLISH (the high nibble of a packet's first byte)


class ReadBufferedSocket:
    """Wraps a connected (plain or TLS) socket; everything but ``recv`` and ``pending`` is the socket's.

    ``linger_s`` (0: never wait) is the wait before a read that follows a small read of publishes.
    """

    __slots__ = ("_buf", "_dribble", "_linger_s", "_pos", "_sock")

    def __init__(self, sock: Any, linger_s: float = 0.0) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0
        self._linger_s = linger_s
        self._dribble = False

    def recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` bytes: from the buffer, else one large read of the socket.

        Raises what the socket's ``recv`` raises (BlockingIOError when nothing is there); returns
        b"" once the peer closed, like a socket.
        """
        if self._pos >= len(self._buf):
            if self._dribble:
                time.sleep(self._linger_s)
            data = self._sock.recv(max(bufsize, _CHUNK))
            self._dribble = bool(self._linger_s) and 0 < len(data) < _DRIBBLE_BYTES and _has_publish(data)
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


def _has_publish(data: bytes) -> bool:
    """Whether a PUBLISH packet starts in ``data``, a read that begins at a packet boundary.

    Walks the fixed headers (type nibble, variable-length remaining length); a packet cut at the
    end of the read is fine. A read that begins mid-packet (after a 64 KB read cut one) may be
    misjudged: that only decides whether one read waits.
    """
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] >> 4 == _PUBLISH:
            return True
        length, shift, pos = 0, 0, pos + 1
        while pos < end:
            byte = data[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        pos += length
    return False
