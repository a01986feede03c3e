"""Weights fitted to the int8 grid: learned rounding (AdaRound) and the distillation fine-tune.

Unit checks of the pieces (patches against the layer itself, the grid TFLite reproduces), then both
recipes end to end on the digits CNN made rounding-sensitive, and where the search tries them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converter.quantize import Recipe
from converter.search import Sources, _best_ranges, _fitted, _remedies
from edgefleet.profiles import load_profile


def test_patches_times_kernel_is_the_conv_output_for_same_and_valid_padding() -> None:
    from converter._tf import keras
    from converter.rounding import _patches

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 9, 3)).astype(np.float32)
    for padding, strides in (("same", 2), ("valid", 1), ("same", 1)):
        layer = keras.layers.Conv2D(4, 3, strides=strides, padding=padding, use_bias=False)
        out = np.asarray(layer(x))
        rows = np.arange(out.shape[0] * out.shape[1] * out.shape[2])
        patches, _, _ = _patches(x, layer, "kernel", rows, rng)
        w = np.asarray(layer.kernel).reshape(-1, 4)
        np.testing.assert_allclose(patches.reshape(len(rows), -1) @ w, out.reshape(-1, 4), atol=1e-5)


def test_learned_rounding_keeps_each_channels_scale_and_stays_on_the_grid() -> None:
    from converter.rounding import _learn

    rng = np.random.default_rng(1)
    w = rng.normal(size=(27, 6))
    x = rng.normal(size=(500, 27)) @ (np.eye(27) + 0.5 * rng.normal(size=(27, 27))) + 1.0  # correlated, as activations are
    moments = (x.T @ x / 500, x.T @ x / 500, x.T @ x / 500)
    learned, ratio = _learn(w, moments, False, 600)
    scale = np.abs(w).max(axis=0) / 127
    grid = learned / scale
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-9)  # on the grid
    np.testing.assert_allclose(np.abs(learned).max(axis=0), np.abs(w).max(axis=0))  # same scale
    assert np.all(np.abs(grid - w / scale) < 1 + 1e-9)  # up or down, never further
    assert ratio < 0.7  # reconstructs better than nearest (0.49 measured)


@pytest.fixture(scope="module")
def coarse(digits, tmp_path_factory):
    """The digits CNN with one weight per output channel 8x its largest: every channel's int8 grid is
    8x coarser for the rest, so how each weight is rounded matters (the float model is the reference)."""
    from converter._tf import keras
    from converter.data import SampleSet
    from converter.loading import export_keras

    model = keras.models.clone_model(digits.model)
    model.set_weights(digits.model.get_weights())
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            w = np.asarray(layer.kernel)
            flat = w.reshape(-1, w.shape[-1])
            flat[0] = 8 * np.abs(flat).max(axis=0) * np.sign(flat[0] + 1e-12)
            layer.kernel.assign(flat.reshape(w.shape))
    folder = tmp_path_factory.mktemp("coarse")
    export_keras(model, folder / "float", (["image"], ["probs"]))
    cal = SampleSet({"image": digits.x[:300]}, None, "cal")
    ev = SampleSet({"image": digits.x[digits.n_train:]}, digits.y[digits.n_train:], "eval")
    return model, folder, cal, ev


def _measure(model: bytes, ev, reference) -> tuple[float, float]:
    from converter import fidelity

    outputs = fidelity.run_model(model, ev)
    metrics = fidelity.compare(reference, outputs, ev.labels)
    error = float(np.mean((next(iter(outputs.values())) - next(iter(reference.values()))) ** 2))
    return metrics.top1_agreement_pct, error


def _quantized(sources: Sources, recipe: Recipe) -> bytes:
    from converter import quantize
    return quantize.quantize(sources.for_recipe(recipe), recipe, sources.calibration)


def test_learned_rounding_beats_nearest_per_channel_where_rounding_matters(coarse, tmp_path: Path,
                                                                         monkeypatch) -> None:
    from tensorflow.lite.tools import flatbuffer_utils

    from converter import fidelity, quantize, rounding

    monkeypatch.setattr(rounding, "_ITERATIONS", 200)  # a test budget; the default is 600
    monkeypatch.setattr(rounding, "_MAX_ROWS", 5000)
    model, folder, cal, ev = coarse
    sources = Sources(folder / "float", model, (["image"], ["probs"]), cal, tmp_path, False)
    reference = fidelity.run_model(quantize.convert_float(folder / "float"), ev)
    plain_agree, plain_error = _measure(_quantized(sources, Recipe("int8 per-channel")), ev, reference)
    learned = _quantized(sources, Recipe("lr", learned_rounding=True))
    agree, error = _measure(learned, ev, reference)
    summary = sources.rounding["minmax"]
    assert summary.kernels == 5 and summary.flipped > 0
    assert agree >= plain_agree and error < plain_error, (agree, plain_agree, error, plain_error)
    # the learned rounding is what TFLite stores: the last Dense layer's int8 weights, byte for byte
    w = np.asarray(sources._models["learned_rounding_minmax"].layers[-1].kernel, np.float64)
    expected = np.round(w / (np.abs(w).max(axis=0) / 127)).T.astype(np.int8)
    flat = flatbuffer_utils.convert_bytearray_to_object(bytearray(learned))
    stored = [np.frombuffer(bytes(flat.buffers[t.buffer].data), np.int8).reshape(t.shape)
              for t in flat.subgraphs[0].tensors if t.type == 9 and list(t.shape) == [10, w.shape[0]]]
    assert len(stored) == 1 and np.array_equal(stored[0], expected)


def test_distillation_fine_tune_keeps_or_improves_agreement_and_ends_on_the_grid(coarse, tmp_path: Path) -> None:
    from converter import distill, fidelity, quantize
    from converter._tf import keras

    model, folder, cal, ev = coarse
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    summary = distill.distill(twin, model, [cal.inputs["image"]], epochs=3)
    assert summary.loss_after <= summary.loss_before and summary.steps == 3 * (240 // 32)  # every 5th sample held back
    for var, factor, axis in distill._kernel_specs(twin):  # what TFLite will reproduce exactly
        folded = np.asarray(var) * factor
        scale = np.abs(folded).max(axis=tuple(i for i in range(folded.ndim) if i != axis), keepdims=True) / 127
        np.testing.assert_allclose(folded / scale, np.round(folded / scale), atol=1e-3)
    sources = Sources(folder / "float", model, (["image"], ["probs"]), cal, tmp_path, False)
    reference = fidelity.run_model(quantize.convert_float(folder / "float"), ev)
    plain_agree, _ = _measure(_quantized(sources, Recipe("int8 per-channel")), ev, reference)
    sources._twins["distilled_minmax"] = tmp_path / "distilled"
    from converter.loading import export_keras
    export_keras(twin, tmp_path / "distilled", (["image"], ["probs"]))
    agree, _ = _measure(_quantized(sources, Recipe("d", distilled=True)), ev, reference)
    assert agree >= plain_agree - 0.5, (agree, plain_agree)


def test_search_fits_weights_after_the_range_methods_and_before_16x8(tmp_path: Path) -> None:
    sources = Sources(tmp_path, object(), (["image"], ["probs"]), None, tmp_path, False)  # type: ignore[arg-type]
    profile = load_profile("rpi4")
    allow = profile.model_copy(update={"quantization": profile.quantization.model_copy(
        update={"allow_16bit_activations": True, "require_full_integer": False}), })
    names = [r.name if isinstance(r, Recipe) else r for r in _remedies(sources, allow)]
    assert (names.index("ranges:mse") < names.index("learned_rounding") < names.index("distilled")
            < names.index("16x8 (int16 activations)"))
    no_keras = Sources(tmp_path, None, (["image"], ["probs"]), None, tmp_path, False)  # type: ignore[arg-type]
    assert "learned_rounding" not in _remedies(no_keras, allow)


def test_fitted_recipes_carry_the_range_method_that_measured_best() -> None:
    from converter.fidelity import Metrics
    from converter.search import Candidate
    from converter.stats import wilson

    def cand(recipe: Recipe, agree: int) -> Candidate:
        metrics = Metrics(400, agree / 4, None, None, {"y": 0.99}, {"y": 30.0}, {"y": 0.1},
                          agreement=wilson(agree, 400))
        return Candidate(recipe, b"m", metrics, ("low",), None, host_latency_ms=1.0, kernel="xnnpack-int8")

    tried = [cand(Recipe("int8 per-channel"), 360), cand(Recipe("p", ranges="percentile"), 370),
             cand(Recipe("m", ranges="mse"), 380), cand(Recipe("16x8", int16_activations=True), 399)]
    recipe = _fitted("distilled", _best_ranges(tried))
    assert recipe.distilled and recipe.ranges == "mse" and recipe.name == "int8 per-channel + distillation + mse ranges"
    assert _fitted("learned_rounding", "minmax").name == "int8 per-channel + learned rounding"
    with pytest.raises(ValueError, match="pick one"):
        Recipe("x", bias_corrected=True, learned_rounding=True)
