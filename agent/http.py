"""Local inference endpoint in the TensorFlow Serving REST format, plus /metrics and /healthz.

Loopback by default: it has no authentication, so exposing it is a deliberate config change
(``http.listen``). Routes:

* ``POST /v1/models/{name}:predict`` -- row format ``{"instances": [...]}`` -> ``{"predictions": [...]}``
  (one entry per instance; a dict per instance for multi-output models); column format
  ``{"inputs": ...}`` -> ``{"outputs": ...}`` as TF Serving does.
* ``GET /v1/models/{name}`` -- ``{"model_version_status": [...]}`` as TF Serving.
* ``GET /metrics`` -- Prometheus text exposition.
* ``GET /healthz`` -- 200 when a model is serving, 503 otherwise.

Anything wrong in a request is a 4xx with ``{"error": "..."}``; the body size is bounded before
it is read. stdlib only (``http.server.ThreadingHTTPServer``), one thread per connection.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from edgefleet.errors import ConfigError, EdgefleetError, InputError, ModelError

__all__ = ["InferenceServer", "ServingBackend", "prometheus_lines", "to_batch"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingBackend:
    """What the HTTP layer needs from the service (plain callables: easy to wire and to test)."""

    infer: Callable[[Any, str, int], Any]
    """``infer(x, source, samples)`` -> engine outputs; raises InputError/ModelError."""
    model_info: Callable[[], dict[str, str] | None]
    input_names: Callable[[], list[str]]
    metrics_text: Callable[[], str]


def _json_ready(out: Any) -> Any:
    if isinstance(out, dict):
        return {k: _json_ready(v) for k, v in out.items()}
    arr = np.asarray(out)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ModelError("the model produced NaN or Inf")
    return arr.tolist()


def to_batch(instances: Any, input_names: list[str], max_instances: int) -> Any:
    """Row-format instances -> a batch array (one input) or dict name -> batch array.

    Raises:
        InputError: not a non-empty list, too many instances, or dict keys that do not match.
    """
    if not isinstance(instances, list) or not instances:
        raise InputError("'instances' must be a non-empty list")
    if len(instances) > max_instances:
        raise InputError(f"{len(instances)} instances, at most {max_instances} per request")
    try:
        if all(isinstance(i, dict) for i in instances):
            keys = set(instances[0])
            if any(set(i) != keys for i in instances):
                raise InputError("every instance must name the same inputs")
            return {k: np.asarray([i[k] for i in instances], dtype=np.float32) for k in keys}
        if len(input_names) > 1:
            raise InputError(f"model has inputs {input_names}: give each instance as an object")
        return np.asarray(instances, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise InputError(f"instances are not a rectangular numeric array: {exc}") from exc


def _columns(inputs: Any) -> Any:
    try:
        if isinstance(inputs, dict):
            return {k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()}
        return np.asarray(inputs, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise InputError(f"inputs are not a rectangular numeric array: {exc}") from exc


class _Handler(BaseHTTPRequestHandler):
    server_version = "edge-agent"
    protocol_version = "HTTP/1.1"
    timeout = 30  # seconds a client may stall mid-request before its socket is closed
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, allow_nan=False).encode())

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message.splitlines()[0] if message else "error"})

    def _model_name(self, path: str) -> tuple[str | None, str]:
        prefix = "/v1/models/"
        if not path.startswith(prefix):
            return None, ""
        rest = path[len(prefix):]
        name, sep, verb = rest.partition(":")
        name = name.split("/versions/")[0]
        return name, verb if sep else ""

    def do_GET(self) -> None:
        backend = self.server.backend
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            info = backend.model_info()
            self._json(200 if info else 503, {"status": "ok" if info else "no model", "model": info})
            return
        if path == "/metrics":
            self._send(200, backend.metrics_text().encode(), "text/plain; version=0.0.4")
            return
        name, verb = self._model_name(path)
        if name and not verb:
            info = backend.model_info()
            if info is None or info["name"] != name:
                self._error(404, f"model {name!r} is not served here")
                return
            self._json(200, {"model_version_status": [{
                "version": info["version"], "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""}}]})
            return
        self._error(404, f"no route for GET {path}")

    def do_POST(self) -> None:
        backend = self.server.backend
        name, verb = self._model_name(self.path.split("?", 1)[0])
        if not name or verb != "predict":
            self._drain_and_error(404, f"no route for POST {self.path}")
            return
        length_text = self.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            self._error(411, "Content-Length required")
            self.close_connection = True
            return
        length = int(length_text)
        if length > self.server.max_body_bytes:
            self._error(413, f"body of {length} bytes exceeds {self.server.max_body_bytes}")
            self.close_connection = True
            return
        body = self.rfile.read(length)
        info = backend.model_info()
        if info is None:
            self._error(503, "no model is active yet")
            return
        if info["name"] != name:
            self._error(404, f"model {name!r} is not served here (serving {info['name']!r})")
            return
        try:
            request = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            self._error(400, f"body is not JSON: {exc}")
            return
        if not isinstance(request, dict) or ("instances" in request) == ("inputs" in request):
            self._error(400, "expected a JSON object with exactly one of 'instances' or 'inputs'")
            return
        try:
            if "instances" in request:
                batch = to_batch(request["instances"], backend.input_names(), self.server.max_instances)
                out = backend.infer(batch, "http", len(request["instances"]))
                reply = {"predictions": _rows(_json_ready(out))}
            else:
                columns = _columns(request["inputs"])
                first = next(iter(columns.values())) if isinstance(columns, dict) and columns else columns
                samples = int(first.shape[0]) if isinstance(first, np.ndarray) and first.ndim > 1 else 1
                out = backend.infer(columns, "http", samples)
                reply = {"outputs": _json_ready(out)}
        except InputError as exc:
            self._error(400, str(exc))
            return
        except EdgefleetError as exc:
            self._error(500, str(exc))
            return
        except Exception as exc:  # never let one request take the server down
            log.exception("predict failed")
            self._error(500, f"internal error: {type(exc).__name__}")
            return
        self._json(200, reply)

    def _drain_and_error(self, status: int, message: str) -> None:
        length = self.headers.get("Content-Length", "0")
        if length.isdigit() and int(length) <= self.server.max_body_bytes:
            self.rfile.read(int(length))
        else:
            self.close_connection = True
        self._error(status, message)


def _rows(out: Any) -> list[Any]:
    """Column outputs -> one prediction per instance (dicts for multi-output models)."""
    if isinstance(out, dict):
        names = list(out)
        n = len(out[names[0]]) if names else 0
        return [{k: out[k][i] for k in names} for i in range(n)]
    return list(out)


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` at once (more get a 503)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog (the stdlib's 5 makes bursts of clients wait for SYN retries)

    def __init__(self, address: tuple[str, int], backend: ServingBackend, max_body_bytes: int,
                 max_instances: int, max_connections: int) -> None:
        self.backend = backend
        self.max_body_bytes = max_body_bytes
        self.max_instances = max_instances
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                body = b'{"error": "too many connections"}'
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                                + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that resets or times out mid-request is not our error: no traceback on stderr.
        log.debug("http connection from %s ended with an error", client_address,
                  exc_info=True)  # noqa: LOG014 - socketserver calls this inside its except block

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class InferenceServer:
    """Start/stop the endpoint on a background thread.

    Raises:
        ConfigError: the address cannot be bound (port in use, bad host).
    """

    def __init__(self, address: tuple[str, int], backend: ServingBackend, max_body_bytes: int = 8 << 20,
                 max_instances: int = 64, max_connections: int = 32) -> None:
        try:
            self._server = _Server(address, backend, max_body_bytes, max_instances, max_connections)
        except OSError as exc:
            raise ConfigError(f"http.listen {address[0]}:{address[1]}: cannot bind: {exc.strerror or exc}") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def prometheus_lines(metrics: dict[str, tuple[str, str, float | None]], labels: str = "") -> str:
    """``{name: (type, help, value)}`` -> text exposition (None values are skipped)."""
    out = []
    for name, (kind, help_text, value) in metrics.items():
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            continue
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.append(f"{name}{labels} {value}")
    return "\n".join(out) + "\n"

