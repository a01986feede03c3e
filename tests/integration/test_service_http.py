"""The local TF-Serving-style endpoint and the directory source, against the real engine."""

from __future__ import annotations

import http.client
import json

import numpy as np
import pytest
from PIL import Image

from agent.config import parse_config
from agent.engine import Engine
from agent.service import AgentService
from edgefleet.testing.artifacts import build_artifact
from edgefleet.testing.waiting import wait_for
from tests.integration.service_support import agent_config
from tests.support.models import OTA_MODELS


@pytest.fixture(scope="module")
def service(broker, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("http-agent")
    art = build_artifact(OTA_MODELS / "clf_a.tflite", tmp / "art", version="3",
                         baseline={"class_histogram": [0.1] * 10, "mean_confidence": 0.5},
                         labels=[f"class-{i}" for i in range(10)])
    cfg = agent_config(tmp, broker.url, device_id="pi-http", model=art.dir,
                       http={"listen": "127.0.0.1:0", "max_body_bytes": 200_000},
                       source={"type": "directory", "path": str(tmp / "frames"), "poll_interval_s": 0.05},
                       sinks={"jsonl": str(tmp / "results.jsonl")},
                       # the tests close telemetry windows themselves: the service's own telemetry
                       # thread must not close one between a test's requests and its check
                       telemetry={"interval_s": 3600})
    svc = AgentService(parse_config(cfg))
    svc.start()
    reference = Engine(art.dir, profile="x86-dev", autotune=False)
    yield svc, reference, tmp
    svc.stop()
    reference.close()


def request(svc: AgentService, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
    assert svc.http is not None
    conn = http.client.HTTPConnection("127.0.0.1", svc.http.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read().decode()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, json.loads(data) if ctype.startswith("application/json") else data
    finally:
        conn.close()


def post(svc: AgentService, path: str, obj: object) -> tuple[int, dict]:
    status, body = request(svc, "POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"})
    assert isinstance(body, dict)
    return status, body


def test_predict_round_trip_matches_the_engine(service) -> None:
    svc, reference, _ = service
    x = np.random.default_rng(1).uniform(0, 1, (3, *reference.input_details[0].shape[1:])).astype(np.float32)
    status, body = post(svc, "/v1/models/clf:predict", {"instances": x.tolist()})
    assert status == 200, body
    expected = reference.infer(x)
    np.testing.assert_allclose(np.asarray(body["predictions"]), expected, atol=1e-6)
    status, body = post(svc, "/v1/models/clf:predict", {"inputs": x[:1].tolist()})
    assert status == 200 and np.allclose(body["outputs"], expected[:1], atol=1e-6)


def test_model_status_metrics_and_health(service) -> None:
    svc, _, _ = service
    status, body = request(svc, "GET", "/v1/models/clf")
    assert status == 200
    assert body == {"model_version_status": [{"version": "3", "state": "AVAILABLE",
                                              "status": {"error_code": "OK", "error_message": ""}}]}
    status, text = request(svc, "GET", "/metrics")
    assert status == 200 and "edgefleet_inferences_total" in text and 'device_id="pi-http"' in text
    assert request(svc, "GET", "/healthz")[0] == 200


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "exactly one of"),
    (b'{"instances": []}', 400, "non-empty"),
    (b'{"instances": [[1, 2, 3]]}', 400, "expected shape"),
    (b'{"instances": [[1, 2], [3]]}', 400, "rectangular"),
    (b'{"instances": [["a"]]}', 400, "rectangular"),
])
def test_bad_requests_get_400_with_a_json_error(service, body: bytes, status: int, fragment: str) -> None:
    svc, _, _ = service
    got, reply = request(svc, "POST", "/v1/models/clf:predict", body)
    assert got == status and fragment in reply["error"]


def test_unknown_model_route_and_oversized_body_are_refused(service) -> None:
    svc, _, _ = service
    assert post(svc, "/v1/models/other:predict", {"instances": [[0]]})[0] == 404
    assert request(svc, "GET", "/v2/anything")[0] == 404
    status, body = request(svc, "POST", "/v1/models/clf:predict", b"[" + b"0," * 150_000 + b"0]")
    assert status == 413 and "exceeds" in body["error"]
    assert request(svc, "GET", "/healthz")[0] == 200  # still serving


def test_directory_source_infers_moves_and_writes_results(service) -> None:
    _, reference, tmp = service
    frames = tmp / "frames"
    shape = reference.input_details[0].shape[1:]
    x = np.random.default_rng(2).uniform(0, 1, shape).astype(np.float32)
    np.save(frames / ".frame1.npy", x)
    (frames / ".frame1.npy").rename(frames / "frame1.npy")
    Image.fromarray((x * 255).astype(np.uint8)).save(frames / "frame2.png")
    (frames / "broken.npy").write_bytes(b"not an array")
    (frames / "notes.txt").write_text("ignored")
    wait_for(lambda: (frames / "done" / "frame1.npy").exists() and (frames / "done" / "frame2.png").exists()
             and (frames / "failed" / "broken.npy").exists(), 10, what="files processed")
    assert (frames / "notes.txt").exists()
    lines = [json.loads(line) for line in (tmp / "results.jsonl").read_text().splitlines()]
    by_item = {rec["item"]: rec for rec in lines}
    np.testing.assert_allclose(by_item["frame1.npy"]["outputs"], reference.infer(x), atol=1e-6)
    assert by_item["frame2.png"]["model"]["version"] == "3"
    assert "broken.npy" not in by_item


