"""Cross-layer equalization: make per-tensor int8 weights nearly as faithful as per-channel ones.

Per-channel quantization stores a float32 scale and an int64 zero point for every output channel
(24 bytes with the bias's), which on a small, channel-rich model such as MobileNetV2 0.35 is a
quarter of the int8 file. Per-tensor weights drop all of that, but one scale per tensor crushes
the channels whose folded (conv x batch-norm) weights are small: MobileNet's depthwise kernels
span two orders of magnitude.

Equalization (Nagel et al., "Data-Free Quantization", 2019) rescales channel ``c`` of a layer's
output by ``1/s_c`` and the next layer's matching input channel by ``s_c``, choosing ``s_c`` so both
layers' per-channel ranges become ``sqrt(r1_c * r2_c)``. ReLU is positive-homogeneous, so the
float model computes the same function. ReLU6 (any capped ReLU) is only homogeneous below its cap,
so here ``s_c`` is bounded by each channel's pre-activation maximum on the calibration samples (with
a safety margin): a channel that reaches the cap is left alone, and no channel is scaled into it.
Then :func:`correct_bias` (the same paper's bias correction, empirical form) removes the mean
shift that rounding the weights to one per-tensor grid adds to every output channel: for each
conv/dense layer, ``E[(q(W) - W) x]`` is computed from the rounding error of the folded weights
and the mean of the layer's input on calibration samples, and subtracted from its bias (or
batch-norm offset). This one step does change the float function, on purpose, by exactly the
expected quantization error. The result is checked like any candidate: against the original
float model on held-out samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EqualizeSummary", "activation_of", "bn_factor", "consumers_of", "correct_bias", "equalize"]

_MARGIN = 1.25  # headroom between a channel's calibration maximum and the ReLU cap


@dataclass(frozen=True)
class EqualizeSummary:
    """What :func:`equalize` changed: layer pairs rescaled, their channels, and how many of those
    were left alone because they reach a ReLU cap on the calibration samples; ``bias_corrected``
    is filled in by the caller from :func:`correct_bias`."""

    pairs: int
    channels: int
    pinned: int
    bias_corrected: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": self.pairs, "channels": self.channels, "pinned": self.pinned,
                "bias_corrected": self.bias_corrected}


@dataclass(frozen=True)
class _Pair:
    first: Any  # Conv2D / DepthwiseConv2D producing the channels
    norm: Any  # its BatchNormalization, which absorbs the 1/s
    act: Any  # ReLU layer between them
    second: Any  # Conv2D / DepthwiseConv2D / Dense consuming the channels
    second_norm: Any | None  # BatchNormalization after ``second`` (folded into its weights by TFLite)


def _layers() -> Any:
    from converter._tf import keras
    return keras.layers


def consumers_of(model: Any) -> dict[str, list[Any]]:
    """Layer name -> the layers that read its output (what follows a conv: its batch norm, its ReLU)."""
    from converter.pruning import inbound_layers
    out: dict[str, list[Any]] = {}
    for layer in model.layers:
        for name in inbound_layers(layer):
            out.setdefault(name, []).append(layer)
    return out


def _is_plain_relu(layer: Any) -> bool:
    L = _layers()
    return (isinstance(layer, L.ReLU) and float(layer.negative_slope) == 0.0 and float(layer.threshold) == 0.0)


def _find_pairs(model: Any) -> list[_Pair]:
    """Chains conv -> BN -> ReLU -> [channel-wise layers] -> conv/dense, each link with one consumer."""
    L = _layers()
    consumers = consumers_of(model)
    # layers that act on each channel alone and commute with a positive per-channel scale
    passthrough = (L.ZeroPadding2D, L.MaxPooling2D, L.AveragePooling2D, L.GlobalAveragePooling2D,
                   L.GlobalMaxPooling2D, L.Dropout)

    def only(layer: Any) -> Any | None:
        found = consumers.get(layer.name, [])
        return found[0] if len(found) == 1 else None

    pairs = []
    for first in model.layers:
        if not isinstance(first, (L.Conv2D, L.DepthwiseConv2D)) or activation_of(first) != "linear":
            continue
        if isinstance(first, L.DepthwiseConv2D) and first.depth_multiplier != 1:
            continue
        norm = only(first)
        if not (isinstance(norm, L.BatchNormalization) and norm.scale and norm.center):
            continue
        act = only(norm)
        if act is None or not _is_plain_relu(act):
            continue
        second = only(act)
        while isinstance(second, passthrough):
            second = only(second)
        if isinstance(second, L.DepthwiseConv2D) and second.depth_multiplier != 1:
            continue
        if not isinstance(second, (L.Conv2D, L.DepthwiseConv2D, L.Dense)):
            continue
        after = only(second)
        second_norm = after if isinstance(after, L.BatchNormalization) and activation_of(second) == "linear" else None
        pairs.append(_Pair(first, norm, act, second, second_norm))
    return pairs


def activation_of(layer: Any) -> str:
    """The name of a layer's fused activation ("linear" for a Keras layer without one, "None" for a layer that takes none)."""
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", str(activation))


