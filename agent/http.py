"""Local inference endpoint in the TensorFlow Serving REST format, plus /metrics and /healthz.

Loopback by default: it has no authentication, so exposing it is a deliberate config change
(``http.listen``). Routes (``/versions/N`` is optional and must name the version being served,
see :func:`serving_version`):

* ``POST /v1/models/{name}[/versions/N]:predict`` -- row format ``{"instances": [...]}`` ->
  ``{"predictions": [...]}`` (a dict per instance for multi-output models); column format
  ``{"inputs": ...}`` -> ``{"outputs": ...}``; ``{"b64": ...}`` values are PNG/JPEG images; an
  opt-in ``"labels": true`` (or k) adds ``"results"``: ``[[label, score], ...]`` per instance, as
  TF Serving's classify answers, leaving ``predictions`` untouched.
* ``GET /v1/models/{name}[/versions/N]`` -- ``{"model_version_status": [...]}``.
* ``GET /v1/models/{name}[/versions/N]/metadata`` -- ``model_spec`` and the ``signature_def``.
* ``GET /metrics`` -- Prometheus text exposition.
* ``GET /healthz`` -- 200 when a model is serving, 503 otherwise.

What one client can cost is bounded (:class:`HttpLimits`): body bytes per request and across
requests (503 beyond the budget), values per request before ``json.loads`` builds them (413),
time per request phase (slow clients are cut), connections (the one waiting longest on its
client is evicted for a newcomer). Every error is ``{"error": "..."}`` with its status, the
standard library's own errors too. stdlib server (``ThreadingHTTPServer``), one thread per
connection.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.images import MAX_IMAGE_PIXELS, decode_image
from edgefleet.errors import ArtifactError, ConfigError, EdgefleetError, InputError, ModelError
from edgefleet.manifest import parse_version

if TYPE_CHECKING:
    from agent.tensors import TensorInfo

__all__ = ["HttpLimits", "InferenceServer", "ServingBackend", "serving_version", "signature_def", "to_batch"]

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
"""The one signature served (TF Serving's default key); ``signature_name`` may name it or be omitted."""
_TF_DTYPES = {"float32": "DT_FLOAT", "float16": "DT_HALF", "float64": "DT_DOUBLE", "int8": "DT_INT8",
              "uint8": "DT_UINT8", "int16": "DT_INT16", "int32": "DT_INT32", "int64": "DT_INT64", "bool": "DT_BOOL"}


def _none() -> None:
    return None


@dataclass(frozen=True)
class ServingBackend:
    """What the HTTP layer needs from the service (plain callables: easy to wire and to test)."""

    infer: Callable[[Any, str, int], Any]
    """``infer(x, source, samples)`` -> engine outputs; raises InputError/ModelError."""
    model_info: Callable[[], dict[str, str] | None]
    input_names: Callable[[], list[str]]
    metrics_text: Callable[[], str]
    health: Callable[[], dict[str, Any]] | None = None
    """``health()`` -> ``{"ok": bool, "stuck_workers": n, ...}``; not ok makes ``/healthz`` a 503."""
    # Optional (defaults keep older wiring working); keep them last.
    tensors: Callable[[], tuple[Sequence[TensorInfo], Sequence[TensorInfo]] | None] = _none
    """Inputs and outputs of the active model: metadata, integer pass-through, images, value bound."""
    input_range: Callable[[], tuple[float, float] | None] = _none
    """The manifest's ``preprocessing.input_range``, for decoded images (None: 0..1)."""
    labels: Callable[[], list[str] | None] = _none
    """Class names by output index, when the model carries them."""


@dataclass(frozen=True)
class HttpLimits:
    """What one client may cost the device. Sizes in bytes, times in seconds."""

    max_body_bytes: int = 8 << 20
    """Largest request body (Content-Length or chunked total); 413 beyond."""
    max_instances: int = 64
    """Largest batch in one predict request, row or column format; 400 beyond."""
    max_connections: int = 32
    """Connections served at once."""
    max_inflight_bytes: int | None = None
    """Body bytes held by all requests together (None: 2 x max_body_bytes); 503 beyond."""
    request_timeout_s: float = 5.0
    """For the request line and headers, for the body on top of its size at ``min_body_rate``, and per write."""
    idle_timeout_s: float = 30.0
    """Keep-alive: how long a connection may wait for its next request."""
    min_body_rate: int = 256 << 10
    """Bytes per second a body must at least arrive at."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Largest ``b64`` image, decoded pixels (the directory source's bound)."""

    @property
    def inflight_bytes(self) -> int:
        return self.max_inflight_bytes if self.max_inflight_bytes is not None else 2 * self.max_body_bytes


def serving_version(version: str) -> int | None:
    """The manifest's dotted version as TF Serving's integer version (``/versions/N``, status).

    ``"3"`` -> 3 (a plain number is itself); ``"1.4.2"`` -> 1004002 and ``"2.1"`` -> 2001000
    (major x 10**6 + minor x 10**3 + patch, so dotted versions keep their order). None when the
    version has no such form (four parts, or a minor or patch above 999).
    """
    try:
        parse_version(version)
    except ArtifactError:
        return None
    parts = [int(p) for p in version.split(".")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) > 3 or any(p > 999 for p in parts[1:]):
        return None
    major, minor, patch = (*parts, 0)[:3]
    return major * 1_000_000 + minor * 1_000 + patch


def signature_def(inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo]) -> dict[str, Any]:
    """TF Serving's ``signature_def`` map for the model (the batch axis is ``-1``: batches are accepted)."""
    def spec(t: TensorInfo) -> dict[str, Any]:
        dims = [{"size": str(-1 if i == 0 else d), "name": ""} for i, d in enumerate(t.shape)]
        return {"dtype": _TF_DTYPES.get(t.dtype.name, "DT_INVALID"),
                "tensor_shape": {"dim": dims, "unknown_rank": False}, "name": t.name}

    return {SIGNATURE: {"inputs": {t.name: spec(t) for t in inputs}, "outputs": {t.name: spec(t) for t in outputs},
                        "method_name": "tensorflow/serving/predict"}}


