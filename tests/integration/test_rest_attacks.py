"""Hostile clients against a real InferenceServer on a free port, serving a real engine.

Each test is named after the attack; each checks the JSON status the attacker gets and that
the server still answers an honest client afterwards.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import psutil
import pytest

from agent.engine import Engine
from agent.http import HttpLimits, InferenceServer, ServingBackend
from edgefleet.testing.waiting import wait_for
from tests.support.models import OTA_MODELS

LIMITS = HttpLimits(request_timeout_s=1.0, idle_timeout_s=2.0)  # defaults, with short timeouts to keep tests fast


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine(OTA_MODELS / "clf_a.tflite", profile="x86-dev", autotune=False)
    yield eng
    eng.close()


def backend_for(engine: Engine, *, wired: bool = True, infer=None) -> ServingBackend:
    """The backend as the service wires it (``wired``: with the model's tensors)."""
    return ServingBackend(
        infer=infer or (lambda x, source, n: engine.infer(x)),
        model_info=lambda: {"name": "clf", "version": "3", "sha256": engine.sha256},
        input_names=lambda: [t.name for t in engine.input_details], metrics_text=lambda: "",
        **({"tensors": lambda: (engine.input_details, engine.output_details)} if wired else {}))


@pytest.fixture()
def server(engine: Engine) -> Iterator[InferenceServer]:
    srv = InferenceServer(("127.0.0.1", 0), backend_for(engine), limits=LIMITS)
    srv.start()
    yield srv
    srv.stop()


def call(port: int, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        assert resp.getheader("Content-Type", "").startswith("application/json"), (resp.status, data[:200])
        return resp.status, json.loads(data) if data else {}, resp
    finally:
        conn.close()


def raw(port: int, data: bytes, timeout: float = 10) -> tuple[int, dict]:
    """Send bytes as they are; parse the one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        assert resp.getheader("Content-Type", "").startswith("application/json")
        return resp.status, json.loads(resp.read())


def honest_predict_works(port: int, engine: Engine) -> None:
    x = np.zeros((1, *engine.input_details[0].shape[1:]), np.float32)
    status, body, _ = call(port, "POST", "/v1/models/clf:predict", json.dumps({"instances": x.tolist()}).encode())
    assert status == 200 and len(body["predictions"]) == 1


def test_eight_concurrent_8mib_bodies_stay_within_the_memory_budget(server: InferenceServer, engine: Engine) -> None:
    """Before: 8 x 8 MiB of numbers took the process from ~85 MiB to ~330 MiB. Now the bodies in
    flight are bounded (2 x 8 MiB, the rest 503) and a body holding more values than a full
    batch is refused before json.loads builds it (413)."""
    values = ",".join(["0.5"] * ((8 << 20) // 4 - 16))
    body = ('{"instances": [' + values + "]}").encode()
    assert len(body) <= 8 << 20
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    results: list[tuple[int, dict]] = []
    done = threading.Event()

    def send() -> None:
        status, reply, _ = call(server.port, "POST", "/v1/models/clf:predict", body)
        results.append((status, reply))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    while not done.is_set():
        peak = max(peak, proc.memory_info().rss)
        if not any(t.is_alive() for t in threads):
            done.set()
        time.sleep(0.005)
    assert len(results) == 8
    assert {s for s, _ in results} <= {413, 503} and all("error" in r for _, r in results)
    assert (peak - base) / 2**20 < 64, f"RSS grew by {(peak - base) / 2**20:.0f} MiB"
    honest_predict_works(server.port, engine)


def test_columnar_inputs_cannot_skip_the_batch_bound(server: InferenceServer, engine: Engine) -> None:
    shape = engine.input_details[0].shape[1:]
    columns = json.dumps({"inputs": np.zeros((65, *shape), np.float32).tolist()}).encode()
    status, reply, _ = call(server.port, "POST", "/v1/models/clf:predict", columns)
    assert status == 413 and "64 instances" in reply["error"]  # the value bound catches it before parsing
    unwired = InferenceServer(("127.0.0.1", 0), backend_for(engine, wired=False), limits=LIMITS)
    unwired.start()
    try:
        status, reply, _ = call(unwired.port, "POST", "/v1/models/clf:predict", columns)
        assert status == 400 and "65 instances, at most 64" in reply["error"]
    finally:
        unwired.stop()
    honest_predict_works(server.port, engine)


def test_deeply_nested_json_gets_400_not_a_dropped_connection(server: InferenceServer, engine: Engine) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1/models/clf:predict", b'{"instances": ' + b"[" * 200_000)
    resp = conn.getresponse()
    assert resp.status == 400 and "nested too deeply" in json.loads(resp.read())["error"]
    conn.request("GET", "/v1/models/clf")  # the same keep-alive connection still works
    assert conn.getresponse().status == 200
    conn.close()
    honest_predict_works(server.port, engine)


def test_32_slowloris_clients_do_not_lock_out_a_new_client(server: InferenceServer, engine: Engine) -> None:
    """Before: 32 clients trickling header lines held every slot (each byte restarted a 30 s
    timeout) and a new client waited 40 s or more. Now a newcomer evicts the connection that
    has waited longest, and each request phase has a deadline."""
    slow: list[socket.socket] = []
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            for s in slow:
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass
            stop.wait(0.2)

    try:
        for _ in range(32):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"POST /v1/models/clf:predict HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        threading.Thread(target=trickle, daemon=True).start()
        wait_for(lambda: len(server._server._conns) == 32, 5, what="every slot taken by a slow client")
        start = time.monotonic()
        honest_predict_works(server.port, engine)
        assert time.monotonic() - start < 2.0
        assert server.evicted >= 1
        # The deadline closes the others even without newcomers (headers must arrive in 1 s here).
        wait_for(lambda: len(server._server._conns) == 0, 5, what="slow connections cut by their deadline")
    finally:
        stop.set()
        for s in slow:
            s.close()


def test_slow_body_gets_408_after_its_deadline(server: InferenceServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/models/clf:predict HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
        start = time.monotonic()
        resp = http.client.HTTPResponse(s)
        resp.begin()
        assert resp.status == 408 and "error" in json.loads(resp.read())
        assert time.monotonic() - start < 3.0


def test_every_connection_busy_gets_503_json_and_the_server_recovers(engine: Engine) -> None:
    release = threading.Event()

    def blocking_infer(x, source, n):
        release.wait(10)
        return engine.infer(x)

    srv = InferenceServer(("127.0.0.1", 0), backend_for(engine, infer=blocking_infer),
                          limits=HttpLimits(max_connections=2, request_timeout_s=1.0))
    srv.start()
    try:
        busy = [threading.Thread(target=honest_predict_works, args=(srv.port, engine)) for _ in range(2)]
        for t in busy:
            t.start()
        wait_for(lambda: sum(not w for w in srv._server._conns.values()) == 2, 5, what="both slots running")
        status, reply, _ = call(srv.port, "GET", "/healthz")
        assert status == 503 and reply["error"] == "too many connections"
        release.set()
        for t in busy:
            t.join(10)
        assert call(srv.port, "GET", "/healthz")[0] == 200
    finally:
        release.set()
        srv.stop()


@pytest.mark.parametrize("method, path, status, allow", [
    ("PUT", "/v1/models/clf:predict", 405, "POST"),
    ("DELETE", "/metrics", 405, "GET, HEAD"),
    ("GET", "/v1/models/clf:predict", 405, "POST"),
    ("POST", "/healthz", 405, "GET, HEAD"),
    ("PATCH", "/nowhere", 404, None),
    ("GET", "/v1/models/clf:classify", 404, None),
    ("BREW", "/", 501, None),
])
def test_wrong_methods_get_json_errors_with_allow(server: InferenceServer, method: str, path: str, status: int,
                                                  allow: str | None) -> None:
    got, reply, resp = call(server.port, method, path, b"{}" if method in ("PUT", "POST") else None)
    assert got == status and reply["error"]
    assert resp.getheader("Allow") == allow


@pytest.mark.parametrize("path", ["/healthz", "/v1/models/clf", "/v1/models/clf/metadata", "/metrics"])
def test_head_works_where_get_works(server: InferenceServer, path: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", path)
    get = conn.getresponse()
    get_body = get.read()
    conn.request("HEAD", path)
    head = conn.getresponse()
    assert head.status == get.status == 200 and head.read() == b""
    assert int(head.getheader("Content-Length")) == len(get_body)
    conn.close()


@pytest.mark.parametrize("request_bytes, status, fragment", [
    (b"GARBAGE\r\n\r\n", 400, "Bad request"),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, ""),
    (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "Line too long"),
    (b"POST /v1/models/clf:predict HTTP/1.1\r\n\r\n", 411, "Content-Length"),
    (b"POST /v1/models/clf:predict HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413, "exceeds"),
    (b"POST /v1/models/clf:predict HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
     "chunked"),
    (b"POST /v1/models/clf:predict HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "chunked"),
    (b"POST /v1/models/clf:predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "chunk size"),
    (b"POST /v1/models/clf:predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
     + b"".join(b"100000\r\n" + b"0" * 0x100000 + b"\r\n" for _ in range(9)) + b"0\r\n\r\n", 413, "chunked body"),
    (b"POST /v1/models/clf/versions/7:predict HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 404, "Specific(clf, 7)"),
])
def test_malformed_requests_get_json_errors(server: InferenceServer, engine: Engine, request_bytes: bytes,
                                            status: int, fragment: str) -> None:
    got, reply = raw(server.port, request_bytes)
    assert got == status and fragment in reply["error"]
    honest_predict_works(server.port, engine)


def test_chunked_body_is_accepted(server: InferenceServer, engine: Engine) -> None:
    x = np.zeros((1, *engine.input_details[0].shape[1:]), np.float32)
    body = json.dumps({"instances": x.tolist()}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 1000]), body[i:i + 1000]) for i in range(0, len(body), 1000))
    status, reply = raw(server.port, b"POST /v1/models/clf:predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                        + chunks + b"0\r\n\r\n")
    assert status == 200
    np.testing.assert_allclose(reply["predictions"], engine.infer(x), atol=1e-6)
