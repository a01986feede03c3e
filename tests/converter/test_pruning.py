"""Pruning on Keras 3: filters really disappear, residual branches are left alone, sparsity holds."""

from __future__ import annotations

import numpy as np

from converter._tf import keras
from converter.pruning import (
    apply_sparsity,
    conv_macs,
    finetune,
    kernel_sparsity,
    plan_channel_pruning,
    prune_channels,
)


def _accuracy(model, x, y) -> float:
    return float(np.mean(model.predict(x, verbose=0).argmax(1) == y))


def test_channel_pruning_removes_filters_downstream_and_finetune_recovers_accuracy(digits) -> None:
    x_tr, y_tr = digits.x[:digits.n_train], digits.y[:digits.n_train]
    x_te, y_te = digits.x[digits.n_train:], digits.y[digits.n_train:]
    pruned, summary = prune_channels(digits.model, 0.3, allocation="uniform")
    assert pruned.count_params() < 0.6 * digits.model.count_params()
    # the first conv and its batch norm, by position: Keras numbers auto names per process, so
    # "conv2d" is another layer once an earlier test built a model first
    conv = next(layer.name for layer in digits.model.layers if type(layer).__name__ == "Conv2D")
    norm = next(layer.name for layer in digits.model.layers if type(layer).__name__ == "BatchNormalization")
    assert pruned.get_layer(conv).filters == 24  # 32 * 0.7 rounded to a multiple of 8
    assert pruned.get_layer(norm).gamma.shape == (24,)
    assert pruned.get_layer("probs").units == 10  # the output layer keeps its classes
    assert any("probs" in s for s in summary.skipped)
    finetune(pruned, digits.model, [x_tr], y_tr, epochs=3)
    assert _accuracy(pruned, x_te, y_te) >= _accuracy(digits.model, x_te, y_te) - 0.03


def test_pruning_zero_fraction_keeps_the_function_exactly(digits) -> None:
    same, _ = prune_channels(digits.model, 0.0)
    x = digits.x[:16]
    assert np.allclose(same.predict(x, verbose=0), digits.model.predict(x, verbose=0), atol=1e-5)


def test_layers_feeding_a_residual_add_are_left_untouched() -> None:
    inp = keras.Input((8, 8, 4))
    a = keras.layers.Conv2D(4, 1, name="branch")(inp)
    s = keras.layers.Add(name="residual")([a, inp])
    h = keras.layers.Conv2D(16, 3, name="body")(s)
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(3, name="head")(h)
    model = keras.Model(inp, out)
    plans, skipped = plan_channel_pruning(model, 0.5)
    assert [p.layer for p in plans] == ["body"]
    assert any(s.startswith("branch: reaches model input") for s in skipped)
    pruned, _ = prune_channels(model, 0.5)
    assert pruned.get_layer("branch").filters == 4 and pruned.get_layer("body").filters == 8
    assert pruned.predict(np.zeros((1, 8, 8, 4), np.float32), verbose=0).shape == (1, 3)


def test_magnitude_pruning_reaches_sparsity_and_finetune_does_not_regrow_weights(digits) -> None:
    model = keras.models.clone_model(digits.model)
    model.set_weights(digits.model.get_weights())
    masks = apply_sparsity(model, 0.5)
    assert abs(kernel_sparsity(model) - 0.5) < 0.01
    finetune(model, digits.model, [digits.x[:400]], None, epochs=1, masks=masks)
    assert kernel_sparsity(model) >= 0.49


def test_residual_add_between_convs_prunes_both_branches_with_the_same_channels() -> None:
    inp = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(16, 3, padding="same", name="a")(inp)
    b = keras.layers.Conv2D(16, 3, padding="same", name="b")(a)
    b = keras.layers.BatchNormalization(name="b_bn")(b)
    s = keras.layers.Add(name="residual")([a, b])
    h = keras.layers.ReLU()(s)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inp, keras.layers.Dense(3, name="head")(h))
    plans, _ = plan_channel_pruning(model, 0.5, allocation="uniform")
    joint = [p for p in plans if set(p.producers) == {"a", "b"}]
    assert len(joint) == 1 and len(joint[0].kept) == 8 and set(joint[0].members) >= {"b_bn"}
    pruned, _ = prune_channels(model, 0.5, allocation="uniform")
    assert pruned.get_layer("a").filters == pruned.get_layer("b").filters == 8
    assert pruned.get_layer("b").kernel.shape == (3, 3, 8, 8) and pruned.get_layer("head").kernel.shape == (8, 3)
    x = np.random.default_rng(0).random((2, 8, 8, 3), np.float32)
    assert pruned.predict(x, verbose=0).shape == (2, 3)


def _pyramid() -> keras.Model:
    """Two conv stages: a wide-per-pixel 48x48 stage and a 6x6 stage, like MobileNet's early and late layers."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((48, 48, 3))
    h = keras.layers.Conv2D(40, 3, padding="same", name="early")(inp)
    h = keras.layers.BatchNormalization(name="early_bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(24, 1, strides=8, name="down")(h)
    h = keras.layers.Conv2D(200, 3, padding="same", name="late")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(5, name="head")(h))


def test_kept_channels_are_whole_tiles_of_8_and_one_tile_spaces_stay_whole() -> None:
    model = _pyramid()
    for allocation in ("uniform", "width", "cost"):
        for fraction in (0.1, 0.3, 0.6):
            plans, _ = plan_channel_pruning(model, fraction, allocation)
            assert plans and all(len(p.kept) % 8 == 0 and len(p.kept) >= 8 for p in plans), (allocation, fraction)
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, name="narrow")(inp)
    h = keras.layers.GlobalAveragePooling2D()(h)
    plans, _ = plan_channel_pruning(keras.Model(inp, keras.layers.Dense(2)(h)), 0.5)
    assert [len(p.kept) for p in plans] == [8]


def test_cost_allocation_prunes_high_resolution_channels_more_for_the_same_channel_fraction() -> None:
    model = _pyramid()
    _, u = prune_channels(model, 0.3, allocation="uniform")
    _, c = prune_channels(model, 0.3, allocation="cost")
    assert abs(c.channels_removed - 0.3) < 0.06 and abs(u.channels_removed - 0.3) < 0.06
    kept = {p.layer: len(p.kept) for p in c.plans}
    assert kept["early"] / 40 < kept["late"] / 200  # a 48x48 channel costs far more than a 6x6 one
    assert c.macs_after < u.macs_after < conv_macs(model)


def test_size_allocation_puts_more_sparsity_in_large_kernels_with_the_same_overall_sparsity() -> None:
    model = _pyramid()
    masks = apply_sparsity(model, 0.5, allocation="size")
    assert abs(kernel_sparsity(model) - 0.5) < 0.01
    sparsity = {name: 1 - float(mask.mean()) for name, mask in masks.items()}
    assert sparsity["late"] > 0.5 > sparsity["early"]
    late = np.moveaxis(np.asarray(model.get_layer("late").kernel), 2, -1).reshape(-1, 24)
    assert set(np.unique((late == 0).sum(axis=1))) <= {0, 8, 16, 24}  # whole blocks of 8 input channels