class _PayloadTooLarge(InputError):
    """The request holds more than a valid one can (413)."""


def _json_ready(out: Any) -> Any:
    if isinstance(out, dict):
        return {k: _json_ready(v) for k, v in out.items()}
    arr = np.asarray(out)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ModelError("the model produced NaN or Inf")
    return arr.tolist()


def _value_bound(inputs: Sequence[TensorInfo] | None, max_instances: int) -> int | None:
    """Most commas a valid body can hold: a full batch's values, plus a few request keys.

    A JSON document has one comma fewer than it has scalars (at every level of nesting), so
    ``body.count(b",")`` -- one pass in C -- bounds what ``json.loads`` would build, before it
    builds it: 8 MiB of numbers are ~2 M Python floats, ~70 MB.
    """
    if not inputs:
        return None
    return max_instances * sum(int(np.prod(t.shape[1:])) for t in inputs) + 64


def _parse_json(body: bytes | bytearray) -> Any:
    try:
        return json.loads(body)
    except RecursionError as exc:
        raise InputError("body is nested too deeply") from exc
    except ValueError as exc:
        raise InputError(f"body is not JSON: {exc}") from exc


def _numeric(value: Any, info: TensorInfo | None, what: str) -> np.ndarray:
    """JSON numbers -> array. Integers that fit an integer input keep its dtype; the rest is float32.

    So pixel values sent to a uint8/int8 model reach it unchanged instead of being re-quantized.
    """
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(f"{what} are not a rectangular numeric array: {exc}") from exc
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{what} are not a rectangular numeric array (got {arr.dtype.name} values)")
    if info is not None and info.dtype.kind in "iu" and arr.dtype.kind in "iu" and arr.size:
        limits = np.iinfo(info.dtype)
        if limits.min <= arr.min() and arr.max() <= limits.max:
            return arr.astype(info.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    if out.size and not np.isfinite(out).all():
        raise InputError(f"{what}: every value must be a finite number within float32 range")
    return out


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


@dataclass(frozen=True)
class _Decoder:
    """How JSON values become model inputs for one request (the model's tensors, image settings)."""

    infos: dict[str, TensorInfo]
    input_range: tuple[float, float] | None = None
    max_pixels: int = MAX_IMAGE_PIXELS
    image_lock: Any = None

    def tensor(self, value: Any, name: str | None, what: str) -> np.ndarray:
        """One input's value: numbers, one ``{"b64"}`` image, or a list of images."""
        info = self.infos.get(name) if name is not None else None
        if _is_b64(value):
            return self._image(value["b64"], info, what)
        if isinstance(value, list) and value and all(_is_b64(v) for v in value):
            return np.stack([self._image(v["b64"], info, f"{what}[{i}]") for i, v in enumerate(value)])
        return _numeric(value, info, what)

    def _image(self, text: str, info: TensorInfo | None, what: str) -> np.ndarray:
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"{what}: 'b64' is not base64: {exc}") from exc
        with self.image_lock or _NO_LOCK:  # one decode at a time: its transient memory is one image's
            return decode_image(io.BytesIO(data), info.shape if info is not None else None, self.input_range,
                                what, self.max_pixels)


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()