def bn_factor(norm: Any | None, n: int) -> np.ndarray:
    """gamma / sqrt(var + eps) per channel of ``norm``: what TFLite folds into the kernel (1 without one)."""
    if norm is None:
        return np.ones(n, np.float64)
    gamma = np.asarray(norm.gamma, np.float64) if norm.scale else np.ones(n)
    return gamma / np.sqrt(np.asarray(norm.moving_variance, np.float64) + norm.epsilon)


def _out_range(pair: _Pair) -> np.ndarray:
    """Per output channel: max |folded weight| of the first layer (TFLite folds the BN into it)."""
    kernel = np.asarray(pair.first.kernel, np.float64)
    if isinstance(pair.first, _layers().DepthwiseConv2D):
        kernel = kernel[..., 0]
    folded = np.abs(kernel) * np.abs(bn_factor(pair.norm, kernel.shape[-1]))
    return folded.reshape(-1, kernel.shape[-1]).max(axis=0)


def _in_range(pair: _Pair) -> np.ndarray:
    """Per input channel: max |folded weight| of the second layer."""
    L = _layers()
    kernel = np.asarray(pair.second.kernel, np.float64)
    if isinstance(pair.second, L.DepthwiseConv2D):
        folded = np.abs(kernel[..., 0]) * np.abs(bn_factor(pair.second_norm, kernel.shape[2]))
        return folded.reshape(-1, kernel.shape[2]).max(axis=0)
    folded = np.abs(kernel) * np.abs(bn_factor(pair.second_norm, kernel.shape[-1]))
    return folded.max(axis=tuple(i for i in range(kernel.ndim) if i != kernel.ndim - 2))


def _apply(pair: _Pair, s: np.ndarray) -> None:
    """First layer's channel c divided by s_c (through its BN), second layer's input c multiplied by s_c."""
    pair.norm.gamma.assign((np.asarray(pair.norm.gamma, np.float64) / s).astype(np.float32))
    pair.norm.beta.assign((np.asarray(pair.norm.beta, np.float64) / s).astype(np.float32))
    kernel = np.asarray(pair.second.kernel, np.float64)
    shape = [1] * kernel.ndim
    shape[2 if isinstance(pair.second, _layers().DepthwiseConv2D) else kernel.ndim - 2] = -1
    pair.second.kernel.assign((kernel * s.reshape(shape)).astype(np.float32))


def _scales(r1: np.ndarray, r2: np.ndarray, peak: np.ndarray, cap: float | None) -> np.ndarray:
    """Per channel ``s``: divide the first layer's channel by it, multiply the second's by it.

    Unconstrained this is DFQ's ``sqrt(r1 / r2)``, which gives both layers the range
    ``sqrt(r1 * r2)``. Channels that reach a ReLU cap must keep ``s = 1``; they pin each layer's
    per-tensor range, so the free channels are balanced against those ranges instead (equal share
    of both). No channel is scaled up into the cap or above the layer's activation peak, which
    would coarsen the per-tensor activation scale.
    """
    live = (r1 > 1e-12) & (r2 > 1e-12)
    r1, r2 = np.where(live, r1, 1.0), np.where(live, r2, 1.0)
    # no channel grows past the tensor's current activation peak, nor near a ReLU cap: the
    # per-tensor activation scale stays where it was
    ceiling = float(peak.max())
    free = live.copy()
    if cap is not None:
        ceiling = min(ceiling, float(cap) / _MARGIN)
        free &= peak <= float(cap) / _MARGIN  # never near the cap on the calibration samples
    low = np.maximum(peak / ceiling, 1e-6) if ceiling > 0 else np.full_like(r1, 1e-6)
    if not free.any():
        return np.ones_like(r1)
    pinned = live & ~free
    target = float(np.sqrt(r1 * r2)[free].max())
    range1 = max(target, float(r1[pinned].max()) if pinned.any() else 0.0)
    range2 = max(target, float(r2[pinned].max()) if pinned.any() else 0.0)
    s = np.sqrt(r1 * range2 / (r2 * range1))
    return np.where(free, np.maximum(s, low), 1.0)


def _channel_batches(model: Any, tensors: list[Any], inputs: list[np.ndarray], max_samples: int,
                     batch: int = 32) -> Iterator[list[np.ndarray]]:
    """``tensors`` evaluated batch by batch, each flattened to (values, channels): the activations of
    a MobileNet on a few hundred samples would not fit in memory at once."""
    from converter._tf import keras
    probe = keras.Model(model.inputs, tensors)
    for start in range(0, min(len(inputs[0]), max_samples), batch):
        chunk = [x[start:min(start + batch, max_samples)] for x in inputs]
        outs = probe(chunk, training=False)
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        yield [np.asarray(o, np.float64).reshape(-1, o.shape[-1]) for o in outs]


