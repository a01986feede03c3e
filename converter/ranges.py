"""Activation ranges for int8 chosen by percentile or by quantization MSE instead of min/max.

TFLite's calibration records each activation tensor's minimum and maximum over the calibration
samples, and the int8 scale is ``(max - min) / 255``. One rare outlier then stretches the grid for
every other value: on fer's mini-Xception plain per-channel int8 agrees with the float model on
about 95 % of inputs while 16x8 (the same int8 weights, int16 activations) agrees on 99 %, so the
loss is in the activation ranges, not the weights.

Here the calibrated float model (the converter's ``_experimental_calibrate_only`` output, whose
tensors carry the recorded min/max) is run once more over the calibration samples to build a
streaming histogram per activation tensor (``BINS`` bins over the recorded range; exact zeros,
which int8 represents exactly, counted apart). Each range is then narrowed, never widened:

- ``percentile``: the ``PERCENTILE``-th and ``100 - PERCENTILE``-th percentiles;
- ``mse``: the clip ``[lo, hi]`` minimising the expected squared error of int8 quantization over
  the histogram, clipping error plus rounding error (``step**2 / 12`` inside the range), the
  "MSE calibration" of TensorRT and of Nagel et al.'s white paper on quantization (2021).

Left alone: the graph's inputs (the manifest's input quantization must match the
preprocessing), its outputs, and the inputs of arg-max/arg-min. A softmax's input keeps its
maximum (top-1 is decided by the largest logits, exactly what a clip would flatten); only its lower
bound rises, to ``LOGIT_SPAN`` below the lowest top logit of any calibration sample
(:func:`logit_floor`): on fer's mini-Xception that input alone cost 2 points of agreement, and its
step is where the int8 softmax's tied outputs come from. Tensors whose scale the quantizer fixes (softmax,
logistic outputs) or ties to a neighbour's (concat, pooling, reshape) are still resolved by
TensorFlow's quantizer, which runs unchanged on the edited model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from converter.data import SampleSet

__all__ = ["BINS", "LOGIT_SPAN", "METHODS", "PERCENTILE", "Histogram", "RangeSummary", "choose_range",
           "expected_mse", "jitter_ranges", "logit_floor", "mse_range", "percentile_range", "refit_ranges"]

METHODS = ("minmax", "percentile", "mse")
BINS = 2048  # per tensor; 8x finer than the int8 grid at the full recorded range
PERCENTILE = 99.99
_LEVELS = 255  # int8 steps across the range
_CANDIDATES = 256  # clip values tried per side and round of the MSE search
_ROUNDS = 3  # coordinate descent: upper clip, then lower clip, repeated
# ops whose inputs keep the recorded range (see the module docstring)
_KEEP_INPUTS_OF = {"ARG_MAX", "ARG_MIN"}
# ops whose input keeps its recorded maximum; only logits far below every sample's top are clipped
_LOGITS_OF = {"SOFTMAX", "LOG_SOFTMAX"}
LOGIT_SPAN = 4.0  # natural-log units: a class this far below the top has < e^-4 (1.8 %) of its probability


@dataclass
class Histogram:
    """Counts of one tensor's values over ``[lo, hi]`` in ``len(counts)`` bins; exact zeros apart."""

    lo: float
    hi: float
    counts: np.ndarray
    zeros: int = 0

    @classmethod
    def empty(cls, lo: float, hi: float, bins: int = BINS) -> Histogram:
        return cls(float(lo), float(hi), np.zeros(bins, np.int64))

    @property
    def centers(self) -> np.ndarray:
        edges = np.linspace(self.lo, self.hi, len(self.counts) + 1)
        return (edges[:-1] + edges[1:]) / 2

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self.zeros

    def add(self, values: np.ndarray) -> None:
        """Count ``values`` (any shape); values outside ``[lo, hi]`` land in the edge bins."""
        flat = np.asarray(values, np.float64).ravel()
        nonzero = flat[flat != 0]
        self.zeros += flat.size - nonzero.size
        if nonzero.size == 0 or self.hi <= self.lo:
            return
        width = (self.hi - self.lo) / len(self.counts)
        index = np.clip(((nonzero - self.lo) / width).astype(np.int64), 0, len(self.counts) - 1)
        self.counts += np.bincount(index, minlength=len(self.counts))


def expected_mse(hist: Histogram, lo: np.ndarray | float, hi: np.ndarray | float) -> np.ndarray:
    """Expected squared int8 quantization error per value for each clip ``[lo, hi]`` (broadcast).

    Values outside the clip cost their distance to it squared; inside it, the rounding error of a
    uniform grid of ``(hi - lo) / 255`` steps, ``step**2 / 12``. Exact zeros cost nothing.
    """
    lo_arr = np.atleast_1d(np.asarray(lo, np.float64))[:, None]
    hi_arr = np.atleast_1d(np.asarray(hi, np.float64))[:, None]
    x = hist.centers[None, :]
    below = np.clip(lo_arr - x, 0.0, None)
    above = np.clip(x - hi_arr, 0.0, None)
    inside = (below == 0) & (above == 0)
    step = (hi_arr - lo_arr) / _LEVELS
    err = below ** 2 + above ** 2 + inside * (step ** 2 / 12)
    return (err * hist.counts[None, :]).sum(axis=1) / max(hist.total, 1)


