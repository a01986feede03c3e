"""A client written for TF Serving, unchanged: plain ``requests`` and the request bodies of TF
Serving's REST documentation (row and columnar predict, signature_name, status, metadata),
against a real InferenceServer serving real engines."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from agent.engine import Engine
from agent.http import InferenceServer, ServingBackend, serving_version
from agent.sources import load_input
from tests.support.models import MODELS, OTA_MODELS

LABELS = ["cat", "dog", "bird", "fish"]


def serve(engine: Engine, name: str, version: str, labels: list[str] | None = None) -> InferenceServer:
    """Wired as the service does it: the active model's tensors, input range and labels."""
    backend = ServingBackend(
        infer=lambda x, source, n: engine.infer(x),
        model_info=lambda: {"name": name, "version": version, "sha256": engine.sha256},
        input_names=lambda: [t.name for t in engine.input_details], metrics_text=lambda: "",
        tensors=lambda: (engine.input_details, engine.output_details), labels=lambda: labels)
    server = InferenceServer(("127.0.0.1", 0), backend)
    server.start()
    return server


@pytest.fixture(scope="module")
def clf() -> Iterator[tuple[str, Engine]]:
    engine = Engine(OTA_MODELS / "clf_a.tflite", profile="x86-dev", autotune=False)
    server = serve(engine, "clf", "1.4.2", LABELS)
    yield f"http://127.0.0.1:{server.port}/v1/models/clf", engine
    server.stop()
    engine.close()


def sample(engine: Engine, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, *engine.input_details[0].shape[1:])).astype(np.float32)


@pytest.mark.parametrize("version, number", [("3", 3), ("123", 123), ("1.4.2", 1_004_002),
                                             ("2.1", 2_001_000), ("0.9", 9_000), ("1.0", 1_000_000),
                                             ("1.2.3.4", None), ("1.1000", None), ("x", None)])
def test_serving_version_maps_dotted_versions_onto_ordered_integers(version: str, number: int | None) -> None:
    assert serving_version(version) == number


def test_dotted_versions_keep_their_order_as_integers() -> None:
    versions = ["0.1", "0.9", "0.10", "1.0", "1.0.1", "1.4.2", "1.10", "2.0"]
    assert sorted(versions, key=serving_version) == versions


