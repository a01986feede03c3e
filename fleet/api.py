"""The controller's HTTP API: a bearer token, JSON in and out, one JSON error per failure.

Routes (all but ``/v1/health`` need ``Authorization: Bearer <token>``)::

    GET  /v1/health                              {"ok": true, "controller": id, "schema": N}
    GET  /v1/rollouts                            the newest rollouts with counts
    POST /v1/rollouts                            {"kind": "deploy" | "rollback", ...} -> 201 summary
    GET  /v1/rollouts/{id}                       one rollout with every execution
    GET  /v1/rollouts/{id}/history?device=ID     one device's story
    GET  /v1/devices                             the controller's registry (state + newest telemetry)
    HEAD /v1/artifacts/{sha256}                  200 when the controller has the model, else 404
    PUT  /v1/artifacts/{sha256}                  upload a model (checked against its sha256)

Status codes by who is at fault: 400 bad request (ConfigError), 401 token, 404 unknown route or
rollout, 409 a busy target, 413 too large, 422 a bad artifact, 503 the state database is away.
A failing request never stops the server: every handler error becomes one of these.
"""

from __future__ import annotations

import hmac
import json
import re
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from edgefleet.addresses import parse_host_port
from edgefleet.errors import ArtifactError, ConfigError, EdgefleetError, TransportError
from edgefleet.messages import parse_json
from fleet.store import RolloutBusy, StoreUnavailable

__all__ = ["ApiServer", "Service", "load_token"]

MAX_JSON_BYTES = 8 * 1024 * 1024        # a deploy request carries the manifest (with golden samples)
MAX_ARTIFACT_BYTES = 1024 * 1024 * 1024  # largest model an upload may carry
_SHA = re.compile(r"^[0-9a-f]{64}$")


class Service(Protocol):
    """What the API asks of the controller (fleet.controller.Controller)."""

    controller_id: str

    def health(self) -> dict[str, Any]: ...

    def listing(self) -> list[dict[str, Any]]: ...

    def summary(self, rollout_id: str) -> dict[str, Any]: ...

    def history(self, rollout_id: str, device_id: str) -> list[dict[str, Any]]: ...

    def devices(self) -> list[dict[str, Any]]: ...

    def submit(self, request: dict[str, Any]) -> dict[str, Any]: ...

    def has_artifact(self, sha256: str) -> bool: ...

    def put_artifact(self, sha256: str, data: bytes) -> None: ...


def load_token(path: str) -> str:
    """The shared secret from a file (first line, stripped).

    Raises:
        ConfigError: unreadable, or shorter than 16 characters.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.readline().strip()
    except OSError as exc:
        raise ConfigError(f"token file {path}: {exc.strerror or exc}") from exc
    if len(token) < 16:
        raise ConfigError(f"token file {path}: expected a token of at least 16 characters "
                          "(e.g. `openssl rand -hex 32 > token`)")
    return token


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _status_of(exc: Exception) -> int:
    if isinstance(exc, _HttpError):
        return exc.status
    if isinstance(exc, StoreUnavailable):
        return 503
    if isinstance(exc, RolloutBusy):
        return 409
    if isinstance(exc, ArtifactError):
        return 422
    if isinstance(exc, ConfigError) and str(exc).startswith("unknown rollout"):
        return 404
    return 400


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _reply(self, status: int, body: Any = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _body(self, limit: int) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError as exc:
            raise _HttpError(400, "bad Content-Length") from exc
        if length > limit:
            self.close_connection = True
            raise _HttpError(413, f"request body of {length} bytes exceeds {limit}")
        return self.rfile.read(length) if length else b""

    def _json(self) -> dict[str, Any]:
        try:
            obj = parse_json(self._body(MAX_JSON_BYTES) or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise _HttpError(400, f"request body: expected a JSON object ({exc})") from exc
        if not isinstance(obj, dict):
            raise _HttpError(400, "request body: expected a JSON object")
        return obj

    def _authorized(self) -> bool:
        given = self.headers.get("Authorization", "")
        expected = f"Bearer {self.server.token}"
        return hmac.compare_digest(given.encode(), expected.encode())

    def _route(self) -> tuple[int, Any]:
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/")
        method = self.command
        svc = self.server.service
        if method == "GET" and path == "/v1/health":
            return 200, svc.health()
        if not self._authorized():
            raise _HttpError(401, "bad or missing token (Authorization: Bearer ...; see --token-file)")
        segments = path.split("/")[1:]
        if segments[:2] == ["v1", "rollouts"]:
            if len(segments) == 2 and method == "GET":
                return 200, svc.listing()
            if len(segments) == 2 and method == "POST":
                return 201, svc.submit(self._json())
            if len(segments) == 3 and method == "GET":
                return 200, svc.summary(segments[2])
            if len(segments) == 4 and segments[3] == "history" and method == "GET":
                device = (parse_qs(parts.query).get("device") or [""])[0]
                if not device:
                    raise _HttpError(400, "history: expected ?device=ID")
                return 200, svc.history(segments[2], device)
        if segments == ["v1", "devices"] and method == "GET":
            return 200, svc.devices()
        if len(segments) == 3 and segments[:2] == ["v1", "artifacts"] and method in ("HEAD", "PUT"):
            sha = segments[2]
            if not _SHA.match(sha):
                raise _HttpError(400, f"artifact id {sha!r}: expected a sha256 in hex")
            if method == "HEAD":
                return (200 if svc.has_artifact(sha) else 404), None
            svc.put_artifact(sha, self._body(MAX_ARTIFACT_BYTES))
            return 201, {"sha256": sha}
        raise _HttpError(404, f"unknown request {method} {parts.path} (see docs/fleet.md, controller API)")

    def _handle(self) -> None:
        try:
            status, body = self._route()
        except (EdgefleetError, _HttpError) as exc:
            status, body = _status_of(exc), {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 (a bug: say so in a 500, keep serving)
            self.server.on_error(exc)
            status, body = 500, {"error": f"internal error: {type(exc).__name__}: {exc}"}
        try:
            self._reply(status, body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = do_PATCH = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    token: str
    service: Service
    on_error: Callable[[Exception], None]


class ApiServer:
    """The API on ``listen`` in a background thread; TLS when a certificate and key are given."""

    def __init__(self, listen: str, service: Service, token: str, tls_cert: str | None = None,
                 tls_key: str | None = None, on_error: Callable[[Exception], None] = lambda exc: None) -> None:
        """Raises ConfigError (bad address or TLS files) or TransportError (cannot listen)."""
        host, port = parse_host_port(listen, "--listen", default_host="127.0.0.1")
        try:
            self._server = _Server((host, port), _Handler)
        except OSError as exc:
            raise TransportError(f"controller API cannot listen on {listen}: {exc}") from exc
        self._server.token, self._server.service, self._server.on_error = token, service, on_error
        self.scheme = "http"
        if tls_cert or tls_key:
            if not (tls_cert and tls_key):
                raise ConfigError("TLS: expected both --tls-cert and --tls-key")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            try:
                ctx.load_cert_chain(tls_cert, tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"TLS files {tls_cert}, {tls_key}: {exc}") from exc
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self.host = host if host not in ("0.0.0.0", "::") else "127.0.0.1"
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="controller-api", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