def to_batch(instances: Any, input_names: list[str], max_instances: int, decoder: _Decoder | None = None) -> Any:
    """Row-format instances -> a batch array (one input) or dict name -> batch array.

    Raises:
        InputError: not a non-empty list, too many instances, or dict keys that do not match.
    """
    decoder = decoder or _Decoder({})
    if not isinstance(instances, list) or not instances:
        raise InputError("'instances' must be a non-empty list")
    if len(instances) > max_instances:
        raise InputError(f"{len(instances)} instances, at most {max_instances} per request")
    if all(isinstance(i, dict) and not _is_b64(i) for i in instances):
        keys = set(instances[0])
        if any(set(i) != keys for i in instances):
            raise InputError("every instance must name the same inputs")
        return {k: decoder.tensor([i[k] for i in instances], k, "instances") for k in keys}
    if len(input_names) > 1:
        raise InputError(f"model has inputs {input_names}: give each instance as an object")
    return decoder.tensor(instances, input_names[0] if input_names else None, "instances")


def _columns(inputs: Any, input_names: list[str], decoder: _Decoder) -> Any:
    if isinstance(inputs, dict) and not _is_b64(inputs):
        return {k: decoder.tensor(v, k, f"inputs[{k!r}]") for k, v in inputs.items()}
    return decoder.tensor(inputs, input_names[0] if len(input_names) == 1 else None, "inputs")


def _column_samples(columns: Any, decoder: _Decoder) -> int:
    """Instances in a column request: a column's first axis when it has the model input's rank."""
    items = columns.items() if isinstance(columns, dict) else [(None, columns)]
    counts = [1]
    for name, arr in items:
        info = decoder.infos.get(name) if name is not None else next(iter(decoder.infos.values()), None)
        rank = len(info.shape) if info is not None else 2
        if arr.ndim >= max(rank, 1):
            counts.append(int(arr.shape[0]))
    return max(counts)


def _labels_k(request: dict[str, Any]) -> int:
    """The opt-in ``labels`` field: 0 (absent or false), 1 (true) or k best classes."""
    value = request.get("labels", False)
    if value is False or value is None:
        return 0
    if value is True:
        return 1
    if isinstance(value, int) and value >= 1:
        return value
    raise InputError(f"'labels' must be true or a number of classes >= 1, got {value!r}")


