"""The input-locality cache through a real Engine: exact hits, near-duplicate reuse and its limits,
reuse only where verdicts prove it safe, byte bounds, and per-model keys.

Near-duplicate reuse now needs evidence first (no verdicts, no reuse), so the tests that exercise
reuse warm the cache with noisy repeats of one frame until its bound is under the target; the
tests of the old EWMA threshold (tighten at once, loosen slowly, young-threshold verification)
are replaced by the rules that took its place: bands proven by a bound, thin bands verified more.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from agent import Engine
from agent.cache import InferenceCache, binomial_upper, input_signature, poisson_quantile, signature_distance
from agent.tensors import TensorInfo
from edgefleet.errors import ConfigError
from edgefleet.profiles import CacheSettings

pytestmark = pytest.mark.runtime


def _engine(models, name="int8.tflite", **cache):
    config = CacheSettings(**{"verify_fraction": 0.0, "max_verify_fraction": 0.0, **cache})
    return Engine(models / name, profile="x86-dev", autotune=False, cache=config)


def _frame(seed=0):
    return np.random.default_rng(seed).uniform(0.2, 0.8, (1, 16, 16, 3)).astype(np.float32)


def _warm(engine, x, frames=600, sigma=0.003, seed=11, free=False):
    """Noisy repeats of ``x`` until the cache reuses: on the budget after ~75 clean verdicts at
    1 %, 95 %, or with ``free`` until a band is reused freely (~300 verdicts)."""
    rng = np.random.default_rng(seed)
    for _ in range(frames):
        engine.infer(x + rng.normal(0, sigma, x.shape).astype(np.float32))
        stats = engine.stats()["cache"]
        if stats["score_limit"] > 0 if free else stats["near_hits"]:
            return
    raise AssertionError(f"no reuse after {frames} noisy repeats: {engine.stats()['cache']}")


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


def test_no_near_reuse_before_any_evidence(models):
    engine = _engine(models)
    x = _frame()
    engine.infer(x)
    engine.infer(x + np.random.default_rng(5).normal(0, 0.004, x.shape).astype(np.float32))
    stats = engine.stats()["cache"]
    assert stats["near_hits"] == 0 and stats["misses"] == 2 and stats["verdicts"] == 1
    assert stats["score_limit"] == 0.0 and stats["disagreement_upper"] is None


def test_noisy_repeat_of_a_computed_frame_is_a_near_hit_returning_its_outputs(models):
    engine = _engine(models, max_consecutive=1000, max_age_s=100.0)
    x = _frame()
    _warm(engine, x)
    engine.clear_cache()
    computed = engine.infer(x)  # computed: the new reference
    before = engine.stats()["cache"]["near_hits"]
    noisy = x + np.random.default_rng(5).normal(0, 0.004, x.shape).astype(np.float32)
    np.testing.assert_array_equal(engine.infer(noisy), computed)
    stats = engine.stats()["cache"]
    assert stats["near_hits"] == before + 1
    # Reused first on the budget: each reuse may carry up to 4 % risk, the answers as a whole <= 1 %
    # in expectation; the reported bound is on the count that may really have happened (a whole
    # disagreement over a handful of reuses, at 95 %), never below the expected one.
    samples = stats["exact_hits"] + stats["near_hits"] + stats["misses"] + stats["verified_hits"]
    assert 0 < stats["expected_disagreements"] <= 0.04 * stats["near_hits"]
    assert stats["expected_disagreements"] <= 0.01 * samples
    assert stats["disagreement_upper"] * stats["near_hits"] >= max(1.0, stats["expected_disagreements"]) - 1e-3


def test_a_different_scene_is_never_a_near_hit(models):
    engine = _engine(models, max_age_s=100.0)
    _warm(engine, _frame(0))
    before = engine.stats()["cache"]["near_hits"]
    engine.infer(_frame(1))
    assert engine.stats()["cache"]["near_hits"] == before


def test_near_reuse_stops_after_max_consecutive(models):
    engine = _engine(models, max_consecutive=3, max_age_s=100.0)
    x = _frame()
    _warm(engine, x, frames=4000, free=True)  # reused freely: the budget does not ration it
    rng = np.random.default_rng(9)
    engine.clear_cache()
    start = engine.stats()["cache"]
    for _ in range(9):
        engine.infer(x + rng.normal(0, 0.003, x.shape).astype(np.float32))
    stats = engine.stats()["cache"]
    reused, computed = stats["near_hits"] - start["near_hits"], stats["misses"] - start["misses"]
    assert (reused, computed) == (6, 3)  # miss, 3 reuses, miss, 3 reuses, miss, 2


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
    _warm(engine, x, frames=1500, sigma=0.008)  # evidence at distances like the drift's steps
    engine.clear_cache()
    outcomes = []
    for step in range(12):
        before = engine.stats()["cache"]["misses"]
        engine.infer(x + np.float32(step * 0.006))  # 1.5 levels of 255 per step
        outcomes.append(engine.stats()["cache"]["misses"] > before)
    assert outcomes[0] is True
    assert sum(outcomes) >= 3  # a fresh computation about every 3-4 steps, not once
    assert not all(outcomes)


def test_unrelated_images_are_never_reused_however_loose_the_threshold(models):
    # A threshold of 1.0 lets anything be a candidate: the verdicts disagree, so no band is proven.
    engine = _engine(models, name="float.tflite", near_threshold=1.0, max_age_s=100.0, max_consecutive=1000)
    rng = np.random.default_rng(3)
    for _ in range(200):
        engine.infer(rng.uniform(0, 1, (1, 16, 16, 3)).astype(np.float32) ** rng.uniform(0.2, 5))
    stats = engine.stats()["cache"]
    assert stats["verdicts"] == 199 and stats["verdict_disagreements"] > 20
    assert stats["near_hits"] == 0 and stats["score_limit"] == 0.0


def test_verified_outputs_are_the_fresh_ones(models):
    engine = _engine(models, name="float.tflite", verify_fraction=1.0, max_age_s=100.0, max_consecutive=1000)
    plain = Engine(models / "float.tflite", profile="x86-dev", autotune=False)
    x = _frame(0)
    rng = np.random.default_rng(4)
    for _ in range(400):  # every candidate is verified, so nothing is reused, yet evidence accrues
        noisy = x + rng.normal(0, 0.003, x.shape).astype(np.float32)
        np.testing.assert_allclose(engine.infer(noisy), plain.infer(noisy), rtol=1e-6)
    stats = engine.stats()["cache"]
    assert stats["verified_hits"] > 0 and stats["near_hits"] == 0


def _direct_cache(**settings):
    """An InferenceCache on a (1,8,8,1) float input and a 4-class output, driven without a model."""
    info = TensorInfo("x", 0, (1, 8, 8, 1), np.dtype(np.float32), 0.0, 0)
    out = TensorInfo("y", 1, (1, 4), np.dtype(np.float32), 0.0, 0)
    config = CacheSettings(**{"max_bytes": 0, "max_consecutive": 10**6, "max_age_s": 1e6, **settings})
    return InferenceCache(config, "c" * 64, [info], [out], classifier=True, input_ranges=[(0.0, 1.0)])


def _drive(cache, frames, answer):
    """Run frames through ``cache``, computing ``answer(frame)`` on every miss or verification.

    Returns, per frame, whether the cache's outputs were served (a near or exact hit).
    """
    reused = []
    for frame in frames:
        lookup = cache.lookup([frame])
        reused.append(lookup.outputs is not None and not lookup.verify)
        if not reused[-1]:
            cache.record(lookup, (answer(frame),))
    return reused


def test_a_band_is_reused_only_once_its_upper_bound_is_under_the_target():
    cache = _direct_cache(verify_fraction=0.0, max_verify_fraction=0.0, max_consecutive=10)
    frame = np.full((1, 8, 8, 1), 0.5, np.float32)
    confident = np.array([[0.05, 0.85, 0.05, 0.05]], np.float32)
    _drive(cache, [frame] * 120, lambda f: confident.copy())  # 119 clean verdicts: ramp only
    stats = cache.stats()
    assert stats["score_limit"] == 0.0 and [b["reuse"] for b in stats["bands"]] == ["budget"]
    _drive(cache, [frame] * 1800, lambda f: confident.copy())  # every 11th frame brings a verdict
    stats = cache.stats()
    assert stats["score_limit"] > 0 and stats["near_hits"] > 900
    assert binomial_upper(0, stats["verifications"], 0.95) <= 0.01
    samples = stats["near_hits"] + stats["misses"] + stats["verified_hits"]
    assert stats["expected_disagreements"] <= 0.01 * samples  # rationed to the target in expectation
    assert stats["answer_disagreement_upper"] <= 0.015  # the count that may have happened, at 95 %


def test_a_tied_answer_is_never_reused_whatever_the_evidence():
    cache = _direct_cache(verify_fraction=0.0, max_verify_fraction=0.0)
    frame = np.full((1, 8, 8, 1), 0.5, np.float32)
    _drive(cache, [frame] * 600, lambda f: np.array([[0.05, 0.85, 0.05, 0.05]], np.float32))
    cache.clear()  # the next frame is computed: its answer is the tie
    reused = cache.stats()["near_hits"]
    tied = np.array([[0.45, 0.45, 0.05, 0.05]], np.float32)  # margin 0: the score is infinite
    _drive(cache, [frame] * 50, lambda f: tied.copy())
    assert cache.stats()["near_hits"] == reused


def test_answers_that_flip_under_noise_stop_reuse_in_their_band():
    cache = _direct_cache(verify_fraction=0.05, max_consecutive=10, seed=2)
    rng = np.random.default_rng(0)
    frames = [np.full((1, 8, 8, 1), 0.5 + 0.01 * (i % 2), np.float32) for i in range(3000)]
    unsure = np.array([[0.3, 0.5, 0.1, 0.1]], np.float32)  # margin 0.2, but steady: reuse is earned
    early = _drive(cache, frames[:2000], lambda f: unsure.copy())
    assert sum(early[-200:]) > 150

    def flicker(f):  # then the same margin flips half the time: every reuse is a coin toss
        return unsure.copy() if rng.random() < 0.5 else unsure[:, [1, 0, 2, 3]].copy()

    late = _drive(cache, frames[2000:], flicker)
    assert cache.stats()["verdict_disagreements"] > 5
    assert sum(late[-500:]) == 0  # the band was shut, and stays shut while it keeps flipping


def test_thin_bands_are_verified_often_and_strong_ones_at_verify_fraction():
    cache = _direct_cache(verify_fraction=0.05, max_verify_fraction=0.5, max_consecutive=10, seed=3)
    frame = np.full((1, 8, 8, 1), 0.5, np.float32)
    confident = np.array([[0.05, 0.85, 0.05, 0.05]], np.float32)
    _drive(cache, [frame] * 3000, lambda f: confident.copy())
    band = cache.lookup([frame]).band
    assert cache._evidence.share[band] <= 0.06  # hundreds of verdicts: the floor
    assert cache._evidence.share[band + 5] == 0.5  # no verdicts there yet: the ceiling


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
    assert config["max_bytes"] == 16777216 and config["near_threshold"] == 0.25


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


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.float32])
def test_the_gathered_signature_and_its_distance_are_the_strided_subsample_and_its_mean_difference(dtype):
    """The hot path gathers at precomputed positions and sums into a scratch buffer (issue 15's 30 us):
    the figures must be exactly those of slicing every 7th pixel and taking a plain mean."""
    rng = np.random.default_rng(1)
    shape = (1, 224, 224, 3)
    lo, hi = {np.uint8: (0, 255), np.int8: (-128, 127), np.float32: (-1.0, 1.0)}[dtype]
    a, b = (rng.uniform(lo, hi, shape).astype(dtype) for _ in range(2))
    info = TensorInfo("x", 0, shape, np.dtype(dtype), 0.0, 0)
    sa, sb = (input_signature([x], [info], [(lo, hi)]) for x in (a, b))
    sliced = a[0:1, 3::7, 3::7, :].ravel()  # 224 // 32 = 7, starting half a step in
    if dtype == np.uint8:
        expected = sliced
    elif dtype == np.int8:
        expected = (sliced.astype(np.int16) + 128).astype(np.uint8)
    else:
        expected = np.clip(np.rint((sliced - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(sa, expected)
    assert sa.dtype == np.uint8 and sa.size == 32 * 32 * 3
    plain = float(np.abs(sa.astype(np.int16) - sb.astype(np.int16)).mean()) / 255.0
    assert signature_distance(sa, sb) == plain


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


def test_stats_keep_the_telemetry_keys_and_report_the_bound():
    stats = _direct_cache().stats()
    for key in ("enabled", "hit_rate", "exact_hits", "near_hits", "misses", "disagreement_rate", "threshold",
                "verified_hits", "disagreements", "disagreement", "disagreement_upper", "verifications",
                "answer_disagreement_upper", "confidence", "score_limit", "bands"):
        assert key in stats, key


def test_clopper_pearson_upper_bound_is_exact_at_zero_and_some_events():
    assert binomial_upper(0, 299, 0.95) == pytest.approx(1 - 0.05 ** (1 / 299), rel=1e-6)
    assert binomial_upper(0, 0, 0.95) == 1.0
    assert 0.019 < binomial_upper(2, 300, 0.95) < 0.022  # 6.3 / 300, the Poisson figure


def test_a_frame_far_beyond_the_distances_that_agreed_is_computed_even_where_its_band_is_open():
    """The envelope: reuse within 3x the mean distance of agreeing verdicts, whatever the bands say."""
    cache = _direct_cache(verify_fraction=0.0, max_verify_fraction=0.0, max_consecutive=10)
    confident = np.array([[0.05, 0.85, 0.05, 0.05]], np.float32)
    frames = [np.full((1, 8, 8, 1), 0.5 + 0.01 * (i % 2), np.float32) for i in range(400)]
    _drive(cache, frames, lambda f: confident.copy())
    ceiling = cache.stats()["reuse_ceiling"]
    assert 0.0 < ceiling < 0.03  # 3 x the mean agreeing distance (0 or 2 levels of 255)
    ev = cache._evidence
    ev.cost, ev.on_budget = [0.0] * len(ev.cost), [False] * len(ev.cost)  # every band free: only the envelope
    cache.clear()
    base = np.full((1, 8, 8, 1), 0.5, np.float32)
    cache.record(cache.lookup([base]), (confident.copy(),))
    assert cache.lookup([base + np.float32(ceiling / 2)]).kind == "near"
    assert cache.lookup([base + np.float32(ceiling * 2)]).kind == "miss"  # the band is open, the envelope not


def _drive_truth(cache, frames, truths):
    """Like ``_drive``, with each frame's answer fixed in advance; returns (reused, wrong) per frame."""
    reused, wrong = [], []
    for frame, truth in zip(frames, truths):
        lookup = cache.lookup([frame])
        served = lookup.outputs is not None and not lookup.verify
        reused.append(served)
        wrong.append(served and int(np.argmax(lookup.outputs[0])) != int(np.argmax(truth)))
        if not served:
            cache.record(lookup, (truth.copy(),))
    return reused, wrong


def test_a_flickering_scene_at_the_scores_of_a_calm_one_is_not_reused_on_the_calm_evidence():
    """Issue 15 (a): a calm scene proves a band; then a scene whose top-1 flips under noise arrives at
    the same distance and the same (confident) margins. Its first disagreements move it to a context
    of its own, where no calm evidence applies: reuse stops within a few verdicts, and what it did
    reuse stays within the reported bound."""
    cache = _direct_cache(verify_fraction=0.05, max_consecutive=10, seed=2)
    rng = np.random.default_rng(0)
    frames = [np.full((1, 8, 8, 1), 0.5 + 0.01 * (i % 2), np.float32) for i in range(3000)]
    sure = np.array([[0.05, 0.85, 0.05, 0.05]], np.float32)
    flipped = sure[:, [1, 0, 2, 3]]  # the same margin, the other class
    calm, _ = _drive_truth(cache, frames[:2000], [sure] * 2000)
    assert sum(calm[-200:]) > 150 and cache.stats()["score_limit"] > 0  # reused freely
    truths = [sure if rng.random() < 0.7 else flipped for _ in range(1000)]
    reused, wrong = _drive_truth(cache, frames[2000:], truths)
    # Without contexts (before issue 15's fix): 103 reuses, 53 of them wrong, under a reported 1.2 %.
    assert sum(reused) <= 60, sum(reused)
    stats = cache.stats()
    assert any(b["context"] > 0 for b in stats["bands"])
    assert sum(wrong) <= stats["disagreement_upper"] * stats["near_hits"]


def test_a_scene_cut_far_above_the_noise_leaves_the_calm_frames_context_alone():
    cache = _direct_cache()
    cache._note_recent(20, agree=False)  # a cut: a disagreement at a score far above the noise's
    assert cache._context[5] == 0 and cache._context[16] > 0
    cache._note_recent(6, agree=False)
    cache._note_recent(6, agree=False)  # flips at the noise's own scores
    assert cache._context[5] // 26 == 2 and cache._context[2] // 26 == 2
    for _ in range(16):  # sixteen calm verdicts later it is forgotten
        cache._note_recent(6, agree=True)
    assert cache._context == [0] * 26


def test_reported_bound_is_on_the_count_that_may_have_happened_not_only_the_expected_one():
    assert poisson_quantile(0.0, 0.95) == 0
    assert poisson_quantile(3.4, 0.95) == 7  # P(X <= 7 | 3.4) = 0.97, P(X <= 6) = 0.94
    assert poisson_quantile(16.0, 0.95) == 23
    assert poisson_quantile(499.0, 0.95) <= poisson_quantile(501.0, 0.95) <= 501 + 1.645 * 501 ** 0.5 + 2
    cache = _direct_cache(verify_fraction=0.0, max_verify_fraction=0.0, max_consecutive=10)
    frame = np.full((1, 8, 8, 1), 0.5, np.float32)
    confident = np.array([[0.05, 0.85, 0.05, 0.05]], np.float32)
    _drive(cache, [frame] * 200, lambda f: confident.copy())
    stats = cache.stats()
    expected, reuses = stats["expected_disagreements"], stats["near_hits"]
    assert 0 < expected and reuses > 0
    # Reuses at a few % each: a few more disagreements than expected are well within chance.
    assert stats["disagreement_upper"] * reuses >= poisson_quantile(expected, 0.95) > expected


def test_past_reuses_are_recharged_when_their_cell_disagrees_and_refunded_while_it_stays_clean():
    cache = _direct_cache(verify_fraction=0.0, max_verify_fraction=0.0, max_consecutive=10)
    frame = np.full((1, 8, 8, 1), 0.5, np.float32)
    confident = np.array([[0.05, 0.85, 0.05, 0.05]], np.float32)
    _drive(cache, [frame] * 300, lambda f: confident.copy())
    ev = cache._evidence
    cell = cache.lookup([frame]).band
    first_risk, first_reused = ev.risk, ev.reused[cell]
    assert first_reused > 0 and first_risk > 0
    _drive(cache, [frame] * 300, lambda f: confident.copy())
    assert first_reused * ev.best[cell] < first_risk  # the early reuses now carry today's tighter bound
    assert ev.risk == pytest.approx(sum(r * b for r, b in zip(ev.reused, ev.best)))
    lookup = cache.lookup([frame])
    while lookup.outputs is not None:  # reach a frame that is computed: its verdict lands in the cell
        lookup = cache.lookup([frame])
    before = ev.risk
    cache.record(lookup, (confident[:, [1, 0, 2, 3]].copy(),))  # ... and disagrees
    assert ev.risk > before  # every past reuse there now carries the wider bound
    assert ev.risk == pytest.approx(sum(r * b for r, b in zip(ev.reused, ev.best)))
