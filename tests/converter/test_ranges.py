"""Activation ranges by percentile or MSE: the chooser on synthetic histograms (pure numpy), the
converted model (still full int8, loads, plain int8's size), and the search that tries them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converter.fidelity import Metrics
from converter.quantize import Recipe
from converter.ranges import Histogram, choose_range, expected_mse, mse_range, percentile_range
from converter.search import Candidate, Sources, _best_min_max_int8, _remedies, _with_ranges
from converter.stats import wilson
from edgefleet.profiles import load_profile


def _histogram(values: np.ndarray, bins: int = 2048) -> Histogram:
    hist = Histogram.empty(float(values.min()), float(values.max()), bins)
    for chunk in np.array_split(values, 7):  # streamed, as over calibration samples
        hist.add(chunk)
    return hist


@pytest.fixture(scope="module")
def outliers() -> np.ndarray:
    """A Gaussian bulk with a handful of values 40 sigma out: what stretches a min/max range."""
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(0.0, 1.0, 200_000), [40.0, -38.0, 35.0]])


def test_mse_clip_on_a_histogram_with_outliers_lowers_the_error_of_min_max(outliers: np.ndarray) -> None:
    hist = _histogram(outliers)
    lo, hi = mse_range(hist)
    assert -35 < lo < -3 and 3 < hi < 35  # inside the outliers (whose own clipping error it weighs), outside the bulk
    minmax = float(expected_mse(hist, hist.lo, hist.hi)[0])
    chosen = float(expected_mse(hist, lo, hi)[0])
    assert chosen < 0.8 * minmax

    def real_mse(a: float, b: float) -> float:  # int8 on the actual values, not the histogram's estimate
        step = (b - a) / 255
        q = np.round((np.clip(outliers, a, b) - a) / step) * step + a
        return float(np.mean((outliers - q) ** 2))
    assert real_mse(lo, hi) < 0.8 * real_mse(hist.lo, hist.hi)
    assert real_mse(lo, hi) < real_mse(*percentile_range(hist))  # MSE weighs what percentile ignores


def test_percentile_clip_drops_rare_outliers_and_keeps_zero_in_range(outliers: np.ndarray) -> None:
    lo, hi = percentile_range(_histogram(outliers), 99.99)
    assert -5 < lo < -3 and 3 < hi < 5  # about +-3.7 sigma
    positive = _histogram(np.abs(outliers) + 1.0)  # all values above zero: int8 still has to hold 0
    assert percentile_range(positive)[0] == 0.0 and mse_range(positive)[0] == 0.0


def test_relu_output_with_a_spike_of_exact_zeros_keeps_its_lower_bound_at_zero() -> None:
    rng = np.random.default_rng(1)
    relu = np.maximum(rng.normal(0.0, 1.0, 100_000), 0.0)
    hist = _histogram(relu)
    assert hist.zeros > 40_000  # exact zeros are counted apart: int8 holds them exactly
    lo, hi = mse_range(hist)
    assert lo == 0.0 and 2.0 < hi <= relu.max()


def test_clean_uniform_values_are_barely_clipped() -> None:
    values = np.random.default_rng(2).uniform(-1.0, 1.0, 100_000)
    lo, hi = mse_range(_histogram(values))
    assert lo < -0.97 and hi > 0.97


def test_unknown_range_method_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="expected one of minmax, percentile, mse"):
        choose_range(_histogram(np.arange(10.0)), "entropy")
    with pytest.raises(ValueError, match="expected one of"):
        Recipe("x", ranges="kl")
    with pytest.raises(ValueError, match="full-int8 recipes only"):
        Recipe("x", int16_activations=True, ranges="mse")


def _candidate(recipe: Recipe, agree: int) -> Candidate:
    metrics = Metrics(400, agree / 4, None, None, {"y": 0.99}, {"y": 30.0}, {"y": 0.1}, agreement=wilson(agree, 400))
    return Candidate(recipe, b"m", metrics, ("agreement too low",), None, host_latency_ms=1.0, kernel="xnnpack-int8")


def test_search_tries_both_range_methods_after_the_weight_remedies_and_before_16x8(tmp_path: Path) -> None:
    sources = Sources(tmp_path, object(), (["image"], ["probs"]), None, tmp_path, False)  # type: ignore[arg-type]
    profile = load_profile("rpi4")
    allow = profile.model_copy(update={"quantization": profile.quantization.model_copy(
        update={"allow_16bit_activations": True, "require_full_integer": False}), })
    names = [r.name if isinstance(r, Recipe) else r for r in _remedies(sources, allow)]
    assert names.index("int8 per-channel + bias correction") < names.index("ranges:percentile")
    assert names.index("ranges:percentile") < names.index("ranges:mse") < names.index("16x8 (int16 activations)")


def test_range_methods_build_on_the_most_faithful_min_max_int8_candidate() -> None:
    plain = _candidate(Recipe("int8 per-channel"), 264)
    corrected = _candidate(Recipe("int8 per-channel + bias correction", bias_corrected=True), 376)
    per_tensor = _candidate(Recipe("int8 per-tensor", per_channel=False), 370)
    slow = _candidate(Recipe("16x8", int16_activations=True), 396)
    ranged = _candidate(Recipe("int8 + mse", ranges="mse"), 399)
    base = _best_min_max_int8([plain, corrected, per_tensor, slow, ranged])
    assert base is corrected
    recipe = _with_ranges(base.recipe, "mse")
    assert recipe.bias_corrected and recipe.ranges == "mse" and recipe.name.endswith("+ mse ranges")
    assert _best_min_max_int8([slow]) is None


@pytest.fixture(scope="module")
def prepared(digits, tmp_path_factory):
    from converter.data import SampleSet
    from converter.loading import load_model

    loaded = load_model(digits.keras_path, tmp_path_factory.mktemp("ranges"))
    cal = SampleSet({"image": digits.x[:300]}, digits.y[:300], "cal")
    ev = SampleSet({"image": digits.x[digits.n_train:]}, digits.y[digits.n_train:], "eval")
    return loaded, cal, ev


def test_unchanged_ranges_through_the_hook_give_plain_int8_byte_for_byte(prepared, monkeypatch) -> None:
    """The hook calls TensorFlow's quantizer exactly as its own int8 path does."""
    import converter.quantize as q

    loaded, cal, _ = prepared
    plain = q.quantize(loaded.saved_model_dir, Recipe("int8"), cal)
    monkeypatch.setattr(q, "refit_ranges", lambda model, *args, **kw: (model, None))
    assert q.quantize(loaded.saved_model_dir, Recipe("int8 + mse", ranges="mse"), cal) == plain


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_model_with_refit_ranges_is_full_int8_loads_and_has_plain_int8_size(prepared, method: str) -> None:
    from converter.fidelity import compare, run_model
    from converter.quantize import convert_float, quantize
    from converter.tflite_inspect import inspect_tflite

    loaded, cal, ev = prepared
    plain = quantize(loaded.saved_model_dir, Recipe("int8"), cal)
    model = quantize(loaded.saved_model_dir, Recipe(f"int8 + {method}", ranges=method), cal)
    inspection = inspect_tflite(model)  # read back through ai-edge-litert
    assert inspection.full_integer and inspection.non_integer_ops == ()
    assert len(model) == len(plain) and model != plain  # same tensors and buffers, other scales
    reference = run_model(convert_float(loaded.saved_model_dir), ev)
    assert compare(reference, run_model(model, ev), ev.labels).top1_agreement_pct >= 97


