"""A built-in HTTP server for model files and manifests, with Range requests so devices resume downloads.

Serves only the files it is given (by URL path -> file or bytes), never a directory listing or
anything outside. Single ranges (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) get 206; unsatisfiable
ones 416; anything else the whole file. Runs in a daemon thread (ThreadingHTTPServer, one thread
per device).

An update command names its manifest by URL, sha256 and size (:class:`ManifestRef`), so it stays
small enough for managed brokers. The fleet serves the manifest's canonical JSON, the bytes its
signature covers, which any driver of the rollout rebuilds from the stored manifest
(:func:`serve_manifest`); with ``--artifact-url`` the operator hosts ``manifest.json`` beside the
model, and :func:`hosted_manifest` checks it is the same manifest before anything is sent.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edgefleet.addresses import parse_host_port
from edgefleet.errors import ArtifactError, ConfigError, TransportError
from edgefleet.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, ManifestRef
from edgefleet.messages import parse_json
from edgefleet.signing import canonical_bytes

__all__ = ["ArtifactServer", "advertised_host", "hosted_manifest",
           "manifest_url_beside", "parse_range", "serve_manifest"]


def manifest_url_beside(model_url: str) -> str:
    """``.../v3/model.tflite`` -> ``.../v3/manifest.json``: where ``--artifact-url`` hosts the manifest."""
    return model_url.rsplit("/", 1)[0] + "/" + MANIFEST_NAME


def serve_manifest(server: ArtifactServer, raw: Mapping[str, Any]) -> ManifestRef:
    """Serve the manifest's canonical JSON at ``/{its sha256}/manifest.json`` (content-addressed)."""
    data = canonical_bytes(raw)
    return ManifestRef.of(server.add_bytes(f"/{hashlib.sha256(data).hexdigest()}/{MANIFEST_NAME}", data), data)


def hosted_manifest(url: str, raw: Mapping[str, Any], timeout_s: float = 10.0) -> ManifestRef:
    """The manifest an operator hosts at ``url``, checked to be ``raw`` (the same signed manifest).

    Devices fetch exactly these bytes; any formatting of the same manifest will do, since the
    signature covers its canonical form.

    Raises:
        TransportError: ``url`` cannot be fetched.
        ArtifactError: it is larger than MAX_MANIFEST_BYTES, not strict JSON, or another manifest.
    """
    fix = f"host the artifact's {MANIFEST_NAME} beside its model (devices fetch it from {url})"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            data = response.read(MAX_MANIFEST_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TransportError(f"cannot fetch {url}: {getattr(exc, 'reason', exc)}; {fix}") from exc
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{url}: more than {MAX_MANIFEST_BYTES} bytes; {fix}")
    try:
        hosted = canonical_bytes(parse_json(data))
    except (ValueError, UnicodeDecodeError, ArtifactError) as exc:
        raise ArtifactError(f"{url}: not a manifest ({exc}); {fix}") from exc
    if hosted != canonical_bytes(raw):
        raise ArtifactError(f"{url}: another manifest than the one deployed (sha256 of its canonical form "
                            f"{hashlib.sha256(hosted).hexdigest()[:12]}..., expected "
                            f"{hashlib.sha256(canonical_bytes(raw)).hexdigest()[:12]}...); {fix}")
    return ManifestRef.of(url, data)

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """Byte range ``(start, end_inclusive)`` from a Range header; None = whole file; "416" = unsatisfiable."""
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # multi-range or malformed: RFC 7233 allows ignoring it
    if not m.group(1):
        n = int(m.group(2))
        if n == 0:
            return "416"
        return max(0, size - n), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        return "416"
    return start, min(end, size - 1)


def advertised_host(bind_host: str) -> str:
    """The address devices should use: the bind address, or this host's outbound address for 0.0.0.0."""
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.255.255.255", 1))  # no packet is sent; picks the outbound interface
            return str(sock.getsockname()[0])
    except OSError:
        return socket.gethostname()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the rollout shows progress
        return

    def _send_file(self, head: bool) -> None:
        path = self.server.files.get(self.path.split("?", 1)[0])
        if path is None:
            self.send_error(404, "not found")
            return
        size = len(path) if isinstance(path, bytes) else path.stat().st_size
        rng = parse_range(self.headers.get("Range"), size)
        if rng == "416":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = rng if isinstance(rng, tuple) else (0, size - 1)
        length = end - start + 1
        self.send_response(206 if isinstance(rng, tuple) else 200)
        if isinstance(rng, tuple):
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if head:
            return
        if isinstance(path, bytes):
            self.wfile.write(path[start:end + 1])
            self.server.served += 1
            return
        with open(path, "rb") as fh:
            fh.seek(start)
            remaining = length
            while remaining > 0:
                block = fh.read(min(1 << 16, remaining))
                if not block:
                    break
                self.wfile.write(block)
                remaining -= len(block)
        self.server.served += 1

    def do_GET(self) -> None:
        try:
            self._send_file(head=False)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_HEAD(self) -> None:
        self._send_file(head=True)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, Path | bytes]
    served: int


class ArtifactServer:
    """Serve named files over HTTP from a background thread: ``url_for(path)`` gives the device URL."""

    def __init__(self, bind: str = "0.0.0.0:0", advertise: str | None = None) -> None:
        host, port = parse_host_port(bind, "--serve", default_host="0.0.0.0")
        try:
            self._server = _Server((host, port), _Handler)
        except OSError as exc:
            raise TransportError(f"artifact server cannot listen on {bind}: {exc}") from exc
        self._server.files = {}
        self._server.served = 0
        self.host = advertise or advertised_host(host)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="artifact-http", daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def served(self) -> int:
        """Completed GET responses (for tests and progress)."""
        return self._server.served

    def add(self, url_path: str, file: Path) -> str:
        """Serve ``file`` at ``url_path`` (starting with /) and return its full URL."""
        if not url_path.startswith("/"):
            url_path = "/" + url_path
        if not Path(file).is_file():
            raise ConfigError(f"{file}: not a file")
        self._server.files[url_path] = Path(file)
        return self.base_url + url_path

    def add_bytes(self, url_path: str, data: bytes) -> str:
        """Serve ``data`` (kept in memory: a manifest) at ``url_path`` and return its full URL."""
        if not url_path.startswith("/"):
            url_path = "/" + url_path
        self._server.files[url_path] = bytes(data)
        return self.base_url + url_path

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ArtifactServer:  # noqa: PYI034 (py3.10: no typing.Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

