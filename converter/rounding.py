"""Learned weight rounding: AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", 2020) layer by layer on the calibration samples, in numpy.

TFLite rounds every int8 weight to the nearest step of its channel's grid (symmetric,
``max|W_c| / 127`` per output channel of the kernel with its batch-norm folded in). Nearest is
best for each weight alone, not for the layer's output: the errors of a channel's weights add up
over the same input. AdaRound chooses, for each weight, the step below or the step above so the
layer's output on calibration inputs stays closest to the float layer's:

    min over h in {0, 1}  of  || X_q (s * (floor(W / s) + h)) - X W ||^2

``X`` is the float model's input to the layer, ``X_q`` the input it gets once the layers before it
are rounded (the "asymmetric" form of the paper: each layer also makes up for the error that
reaches it). The problem is relaxed to a rectified sigmoid ``h(V)`` and solved with Adam, with the
paper's regulariser annealed so every ``h`` ends at 0 or 1. Only second moments of the inputs are
needed (``X_q^T X_q``, ``X_q^T X``, ``X^T X``), so a layer costs one pass over its input patches,
then small matrix products. A layer whose learned rounding reconstructs worse than nearest keeps
nearest.

The result is written into the (twin) Keras model as weights that lie exactly on TFLite's grid
(unfolded again through the batch norm, which TFLite folds back in), so TensorFlow's quantizer
reproduces the learned rounding: each channel's largest weight is left where it is, so the
channel's scale does not move. The float function changes by the quantization error only; the
candidate is judged like any other, against the original float model on held-out samples.

Layers covered: Conv2D, DepthwiseConv2D (multiplier 1), SeparableConv2D (both kernels) and Dense,
with a batch norm folded in when it is their only consumer and they have no activation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["RoundingSummary", "kernels_to_round", "learn_rounding"]

_MAX_ROWS = 20_000  # input patches per layer the second moments are estimated from
_ITERATIONS = 600
_WARMUP = 0.2  # share of the iterations before the regulariser is switched on
_LEARNING_RATE = 0.05
_REG = 3.0  # regulariser weight, against the reconstruction error of nearest rounding (= 1); 0.01 left h soft
_BETA = (20.0, 2.0)  # annealed exponent of the regulariser


@dataclass(frozen=True)
class RoundingSummary:
    """What :func:`learn_rounding` changed: kernels rounded (of those it looked at), weights rounded
    away from nearest, and the layers' output error against nearest rounding's (mean ratio)."""

    kernels: int
    kept_nearest: int
    weights: int
    flipped: int
    error_ratio: float

    def to_dict(self) -> dict[str, Any]:
        return {"kernels": self.kernels, "kept_nearest": self.kept_nearest, "weights": self.weights,
                "flipped": self.flipped, "error_ratio": round(self.error_ratio, 4)}


def _layers() -> Any:
    from converter._tf import keras
    return keras.layers


@dataclass(frozen=True)
class _Kernel:
    """One kernel as TFLite quantizes it: (rows, channels) folded weights, how to write it back."""

    layer: Any
    attr: str  # "kernel", "depthwise_kernel" or "pointwise_kernel"
    factor: np.ndarray  # batch-norm factor per output channel (ones when none is folded in)
    depthwise: bool  # each channel sees only its own input channel


def _folded(k: _Kernel) -> np.ndarray:
    """(n, channels) weights as TFLite quantizes them; for depthwise, (kh*kw, channels)."""
    w = np.asarray(getattr(k.layer, k.attr), np.float64)
    if k.depthwise:
        return w[..., 0].reshape(-1, w.shape[2]) * k.factor
    return w.reshape(-1, w.shape[-1]) * k.factor


def _write(k: _Kernel, folded: np.ndarray) -> None:
    var = getattr(k.layer, k.attr)
    shape = tuple(var.shape)
    safe = np.where(k.factor != 0, k.factor, 1.0)
    w = (folded / safe).reshape(shape[:-1] if k.depthwise else shape)
    var.assign((w[..., None] if k.depthwise else w).astype(np.float32))


def kernels_to_round(model: Any) -> list[_Kernel]:
    """The kernels to round, in model order (each after every layer it depends on)."""
    from converter.equalize import activation_of, bn_factor, consumers_of

    L = _layers()
    consumers = consumers_of(model)
    out = []
    for layer in model.layers:
        if not isinstance(layer, (L.Conv2D, L.DepthwiseConv2D, L.SeparableConv2D, L.Dense)):
            continue
        if isinstance(layer, (L.DepthwiseConv2D, L.SeparableConv2D)) and layer.depth_multiplier != 1:
            continue
        if getattr(layer, "groups", 1) != 1:
            continue
        after = consumers.get(layer.name, [])
        norm = (after[0] if len(after) == 1 and isinstance(after[0], L.BatchNormalization)
                and activation_of(layer) == "linear" else None)
        if isinstance(layer, L.SeparableConv2D):
            channels = int(layer.depthwise_kernel.shape[2])
            out.append(_Kernel(layer, "depthwise_kernel", np.ones(channels), True))
            out.append(_Kernel(layer, "pointwise_kernel", bn_factor(norm, int(layer.pointwise_kernel.shape[-1])),
                               False))
        elif isinstance(layer, L.DepthwiseConv2D):
            out.append(_Kernel(layer, "kernel", bn_factor(norm, int(layer.kernel.shape[2])), True))
        else:
            out.append(_Kernel(layer, "kernel", bn_factor(norm, int(layer.kernel.shape[-1])), False))
    return out


def _pads(size: int, k: int, stride: int, dilation: int, padding: str) -> tuple[int, int]:
    if padding != "same":
        return 0, 0
    extent = (k - 1) * dilation + 1
    out = -(-size // stride)
    total = max((out - 1) * stride + extent - size, 0)
    return total // 2, total - total // 2


def _patches(x: np.ndarray, layer: Any, attr: str, rows: np.ndarray | None, rng: np.random.Generator,
             pair: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The layer's input as patch rows ``(rows, kh, kw, C)`` (Dense: ``(rows, C)``), at ``rows``
    (chosen at random when None, at most ``_MAX_ROWS``); ``pair`` (the other model's input) at the
    same places."""
    L = _layers()
    if isinstance(layer, L.Dense):
        flat = x.reshape(-1, x.shape[-1])
        if rows is None:
            rows = rng.choice(len(flat), min(len(flat), _MAX_ROWS), replace=False)
        other = pair.reshape(-1, pair.shape[-1])[rows] if pair is not None else None
        return flat[rows], other, rows
    if attr == "pointwise_kernel":
        kh = kw = 1
        strides, dilation, padding = (1, 1), (1, 1), "valid"
    else:
        kh, kw = layer.kernel_size
        strides, dilation, padding = layer.strides, layer.dilation_rate, layer.padding

    def windows(a: np.ndarray) -> np.ndarray:  # a view (N, Ho, Wo, C, kh, kw): nothing copied yet
        pt, pb = _pads(a.shape[1], kh, strides[0], dilation[0], padding)
        pl, pr = _pads(a.shape[2], kw, strides[1], dilation[1], padding)
        a = np.pad(a, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
        view = np.lib.stride_tricks.sliding_window_view(a, ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1),
                                                        axis=(1, 2))
        return view[:, ::strides[0], ::strides[1], :, ::dilation[0], ::dilation[1]]

    win = windows(x)
    positions = win.shape[0] * win.shape[1] * win.shape[2]
    if rows is None:
        rows = rng.choice(positions, min(positions, _MAX_ROWS), replace=False)
    at = np.unravel_index(rows, win.shape[:3])
    other = windows(pair)[at].transpose(0, 2, 3, 1) if pair is not None else None
    return win[at].transpose(0, 2, 3, 1), other, rows