def test_softmax_input_keeps_its_top_and_clips_only_logits_that_cannot_compete() -> None:
    from converter.ranges import LOGIT_SPAN, logit_floor

    assert logit_floor(-15.7, 8.4, 0.5) == 0.5 - LOGIT_SPAN  # fer's logits: the grid gets twice as fine
    assert logit_floor(-3.0, 8.4, 0.5) == -3.0  # never below what was recorded
    assert logit_floor(-40.0, 8.4, 0.5, beta=2.0) == 0.5 - LOGIT_SPAN / 2


def test_softmax_input_floor_is_four_below_the_lowest_top_so_near_equal_logits_stop_sharing_an_int8_step() -> None:
    """On fer the int8 softmax's tied outputs are ties of its int8 logits (step 0.057 with a floor 8
    below the lowest top): 6 % of held-out crops have their two best classes closer than that."""
    from converter.ranges import logit_floor

    lo, hi, lowest_top = -12.9, 7.2, 0.6  # fer's recorded logits and lowest top logit
    floor = logit_floor(lo, hi, lowest_top)
    assert floor == pytest.approx(lowest_top - 4.0)
    step = (hi - floor) / 255
    assert step < 0.042 < (hi - (lowest_top - 8.0)) / 255  # 0.0416, against 0.0573 with 8


def test_variants_of_unchanged_ranges_answer_like_the_recipe_and_jitter_moves_every_activation_scale(prepared) -> None:
    """One calibration, several quantizations: an identity edit gives the recipe's own model (same
    outputs; TensorFlow's final byte-level passes are skipped), a jitter rescales every activation."""
    from converter.fidelity import run_model
    from converter.quantize import quantize, quantize_variants
    from converter.ranges import jitter_ranges
    from converter.tflite_inspect import inspect_tflite

    loaded, cal, ev = prepared
    recipe = Recipe("int8 + mse", ranges="mse")
    own = quantize(loaded.saved_model_dir, recipe, cal)
    rng = np.random.default_rng(0)
    same, jittered = quantize_variants(loaded.saved_model_dir, recipe, cal,
                                       [lambda m: m, lambda m: jitter_ranges(m, 0.05, rng)])
    for a, b in zip(run_model(own, ev).values(), run_model(same, ev).values()):
        np.testing.assert_array_equal(a, b)
    assert inspect_tflite(jittered).full_integer

    def activation_scales(model: bytes) -> list[float]:
        from ai_edge_litert.interpreter import Interpreter
        details = Interpreter(model_content=model).get_tensor_details()
        return [d["quantization"][0] for d in details if d["dtype"] == np.int8 and d["quantization"][0] > 0
                and d["shape"].size == 4 and d["shape"][0] == 1]
    before, after = activation_scales(same), activation_scales(jittered)
    assert len(before) == len(after) > 3
    ratios = [b / a for a, b in zip(before, after)]
    assert sum(abs(r - 1) > 1e-4 for r in ratios) >= len(ratios) - 2  # input and output keep theirs
    assert all(0.94 < r < 1.06 for r in ratios)


def test_variants_refuse_recipes_whose_activations_are_not_int8(prepared) -> None:
    from converter.quantize import quantize_variants

    loaded, cal, _ = prepared
    with pytest.raises(ValueError, match="full-int8"):
        next(quantize_variants(loaded.saved_model_dir, Recipe("16x8", int16_activations=True), cal, [lambda m: m]))
