"""The read buffer under paho: whatever way the network splits the bytes, paho gets the same stream."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.bufsock import ReadBufferedSocket


class _ChunkedSocket:
    """A peer that hands out a byte stream in the given chunks, then EOF; BlockingIOError between them."""

    def __init__(self, chunks: list[bytes], stall_between: bool) -> None:
        self._chunks = list(chunks)
        self._stall = stall_between
        self._stalled = False
        self.recv_calls = 0

    def recv(self, n: int) -> bytes:
        self.recv_calls += 1
        if self._stall and not self._stalled and self._chunks:
            self._stalled = True
            raise BlockingIOError
        self._stalled = False
        if not self._chunks:
            return b""
        head = self._chunks[0]
        self._chunks[0] = head[n:]
        if not self._chunks[0]:
            self._chunks.pop(0)
        return head[:n]

    def fileno(self) -> int:
        return 7


def _read_all(sock: ReadBufferedSocket, sizes: list[int]) -> bytes:
    out = bytearray()
    i = 0
    while True:
        try:
            data = sock.recv(sizes[i % len(sizes)])
        except BlockingIOError:
            continue
        if not data:
            return bytes(out)
        out += data
        i += 1


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=3000), max_size=12),
       sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=8), stall=st.booleans())
def test_stream_split_anywhere_reads_back_identical(chunks: list[bytes], sizes: list[int], stall: bool) -> None:
    sock = ReadBufferedSocket(_ChunkedSocket(chunks, stall))
    assert _read_all(sock, sizes) == b"".join(chunks)


def test_many_small_packets_cost_one_system_read() -> None:
    # 1,000 PUBLISH-sized packets arriving at once: paho's 1-byte header reads come from memory
    inner = _ChunkedSocket([b"\x30\x10" + b"x" * 16] * 1000, stall_between=False)
    inner._chunks = [b"".join(inner._chunks)]
    sock = ReadBufferedSocket(inner)
    for _ in range(1000):
        assert sock.recv(1) == b"\x30"
        assert sock.recv(1) == b"\x10"
        assert sock.recv(16) == b"x" * 16
    assert inner.recv_calls == 1
    assert sock.pending() == 0


def test_pending_tells_paho_not_to_wait_in_select_while_bytes_are_buffered() -> None:
    sock = ReadBufferedSocket(_ChunkedSocket([b"abcdef"], stall_between=False))
    assert sock.pending() == 0
    assert sock.recv(2) == b"ab"
    assert sock.pending() == 4
    assert sock.recv(100) == b"cdef"
    assert sock.pending() == 0
    assert sock.recv(1) == b""  # the peer closed: paho sees EOF as from a socket


def test_a_peer_closing_mid_packet_is_eof_not_a_hang() -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(b"\x30\x05ab")
        a.close()
        sock = ReadBufferedSocket(b)
        assert sock.recv(1) == b"\x30"
        assert sock.recv(1) == b"\x05"
        assert sock.recv(5) == b"ab"
        assert sock.recv(3) == b""
        assert sock.fileno() == b.fileno()  # select() still sees the real socket
    finally:
        b.close()


def test_nothing_to_read_raises_like_a_nonblocking_socket() -> None:
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            ReadBufferedSocket(b).recv(1)
    finally:
        a.close()
        b.close()