def _moments(xq: np.ndarray, xf: np.ndarray, depthwise: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Xq^T Xq, Xq^T X, X^T X) over the rows; per channel ``(C, k, k)`` for depthwise kernels."""
    n = len(xq)
    if depthwise:  # rows of (kh, kw, C): one (kh*kw)-vector per channel
        q = xq.reshape(n, -1, xq.shape[-1]).astype(np.float64)
        f = xf.reshape(n, -1, xf.shape[-1]).astype(np.float64)
        return (np.einsum("nic,njc->cij", q, q) / n, np.einsum("nic,njc->cij", q, f) / n,
                np.einsum("nic,njc->cij", f, f) / n)
    q = xq.reshape(n, -1).astype(np.float64)
    f = xf.reshape(n, -1).astype(np.float64)
    return q.T @ q / n, q.T @ f / n, f.T @ f / n


def _apply(m: np.ndarray, w: np.ndarray, depthwise: bool) -> np.ndarray:
    """``M @ W`` per output channel: shared ``M`` (k, k), or one per channel (C, k, k)."""
    return np.einsum("cij,jc->ic", m, w) if depthwise else m @ w


def _error(wq: np.ndarray, w: np.ndarray, moments: tuple[np.ndarray, np.ndarray, np.ndarray],
           depthwise: bool) -> float:
    """Mean squared output error ``|Xq Wq - X W|^2`` per row, from the second moments."""
    a, b, c = moments
    return float(np.sum(wq * _apply(a, wq, depthwise)) - 2 * np.sum(wq * _apply(b, w, depthwise))
                 + np.sum(w * _apply(c, w, depthwise)))


def _learn(w: np.ndarray, moments: tuple[np.ndarray, np.ndarray, np.ndarray], depthwise: bool,
           iterations: int) -> tuple[np.ndarray, float]:
    """(weights on the int8 grid, their output error / nearest rounding's) for folded ``w`` (n, C)."""
    scale = np.abs(w).max(axis=0) / 127
    live = scale > 0
    s = np.where(live, scale, 1.0)
    ratio = w / s
    nearest = np.round(ratio) * s
    base = _error(nearest, w, moments, depthwise)
    if base <= 0 or not live.any():
        return nearest, 1.0
    floor = np.floor(ratio)
    # a channel's largest weight fixes its scale: it stays where nearest puts it (exactly +-127)
    pinned = (np.abs(ratio) >= 127 - 1e-9) | ~live[None, :] | (ratio == floor)
    rest = np.clip(ratio - floor, 0.0, 1.0)
    sig = np.clip((rest + 0.1) / 1.2, 1e-4, 1 - 1e-4)
    v = np.log(sig / (1 - sig))
    m1, m2 = np.zeros_like(v), np.zeros_like(v)
    a, b, _ = moments
    target = _apply(b, w, depthwise)
    free = (~pinned).sum() or 1
    warm = int(iterations * _WARMUP)
    for t in range(1, iterations + 1):
        sigma = 1 / (1 + np.exp(-v))
        raw = sigma * 1.2 - 0.1
        h = np.where(pinned, np.round(rest), np.clip(raw, 0.0, 1.0))
        wq = (floor + h) * s
        grad_h = 2 * (_apply(a, wq, depthwise) - target) * s / base
        if t > warm:
            beta = _BETA[1] + (_BETA[0] - _BETA[1]) * (1 - (t - warm) / max(iterations - warm, 1))
            centred = 2 * h - 1
            grad_h += _REG * (-2 * beta * np.abs(centred) ** (beta - 1) * np.sign(centred)) / free
        grad = np.where(pinned | (raw <= 0) | (raw >= 1), 0.0, grad_h * 1.2 * sigma * (1 - sigma))
        m1 = 0.9 * m1 + 0.1 * grad
        m2 = 0.999 * m2 + 0.001 * grad ** 2
        v -= _LEARNING_RATE * (m1 / (1 - 0.9 ** t)) / (np.sqrt(m2 / (1 - 0.999 ** t)) + 1e-8)
    raw = 1 / (1 + np.exp(-v)) * 1.2 - 0.1
    h = np.where(pinned, np.round(rest), (raw >= 0.5).astype(np.float64))
    learned = np.clip(floor + h, -127, 127) * s
    error = _error(learned, w, moments, depthwise)
    if error >= base:
        return nearest, 1.0
    return learned, error / base


def _predict(probe: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
    outs = probe.predict(inputs, batch_size=32, verbose=0)
    return [np.asarray(o) for o in (outs if isinstance(outs, (list, tuple)) else [outs])]


def _inputs_of(model: Any, layers: list[Any], inputs: list[np.ndarray]) -> list[np.ndarray]:
    from converter._tf import keras
    return _predict(keras.Model(model.inputs, [layer.input for layer in layers]), inputs)


def _twin_inputs(model: Any, ranges: dict[str, tuple[float, float]] | None) -> Any:
    """name -> the twin's input to that layer (``NAME/pointwise``: a SeparableConv2D's pointwise
    half's) on ``feed``, as the int8 model sees it when ``ranges`` are given. The graph is built
    once; it shares the twin's variables, so each call sees the layers rounded so far."""
    from converter._tf import keras
    if ranges is None:
        return lambda name, feed: _inputs_of(model, [model.get_layer(name)], feed)[0]
    from converter.fakequant import layer_inputs
    graph, inputs = layer_inputs(model, ranges)
    return lambda name, feed: _predict(keras.Model(graph.inputs, inputs[name]), feed)[0]


def _depthwise_out(layer: Any, x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    from converter._tf import tf
    return np.asarray(tf.nn.depthwise_conv2d(x, kernel.astype(np.float32), (1, *layer.strides, 1),
                                             layer.padding.upper(), dilations=layer.dilation_rate))


def learn_rounding(model: Any, reference: Any, inputs: list[np.ndarray], max_samples: int = 256,
                   iterations: int | None = None, seed: int = 0,
                   ranges: dict[str, tuple[float, float]] | None = None) -> RoundingSummary:
    """Round ``model``'s weights (a Keras twin of ``reference``, changed in place) to the int8 grid
    layer by layer, each rounding learned on the calibration ``inputs`` (first ``max_samples``).

    With ``ranges`` (:func:`converter.fakequant.activation_ranges`), each layer's input ``X_q`` is
    also fake-quantized as the int8 model's will be, so the rounding makes up for that error too.

    Raises:
        ValueError: ``model`` and ``reference`` do not have the same layers.
    """
    kernels = kernels_to_round(model)
    if not kernels:
        return RoundingSummary(0, 0, 0, 0, 1.0)
    L = _layers()
    by_name = {layer.name: layer for layer in reference.layers if not isinstance(layer, L.InputLayer)}
    if set(by_name) != {layer.name for layer in model.layers if not isinstance(layer, L.InputLayer)}:
        raise ValueError("learned rounding needs the twin of the reference model (same layer names)")
    rng = np.random.default_rng(seed)
    feed = [x[:max_samples] for x in inputs]
    done, kept, weights, flipped, ratios = 0, 0, 0, 0, []
    layer_input: tuple[str, np.ndarray, np.ndarray] | None = None
    twin_input = _twin_inputs(model, ranges)
    for k in kernels:
        name = k.layer.name
        if layer_input is None or layer_input[0] != name:  # the twin's input, with the layers before rounded
            layer_input = (name, twin_input(name, feed),
                           _inputs_of(reference, [by_name[name]], feed)[0])
        xq, xf = layer_input[1], layer_input[2]
        if k.attr == "pointwise_kernel":  # the depthwise half is already rounded in the twin
            ref_layer = by_name[name]
            xq = (_depthwise_out(k.layer, xq, np.asarray(k.layer.depthwise_kernel)) if ranges is None
                  else twin_input(f"{name}/pointwise", feed))
            xf = _depthwise_out(ref_layer, xf, np.asarray(ref_layer.depthwise_kernel))
        pq, pf, _ = _patches(xq, k.layer, k.attr, None, rng, xf)
        assert pf is not None
        w = _folded(k)
        learned, ratio = _learn(w, _moments(pq, pf, k.depthwise), k.depthwise, iterations or _ITERATIONS)
        nearest = np.round(w / np.where(np.abs(w).max(axis=0) > 0, np.abs(w).max(axis=0) / 127, 1.0))
        grid = learned / np.where(np.abs(w).max(axis=0) > 0, np.abs(w).max(axis=0) / 127, 1.0)
        done += 1
        kept += ratio >= 1.0
        weights += w.size
        flipped += int(np.sum(np.abs(np.round(grid) - nearest) > 0.5))
        ratios.append(ratio)
        _write(k, learned)
    return RoundingSummary(done, kept, weights, flipped, float(np.mean(ratios)))
