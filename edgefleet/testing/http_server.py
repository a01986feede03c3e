"""A real HTTP artifact server on loopback (stdlib http.server) that can misbehave on purpose.

Serves byte blobs by path with ``Range`` support, and per path can: cut the first ``cut_times``
responses after ``cut_after`` bytes (a broken transfer), hang after the headers (a dead server),
trickle the body (``trickle_bytes`` every ``trickle_s``: a crawling link), answer with a status
code (404, 500), or ignore Range. Every request's path and Range header is
recorded so tests can assert what the client did.

    with ArtifactServer() as srv:
        url = srv.add("/m.tflite", data, cut_after=1000, cut_times=1)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["ArtifactServer", "Route"]


@dataclass
class Route:
    data: bytes
    cut_after: int | None = None
    cut_times: int = 0
    hang_s: float = 0.0
    status: int | None = None
    ignore_range: bool = False
    trickle_s: float = 0.0      # pause between pieces of the body, s (0: send it at once)
    trickle_bytes: int = 1      # piece size when trickling, bytes
    served: int = 0


@dataclass
class _Log:
    requests: list[tuple[str, str | None]] = field(default_factory=list)


class ArtifactServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.log = _Log()
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range")
                server.log.requests.append((self.path, rng))
                route = server.routes.get(self.path)
                if route is None or route.status:
                    code = route.status if route else 404
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if rng and not route.ignore_range and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(route.data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = route.data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(route.data) - 1}/{len(route.data)}")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                route.served += 1
                if route.hang_s:
                    self.wfile.flush()
                    server._stop.wait(route.hang_s)
                    return
                if route.cut_after is not None and route.cut_times > 0:
                    route.cut_times -= 1
                    self.wfile.write(body[: route.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if route.trickle_s:
                    try:
                        for i in range(0, len(body), max(route.trickle_bytes, 1)):
                            self.wfile.write(body[i:i + max(route.trickle_bytes, 1)])
                            self.wfile.flush()
                            if server._stop.wait(route.trickle_s):
                                return
                    except OSError:  # the client gave up on us
                        self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="artifact-http",
                                        daemon=True)

    def add(self, path: str, data: bytes, **behaviour: object) -> str:
        """Serve ``data`` at ``path``; returns its URL."""
        self.routes[path] = Route(data=data, **behaviour)  # type: ignore[arg-type]
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def requests_for(self, path: str) -> list[str | None]:
        return [r for p, r in self.log.requests if p == path]

    def start(self) -> ArtifactServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ArtifactServer:  # noqa: PYI034 (py310: no typing.Self)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