def _with_zero(lo: float, hi: float) -> tuple[float, float]:
    """int8 ranges always hold 0 exactly (TFLite nudges them to); a clip never needs to exclude it."""
    return min(lo, 0.0), max(hi, 0.0)


def percentile_range(hist: Histogram, percentile: float = PERCENTILE) -> tuple[float, float]:
    """The ``100 - percentile`` and ``percentile`` percentiles of the histogram, zero included."""
    counts = hist.counts.astype(np.float64).copy()
    if hist.zeros and hist.lo < 0 < hist.hi:
        counts[min(int((0 - hist.lo) / (hist.hi - hist.lo) * len(counts)), len(counts) - 1)] += hist.zeros
    total = counts.sum()
    if total == 0:
        return _with_zero(hist.lo, hist.hi)
    edges = np.linspace(hist.lo, hist.hi, len(counts) + 1)
    cdf = np.cumsum(counts) / total
    tail = (100.0 - percentile) / 100.0
    lo = edges[int(np.searchsorted(cdf, tail, side="right"))]  # lower edge of the bin crossing the tail
    hi = edges[int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1]  # upper edge of the crossing bin
    return _with_zero(max(float(lo), hist.lo), min(float(hi), hist.hi))


def mse_range(hist: Histogram) -> tuple[float, float]:
    """The clip ``[lo, hi]`` inside the recorded range with the least :func:`expected_mse`.

    First both sides shrunk by one factor (one outlier's grid hides the other side's, so one
    side alone cannot find the way), then coordinate descent over ``_CANDIDATES`` values per side:
    the upper clip with the lower fixed, then the lower with the upper fixed. The min/max range
    is among the candidates, so the result is never worse than it.
    """
    lo, hi = _with_zero(hist.lo, hist.hi)
    if hist.total == 0 or hi <= lo:
        return lo, hi
    shrink = np.linspace(1.0, 0.0, _CANDIDATES, endpoint=False)
    best = int(np.argmin(expected_mse(hist, lo * shrink, hi * shrink)))
    his, los = hi * shrink, lo * shrink
    lo, hi = float(los[best]), float(his[best])
    for _ in range(_ROUNDS):
        hi = float(his[int(np.argmin(expected_mse(hist, lo, his)))])
        lo = float(los[int(np.argmin(expected_mse(hist, los, hi)))])
    return lo, hi


def choose_range(hist: Histogram, method: str) -> tuple[float, float]:
    """``hist``'s int8 clip by ``method`` (one of ``METHODS``).

    Raises:
        ValueError: an unknown method.
    """
    if method == "minmax":
        return _with_zero(hist.lo, hist.hi)
    if method == "percentile":
        return percentile_range(hist)
    if method == "mse":
        return mse_range(hist)
    raise ValueError(f"unknown activation range method {method!r}; expected one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class RangeSummary:
    """What :func:`refit_ranges` changed: activation tensors seen, narrowed, and by how much."""

    method: str
    tensors: int
    narrowed: int
    mean_width: float  # new width / recorded width, averaged over the tensors seen


def _refittable(model: Any) -> tuple[dict[int, tuple[float, float]], dict[int, float]]:
    """Tensor index -> recorded (min, max) for the activation tensors of subgraph 0 we may edit,
    and of the softmax inputs among them, index -> the softmax's beta (see :func:`logit_floor`)."""
    sg = model.subgraphs[0]
    keep = set(sg.inputs if sg.inputs is not None else []) | set(sg.outputs if sg.outputs is not None else [])
    from tensorflow.lite.tools import flatbuffer_utils
    logits: dict[int, float] = {}
    for op in sg.operators or []:
        name = flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)
        inputs = [int(i) for i in (op.inputs if op.inputs is not None else []) if i >= 0]
        if name in _LOGITS_OF and inputs:
            beta = float(getattr(op.builtinOptions, "beta", 1.0) or 1.0) if name == "SOFTMAX" else 1.0
            logits[inputs[0]] = beta
        elif name in _KEEP_INPUTS_OF:
            keep |= set(inputs)
    out = {}
    for index, tensor in enumerate(sg.tensors):
        q = tensor.quantization
        if index in keep or q is None or q.min is None or q.max is None or len(q.min) != 1 or len(q.max) != 1:
            continue
        buffer = model.buffers[tensor.buffer] if tensor.buffer < len(model.buffers) else None
        if buffer is not None and buffer.data is not None and len(buffer.data):
            continue  # a constant: weights are quantized by their own rule
        lo, hi = float(q.min[0]), float(q.max[0])
        if hi > lo:
            out[index] = (lo, hi)
    return out, {i: b for i, b in logits.items() if i in out}


