"""Engine behaviour with real interpreters: quantized I/O, several inputs/outputs, batches, errors,
artifact directories, thread safety and the autotuned layout."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from agent import Engine
from edgefleet.errors import ArtifactError, InputError, ModelError
from edgefleet.profiles import profile_dir
from edgefleet.quant import quantize
from edgefleet.testing.artifacts import build_artifact
from tests.agent.conftest import run_bare

pytestmark = pytest.mark.runtime


def test_float_model_outputs_equal_the_bare_interpreter(models, images):
    engine = Engine(models / "float.tflite", profile="x86-dev", autotune=False)
    idx = engine.input_details[0].index
    want = run_bare(models / "float.tflite", {idx: images[:1]})[engine.output_details[0].index]
    got = engine.infer(images[:1])
    assert got.dtype == np.float32 and got.shape == (1, 10)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["int8.tflite", "uint8.tflite"])
def test_float_input_is_quantized_with_the_models_parameters_and_output_dequantized(models, images, name):
    engine = Engine(models / name, profile="x86-dev", autotune=False)
    inp, out = engine.input_details[0], engine.output_details[0]
    assert inp.quantized and out.quantized
    q = quantize(images[:1], inp)
    assert q.dtype == inp.dtype
    raw = run_bare(models / name, {inp.index: q})[out.index]
    expected = (raw.astype(np.float32) - out.zero_point) * out.scale
    np.testing.assert_array_equal(engine.infer(images[:1]), expected)
    # the same tensor given already quantized passes through unchanged, and raw=True gives model dtype
    np.testing.assert_array_equal(engine.infer(q), expected)
    np.testing.assert_array_equal(engine.infer(q, raw=True), raw)


def test_quantized_model_agrees_with_float_model_on_top1(models, images):
    f = Engine(models / "float.tflite", profile="x86-dev", autotune=False)
    q = Engine(models / "int8.tflite", profile="x86-dev", autotune=False)
    diff = np.abs(f.infer(images) - q.infer(images)).max()
    assert diff < 0.02


def test_several_inputs_and_outputs_by_name(models):
    engine = Engine(models / "multi_io.tflite", profile="x86-dev", autotune=False)
    assert [t.name for t in engine.input_details] == ["a", "b"]
    assert [t.name for t in engine.output_details] == ["prod", "sum"]
    a = np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4)
    b = np.linspace(0, 2, 6, dtype=np.float32).reshape(1, 6)
    got = engine.infer({"b": b, "a": a})
    ins = {t.name: t.index for t in engine.input_details}
    want = run_bare(models / "multi_io.tflite", {ins["a"]: a, ins["b"]: b})
    assert set(got) == {"prod", "sum"}
    for t in engine.output_details:
        np.testing.assert_allclose(got[t.name], want[t.index], rtol=1e-6)


def test_batch_of_n_on_a_batch1_model_equals_n_single_calls(models, images):
    engine = Engine(models / "int8.tflite", profile="x86-dev", autotune=False)
    batch = engine.infer(images)
    assert batch.shape == (8, 10)
    singles = np.concatenate([engine.infer(images[i:i + 1]) for i in range(len(images))])
    np.testing.assert_array_equal(batch, singles)
    one = engine.infer(images[0])  # no batch axis in, none out
    assert one.shape == (10,)
    np.testing.assert_array_equal(one, batch[0])


def test_multi_input_batches_must_agree_on_size(models):
    engine = Engine(models / "multi_io.tflite", profile="x86-dev", autotune=False)
    out = engine.infer({"a": np.zeros((3, 4), np.float32), "b": np.zeros((3, 6), np.float32)})
    assert out["sum"].shape == (3, 3) and out["prod"].shape == (3, 2)
    with pytest.raises(InputError, match="batch size"):
        engine.infer({"a": np.zeros((3, 4), np.float32), "b": np.zeros((2, 6), np.float32)})


@pytest.mark.parametrize("bad, message", [
    (np.zeros((1, 16, 16, 4), np.float32), r"expected shape \[1, 16, 16, 3\]"),
    (np.zeros((16, 3), np.float32), "expected shape"),
    (np.zeros((1, 16, 16, 3), np.int16), "expected dtype int8"),
    (np.array([["a"]]), "expected"),
])
def test_wrong_shape_or_dtype_is_a_clear_input_error(models, bad, message):
    engine = Engine(models / "int8.tflite", profile="x86-dev", autotune=False)
    with pytest.raises(InputError, match=message):
        engine.infer(bad)
    assert engine.infer(np.zeros((1, 16, 16, 3), np.float32)).shape == (1, 10)  # still serving


def test_wrong_input_names_are_a_clear_input_error(models):
    engine = Engine(models / "multi_io.tflite", profile="x86-dev", autotune=False)
    with pytest.raises(InputError, match="expected inputs"):
        engine.infer({"a": np.zeros((1, 4), np.float32)})
    with pytest.raises(InputError, match="pass a dict"):
        engine.infer(np.zeros((1, 4), np.float32))


def test_missing_and_empty_model_files_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        Engine(tmp_path / "nope.tflite", profile="x86-dev")
    (tmp_path / "empty.tflite").write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        Engine(tmp_path / "empty.tflite", profile="x86-dev")


def test_artifact_directory_exposes_manifest_and_sha256(models, tmp_path):
    art = build_artifact(models / "int8.tflite", tmp_path / "a", name="clf", version="3", golden_samples=1)
    engine = Engine(art.dir, profile="x86-dev", autotune=False)
    assert engine.manifest is not None and engine.manifest.version == "3"
    assert engine.sha256 == art.manifest.model.sha256
    assert engine.stats()["model"]["version"] == "3"


def test_artifact_whose_model_does_not_match_its_manifest_is_refused(models, tmp_path):
    art = build_artifact(models / "int8.tflite", tmp_path / "a", golden_samples=0)
    (art.dir / "model.tflite").write_bytes((models / "uint8.tflite").read_bytes())
    with pytest.raises(ArtifactError, match="do not match the manifest"):
        Engine(art.dir, profile="x86-dev")


def test_manifest_cache_allowed_false_turns_the_cache_off(models, tmp_path):
    art = build_artifact(models / "int8.tflite", tmp_path / "a", golden_samples=0, cache_allowed=False)
    engine = Engine(art.dir, profile="x86-dev", cache=True, autotune=False)
    cache = engine.stats()["cache"]
    assert cache == {"enabled": False, "reason": "manifest says cache_allowed: false"}


def test_many_threads_get_the_same_results_as_one_thread(models, images):
    frames = np.random.default_rng(1).uniform(0, 1, (40, 16, 16, 3)).astype(np.float32)
    single = Engine(models / "int8.tflite", profile="x86-dev", autotune=False, instances=1)
    want = [single.infer(f) for f in frames]
    shared = Engine(models / "int8.tflite", profile="x86-dev", autotune=False, instances=2, threads=1)
    assert shared.layout.instances == 2
    results: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def work(tid: int) -> None:
        try:
            results[tid] = [shared.infer(f) for f in frames]
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for tid in range(4):
        for got, expected in zip(results[tid], want):
            np.testing.assert_array_equal(got, expected)
    assert shared.stats()["calls"] == 4 * len(frames)


def test_autotune_tries_layouts_and_records_the_choice(models):
    engine = Engine(models / "tiny.tflite", profile="x86-dev")  # autotune on in the profile
    layout = engine.stats()["layout"]
    assert layout["objective"] == "latency"
    assert {"threads", "instances", "autotuned", "candidates"} <= set(layout)
    if layout["autotuned"]:
        # Scores are reported to 2 decimals: two layouts may tie there, so the chosen one's score is
        # the highest reported, whichever of the tied ones max() would name.
        (chosen,) = [c for c in layout["candidates"]
                     if (c["threads"], c["instances"]) == (layout["threads"], layout["instances"])]
        assert chosen["score"] == max(c["score"] for c in layout["candidates"])
    skipped = Engine(models / "tiny.tflite", profile="x86-dev", autotune=False).stats()["layout"]
    assert skipped["autotuned"] is False and skipped["candidates"] == []


def test_threads_come_from_the_profile_unless_given(models):
    import os

    rpi4 = Engine(models / "tiny.tflite", profile="rpi4", autotune=False)
    assert rpi4.layout.threads == min(4, os.cpu_count() or 1)
    assert Engine(models / "tiny.tflite", profile="rpi4", threads=1).layout.threads == 1


def test_stats_report_counts_latency_and_runtime(models, images):
    engine = Engine(models / "int8.tflite", profile="x86-dev", autotune=False)
    engine.infer(images)
    engine.infer(images[0])
    stats = engine.stats()
    assert stats["calls"] == 2 and stats["inferences"] == 9 and stats["errors"] == 0
    assert stats["runtime"] in ("ai-edge-litert", "tflite-runtime")
    assert stats["accelerator"] == "cpu"
    assert 0 < stats["latency_ms"]["p50"] <= stats["latency_ms"]["p99"]
    json.dumps(stats)  # the service publishes it as telemetry


def test_each_call_is_timed_once_and_callers_read_that_figure(models, images):
    from agent.engine import last_latency_s

    engine = Engine(models / "int8.tflite", profile="x86-dev", autotune=False)
    engine.infer(images)
    assert last_latency_s() == engine._latencies[0] > 0  # what the service records in its Metrics


def test_closed_engine_refuses_to_infer(models, images):
    engine = Engine(models / "int8.tflite", profile="x86-dev", autotune=False)
    engine.close()
    with pytest.raises(ModelError, match="closed"):
        engine.infer(images[0])


def test_close_wakes_a_call_waiting_for_an_interpreter(models, images):
    engine = Engine(models / "int8.tflite", profile="x86-dev", autotune=False, instances=1)
    busy = engine._pool.get()  # stands for a call in flight holding the only interpreter
    errors: list[BaseException] = []
    waiter = threading.Thread(target=lambda: _capture(errors, engine.infer, images[0]))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # waiting for the interpreter, as it should
    engine.close()
    waiter.join(5)
    assert not waiter.is_alive() and isinstance(errors[0], ModelError)
    engine._pool.put(busy)  # the in-flight call finishes after close
    with pytest.raises(ModelError, match="closed"):
        engine.infer(images[0])


def _capture(errors: list[BaseException], fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 (handed to the test)
        errors.append(exc)


def test_top1_helper_gives_class_per_sample(models, images):
    engine = Engine(models / "float.tflite", profile="x86-dev", autotune=False)
    out = engine.infer(images)
    np.testing.assert_array_equal(engine.top1(out), np.argmax(out, axis=-1))


def test_pool_is_rebuilt_when_autotune_picks_another_thread_count(models, monkeypatch):
    """The timing is replaced by a score that prefers one thread, so the choice is deterministic."""
    import agent.autotune as autotune_module
    import agent.engine as engine_module

    monkeypatch.setattr(engine_module.os, "cpu_count", lambda: 2)
    scores = iter([1.0, 5.0])  # threads=1 scores 1, threads=2 scores 5 -> two threads win
    monkeypatch.setattr(autotune_module, "_measure", lambda *a: next(scores))
    engine = Engine(models / "tiny.tflite", profile="x86-dev")
    assert (engine.layout.threads, engine.layout.instances) == (2, 1)
    assert [w.threads for w in engine._workers] == [2]
    scores = iter([5.0, 1.0])  # now one thread wins: the 2-thread first interpreter must not be kept
    monkeypatch.setattr(autotune_module, "_measure", lambda *a: next(scores))
    engine = Engine(models / "tiny.tflite", profile="x86-dev")
    assert engine.layout.threads == 1
    assert [w.threads for w in engine._workers] == [1]
    assert engine.infer(np.zeros((1, 8), np.float32)).shape == (1, 4)


def test_throughput_objective_tries_several_instances(models, tmp_path, monkeypatch):
    import agent.engine as engine_module

    monkeypatch.setattr(engine_module.os, "cpu_count", lambda: 2)
    text = (profile_dir() / "x86-dev.yaml").read_text()
    profile = tmp_path / "batchy.yaml"
    profile.write_text(text.replace("name: x86-dev", "name: batchy").replace("objective: latency",
                                                                             "objective: throughput"))
    engine = Engine(models / "tiny.tflite", profile=str(profile))
    layout = engine.stats()["layout"]
    tried = {(c["threads"], c["instances"]) for c in layout["candidates"]}
    assert {(1, 1), (1, 2), (2, 1)} <= tried and all(t * i <= 2 for t, i in tried)
    assert layout["candidates"][0]["unit"] == "inferences/s"
    assert len(engine._workers) == layout["instances"]
    assert engine.infer(np.zeros((1, 8), np.float32)).shape == (1, 4)


def test_autotune_is_skipped_for_a_model_too_slow_to_measure(models, monkeypatch):
    import agent.autotune as autotune_module
    import agent.engine as engine_module

    monkeypatch.setattr(engine_module.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(autotune_module, "_AUTOTUNE_BUDGET_S", 1e-7)  # any model is "too slow" for this
    engine = Engine(models / "int8.tflite", profile="x86-dev")
    layout = engine.stats()["layout"]
    assert layout["autotuned"] is False and layout["note"].startswith("skipped: one inference takes")
    assert (layout["threads"], layout["instances"]) == (2, 1)  # the profile's layout


def test_model_bytes_are_accepted_and_hashed(models, images):
    data = (models / "int8.tflite").read_bytes()
    engine = Engine(data, profile="x86-dev", autotune=False)
    from_file = Engine(models / "int8.tflite", profile="x86-dev", autotune=False)
    assert engine.sha256 == from_file.sha256 and engine.source == "<bytes>"
    np.testing.assert_array_equal(engine.infer(images), from_file.infer(images))


def test_validate_true_checks_the_artifacts_golden_samples(models, tmp_path):
    art = build_artifact(models / "int8.tflite", tmp_path / "a", golden_samples=2)
    assert Engine(art.dir, profile="x86-dev", validate=True, autotune=False).manifest is not None
    raw = json.loads((art.dir / "manifest.json").read_text())
    raw["golden"]["samples"][0]["outputs"] = {k: [v + 1.0 for v in vals]
                                             for k, vals in raw["golden"]["samples"][0]["outputs"].items()}
    (art.dir / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="golden sample 0"):
        Engine(art.dir, profile="x86-dev", validate=True)


@pytest.fixture(scope="module")
def hanging_model(tmp_path_factory):
    from tests.integration.service_support import build_hanging_model

    return build_hanging_model(tmp_path_factory.mktemp("hang") / "hang.tflite")


def test_a_call_hanging_in_the_runtime_is_reported_stuck_and_the_next_caller_gets_engine_busy(hanging_model):
    """A real model that loops for minutes on one input; one interpreter, 0.3 s deadline."""
    import time

    from agent.engine import EngineBusy
    from tests.integration.service_support import HANGING_INPUT

    engine = Engine(hanging_model, profile="x86-dev", instances=1, autotune=False, deadline_s=0.3)
    assert engine.stuck_calls() == (0, 0.0, 0.3)
    engine.canary()  # zeros: answers at once
    finished = engine.finished_calls
    hung = threading.Thread(target=lambda: engine.infer(np.asarray(HANGING_INPUT, np.float32)), daemon=True)
    hung.start()
    time.sleep(0.5)
    stuck = engine.stuck_calls()
    assert stuck.count == 1 and stuck.oldest_s > 0.3
    assert engine.health()["ok"] is False and engine.health()["busy_workers"] == 1
    assert engine.stuck_calls(now=time.monotonic() - 0.4).count == 0  # measured against the caller's clock
    t0 = time.monotonic()
    with pytest.raises(EngineBusy, match="no interpreter free within 0.3 s .1 call.s. stuck"):
        engine.infer(np.zeros((1, 4), np.float32))
    assert 0.25 < time.monotonic() - t0 < 2.0
    assert engine.finished_calls == finished