def _top_labels(out: Any, labels: list[str], k: int) -> list[list[list[Any]]]:
    """Per instance ``[[label, score], ...]``, best first (TF Serving's classify ``results``)."""
    scores = None if isinstance(out, dict) else np.asarray(out, dtype=np.float64)
    if scores is None or scores.ndim == 0 or scores.shape[-1] < 2:
        raise InputError("'labels' needs a classifier: one output with a score per class")
    rows = scores.reshape(-1, scores.shape[-1])
    order = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    return [[[labels[i] if i < len(labels) else str(i), float(row[i])] for i in idx]
            for row, idx in zip(rows, order)]


@dataclass(frozen=True)
class _Route:
    name: str
    version: str | None
    label: str | None
    tail: str
    """``""`` (status), ``"/metadata"`` or ``":verb"``."""


_MODEL_PATH = re.compile(r"/v1/models/([^/:]+)(?:/versions/([^/:]+)|/labels/([^/:]+))?(/metadata|:[A-Za-z]+)?")
_GET = ("GET", "HEAD")


def _route(path: str) -> _Route | None:
    m = _MODEL_PATH.fullmatch(path)
    return _Route(m[1], m[2], m[3], m[4] or "") if m else None


def _allowed(path: str) -> tuple[str, ...]:
    """The methods ``path`` answers; () for no such route."""
    if path in ("/healthz", "/metrics"):
        return _GET
    route = _route(path)
    if route is None:
        return ()
    if route.tail == ":predict":
        return ("POST",)
    return _GET if route.tail in ("", "/metadata") else ()


