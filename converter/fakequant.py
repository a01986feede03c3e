"""The int8 view of a Keras twin: which tensors TFLite quantizes, their calibrated ranges, and the
twin rebuilt with each of them passed through fake quantization.

Shared by learned rounding (:mod:`converter.rounding`: each layer's input as the int8 model will
see it) and the distillation fine-tune (:mod:`converter.distill`: the graph it trains).

Which tensors TFLite quantizes is read from the graph: every layer output except a conv/dense
output folded into its batch norm, one fused into the ReLU that follows it, and identity layers;
plus the depthwise half of a SeparableConv2D (its own tensor in TFLite). The model input is left
alone (its quantization is the preprocessing's and cannot be learned away).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from converter.ranges import Histogram, choose_range, logit_floor

__all__ = ["activation_ranges", "layer_inputs", "rebuild"]

_HIST_BINS = 2048


def _keras() -> Any:
    from converter._tf import keras
    return keras


_RELU = ("relu", "relu6")


def _is_relu(layer: Any) -> bool:
    L = _keras().layers
    if isinstance(layer, L.ReLU):
        return True
    if isinstance(layer, L.Activation):
        from converter.equalize import activation_of
        return activation_of(layer) in _RELU
    return False


def _quantized(model: Any) -> set[str]:
    """Names of the layers whose output is a quantized tensor in the TFLite graph."""
    from converter.equalize import activation_of, consumers_of

    L = _keras().layers
    consumers = consumers_of(model)
    weighted = (L.Conv2D, L.DepthwiseConv2D, L.SeparableConv2D, L.Dense)
    out = set()
    for layer in model.layers:
        if isinstance(layer, (L.InputLayer, L.Dropout)):
            continue
        after = consumers.get(layer.name, [])
        only = after[0] if len(after) == 1 else None
        if isinstance(layer, weighted) and activation_of(layer) == "linear" and isinstance(only, L.BatchNormalization):
            continue  # folded into the batch norm
        if isinstance(layer, (*weighted, L.BatchNormalization, L.Add)) and only is not None and _is_relu(only):
            continue  # fused with the ReLU after it
        out.add(layer.name)
    return out


def _layer_classes() -> tuple[Any, Any, Any]:
    keras = _keras()
    from converter._tf import tf

    class FakeQuant(keras.layers.Layer):
        """int8 fake quantization over a fixed range (straight-through gradients inside it)."""

        def __init__(self, lo: float, hi: float, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.lo, self.hi = float(lo), float(hi)

        def call(self, x: Any) -> Any:
            return tf.quantization.fake_quant_with_min_max_args(x, min=self.lo, max=self.hi, num_bits=8)

    class DepthwiseHalf(keras.layers.Layer):
        """The depthwise half of a SeparableConv2D, with its variables."""

        def __init__(self, sep: Any, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.sep = sep

        def call(self, x: Any) -> Any:
            s = self.sep
            return tf.nn.depthwise_conv2d(x, s.depthwise_kernel, (1, *s.strides, 1), s.padding.upper(),
                                          dilations=s.dilation_rate)

    class PointwiseHalf(keras.layers.Layer):
        """The pointwise half of a SeparableConv2D (bias and activation included)."""

        def __init__(self, sep: Any, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.sep = sep

        def call(self, x: Any) -> Any:
            s = self.sep
            y = tf.nn.conv2d(x, s.pointwise_kernel, 1, "VALID")
            if s.use_bias:
                y = y + s.bias
            return s.activation(y)

    return FakeQuant, DepthwiseHalf, PointwiseHalf


def rebuild(model: Any, ranges: dict[str, tuple[float, float]] | None, record: dict[str, Any],
             inputs: dict[str, Any] | None = None) -> Any:
    """``model``'s graph over its own layers (shared variables), every quantized tensor recorded in
    ``record`` and, with ``ranges``, fake-quantized; each layer's input recorded in ``inputs`` by
    layer name (a SeparableConv2D's pointwise half's as ``NAME/pointwise``)."""
    inputs = {} if inputs is None else inputs
    keras = _keras()
    L = keras.layers
    FakeQuant, DepthwiseHalf, PointwiseHalf = _layer_classes()
    # the graph's outputs keep their own quantization (softmax's is fixed); never fake-quantized
    quantized = _quantized(model) - {t._keras_history.operation.name for t in model.outputs}

    def fq(name: str, x: Any) -> Any:
        record[name] = x
        if ranges is None or name not in ranges:
            return x
        lo, hi = ranges[name]
        return FakeQuant(lo, hi, name=f"fq_{len(record)}")(x)

    def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if args:
            inputs[layer.name] = args[0]
        if isinstance(layer, L.SeparableConv2D):
            half = fq(f"{layer.name}/depthwise", DepthwiseHalf(layer, name=f"dw_{layer.name}")(args[0]))
            inputs[f"{layer.name}/pointwise"] = half
            out = PointwiseHalf(layer, name=f"pw_{layer.name}")(half)
        else:
            out = layer(*args, **kwargs)
        return fq(layer.name, out) if layer.name in quantized else out

    if isinstance(model, keras.Sequential):
        inp = keras.Input(batch_shape=tuple(model.inputs[0].shape))
        x = inp
        for layer in model.layers:
            x = call(layer, x)
        return keras.Model(inp, x)
    return keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)


def activation_ranges(model: Any, inputs: list[np.ndarray], method: str = "minmax",
                      max_samples: int = 300) -> dict[str, tuple[float, float]]:
    """Per quantized tensor (see :func:`_rebuild`), its int8 range over the calibration samples by
    ``method`` (:func:`converter.ranges.choose_range`); a softmax's input keeps its maximum and its
    lower bound rises as :func:`converter.ranges.logit_floor` says."""
    keras = _keras()
    record: dict[str, Any] = {}
    graph = rebuild(model, None, record)
    names = list(record)
    probe = keras.Model(graph.inputs, [record[n] for n in names])
    feed = [x[:max_samples] for x in inputs]

    def batches() -> Any:  # streamed: all activations of a MobileNet on 300 samples would not fit
        for start in range(0, len(feed[0]), 32):
            chunk = [x[start:start + 32] for x in feed]
            out = probe.predict_on_batch(chunk if len(chunk) > 1 else chunk[0])
            yield [np.asarray(v, np.float64) for v in (out if isinstance(out, (list, tuple)) else [out])]

    from converter.equalize import activation_of
    from converter.pruning import inbound_layers
    softmax_inputs = set()
    for layer in model.layers:
        if activation_of(layer) == "softmax":
            softmax_inputs |= set(inbound_layers(layer))
    lows, highs = np.zeros(len(names)), np.zeros(len(names))  # ranges always hold 0
    tops = np.full(len(names), np.inf)  # the lowest top logit of any sample (softmax inputs)
    for values in batches():
        for i, v in enumerate(values):
            lows[i], highs[i] = min(lows[i], float(v.min())), max(highs[i], float(v.max()))
            if names[i] in softmax_inputs:
                tops[i] = min(tops[i], float(v.max(axis=-1).min()))
    hists = {i: Histogram.empty(lows[i], highs[i], _HIST_BINS) for i, n in enumerate(names)
             if method != "minmax" and n not in softmax_inputs and highs[i] > lows[i]}
    if hists:
        for values in batches():
            for i, hist in hists.items():
                hist.add(values[i])
    out = {}
    for i, name in enumerate(names):
        lo, hi = float(lows[i]), float(highs[i])
        if hi <= lo:
            continue
        if method != "minmax" and name in softmax_inputs:  # the rule refit_ranges applies
            lo = min(logit_floor(lo, hi, float(tops[i])), 0.0)
        elif i in hists:
            lo, hi = choose_range(hists[i], method)
        out[name] = (lo, hi)
    return out


def layer_inputs(model: Any, ranges: dict[str, tuple[float, float]]) -> tuple[Any, dict[str, Any]]:
    """``model``'s graph with every quantized tensor fake-quantized over ``ranges`` (sharing its
    variables), and each layer's input in it by layer name (``NAME/pointwise``: a
    SeparableConv2D's pointwise half's), as the int8 model will see them."""
    record: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    graph = rebuild(model, ranges, record, inputs)
    return graph, inputs
