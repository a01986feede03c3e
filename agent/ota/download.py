"""Fetch a model file into the staging area: bounded, resumable, retried, and never hung.

- Size: the manifest's size is checked against the device limit and the free space *before* the
  first byte, and a server sending more than the manifest says is cut off.
- Resume: a ``.part`` file left by a broken transfer (or a crash) is continued with an HTTP
  ``Range`` request; a server that ignores Range (200) restarts the file from zero.
- Retries: transport failures (5xx, resets, timeouts) retry with capped exponential backoff; a
  4xx stops at once (the artifact is not there, or we are not allowed to have it).
- Timeout: every socket operation has one, so a server that stops sending cannot hang the agent.

Schemes: ``http://``, ``https://`` (stdlib urllib) and ``file://`` (local mirror, USB stick).
Nothing downloaded here is trusted: :mod:`agent.ota.verify` checks it before any use.
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from edgefleet.errors import ArtifactError, TransportError

__all__ = ["DownloadPolicy", "DownloadResult", "check_space", "download"]


@dataclass(frozen=True)
class DownloadPolicy:
    max_bytes: int                 # largest download accepted, bytes (profile.limits.max_download_mb)
    timeout_s: float = 10.0        # per socket operation (connect, each read), s
    retries: int = 4               # attempts after the first one, for transport errors only
    backoff_s: float = 0.25        # first retry delay, s; doubles each time
    backoff_max_s: float = 5.0     # cap on one retry delay, s
    reserve_bytes: int = 16 << 20  # free space that must remain after the download, bytes
    chunk_bytes: int = 64 << 10    # read size, bytes


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
             sleep: Callable[[float], None] = time.sleep) -> DownloadResult:
    """Download ``url`` to ``dest`` (``dest`` is complete on return, exactly ``size`` bytes).

    The bytes land in ``dest`` + ``.part`` first and are renamed at the end. ``on_chunk(total)``
    is called after each chunk is written (progress and the crash hook).

    Raises:
        ArtifactError: oversize or not enough space (before starting), or the server sent more
            bytes than the manifest says.
        TransportError: a 4xx, an unsupported scheme, or transport failures after every retry.
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
    resumed_from, attempts, delay = have, 0, policy.backoff_s
    while True:
        attempts += 1
        try:
            have = _attempt(url, scheme, part, size, policy, on_chunk)
            if have == size:
                break
            raise _Retry(f"transfer ended at {have} of {size} bytes")
        except _Retry as exc:
            if attempts > policy.retries:
                raise TransportError(f"download of {url} failed after {attempts} attempts: {exc}") from None
            sleep(min(delay, policy.backoff_max_s))
            delay *= 2
    with open(part, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(part, dest)
    return DownloadResult(dest, size, attempts, resumed_from)


def _attempt(url: str, scheme: str, part: Path, size: int, policy: DownloadPolicy,
             on_chunk: Callable[[int], None] | None) -> int:
    have = part.stat().st_size if part.exists() else 0
    if have == size:
        return have
    if scheme == "file":
        path = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        if not path.is_file():
            raise TransportError(f"artifact not found: {path}")
        try:
            with open(path, "rb") as src:
                src.seek(have)
                return _copy(src, part, have, size, policy, on_chunk, append=True)
        except OSError as exc:
            raise TransportError(f"cannot read {path}: {exc}") from exc
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=policy.timeout_s)
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
        if not append:
            have = 0
        try:
            return _copy(response, part, have, size, policy, on_chunk, append=append)
        except (TimeoutError, ConnectionError, HTTPException, OSError) as exc:
            raise _Retry(f"transfer broken: {type(exc).__name__}: {exc}") from None


def _copy(src, part: Path, have: int, size: int, policy: DownloadPolicy,
          on_chunk: Callable[[int], None] | None, append: bool) -> int:
    with open(part, "ab" if append else "wb") as out:
        while True:
            block = src.read(min(policy.chunk_bytes, size - have + 1))
            if not block:
                return have
            have += len(block)
            if have > size:
                raise ArtifactError(f"server sent more than the manifest's {size} bytes; refusing the artifact")
            out.write(block)
            if on_chunk is not None:
                out.flush()
                on_chunk(have)