class _DeadlineReader(io.RawIOBase):
    """Socket reads that fail once the current phase's deadline has passed.

    A socket timeout restarts with every byte, so a client trickling a byte a second would hold
    its connection for ever; a deadline per phase (next request, headers, body) cannot be stretched.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the client took too long")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    server_version = "edge-agent"
    protocol_version = "HTTP/1.1"
    server: _Server
    _body_done = False
    _reserved = 0
    _linger = False

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s " + format, self.address_string(), *args)

    # -- connection life: deadlines and the eviction state ---------------------------------
    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib's unbounded reader: replaced by one with deadlines
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, 64 << 10)

    def handle_one_request(self) -> None:
        limits = self.server.limits
        self._reader.deadline = time.monotonic() + limits.idle_timeout_s
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except OSError:  # TimeoutError included: idle too long
            self.close_connection = True
            return
        self._reader.deadline = time.monotonic() + limits.request_timeout_s
        self._body_done = self._linger = False
        try:
            super().handle_one_request()
        finally:
            self.server.budget.give(self._reserved)
            self._reserved = 0
            self.server.waiting(self.connection)
        if self._linger:
            self._discard_unread()

    def _discard_unread(self) -> None:
        """After an error reply to a request whose body was not read: take in and drop what the
        client is still sending (fixed buffer, bounded in bytes and time), so it gets to read the
        reply instead of a connection reset."""
        limits = self.server.limits
        self._reader.deadline = time.monotonic() + limits.request_timeout_s
        budget, buffer = 4 * limits.max_body_bytes, bytearray(64 << 10)
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            while budget > 0 and (n := self._reader.readinto(buffer)):
                budget -= n
        except OSError:
            pass

    def parse_request(self) -> bool:
        # POST stays evictable until its body is in; other methods have nothing more to read.
        return super().parse_request() and (self.command == "POST" or self._working())

    def _working(self) -> bool:
        """Leave the evictable state; False when this connection was evicted meanwhile."""
        if self.server.working(self.connection):
            return True
        self.close_connection = True
        return False

    # -- replies -----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str = "application/json",
              headers: Sequence[tuple[str, str]] = ()) -> None:
        self.connection.settimeout(self.server.limits.request_timeout_s)  # a client that never reads
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: Sequence[tuple[str, str]] = ()) -> None:
        self._send(status, json.dumps(obj, allow_nan=False).encode(), headers=headers)

    def _error(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        if not self._body_done and self._has_body():
            self.close_connection = self._linger = True  # an unread body would be read as the next request
        self._json(status, {"error": message.splitlines()[0] if message else "error"}, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own errors (bad request line, 414, 431, 501) as JSON, not HTML."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparsed request line: still answer with a status line
            self.request_version = "HTTP/1.0"
        self._json(code, {"error": message or self.responses.get(code, ("error",))[0]})

    def _has_body(self) -> bool:
        headers = getattr(self, "headers", None)
        if headers is None:
            return False
        return "Transfer-Encoding" in headers or headers.get("Content-Length", "0").strip() not in ("", "0")

    def _check_method(self, path: str) -> bool:
        allowed = _allowed(path)
        if not allowed:
            self._error(404, f"no route for {self.command} {path}")
            return False
        if self.command not in allowed:
            self._error(405, f"{path} answers {', '.join(allowed)}, not {self.command}",
                        [("Allow", ", ".join(allowed))])
            return False
        return True

    def _served(self, route: _Route) -> dict[str, str] | None:
        """The model info when ``route`` names the model (and version) being served, else an error reply."""
        if route.label is not None:
            self._error(404, f"version labels are not supported here: ask for /versions/N ({route.label!r})")
            return None
        if route.version is not None and not route.version.isdigit():
            self._error(400, f"version {route.version!r}: expected an integer")
            return None
        info = self.server.backend.model_info()
        if info is None:
            self._error(503, "no model is active yet")
            return None
        number = serving_version(info["version"])
        asked = f"Specific({route.name}, {route.version})" if route.version is not None else f"Latest({route.name})"
        if info["name"] != route.name or (route.version is not None and int(route.version) != number):
            self._error(404, f"Servable not found for request: {asked} (serving {info['name']!r} "
                             f"version {number})")
            return None
        return info

    # -- methods -----------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self.do_GET()  # _send leaves the body out

    def do_OPTIONS(self) -> None:
        path = self.path.split("?", 1)[0]
        allowed = _allowed(path)
        if not allowed:
            self._error(404, f"no route for OPTIONS {path}")
            return
        self._json(200, {}, [("Allow", ", ".join((*allowed, "OPTIONS")))])

    def _refuse_method(self) -> None:
        self._check_method(self.path.split("?", 1)[0])  # never allowed: a 404 or a 405 with Allow

    do_PUT = do_DELETE = do_PATCH = _refuse_method

    def do_GET(self) -> None:
        backend = self.server.backend
        path = self.path.split("?", 1)[0]
        if path == "/healthz":  # 503 without a model, or while an inference call is stuck
            info = backend.model_info()
            health = backend.health() if backend.health is not None else {}
            ok = bool(info) and health.get("ok", True) is True
            status = "ok" if ok else "no model" if not info else "stuck"
            self._json(200 if ok else 503, {**health, "ok": ok, "status": status, "model": info})
            return
        if path == "/metrics":
            self._send(200, backend.metrics_text().encode(), "text/plain; version=0.0.4; charset=utf-8")
            return
        if not self._check_method(path):
            return
        route = _route(path)
        assert route is not None
        info = self._served(route)
        if info is None:
            return
        version = str(serving_version(info["version"]) or 0)
        if route.tail != "/metadata":
            self._json(200, {"model_version_status": [{
                "version": version, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})
            return
        tensors = backend.tensors()
        if tensors is None:
            self._error(503, "the model's signature is not known yet")
            return
        self._json(200, {"model_spec": {"name": info["name"], "signature_name": "", "version": version},
                         "metadata": {"signature_def": {"signature_def": signature_def(*tensors)}}})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if not self._check_method(path):
            return
        route = _route(path)
        assert route is not None
        body = self._read_body()
        if body is None or not self._working():
            return
        if self._served(route) is None:
            return
        try:
            reply = self._predict(body)
        except _PayloadTooLarge as exc:
            self._error(413, str(exc))
            return
        except InputError as exc:
            self._error(400, str(exc))
            return
        except EdgefleetError as exc:
            self._error(getattr(exc, "http_status", 500), str(exc))
            return
        except Exception as exc:  # never let one request take the server down
            log.exception("predict failed")
            self._error(500, f"internal error: {type(exc).__name__}")
            return
        self._json(200, reply)

    def _predict(self, body: bytes | bytearray) -> dict[str, Any]:
        """Bound, parse, convert, infer, shape the reply.

        Raises:
            InputError: the client's fault (_PayloadTooLarge: more values than a full batch holds).
            EdgefleetError: the model's.
        """
        server, backend = self.server, self.server.backend
        tensors = backend.tensors()
        inputs = tensors[0] if tensors is not None else None
        limit = _value_bound(inputs, server.limits.max_instances)
        if limit is not None and body.count(b",") > limit:
            raise _PayloadTooLarge(f"body holds more than {limit} values, more than "
                                   f"{server.limits.max_instances} instances of the model input")
        request = _parse_json(body)
        if not isinstance(request, dict) or ("instances" in request) == ("inputs" in request):
            raise InputError("expected a JSON object with exactly one of 'instances' or 'inputs'")
        signature = request.get("signature_name") or SIGNATURE
        if signature != SIGNATURE:
            raise InputError(f"signature {signature!r} not found: the model has {SIGNATURE!r}")
        k = _labels_k(request)
        labels = backend.labels() if k else None
        if k and not labels:
            raise InputError("'labels' asked for, but the model carries no class labels")
        names = [t.name for t in inputs] if inputs else backend.input_names()
        decoder = _Decoder({t.name: t for t in inputs or ()}, backend.input_range(), server.limits.max_image_pixels,
                           server.image_lock)
        reply: dict[str, Any]
        if "instances" in request:
            out = backend.infer(to_batch(request["instances"], names, server.limits.max_instances, decoder),
                                "http", len(request["instances"]))
            reply = {"predictions": _rows(_json_ready(out))}
        else:
            columns = _columns(request["inputs"], names, decoder)
            samples = _column_samples(columns, decoder)
            if samples > server.limits.max_instances:
                raise InputError(f"{samples} instances, at most {server.limits.max_instances} per request")
            out = backend.infer(columns, "http", samples)
            reply = {"outputs": _json_ready(out)}
        if labels:
            reply["results"] = _top_labels(out, labels, k)
        return reply

    # -- the body: bounded in size, in time and across connections -------------------------
    def _reserve(self, n: int) -> bool:
        if not self.server.budget.take(n):
            self.close_connection = True
            self._error(503, "too many request bytes in flight; retry shortly", [("Retry-After", "1")])
            return False
        self._reserved += n
        return True

    def _read_body(self) -> bytes | bytearray | None:
        """The request body within its bounds; None after an error reply."""
        limits = self.server.limits
        coding, length_text = self.headers.get("Transfer-Encoding"), self.headers.get("Content-Length")
        self._reader.deadline = time.monotonic() + limits.request_timeout_s + limits.max_body_bytes / limits.min_body_rate
        try:
            if coding is not None:
                if length_text is not None or coding.strip().lower() != "chunked":
                    self.close_connection = True
                    self._error(400 if length_text is not None else 501,
                                "expected Transfer-Encoding: chunked without Content-Length")
                    return None
                return self._read_chunked()
            if length_text is None or not length_text.strip().isdigit():
                self.close_connection = True
                self._error(411, "Content-Length (or Transfer-Encoding: chunked) required")
                return None
            length = int(length_text)
            if length > limits.max_body_bytes:
                self._error(413, f"body of {length} bytes exceeds {limits.max_body_bytes}")
                return None
            if not self._reserve(length):
                return None
            self._reader.deadline = time.monotonic() + limits.request_timeout_s + length / limits.min_body_rate
            body = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            self._error(408, "the request body did not arrive in time")
            return None
        if len(body) < length:  # the client hung up mid-body: nobody to answer
            self.close_connection = True
            return None
        self._body_done = True
        return body

    def _read_chunked(self) -> bytearray | None:
        limit = self.server.limits.max_body_bytes
        body = bytearray()
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                size = -1
            if size < 0:
                self.close_connection = True
                self._error(400, f"bad chunk size line {bytes(line[:40])!r}")
                return None
            if len(body) + size > limit:
                self._error(413, f"chunked body exceeds {limit} bytes")
                return None
            if size == 0:
                break
            if not self._reserve(size):
                return None
            chunk = self.rfile.read(size)
            if len(chunk) < size or self.rfile.read(2) != b"\r\n":
                self.close_connection = True
                self._error(400, "truncated or malformed chunk")
                return None
            body += chunk
        for _ in range(64):  # trailer fields, ignored, up to the blank line
            if self.rfile.readline(1024).strip() == b"":
                self._body_done = True
                return body
        self.close_connection = True
        self._error(400, "too many trailer fields")
        return None


def _rows(out: Any) -> list[Any]:
    """Column outputs -> one prediction per instance (dicts for multi-output models)."""
    if isinstance(out, dict):
        names = list(out)
        n = len(out[names[0]]) if names else 0
        return [{k: out[k][i] for k in names} for i in range(n)]
    return list(out)


class _Budget:
    """Body bytes held by all requests at once: bounds memory under many large bodies in parallel."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self._used + n > self.limit:
                return False
            self._used += n
            return True

    def give(self, n: int) -> None:
        if n:
            with self._lock:
                self._used -= n


