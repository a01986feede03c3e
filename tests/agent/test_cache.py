"""The input-locality cache through a real Engine: exact hits, near-duplicate reuse and its limits,
self-verification that tightens the threshold, byte bounds, and per-model keys."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from agent import Engine
from agent.cache import InferenceCache, input_signature, signature_distance
from agent.tensors import TensorInfo
from edgefleet.errors import ConfigError
from edgefleet.profiles import CacheSettings

pytestmark = pytest.mark.runtime


def _engine(models, name="int8.tflite", **cache):
    config = CacheSettings(**{"verify_fraction": 0.0, **cache})
    return Engine(models / name, profile="x86-dev", autotune=False, cache=config)


def _frame(seed=0):
    return np.random.default_rng(seed).uniform(0.2, 0.8, (1, 16, 16, 3)).astype(np.float32)


def test_repeated_input_is_an_exact_hit_with_identical_outputs(models):
    engine = _engine(models, near=False)
    x = _frame()
    first = engine.infer(x)
    second = engine.infer(x)
    np.testing.assert_array_equal(first, second)
    stats = engine.stats()["cache"]
    assert (stats["exact_hits"], stats["misses"]) == (1, 1)
    assert stats["lookup_us"] > 0 and stats["bytes"] > 0
    second[0, 0] = 99.0  # callers own what they get back: the cached copy is untouched
    np.testing.assert_array_equal(engine.infer(x), first)


def test_float_inputs_that_quantize_to_the_same_tensor_share_an_entry(models):
    engine = _engine(models, near=False)
    x = _frame()
    engine.infer(x)
    engine.infer(x + np.float32(1e-6))  # far below one int8 step (1/255)
    assert engine.stats()["cache"]["exact_hits"] == 1


def test_exact_key_includes_the_model_hash(models):
    info = TensorInfo("x", 0, (1, 4), np.dtype(np.float32), 0.0, 0)
    sample = [np.arange(4, dtype=np.float32).reshape(1, 4)]
    a = InferenceCache(CacheSettings(), "a" * 64, [info], [info], classifier=False)
    b = InferenceCache(CacheSettings(), "b" * 64, [info], [info], classifier=False)
    assert a.key(sample) != b.key(sample)
    assert a.key(sample) == a.key([sample[0].copy()])


def test_exact_cache_stays_within_its_byte_bound_and_evicts_least_recent(models):
    engine = _engine(models, near=False, max_bytes=3 * (10 + 128))  # three int8[10] entries
    frames = [_frame(i) for i in range(5)]
    for f in frames:
        engine.infer(f)
    stats = engine.stats()["cache"]
    assert stats["entries"] == 3 and stats["bytes"] <= stats["max_bytes"] and stats["evictions"] == 2
    engine.infer(frames[4])
    engine.infer(frames[0])  # evicted: computed again
    stats = engine.stats()["cache"]
    assert stats["exact_hits"] == 1 and stats["misses"] == 6


def test_noisy_repeat_of_a_computed_frame_is_a_near_hit_returning_its_outputs(models):
    engine = _engine(models)
    x = _frame()
    computed = engine.infer(x)
    noisy = x + np.random.default_rng(5).normal(0, 0.004, x.shape).astype(np.float32)
    np.testing.assert_array_equal(engine.infer(noisy), computed)
    stats = engine.stats()["cache"]
    assert stats["near_hits"] == 1 and stats["misses"] == 1


def test_a_different_scene_is_never_a_near_hit(models):
    engine = _engine(models)
    engine.infer(_frame(0))
    engine.infer(_frame(1))
    assert engine.stats()["cache"]["near_hits"] == 0


def test_near_reuse_stops_after_max_consecutive(models):
    engine = _engine(models, max_consecutive=3)
    x = _frame()
    rng = np.random.default_rng(9)
    for _ in range(9):
        engine.infer(x + rng.normal(0, 0.003, x.shape).astype(np.float32))
    stats = engine.stats()["cache"]
    assert stats["near_hits"] == 6 and stats["misses"] == 3  # miss, 3 reuses, miss, 3 reuses, miss, 2


def test_near_reuse_stops_after_max_age(models):
    engine = _engine(models, max_age_s=0.0)
    x = _frame()
    engine.infer(x)
    engine.infer(x + np.float32(0.004))
    assert engine.stats()["cache"]["near_hits"] == 0


def test_slow_drift_is_compared_with_the_last_computed_input_not_the_previous(models):
    """Each step is far under the threshold, but the drift adds up: reuse must stop."""
    engine = _engine(models, near_threshold=0.02, max_consecutive=1000, max_age_s=100.0)
    x = _frame()
    outcomes = []
    for step in range(12):
        before = engine.stats()["cache"]["misses"]
        engine.infer(x + np.float32(step * 0.006))  # 1.5 levels of 255 per step
        outcomes.append(engine.stats()["cache"]["misses"] > before)
    assert outcomes[0] is True
    assert sum(outcomes) >= 3  # a fresh computation about every 3-4 steps, not once
    assert not all(outcomes)


def test_verification_measures_disagreement_and_tightens_the_threshold(models):
    # A threshold of 1.0 reuses anything: verified hits on unrelated images disagree on top-1.
    engine = _engine(models, name="float.tflite", near_threshold=1.0, verify_fraction=1.0,
                     max_age_s=100.0, max_consecutive=1000, target_disagreement=0.01)
    rng = np.random.default_rng(3)
    for _ in range(40):
        engine.infer(rng.uniform(0, 1, (1, 16, 16, 3)).astype(np.float32) ** rng.uniform(0.2, 5))
    stats = engine.stats()["cache"]
    assert stats["verified_hits"] > 0
    assert stats["disagreements"] > 0 and stats["disagreement"] > 0.01
    assert stats["threshold"] < 1.0 and stats["threshold_changes"] > 0


def test_verified_outputs_are_the_fresh_ones(models):
    engine = _engine(models, name="float.tflite", near_threshold=1.0, verify_fraction=1.0)
    plain = Engine(models / "float.tflite", profile="x86-dev", autotune=False)
    a, b = _frame(0), _frame(1)
    engine.infer(a)
    np.testing.assert_allclose(engine.infer(b), plain.infer(b), rtol=1e-6)
    assert engine.stats()["cache"]["verified_hits"] == 1


def test_threshold_loosens_slowly_back_to_but_never_beyond_the_configured_value():
    info = TensorInfo("x", 0, (1, 3), np.dtype(np.float32), 0.0, 0)
    cache = InferenceCache(CacheSettings(near_threshold=0.02), "c" * 64, [info], [info], classifier=True)
    a = (np.array([[0.1, 0.9, 0.0]], np.float32),)
    b = (np.array([[0.9, 0.1, 0.0]], np.float32),)
    cache._score(a, b)  # one disagreement: tighten at once
    tightened = cache.threshold
    assert tightened < 0.02
    for _ in range(2000):
        cache._score(a, a)
    assert tightened < cache.threshold <= 0.02
    assert cache.threshold == pytest.approx(0.02)


def test_cache_clear_forgets_entries_and_reference(models):
    engine = _engine(models)
    x = _frame()
    engine.infer(x)
    engine.clear_cache()
    engine.infer(x)
    stats = engine.stats()["cache"]
    assert stats["misses"] == 2 and stats["entries"] == 1


def test_cache_true_uses_the_profile_defaults(models):
    engine = Engine(models / "int8.tflite", profile="rpi4", autotune=False, cache=True)
    config = engine.stats()["cache"]["config"]
    assert config["max_bytes"] == 16777216 and config["near_threshold"] == 0.02


def test_bad_cache_settings_are_config_errors(models):
    with pytest.raises(ConfigError, match="near_threshold"):
        Engine(models / "int8.tflite", profile="x86-dev", cache={"near_threshold": 2.0})
    with pytest.raises(ConfigError, match="unknown keys"):
        Engine(models / "int8.tflite", profile="x86-dev", cache={"colour": "blue"})


def test_signatures_of_int8_and_uint8_views_of_one_image_agree():
    img = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3)).astype(np.uint8)
    u8 = TensorInfo("x", 0, (1, 64, 64, 3), np.dtype(np.uint8), 1 / 255, 0)
    i8 = TensorInfo("x", 0, (1, 64, 64, 3), np.dtype(np.int8), 1 / 255, -128)
    su = input_signature([img], [u8], [(0, 255)])
    si = input_signature([(img.astype(np.int16) - 128).astype(np.int8)], [i8], [(-128, 127)])
    assert signature_distance(su, si) == 0.0
    assert su.size <= 32 * 32 * 3


def test_cache_is_consistent_under_several_threads(models):
    engine = Engine(models / "int8.tflite", profile="x86-dev", autotune=False, instances=2, threads=1,
                    cache=CacheSettings(near=False))
    plain = Engine(models / "int8.tflite", profile="x86-dev", autotune=False)
    frames = [_frame(i) for i in range(6)]
    want = [plain.infer(f) for f in frames]
    bad: list[int] = []

    def work() -> None:
        for _ in range(10):
            for i, f in enumerate(frames):
                if not np.array_equal(engine.infer(f), want[i]):
                    bad.append(i)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = engine.stats()["cache"]
    assert not bad
    assert stats["exact_hits"] + stats["misses"] == 4 * 10 * 6 and stats["entries"] == 6


def test_a_young_threshold_is_verified_often_then_at_the_configured_fraction():
    """Directly on InferenceCache: near hits on a static input, outputs that always agree."""
    info = TensorInfo("x", 0, (1, 8, 8, 1), np.dtype(np.float32), 0.0, 0)
    out = TensorInfo("y", 1, (1, 4), np.dtype(np.float32), 0.0, 0)
    cache = InferenceCache(CacheSettings(max_bytes=0, verify_fraction=0.05, max_consecutive=10**6, max_age_s=1e6,
                                       seed=3), "c" * 64, [info], [out], classifier=True,
                           input_ranges=[(0.0, 1.0)])
    frame = [np.full((1, 8, 8, 1), 0.5, np.float32)]
    outputs = (np.array([[0.1, 0.7, 0.1, 0.1]], np.float32),)
    cache.record(cache.lookup(frame), outputs)  # the first frame is computed
    verdicts = []
    for _ in range(400):
        lookup = cache.lookup(frame)
        assert lookup.kind == "near"
        verdicts.append(lookup.verify)
        if lookup.verify:
            cache.record(lookup, tuple(a.copy() for a in outputs))
    assert sum(verdicts[:40]) >= 10  # half the near hits while young: 10 verdicts within a few dozen hits
    settled = verdicts[100:]
    assert sum(settled) / len(settled) < 0.12  # then about verify_fraction (5 %)