def test_model_status_as_documented(clf) -> None:
    url, _ = clf
    expected = {"model_version_status": [{"version": "1004002", "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}
    assert requests.get(url, timeout=10).json() == expected
    assert requests.get(f"{url}/versions/1004002", timeout=10).json() == expected
    resp = requests.get(f"{url}/versions/7", timeout=10)
    assert resp.status_code == 404 and "Specific(clf, 7)" in resp.json()["error"]


def test_predict_on_a_version_answers_404_unless_it_is_the_one_served(clf) -> None:
    url, engine = clf
    body = {"instances": sample(engine, 1).tolist()}
    assert requests.post(f"{url}/versions/1004002:predict", json=body, timeout=10).status_code == 200
    resp = requests.post(f"{url}/versions/7:predict", json=body, timeout=10)
    assert resp.status_code == 404 and resp.json()["error"].startswith("Servable not found")
    resp = requests.post(f"{url}/labels/stable:predict", json=body, timeout=10)
    assert resp.status_code == 404 and "error" in resp.json()


def test_metadata_has_the_signature_def(clf) -> None:
    url, _ = clf
    meta = requests.get(f"{url}/metadata", timeout=10).json()
    assert meta["model_spec"] == {"name": "clf", "signature_name": "", "version": "1004002"}
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["method_name"] == "tensorflow/serving/predict"
    image = sig["inputs"]["image"]
    assert image["dtype"] == "DT_INT8" and image["name"] == "image"
    assert [d["size"] for d in image["tensor_shape"]["dim"]] == ["-1", "32", "32", "3"]
    (out,) = sig["outputs"].values()
    assert out["dtype"] == "DT_INT8" and [d["size"] for d in out["tensor_shape"]["dim"]] == ["-1", "4"]


def test_row_format_with_signature_name_as_documented(clf) -> None:
    url, engine = clf
    x = sample(engine, 2, seed=1)
    resp = requests.post(f"{url}:predict", json={"signature_name": "serving_default", "instances": x.tolist()},
                         timeout=10)
    assert resp.status_code == 200 and list(resp.json()) == ["predictions"]
    np.testing.assert_allclose(resp.json()["predictions"], engine.infer(x), atol=1e-6)
    resp = requests.post(f"{url}:predict", json={"signature_name": "classify_objects", "instances": x.tolist()},
                         timeout=10)
    assert resp.status_code == 400 and "classify_objects" in resp.json()["error"]


def test_columnar_format_as_documented(clf) -> None:
    url, engine = clf
    x = sample(engine, 2, seed=2)
    for inputs in (x.tolist(), {"image": x.tolist()}):
        resp = requests.post(f"{url}:predict", json={"inputs": inputs}, timeout=10)
        assert resp.status_code == 200 and list(resp.json()) == ["outputs"]
        np.testing.assert_allclose(resp.json()["outputs"], engine.infer(x), atol=1e-6)


def _encoded(fmt: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_b64_images_are_decoded_like_the_directory_source(clf, tmp_path: Path, fmt: str, suffix: str) -> None:
    url, engine = clf
    data = _encoded(fmt, seed=3)
    (tmp_path / f"frame{suffix}").write_bytes(data)
    expected = engine.infer(load_input(tmp_path / f"frame{suffix}", engine.input_details[0].shape)[None])
    b64 = {"b64": base64.b64encode(data).decode()}
    for body, key in (({"instances": [b64]}, "predictions"), ({"instances": [{"image": b64}]}, "predictions"),
                      ({"inputs": {"image": [b64]}}, "outputs")):
        resp = requests.post(f"{url}:predict", json=body, timeout=10)
        assert resp.status_code == 200, resp.text
        np.testing.assert_array_equal(resp.json()[key], expected)


def test_b64_that_is_not_an_image_gets_400(clf) -> None:
    url, _ = clf
    for value in ("not base64!", base64.b64encode(b"plain bytes").decode()):
        resp = requests.post(f"{url}:predict", json={"instances": [{"b64": value}]}, timeout=10)
        assert resp.status_code == 400 and "error" in resp.json()


def test_labels_are_opt_in_and_leave_predictions_untouched(clf) -> None:
    url, engine = clf
    x = sample(engine, 2, seed=4)
    plain = requests.post(f"{url}:predict", json={"instances": x.tolist()}, timeout=10).json()
    labelled = requests.post(f"{url}:predict", json={"instances": x.tolist(), "labels": 2}, timeout=10).json()
    assert "results" not in plain and labelled["predictions"] == plain["predictions"]
    scores = np.asarray(plain["predictions"])
    for row, result in zip(scores, labelled["results"]):
        best = np.argsort(-row, kind="stable")[:2]
        assert result == [[LABELS[i], float(row[i])] for i in best]
    one = requests.post(f"{url}:predict", json={"inputs": x.tolist(), "labels": True}, timeout=10).json()
    assert [len(r) for r in one["results"]] == [1, 1]


def test_uint8_pixel_integers_pass_through_in_the_model_dtype() -> None:
    engine = Engine(MODELS / "uint8.tflite", profile="x86-dev", autotune=False)
    server = serve(engine, "u8", "1")
    try:
        pixels = np.random.default_rng(5).integers(0, 256, (2, *engine.input_details[0].shape[1:]))
        resp = requests.post(f"http://127.0.0.1:{server.port}/v1/models/u8:predict",
                             json={"instances": pixels.tolist()}, timeout=10)
        assert resp.status_code == 200
        passed_through = engine.infer(pixels.astype(np.uint8))
        np.testing.assert_array_equal(resp.json()["predictions"], passed_through)
        assert not np.array_equal(engine.infer(pixels.astype(np.float32)), passed_through)  # what a cast did
    finally:
        server.stop()
        engine.close()
