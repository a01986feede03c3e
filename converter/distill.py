"""A short quantization-aware fine-tune by distillation from the float model: the last int8 remedy.

Post-training steps (activation ranges, bias correction, learned rounding) leave the float weights'
function as it is, up to rounding. When int8 activations still lose points, the weights themselves
can learn to live with the int8 grid: the twin is run with every tensor TFLite will quantize passed
through fake quantization (``tf.quantization.fake_quant_with_min_max_args``: int8 steps over the
range calibration gives that tensor, gradients straight through inside it) and its kernels
quantized per output channel the way TFLite will (folded with their batch norm, symmetric,
``max|W_c| / 127``; each channel's largest weight is held, so its scale is TFLite's throughout),
gradients passed straight through to float shadow kernels. The targets are
the float model's own outputs on the calibration samples, so no labels are needed. Batch-norm
statistics and scales stay frozen (TFLite folds them); kernels, biases and batch-norm offsets
learn. At the end the twin's kernels are left exactly on the int8 grid, so TensorFlow's quantizer
reproduces them.

Which tensors TFLite quantizes: see :mod:`converter.fakequant`.

Can go wrong: with few calibration samples the fine-tune fits those samples, not the float model;
the candidate is judged like every other, against the float model on the held-out samples, so
this shows as no gain, never as a hidden one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from converter.fakequant import activation_ranges, rebuild

__all__ = ["DistillSummary", "distill"]

_EPOCHS = 20
_BATCH = 32
_LEARNING_RATE = 1e-5  # Adam; kernels and offsets (1e-4 oscillated on fer: the grid flips under it)
_VALIDATION_EVERY = 5


@dataclass(frozen=True)
class DistillSummary:
    """What :func:`distill` did: epochs and steps, the distillation loss before and after (on all
    calibration samples, fake-quantized twin against the float model), tensors fake-quantized."""

    epochs: int
    steps: int
    loss_before: float
    loss_after: float
    tensors: int
    history: tuple[float, ...] = ()  # after each epoch, the loss on the held-back calibration samples


    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "steps": self.steps, "loss_before": round(self.loss_before, 6),
                "loss_after": round(self.loss_after, 6), "tensors": self.tensors,
                "history": [round(v, 6) for v in self.history]}


def _scales(w: np.ndarray, factor: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """TFLite's per-channel int8 step of ``w * factor`` (channels on ``axis``; 1 for an all-zero
    channel) and the mask of each channel's largest weights, which set it."""
    folded = np.abs(w * factor)
    axes = tuple(i for i in range(w.ndim) if i != axis)
    peak = folded.max(axis=axes, keepdims=True)
    return np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32), folded >= peak  # all of an all-zero channel


def _grid(w: Any, factor: Any, scale: Any) -> Any:
    """``w`` rounded to the int8 grid ``scale`` of ``w * factor``, clipped to +-127 steps."""
    from converter._tf import tf
    steps = tf.clip_by_value(tf.round(w * factor / scale), -127.0, 127.0)
    return steps * scale / tf.where(factor != 0, factor, tf.ones_like(factor))


def _kernel_specs(model: Any) -> list[tuple[Any, np.ndarray, int]]:
    """(kernel variable, batch-norm factor broadcastable to it, channel axis) for each weight kernel."""
    from converter.rounding import kernels_to_round
    specs = []
    for k in kernels_to_round(model):
        var = getattr(k.layer, k.attr)
        rank = len(var.shape)
        axis = rank - 2 if k.depthwise else rank - 1
        shape = [1] * rank
        shape[axis] = -1
        specs.append((var, np.asarray(k.factor, np.float32).reshape(shape), axis))
    return specs


def _loss_fn(targets: list[np.ndarray]) -> Any:
    """KL divergence for outputs that are probability vectors, variance-normalised MSE otherwise."""
    from converter._tf import tf
    kinds = []
    for t in targets:
        probs = t.ndim >= 2 and t.min() >= 0 and np.allclose(t.sum(axis=-1), 1.0, atol=1e-3)
        kinds.append(("kl", 1.0) if probs else ("mse", float(max(t.var(), 1e-12))))

    def loss(outs: list[Any], ys: list[Any]) -> Any:
        total = 0.0
        for (kind, var), o, y in zip(kinds, outs, ys):
            if kind == "kl":
                total += tf.reduce_mean(tf.reduce_sum(y * (tf.math.log(y + 1e-8) - tf.math.log(o + 1e-8)), axis=-1))
            else:
                total += tf.reduce_mean(tf.square(o - y)) / var
        return total
    return loss


