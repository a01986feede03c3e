"""The read buffer under paho: whatever way the network splits the bytes, paho gets the same stream."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet import bufsock
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


# -- lingering after a dribble of publishes (brokers that send a message per TCP segment) ----------
def _packet(kind: int, body: bytes) -> bytes:
    """One MQTT packet: type nibble, variable-length remaining length, body."""
    n, length = len(body), bytearray()
    while True:
        n, digit = divmod(n, 128)
        length.append(digit | (0x80 if n else 0))
        if not n:
            return bytes([kind << 4]) + bytes(length) + body


PUBLISH = _packet(3, b"\x00\x0fedgefleet/v1/x" + b"{}" * 40)
PUBACK = _packet(4, b"\x00\x07")


@settings(max_examples=300, deadline=None)
@given(packets=st.lists(st.tuples(st.integers(1, 15), st.integers(0, 400)), max_size=10), cut=st.integers(0, 5000))
def test_has_publish_finds_a_publish_wherever_it_starts_in_a_read(packets: list[tuple[int, int]], cut: int) -> None:
    data, starts = b"", []
    for kind, size in packets:
        starts.append((len(data), kind))
        data += _packet(kind, b"p" * size)
    cut = min(cut, len(data))
    assert bufsock._has_publish(data[:cut]) == any(kind == 3 and at < cut for at, kind in starts)


class _Recorder:
    def __init__(self) -> None:
        self.waits: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    recorder = _Recorder()
    monkeypatch.setattr(bufsock, "time", recorder)
    return recorder.waits


def _read_chunks(sock: ReadBufferedSocket, count: int) -> None:
    for _ in range(count):
        sock.recv(65536)


def test_a_small_read_of_publishes_makes_the_next_read_wait_for_more(waits: list[float]) -> None:
    sock = ReadBufferedSocket(_ChunkedSocket([PUBLISH, PUBLISH + PUBLISH, PUBLISH], False), linger_s=0.005)
    _read_chunks(sock, 3)
    assert waits == [0.005, 0.005], "the first read never waits; each one after a dribble does"


def test_acknowledgements_are_read_at_once_they_pace_our_own_publishing(waits: list[float]) -> None:
    # Mosquitto lets 20 publishes wait for their PUBACK: a wait per read of them would throttle a wave
    sock = ReadBufferedSocket(_ChunkedSocket([PUBACK * 3, PUBACK, PUBACK * 20, PUBLISH], False), linger_s=0.005)
    _read_chunks(sock, 4)
    assert waits == []


def test_a_burst_is_read_at_once_and_no_linger_means_no_wait(waits: list[float]) -> None:
    burst = PUBLISH * 40  # over a few KB: the broker is already batching
    sock = ReadBufferedSocket(_ChunkedSocket([burst, burst, PUBLISH], False), linger_s=0.005)
    _read_chunks(sock, 3)
    assert waits == []
    plain = ReadBufferedSocket(_ChunkedSocket([PUBLISH, PUBLISH, PUBLISH], False))
    _read_chunks(plain, 3)
    assert waits == []


@settings(max_examples=100, deadline=None)
@given(chunks=st.lists(st.sampled_from([PUBLISH, PUBACK, PUBLISH * 3, PUBACK + PUBLISH, b"\x30"]), max_size=12),
       sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=8))
def test_lingering_never_changes_the_bytes_paho_reads(chunks: list[bytes], sizes: list[int]) -> None:
    real, bufsock.time = bufsock.time, _Recorder()  # type: ignore[assignment]
    try:
        sock = ReadBufferedSocket(_ChunkedSocket(chunks, True), linger_s=0.001)
        assert _read_all(sock, sizes) == b"".join(chunks)
    finally:
        bufsock.time = real  # type: ignore[assignment]
