"""ModelHost: hot swaps under load with real engines; no request fails, old engines close after draining."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from agent.host import ModelHost
from edgefleet.errors import InputError, ModelError
from edgefleet.profiles import load_profile
from edgefleet.testing.artifacts import build_artifact
from tests.support.models import OTA_MODELS

PROFILE = load_profile("x86-dev")
pytestmark = pytest.mark.runtime  # also runs under the tflite-runtime venv (make test-tflite)


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    base = tmp_path_factory.mktemp("host")
    return {"v1": build_artifact(OTA_MODELS / "clf_a.tflite", base / "v1", version="1", golden_samples=1),
            "v2": build_artifact(OTA_MODELS / "clf_a2.tflite", base / "v2", version="2", golden_samples=1)}


def x() -> np.ndarray:
    return np.random.default_rng(0).integers(-128, 128, (1, 32, 32, 3)).astype(np.int8)


def test_swaps_under_concurrent_load_fail_no_request(arts):
    host = ModelHost(PROFILE, autotune=False)
    host.activate(arts["v1"].dir)
    stop, ok, failed = threading.Event(), [0], []

    def load():
        sample = x()
        while not stop.is_set():
            try:
                host.infer(sample)
                ok[0] += 1
            except Exception as exc:  # noqa: BLE001 (the test counts every failure)
                failed.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    engines = []
    for i in range(6):
        engines.append(host.engine)
        host.activate(arts["v2" if i % 2 == 0 else "v1"].dir)
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    assert failed == [] and ok[0] > 100
    assert host.stats()["swaps"] == 7
    for old in engines:  # every replaced engine was closed
        with pytest.raises(ModelError, match="closed"):
            old.infer(x())
    host.close()


def test_old_engine_is_closed_only_after_in_flight_calls_drain(arts):
    host = ModelHost(PROFILE, autotune=False)
    host.activate(arts["v1"].dir)
    old = host.engine
    inside, release = threading.Event(), threading.Event()

    def blocking_observer(*_):
        inside.set()
        release.wait(5)

    host.set_observer(blocking_observer)
    caller = threading.Thread(target=host.infer, args=(x(),))
    caller.start()
    assert inside.wait(5)
    host.set_observer(None)
    swapper = threading.Thread(target=host.activate, args=(arts["v2"].dir,))
    swapper.start()
    time.sleep(0.2)
    assert host.model_info["version"] == "2", "the new model serves while the old one drains"
    assert swapper.is_alive(), "activate waits for the in-flight call before closing the old engine"
    old.infer(x())  # still open
    release.set()
    swapper.join(5)
    caller.join(5)
    with pytest.raises(ModelError, match="closed"):
        old.infer(x())
    host.close()


def test_revert_swaps_back_to_the_kept_previous_engine(arts):
    host = ModelHost(PROFILE, autotune=False)
    host.activate(arts["v1"].dir)
    host.activate(arts["v2"].dir, keep_previous=True)
    assert host.previous_info["version"] == "1"
    assert host.infer_previous(x()) is not None
    t0 = time.perf_counter()
    host.revert()
    assert time.perf_counter() - t0 < 0.5
    assert host.model_info["version"] == "1" and host.previous_info is None
    with pytest.raises(RuntimeError, match="no previous"):
        host.revert()
    host.close()


def test_failed_activation_keeps_the_current_model_serving(arts, tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"TFL3" + b"\x00" * 64)
    host = ModelHost(PROFILE, autotune=False)
    host.activate(arts["v1"].dir)
    with pytest.raises(ModelError):
        host.activate(bad)
    assert host.model_info["version"] == "1"
    host.infer(x())
    host.close()


def test_observer_sees_outputs_latency_and_errors(arts):
    host = ModelHost(PROFILE, autotune=False)
    host.activate(arts["v1"].dir)
    seen = []
    host.set_observer(lambda inp, out, lat, err: seen.append((out is not None, lat, type(err).__name__)))
    host.infer(x())
    with pytest.raises(InputError):
        host.infer(np.zeros((1, 3), np.int8))
    assert seen[0][0] and seen[0][1] > 0 and seen[0][2] == "NoneType"
    assert seen[1] == (False, seen[1][1], "InputError")
    host.close()
    with pytest.raises(ModelError, match="no model"):
        host.infer(x())


def test_a_slot_manifest_drives_the_engines_cache_for_a_bare_model_file(arts, tmp_path):
    """A slot holds a bare model.tflite: the slot's manifest, not a guess from tensors, sets up the cache."""
    bare = tmp_path / "model.tflite"
    bare.write_bytes(arts["v1"].model_path.read_bytes())
    regression = arts["v1"].manifest.model_copy(update={"task": "regression"})
    host = ModelHost(PROFILE, cache=True, autotune=False)
    try:
        host.activate(bare, regression)
        engine = host.engine
        assert engine.manifest is regression and engine._is_classifier() is False
        assert engine.stats()["cache"]["enabled"] is True
        host.activate(bare, regression.model_copy(update={"cache_allowed": False}))
        assert host.stats()["engine"]["cache"] == {"enabled": False, "reason": "manifest says cache_allowed: false"}
    finally:
        host.close()


def test_engine_manifest_argument_wins_over_the_artifacts_own(arts):
    from agent.engine import Engine

    other = arts["v2"].manifest
    with Engine(arts["v1"].dir, PROFILE, autotune=False, manifest=other) as engine:
        assert engine.manifest is other and engine.stats()["model"]["version"] == "2"


def test_revert_does_not_wait_for_a_call_stuck_in_the_model_it_gives_up(arts):
    """A call hung inside the runtime may run for minutes: the rollback must not wait for it."""
    host = ModelHost(PROFILE, autotune=False, drain_timeout_s=30)
    host.activate(arts["v1"].dir)
    host.activate(arts["v2"].dir, keep_previous=True)
    hung, engine = host._current, host.engine
    hung.enter()  # a caller inside the engine ...
    engine._started[0] = time.monotonic() - 60  # ... whose interpreter call started a minute ago
    try:
        t0 = time.perf_counter()
        host.revert()
        assert time.perf_counter() - t0 < 1.0
        assert host.model_info["version"] == "1"
        host.infer(x())
    finally:
        engine._started[0] = 0.0
        hung.leave()
        host.close()