def distill(model: Any, reference: Any, inputs: list[np.ndarray], method: str = "minmax",
            epochs: int = _EPOCHS, batch: int = _BATCH, learning_rate: float = _LEARNING_RATE,
            max_samples: int = 300, seed: int = 0) -> DistillSummary:
    """Fine-tune ``model`` (a Keras twin of ``reference``, changed in place) for int8 by distillation
    on the calibration ``inputs``; its kernels end on TFLite's per-channel int8 grid.

    Raises:
        ValueError: the model has nothing to fine-tune.
    """
    from converter._tf import keras, tf
    L = keras.layers
    every = [np.asarray(x[:max_samples], np.float32) for x in inputs]
    ranges = activation_ranges(reference, every, method, max_samples)
    # every 5th calibration sample is held back to choose the epoch: 300 samples are easily fitted
    # by heart, and a fine-tune that only fits them is worse on anything else
    held = np.arange(len(every[0])) % _VALIDATION_EVERY == 0
    feed, check = [x[~held] for x in every], [x[held] for x in every]

    def predict(xs: list[np.ndarray]) -> list[np.ndarray]:
        out = reference.predict(xs if len(xs) > 1 else xs[0], batch_size=batch, verbose=0)
        return [np.asarray(t, np.float32) for t in (out if isinstance(out, (list, tuple)) else [out])]

    targets, check_targets = predict(feed), predict(check)
    record: dict[str, Any] = {}
    graph = rebuild(model, ranges, record)
    specs = _kernel_specs(model)
    if not specs:
        raise ValueError("no conv or dense kernels to fine-tune")
    offsets = []
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization) and layer.center:
            offsets.append(layer.beta)
        elif getattr(layer, "use_bias", False) and getattr(layer, "bias", None) is not None:
            offsets.append(layer.bias)
    shadows = [tf.Variable(np.asarray(var), dtype=tf.float32) for var, _, _ in specs]
    params = shadows + [v.value if hasattr(v, "value") else v for v in offsets]
    m1 = [tf.Variable(tf.zeros_like(p)) for p in params]
    m2 = [tf.Variable(tf.zeros_like(p)) for p in params]
    loss_of = _loss_fn(targets)
    factors = [tf.constant(f) for _, f, _ in specs]
    # each channel's scale stays where TFLite will put it: its largest weights do not learn (were
    # they to move, the whole channel would be re-rounded on a new grid at every step)
    fixed = [_scales(np.asarray(var), f, axis) for var, f, axis in specs]
    scales = [tf.constant(sc) for sc, _ in fixed]
    frozen = [tf.constant((~pin).astype(np.float32)) for _, pin in fixed] + [None] * len(offsets)
    step_count = tf.Variable(0.0)
    total_steps = float(max(epochs * (len(feed[0]) // batch), 1))

    def quantize_kernels() -> None:
        for (var, _, _), shadow, factor, scale in zip(specs, shadows, factors, scales):
            var.assign(_grid(shadow, factor, scale))

    @tf.function
    def evaluate(xs: list[Any], ys: list[Any]) -> Any:
        quantize_kernels()
        outs = graph(xs if len(xs) > 1 else xs[0], training=False)
        return loss_of(outs if isinstance(outs, (list, tuple)) else [outs], ys)

    @tf.function
    def train_step(xs: list[Any], ys: list[Any]) -> Any:
        quantize_kernels()
        watched = [var for var, _, _ in specs] + offsets
        with tf.GradientTape() as tape:
            outs = graph(xs if len(xs) > 1 else xs[0], training=False)
            loss = loss_of(outs if isinstance(outs, (list, tuple)) else [outs], ys)
        grads = tape.gradient(loss, watched)
        step_count.assign_add(1.0)
        t = step_count
        rate = learning_rate * 0.5 * (1 + tf.cos(np.pi * tf.minimum(t / total_steps, 1.0)))  # cosine to 0: settles
        for p, g, a, b, keep in zip(params, grads, m1, m2, frozen):  # Adam; kernel gradients go straight
            if g is None:                                              # through to the shadows
                continue
            if keep is not None:
                g = g * keep
            a.assign(0.9 * a + 0.1 * g)
            b.assign(0.999 * b + 0.001 * tf.square(g))
            p.assign_sub(rate * (a / (1 - 0.9 ** t)) / (tf.sqrt(b / (1 - 0.999 ** t)) + 1e-8))
        return loss

    def full_loss(xs_all: list[np.ndarray], ys_all: list[np.ndarray]) -> float:
        total, n = 0.0, 0
        for start in range(0, len(xs_all[0]), batch):
            xs = [x[start:start + batch] for x in xs_all]
            ys = [y[start:start + batch] for y in ys_all]
            total += float(evaluate(xs, ys)) * len(xs[0])
            n += len(xs[0])
        return total / max(n, 1)

    def snapshot() -> list[np.ndarray]:
        return [np.array(p.numpy()) for p in params]

    before = full_loss(every, predict(every))
    best, kept = full_loss(check, check_targets), snapshot()
    rng = np.random.default_rng(seed)
    steps, history = 0, []
    for _ in range(epochs):
        order = rng.permutation(len(feed[0]))
        for start in range(0, len(order) - batch + 1, batch):
            index = order[start:start + batch]
            train_step([x[index] for x in feed], [y[index] for y in targets])
            steps += 1
        history.append(full_loss(check, check_targets))
        if history[-1] < best:  # chosen on held-back calibration samples; the evaluation set judges it
            best, kept = history[-1], snapshot()
    for p, value in zip(params, kept):
        p.assign(value)
    after = full_loss(every, predict(every))  # also leaves the kernels on the grid
    return DistillSummary(epochs, steps, before, after, len(ranges), tuple(history))
