"""Fetch a model file into the staging area: bounded, resumable, retried, and never hung.

- Size: the announced size (the manifest's, for the model; the command's, for a schema-2
  manifest) is checked against the device limit and the free space *before* the first byte, and
  a server sending more than announced is cut off.
- Resume: a ``.part`` file left by a broken transfer (or a crash) is continued with an HTTP
  ``Range`` request; a server that ignores Range (200) restarts the file from zero.
- Retries: transport failures (5xx, resets, timeouts, a too slow transfer) retry with jittered
  exponential backoff for as long as the last progress is less than ``retry_budget_s`` old, so a
  network drop of minutes does not fail the update; a 4xx stops at once (the artifact is not
  there, or we are not allowed to have it).
- Time: every socket operation has a timeout, an attempt slower than ``min_bytes_per_s`` on
  average is cut, and the whole download has a deadline, so a server that trickles one byte at a
  time cannot hold the update (and the device's one OTA worker) for ever.
- Errors writing the local file (a full disk) are :class:`~agent.ota.slots.StorageError`, never
  retried as if the network were at fault.

Schemes: ``http://``, ``https://`` (stdlib urllib) and ``file://`` (local mirror, USB stick).
Nothing downloaded here is trusted: :mod:`agent.ota.verify` checks it before any use.
"""

from __future__ import annotations

import os
import random
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

from edgefleet.errors import ArtifactError, StorageError, TransportError

__all__ = ["DownloadPolicy", "DownloadResult", "check_space", "download"]


@dataclass(frozen=True)
class DownloadPolicy:
    max_bytes: int                 # largest download accepted, bytes (profile.limits.max_download_mb)
    timeout_s: float = 10.0        # per socket operation (connect, each read), s
    deadline_s: float = 1800.0     # whole download, every attempt and wait included, s
    min_bytes_per_s: float = 1024.0  # an attempt slower than this on average is cut (and retried), bytes/s
    speed_window_s: float = 30.0   # an attempt's average speed is judged once it has run this long, s
    retry_budget_s: float = 300.0  # transport failures are retried while the last progress is this recent, s
    retries: int = 100             # attempts after the first one, at most (transport errors only)
    backoff_s: float = 0.5         # first retry delay, s; doubles each time, each delay x [0.5, 1) jitter
    backoff_max_s: float = 30.0    # cap on one retry delay, s
    reserve_bytes: int = 16 << 20  # free space that must remain after the download, bytes
    chunk_bytes: int = 64 << 10    # largest read, bytes


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    bytes: int
    attempts: int
    resumed_from: int  # bytes already present when the first attempt started


def check_space(size: int, already: int, directory: Path, policy: DownloadPolicy) -> None:
    """Refuse an oversize artifact or one that would leave less than ``reserve_bytes`` free.

    Raises:
        ArtifactError: too large for this device, or not enough free disk space.
    """
    if size > policy.max_bytes:
        raise ArtifactError(f"artifact is {size} bytes, expected at most {policy.max_bytes} "
                            "(profile limits.max_download_mb)")
    free = shutil.disk_usage(directory).free
    needed = size - already + policy.reserve_bytes
    if free < needed:
        raise ArtifactError(f"not enough free disk space: {free} bytes free, need {needed} "
                            f"({size - already} to download + {policy.reserve_bytes} reserve)")


class _Retry(Exception):
    """A transport failure worth another attempt."""


