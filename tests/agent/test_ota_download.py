"""The OTA download step against a real loopback HTTP server: resume, retries, limits, timeouts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.ota.download import DownloadPolicy, download
from edgefleet.errors import ArtifactError, TransportError
from edgefleet.testing.http_server import ArtifactServer

DATA = bytes(range(256)) * 400  # 100 KiB


def policy(**kw) -> DownloadPolicy:
    base = {"max_bytes": 1 << 20, "timeout_s": 2.0, "retries": 3, "backoff_s": 0.01, "reserve_bytes": 0,
            "chunk_bytes": 8192}
    base.update(kw)
    return DownloadPolicy(**base)


@pytest.fixture
def server():
    with ArtifactServer() as srv:
        yield srv


def test_download_resumes_with_range_after_a_broken_transfer(server, tmp_path: Path):
    url = server.add("/m.tflite", DATA, cut_after=30_000, cut_times=1)
    result = download(url, tmp_path / "m.tflite", len(DATA), policy())
    assert (tmp_path / "m.tflite").read_bytes() == DATA
    ranges = server.requests_for("/m.tflite")
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert int(ranges[1][6:].rstrip("-")) >= 8192, "the second request should continue, not restart"
    assert result.attempts == 2


def test_part_file_left_by_a_crash_is_continued_not_refetched(server, tmp_path: Path):
    url = server.add("/m.tflite", DATA)
    (tmp_path / "m.tflite.part").write_bytes(DATA[:50_000])
    result = download(url, tmp_path / "m.tflite", len(DATA), policy())
    assert result.resumed_from == 50_000
    assert server.requests_for("/m.tflite") == ["bytes=50000-"]
    assert (tmp_path / "m.tflite").read_bytes() == DATA


def test_server_ignoring_range_restarts_the_file_from_zero(server, tmp_path: Path):
    url = server.add("/m.tflite", DATA, ignore_range=True)
    (tmp_path / "m.tflite.part").write_bytes(b"x" * 10_000)
    download(url, tmp_path / "m.tflite", len(DATA), policy())
    assert (tmp_path / "m.tflite").read_bytes() == DATA


def test_404_stops_at_once_without_retrying(server, tmp_path: Path):
    with pytest.raises(TransportError, match="HTTP 404"):
        download(server.url("/missing.tflite"), tmp_path / "m.tflite", len(DATA), policy(retries=5))
    assert len(server.requests_for("/missing.tflite")) == 1


def test_server_errors_are_retried_then_given_up(server, tmp_path: Path):
    server.add("/m.tflite", DATA, status=503)
    with pytest.raises(TransportError, match="after 3 attempts"):
        download(server.url("/m.tflite"), tmp_path / "m.tflite", len(DATA), policy(retries=2))
    assert len(server.requests_for("/m.tflite")) == 3


def test_hung_server_times_out_instead_of_blocking(server, tmp_path: Path):
    url = server.add("/m.tflite", DATA, hang_s=30)
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="timed out|timeout"):
        download(url, tmp_path / "m.tflite", len(DATA), policy(timeout_s=0.3, retries=1))
    assert time.monotonic() - t0 < 5


def test_oversize_artifact_is_refused_before_the_first_byte(server, tmp_path: Path):
    url = server.add("/m.tflite", DATA)
    with pytest.raises(ArtifactError, match="at most"):
        download(url, tmp_path / "m.tflite", len(DATA), policy(max_bytes=len(DATA) - 1))
    assert server.requests_for("/m.tflite") == []


def test_server_sending_more_than_the_manifest_says_is_cut_off(server, tmp_path: Path):
    url = server.add("/m.tflite", DATA + b"extra payload")
    with pytest.raises(ArtifactError, match="more than the .* bytes announced"):
        download(url, tmp_path / "m.tflite", len(DATA), policy())
    assert not (tmp_path / "m.tflite").exists()


def test_full_disk_is_refused_before_downloading(server, tmp_path: Path):
    # Simulated: a reserve larger than any real free space makes the disk look full.
    url = server.add("/m.tflite", DATA)
    with pytest.raises(ArtifactError, match="not enough free disk space"):
        download(url, tmp_path / "m.tflite", len(DATA), policy(reserve_bytes=1 << 60))
    assert server.requests_for("/m.tflite") == []


def test_file_url_is_supported_and_resumable(tmp_path: Path):
    src = tmp_path / "src.tflite"
    src.write_bytes(DATA)
    (tmp_path / "m.tflite.part").write_bytes(DATA[:1000])
    result = download(src.as_uri(), tmp_path / "m.tflite", len(DATA), policy())
    assert result.resumed_from == 1000 and (tmp_path / "m.tflite").read_bytes() == DATA


def test_unknown_url_scheme_is_refused(tmp_path: Path):
    with pytest.raises(TransportError, match="scheme"):
        download("ftp://example.com/m.tflite", tmp_path / "m.tflite", 10, policy())