def _histograms(calibrated: bytes, recorded: dict[int, tuple[float, float]], logits: dict[int, float],
                samples: SampleSet, max_samples: int,
                bins: int) -> tuple[dict[int, Histogram], dict[int, float]]:
    """One streaming histogram per tensor in ``recorded`` over the float calibrated model's values,
    except softmax inputs (``logits``): for those, the lowest top logit over the samples."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    signatures = interp.get_signature_list()
    if signatures:
        details = interp.get_signature_runner(next(iter(signatures))).get_input_details()
        index_of = {name: d["index"] for name, d in details.items()}
    else:
        index_of = {name: d["index"] for name, d in zip(sorted(samples.inputs), interp.get_input_details())}
    hists = {i: Histogram.empty(lo, hi, bins) for i, (lo, hi) in recorded.items() if i not in logits}
    floors = {i: np.inf for i in logits}
    for n in range(min(len(samples), max_samples)):
        for name, value in samples.sample(n).items():
            interp.set_tensor(index_of[name], value)
        interp.invoke()
        for i, hist in hists.items():
            hist.add(interp.get_tensor(i))
        for i, floor in list(floors.items()):
            floors[i] = min(floor, float(np.max(interp.get_tensor(i), axis=-1).min()))
    return hists, floors


def logit_floor(lo: float, hi: float, lowest_top: float, beta: float = 1.0) -> float:
    """A softmax input's new lower bound: ``LOGIT_SPAN / beta`` below the lowest top logit any
    calibration sample had, never below the recorded ``lo``.

    The top of the range is what decides top-1, so it is never clipped (every int8 step there is a
    step between the classes that compete); a logit ``LOGIT_SPAN`` below its sample's top (under
    ``e^-4`` of the top one's probability) cannot compete unless int8 moves it by 4, some thirty
    times the error int8 adds to fer's top logit (0.13). Each step of the grid then gets finer, so
    fewer near-equal classes tie exactly (int8 arg-max takes the first): on fer a span of 4
    instead of 8 cut the tied disagreements by a third and bought 0.25 to 0.4 points with either
    range method, with or without learned rounding, at the same probability error (a clipped
    class reads at most ``e^-4`` of the top, where 8 let int8 show it as 0).
    """
    return min(max(lo, lowest_top - LOGIT_SPAN / beta), hi)


def refit_ranges(calibrated: bytes, samples: SampleSet, method: str, max_samples: int = 300,
                 bins: int = BINS) -> tuple[bytes, RangeSummary]:
    """``calibrated`` (a float ``.tflite`` with recorded min/max) with its activation ranges chosen
    by ``method``, and what changed. Ranges only narrow; see the module docstring for what is kept.

    Raises:
        ValueError: an unknown method.
        RuntimeError: the interpreter could not run the calibrated model.
    """
    if method not in METHODS:
        raise ValueError(f"unknown activation range method {method!r}; expected one of {', '.join(METHODS)}")
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated))
    recorded, logits = _refittable(model)
    if method == "minmax" or not recorded:
        return calibrated, RangeSummary(method, len(recorded), 0, 1.0)
    hists, floors = _histograms(calibrated, recorded, logits, samples, max_samples, bins)
    tensors = model.subgraphs[0].tensors
    narrowed, widths = 0, []
    for index in recorded:
        old_lo, old_hi = _with_zero(*recorded[index])
        if index in floors:
            lo, hi = _with_zero(logit_floor(old_lo, old_hi, floors[index], logits[index]), old_hi)
        else:
            lo, hi = choose_range(hists[index], method)
        lo, hi = max(lo, old_lo), min(hi, old_hi)
        if hi <= lo:
            continue
        widths.append((hi - lo) / (old_hi - old_lo))
        if (lo, hi) != (old_lo, old_hi):
            narrowed += 1
            q = tensors[index].quantization
            q.min, q.max = np.array([lo], np.float32), np.array([hi], np.float32)
    summary = RangeSummary(method, len(recorded), narrowed, float(np.mean(widths)) if widths else 1.0)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), summary


def jitter_ranges(calibrated: bytes, fraction: float, rng: np.random.Generator) -> bytes:
    """``calibrated`` with each editable activation range scaled by its own factor drawn uniformly
    from ``[1 - fraction, 1 + fraction]``: an int8 model as good as the original by any range
    criterion, whose top-1 flips on near-ties show how much one calibration's figure owes to luck."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated))
    tensors = model.subgraphs[0].tensors
    for index, (lo, hi) in _refittable(model)[0].items():
        factor = 1.0 + rng.uniform(-fraction, fraction)
        q = tensors[index].quantization
        q.min, q.max = np.array([lo * factor], np.float32), np.array([hi * factor], np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))