def download(url: str, dest: Path, size: int, policy: DownloadPolicy,
             on_chunk: Callable[[int], None] | None = None,
             sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic, what: str = "artifact") -> DownloadResult:
    """Download ``url`` to ``dest`` (``dest`` is complete on return, exactly ``size`` bytes).

    ``what`` names the file in messages (the model's ``artifact``, or a schema-2 ``manifest``).

    The bytes land in ``dest`` + ``.part`` first and are renamed at the end. ``on_chunk(total)``
    is called after each chunk is written (progress, the crash hook, cancellation: whatever it
    raises ends the download, the ``.part`` file stays). ``sleep`` waits between attempts.

    Raises:
        ArtifactError: oversize or not enough space (before starting), or the server sent more
            bytes than announced (the manifest's model size, the command's manifest size).
        TransportError: a 4xx, an unsupported scheme, the deadline, or transport failures for
            longer than the retry budget.
        StorageError: the local file cannot be written (full disk, I/O error).
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https", "file"):
        raise TransportError(f"artifact_url scheme {scheme!r}: expected http, https or file")
    if dest.exists() and dest.stat().st_size == size:
        return DownloadResult(dest, size, 0, size)
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    check_space(size, have, dest.parent, policy)
    started = clock()
    clocks = _Clocks(clock, started + policy.deadline_s, started)
    resumed_from, attempts = have, 0
    while True:
        attempts += 1
        try:
            have = _attempt(url, scheme, part, size, policy, on_chunk, clocks, what)
            if have == size:
                break
            raise _Retry(f"transfer ended at {have} of {size} bytes")
        except _Retry as exc:
            now = clock()
            delay = min(policy.backoff_s * 2 ** (attempts - 1), policy.backoff_max_s) * (0.5 + random.random() / 2)
            if (attempts > policy.retries or now + delay - clocks.last_progress > policy.retry_budget_s
                    or now + delay > clocks.deadline):
                raise TransportError(f"download of {url} failed after {attempts} attempts in "
                                     f"{now - started:.0f} s: {exc}") from None
            sleep(delay)
    try:
        with open(part, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(part, dest)
    except OSError as exc:
        raise StorageError(f"cannot keep the downloaded file: {exc.strerror or exc}") from exc
    return DownloadResult(dest, size, attempts, resumed_from)


@dataclass
class _Clocks:
    now: Callable[[], float]
    deadline: float       # on ``now``'s scale
    last_progress: float  # when the last byte arrived (the retry budget counts from it)


def _attempt(url: str, scheme: str, part: Path, size: int, policy: DownloadPolicy,
             on_chunk: Callable[[int], None] | None, clocks: _Clocks, what: str) -> int:
    have = part.stat().st_size if part.exists() else 0
    if have == size:
        return have
    if scheme == "file":
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        if not path.is_file():
            raise TransportError(f"artifact not found: {path}")
        try:
            src = open(path, "rb")  # noqa: SIM115 (closed below; open errors are the source's)
        except OSError as exc:
            raise TransportError(f"cannot read {path}: {exc}") from exc
        with src:
            src.seek(have)
            got = _copy(src, part, have, size, policy, on_chunk, True, clocks, what)
        if got < size:  # a local file does not grow by waiting
            raise TransportError(f"transfer ended at {got} of {size} bytes: {path.name} is shorter than the manifest says")
        return got
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=min(policy.timeout_s,
                                                                max(clocks.deadline - clocks.now(), 0.1)))
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            part.unlink(missing_ok=True)  # our partial file does not fit the server's: start over
            raise _Retry("server refused the resume range (416)") from None
        if 400 <= exc.code < 500:
            raise TransportError(f"HTTP {exc.code} {exc.reason} for {url}; not retrying") from exc
        raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Retry(f"{type(exc).__name__}: {reason}") from None
    with response:
        append = bool(have) and response.status == 206
        return _copy(response, part, have if append else 0, size, policy, on_chunk, append, clocks, what)


def _copy(src: Any, part: Path, have: int, size: int, policy: DownloadPolicy,
          on_chunk: Callable[[int], None] | None, append: bool, clocks: _Clocks, what: str) -> int:
    """Append what ``src`` sends to ``part``; read faults are the network's, write faults the disk's."""
    read = getattr(src, "read1", src.read)  # read1: return what has arrived, so slowness is seen
    start, first = clocks.now(), have
    try:
        out = open(part, "ab" if append else "wb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise StorageError(f"cannot write the download: {exc.strerror or exc}") from exc
    with out:
        while True:
            try:
                block = read(min(policy.chunk_bytes, size - have + 1))
            except (TimeoutError, ConnectionError, HTTPException, OSError) as exc:
                raise _Retry(f"transfer broken: {type(exc).__name__}: {exc}") from None
            if not block:
                return have
            have += len(block)
            if have > size:
                raise ArtifactError(f"server sent more than the {size} bytes announced for the {what}; refusing it")
            try:
                out.write(block)
                out.flush()
            except OSError as exc:
                raise StorageError(f"cannot write the download: {exc.strerror or exc}") from exc
            if on_chunk is not None:
                on_chunk(have)
            clocks.last_progress = clocks.now()
            _check_pace(clocks, start, have - first, size - have, policy)


def _check_pace(clocks: _Clocks, start: float, got: int, left: int, policy: DownloadPolicy) -> None:
    """Raises TransportError past the deadline, _Retry when this attempt is too slow on average."""
    now = clocks.now()
    if now > clocks.deadline and left:
        raise TransportError(f"download deadline of {policy.deadline_s:g} s passed with {left} bytes still to go")
    elapsed = now - start
    if elapsed >= policy.speed_window_s and left and got / elapsed < policy.min_bytes_per_s:
        raise _Retry(f"too slow: {got / elapsed:.0f} bytes/s over {elapsed:.0f} s, expected at least "
                     f"{policy.min_bytes_per_s:g}")