def test_telemetry_counts_inferences_and_reports_drift_against_the_baseline(service) -> None:
    svc, reference, _ = service
    svc.metrics.take_window()
    x = np.random.default_rng(3).uniform(0, 1, (5, *reference.input_details[0].shape[1:])).astype(np.float32)
    for row in x:
        svc.infer(row)
    payload = svc.telemetry_payload()
    assert payload["inferences"] == 5 and payload["errors"] == 0
    assert payload["latency_ms"]["p50"] > 0
    assert payload["drift"]["samples"] >= 5 and 0 <= payload["drift"]["tvd"] <= 1
    assert payload["drift"]["confidence_delta"] is not None
    assert payload["model"]["version"] == "3" and "pending" in payload["outbox"]


def test_batch_requests_count_every_instance_in_telemetry(service) -> None:
    svc, reference, _ = service
    svc.metrics.take_window()
    x = np.zeros((4, *reference.input_details[0].shape[1:]), np.float32)
    assert post(svc, "/v1/models/clf:predict", {"instances": x.tolist()})[0] == 200
    assert post(svc, "/v1/models/clf:predict", {"inputs": x.tolist()})[0] == 200
    assert svc.metrics.take_window().inferences == 8


def _prometheus_value(svc: AgentService, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    status, text = request(svc, "GET", "/metrics")
    assert status == 200 and isinstance(text, str)
    return next(s.value for family in text_string_to_metric_families(text) for s in family.samples
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_inferences_total_survives_a_model_swap(service) -> None:
    """The counter lives in the service's Metrics: the new engine's own counts start at zero."""
    svc, reference, tmp = service
    x = np.zeros((1, *reference.input_details[0].shape[1:]), np.float32)
    for _ in range(3):
        svc.infer(x)
    before = _prometheus_value(svc, "edgefleet_inferences_total")
    assert before >= 3
    svc.host.activate(tmp / "art")  # the swap an OTA commit does: same model, a fresh Engine
    assert svc.host.stats()["engine"]["inferences"] == 0
    svc.infer(x)
    assert _prometheus_value(svc, "edgefleet_inferences_total") == before + 1
    telemetry = svc.telemetry_payload()
    assert _prometheus_value(svc, "edgefleet_window_latency_p50_seconds") == telemetry["latency_ms"]["p50"] / 1000.0


def test_stalled_clients_filling_every_slot_are_evicted_for_a_new_client(service) -> None:
    import socket

    svc, _, _ = service
    assert svc.http is not None
    stalled = []
    evicted = svc.http.evicted
    try:
        for _ in range(svc.cfg.http.max_connections):
            s = socket.create_connection(("127.0.0.1", svc.http.port))
            s.sendall(b"POST /v1/models/clf:predict HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # never finished
            stalled.append(s)
        wait_for(lambda: svc.http is not None and len(svc.http._server._conns) == len(stalled), 5,
                 what="every slot taken")
        assert request(svc, "GET", "/healthz")[0] == 200
        assert svc.http.evicted == evicted + 1
    finally:
        for s in stalled:
            s.close()


def test_multi_input_multi_output_model_in_row_and_column_format() -> None:
    from agent.http import InferenceServer, ServingBackend
    from tests.support.models import MODELS

    engine = Engine(MODELS / "multi_io.tflite", profile="x86-dev", autotune=False)
    backend = ServingBackend(infer=lambda x, source, n: engine.infer(x),
                             model_info=lambda: {"name": "multi", "version": "1", "sha256": engine.sha256},
                             input_names=lambda: [t.name for t in engine.input_details], metrics_text=lambda: "")
    server = InferenceServer(("127.0.0.1", 0), backend)
    server.start()
    try:
        rng = np.random.default_rng(4)
        a, b = rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=(2, 6)).astype(np.float32)
        expected = engine.infer({"a": a, "b": b})
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        rows = [{"a": a[i].tolist(), "b": b[i].tolist()} for i in range(2)]
        conn.request("POST", "/v1/models/multi:predict", json.dumps({"instances": rows}))
        predictions = json.loads(conn.getresponse().read())["predictions"]
        assert [sorted(p) for p in predictions] == [["prod", "sum"]] * 2
        np.testing.assert_allclose([p["sum"] for p in predictions], expected["sum"], atol=1e-6)
        conn.request("POST", "/v1/models/multi:predict", json.dumps({"inputs": {"a": a.tolist(), "b": b.tolist()}}))
        outputs = json.loads(conn.getresponse().read())["outputs"]
        np.testing.assert_allclose(outputs["prod"], expected["prod"], atol=1e-6)
        conn.request("POST", "/v1/models/multi:predict", json.dumps({"instances": [a[0].tolist()]}))
        resp = conn.getresponse()
        assert resp.status == 400 and "give each instance as an object" in json.loads(resp.read())["error"]
        conn.close()
    finally:
        server.stop()
        engine.close()


def test_a_running_agent_serves_its_manifests_labels_and_signature_the_tf_serving_way(service) -> None:
    svc, reference, _ = service
    x = np.zeros(reference.input_details[0].shape, np.float32)
    status, body = request(svc, "POST", "/v1/models/clf:predict",
                           json.dumps({"instances": x.tolist(), "labels": 2}).encode())
    assert status == 200 and len(body["results"][0]) == 2, body
    best = int(np.argmax(reference.infer(x)))
    assert body["results"][0][0][0] == f"class-{best}"
    status, meta = request(svc, "GET", "/v1/models/clf/metadata")
    assert status == 200
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert set(sig["inputs"]) == {t.name for t in reference.input_details}
