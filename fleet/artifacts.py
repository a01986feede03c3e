"""A built-in HTTP server for model files, with Range requests so devices resume downloads.

Serves only the files it is given (by URL path -> file), never a directory listing or anything
outside. Single ranges (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) get 206; unsatisfiable ones 416;
anything else the whole file. Runs in a daemon thread (ThreadingHTTPServer, one thread per device).
"""

from __future__ import annotations

import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edgefleet.addresses import parse_host_port
from edgefleet.errors import ConfigError, TransportError

__all__ = ["ArtifactServer", "advertised_host", "parse_range"]

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
        size = path.stat().st_size
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
    files: dict[str, Path]
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

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ArtifactServer:  # noqa: PYI034 (py3.10: no typing.Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