class _Server(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` at once.

    A connection beyond the limit evicts the one that has waited longest on its client (idle
    keep-alive, or a request still arriving: what a slowloris client holds), so slow clients
    cannot lock others out; only when every connection is running a request is it a 503.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog (the stdlib's 5 makes bursts of clients wait for SYN retries)

    def __init__(self, address: tuple[str, int], backend: ServingBackend, limits: HttpLimits) -> None:
        self.backend = backend
        self.limits = limits
        self.budget = _Budget(limits.inflight_bytes)
        self.image_lock = threading.Lock()
        self.evicted = 0
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._conns: dict[Any, bool] = {}  # connection -> waiting on its client (evictable), oldest first
        self._lock = threading.Lock()
        super().__init__(address, _Handler)

    def waiting(self, conn: Any) -> None:
        with self._lock:
            if self._conns.pop(conn, None) is not None:
                self._conns[conn] = True

    def working(self, conn: Any) -> bool:
        with self._lock:
            if conn not in self._conns:
                return False
            self._conns[conn] = False
            return True

    def _evict_one(self) -> bool:
        with self._lock:
            victim = next((c for c, waiting in self._conns.items() if waiting), None)
            if victim is None:
                return False
            del self._conns[victim]
        self.evicted += 1
        try:
            victim.shutdown(socket.SHUT_RDWR)  # its blocked read returns at once; the thread ends
        except OSError:
            pass
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False) and not (self._evict_one() and self._slots.acquire(timeout=2.0)):
            try:
                body = b'{"error": "too many connections"}'
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                                + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._lock:
            self._conns[request] = True
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that resets or times out mid-request is not our error: no traceback on stderr.
        log.debug("http connection from %s ended with an error", client_address,
                  exc_info=True)  # noqa: LOG014 - socketserver calls this inside its except block

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._conns.pop(request, None)
            self._slots.release()


class InferenceServer:
    """Start/stop the endpoint on a background thread.

    Raises:
        ConfigError: the address cannot be bound (port in use, bad host).
    """

    def __init__(self, address: tuple[str, int], backend: ServingBackend, max_body_bytes: int = 8 << 20,
                 max_instances: int = 64, max_connections: int = 32, limits: HttpLimits | None = None) -> None:
        limits = limits or HttpLimits(max_body_bytes=max_body_bytes, max_instances=max_instances,
                                      max_connections=max_connections)
        try:
            self._server = _Server(address, backend, limits)
        except OSError as exc:
            raise ConfigError(f"http.listen {address[0]}:{address[1]}: cannot bind: {exc.strerror or exc}") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def evicted(self) -> int:
        """Connections closed to make room for a new one (slow or idle clients)."""
        return self._server.evicted

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