def _preactivation_max(model: Any, pairs: list[_Pair], inputs: list[np.ndarray], max_samples: int) -> list[np.ndarray]:
    maxima: list[np.ndarray] | None = None
    for flat in _channel_batches(model, [pair.norm.output for pair in pairs], inputs, max_samples):
        batch_max = [f.max(axis=0) for f in flat]
        maxima = batch_max if maxima is None else [np.maximum(a, b) for a, b in zip(maxima, batch_max)]
    assert maxima is not None
    return maxima


def equalize(model: Any, inputs: list[np.ndarray], iterations: int = 4, max_samples: int = 5000) -> EqualizeSummary:
    """Equalize ``model`` (a Keras model, changed in place) for per-tensor weight quantization.

    ``inputs`` are calibration samples, one array per model input (the first ``max_samples`` are
    used: all, normally, since more samples make the bounds safer); they bound the scales at capped
    ReLUs (ReLU6) so the float model's function does not change.
    """
    pairs = _find_pairs(model)
    if not pairs:
        return EqualizeSummary(0, 0, 0)
    maxima = _preactivation_max(model, pairs, inputs, max_samples)
    for _ in range(iterations):
        for pair, peak in zip(pairs, maxima):
            s = _scales(_out_range(pair), _in_range(pair), peak, pair.act.max_value)
            _apply(pair, s)
            peak /= s
    pinned = sum(int(np.sum(peak > float(pair.act.max_value) / _MARGIN)) for pair, peak in zip(pairs, maxima)
                 if pair.act.max_value is not None)
    return EqualizeSummary(len(pairs), sum(len(peak) for peak in maxima), pinned)


def _bias_targets(model: Any) -> list[tuple[Any, Any | None]]:
    """(layer, batch-norm after it or None) for every conv/dense layer whose output offset we can move."""
    L = _layers()
    consumers = consumers_of(model)
    targets = []
    for layer in model.layers:
        if not isinstance(layer, (L.Conv2D, L.DepthwiseConv2D, L.Dense)):
            continue
        if isinstance(layer, L.DepthwiseConv2D) and layer.depth_multiplier != 1:
            continue
        after = consumers.get(layer.name, [])
        norm = (after[0] if len(after) == 1 and isinstance(after[0], L.BatchNormalization) and after[0].center
                and activation_of(layer) == "linear" else None)
        if norm is not None or layer.use_bias:
            targets.append((layer, norm))
    return targets


def _input_means(model: Any, layers: list[Any], inputs: list[np.ndarray], max_samples: int) -> list[np.ndarray]:
    """Per-channel mean of each layer's input over the samples and spatial positions."""
    sums: list[np.ndarray] | None = None
    count = 0
    for flat in _channel_batches(model, [layer.input for layer in layers], inputs, max_samples):
        batch_sums = [f.sum(axis=0) for f in flat]
        sums = batch_sums if sums is None else [a + b for a, b in zip(sums, batch_sums)]
        count = count + np.array([len(f) for f in flat])
    assert sums is not None
    return [total / n for total, n in zip(sums, count)]


def correct_bias(model: Any, inputs: list[np.ndarray], max_samples: int = 300, per_channel: bool = False) -> int:
    """Subtract the expected int8 rounding error of the weights from each layer's output offset.

    Changes ``model`` in place; returns the number of layers corrected. Weights are rounded the
    way TFLite quantizes them: symmetric, ``max|W| / 127`` per folded kernel (``per_channel``:
    per output channel, whose rounding errors are smaller but just as biased on a narrow channel).
    """
    L = _layers()
    targets = _bias_targets(model)
    if not targets:
        return 0
    means = _input_means(model, [layer for layer, _ in targets], inputs, max_samples)
    for (layer, norm), mean in zip(targets, means):
        kernel = np.asarray(layer.kernel, np.float64)
        depthwise = isinstance(layer, L.DepthwiseConv2D)
        if depthwise:
            kernel = kernel[..., 0]
        folded = kernel * bn_factor(norm, kernel.shape[-1])
        if per_channel:
            step = np.abs(folded).reshape(-1, folded.shape[-1]).max(axis=0) / 127
            step = np.where(step > 0, step, 1.0)
        else:
            step = np.abs(folded).max() / 127
            if step == 0:
                continue
        error = np.round(folded / step) * step - folded
        if depthwise:
            shift = (error * mean).reshape(-1, kernel.shape[-1]).sum(axis=0)
        else:  # (kh, kw, in, out) or (in, out): sum over everything but the output axis
            shift = np.tensordot(error, mean, axes=([kernel.ndim - 2], [0])).reshape(-1, kernel.shape[-1]).sum(axis=0)
        offset = norm.beta if norm is not None else layer.bias
        offset.assign((np.asarray(offset, np.float64) - shift).astype(np.float32))
    return len(targets)
