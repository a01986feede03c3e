"""Measure a quantized candidate against the float model on held-out samples.

Both models run in the same host interpreter, one sample at a time with batch 1 exactly as on
the device; inputs are quantized and outputs dequantized with the tensors' own parameters, by
:mod:`edgefleet.quant` (the formulas the agent runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from converter.data import SampleSet
from converter.tflite_inspect import make_interpreter
from edgefleet.profiles import Fidelity as FidelityTarget
from edgefleet.quant import QuantParams, dequantize, quantize, top1

__all__ = [
    "SIGNATURE",
    "Metrics",
    "classification_output",
    "compare",
    "feed_interpreter",
    "host_latency_ms",
    "misses",
    "run_model",
]

SIGNATURE = "serving_default"


def run_model(model: bytes, samples: SampleSet, progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Outputs of ``model`` on every sample, dequantized to float, keyed by output name.

    Inputs are quantized and outputs dequantized with :mod:`edgefleet.quant`, as the agent does, so
    an output here is bit for bit what a device with the same runtime returns for the same sample.
    """
    interp = make_interpreter(model)
    runner = interp.get_signature_runner(SIGNATURE)
    in_params = {k: QuantParams.from_detail(d) for k, d in runner.get_input_details().items()}
    out_params = {k: QuantParams.from_detail(d) for k, d in runner.get_output_details().items()}
    results: dict[str, list[np.ndarray]] = {k: [] for k in out_params}
    for i in range(len(samples)):
        feed = {k: quantize(v, in_params[k]) for k, v in samples.sample(i).items()}
        out = runner(**feed)
        for k, v in out.items():
            results[k].append(dequantize(v, out_params[k])[0])
        if progress:
            progress(1)
    return {k: np.stack(v) for k, v in results.items()}


def host_latency_ms(model: bytes, samples: SampleSet, runs: int = 50, threads: int = 1) -> float:
    """Median ``invoke()`` time on this host, ms: the model alone, without Python glue per call.

    A host figure, not a device figure.
    """
    interp = make_interpreter(model, threads=threads)
    feed_interpreter(interp, samples.sample(0))
    for _ in range(5):
        interp.invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        interp.invoke()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def feed_interpreter(interp: Any, sample: dict[str, np.ndarray]) -> None:
    """Set the inputs of the interpreter's default signature from float samples."""
    runner_inputs = interp.get_signature_list()[SIGNATURE]["inputs"]
    details = {d["name"]: d for d in interp.get_input_details()}
    runner = interp.get_signature_runner(SIGNATURE)
    by_key = runner.get_input_details()
    for key in runner_inputs:
        detail = details[by_key[key]["name"]]
        interp.set_tensor(detail["index"], quantize(sample[key], QuantParams.from_detail(detail)))


@dataclass(frozen=True)
class Metrics:
    """Candidate vs float on the same samples. Percentages are 0..100; None when not applicable."""

    samples: int
    top1_agreement_pct: float | None
    float_accuracy_pct: float | None
    accuracy_pct: float | None
    cosine: dict[str, float]
    snr_db: dict[str, float]
    max_abs_error: dict[str, float]

    @property
    def top1_drop_pct(self) -> float | None:
        if self.float_accuracy_pct is None or self.accuracy_pct is None:
            return None
        return self.float_accuracy_pct - self.accuracy_pct

    @property
    def min_cosine(self) -> float:
        return min(self.cosine.values())

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "top1_agreement_pct": self.top1_agreement_pct,
                "float_accuracy_pct": self.float_accuracy_pct, "accuracy_pct": self.accuracy_pct,
                "top1_drop_pct": self.top1_drop_pct, "cosine": self.cosine, "snr_db": self.snr_db,
                "max_abs_error": self.max_abs_error}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a2, b2 = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    if a2.shape[1] == 1:  # scalar outputs: a per-sample cosine is only a sign, compare the whole column
        a2, b2 = a2.T, b2.T
    num = (a2 * b2).sum(axis=1)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-30), np.where(np.abs(a2 - b2).max(axis=1) == 0, 1.0, 0.0))
    return float(np.mean(cos))


def _snr_db(ref: np.ndarray, cand: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - cand) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    if noise == 0:
        return 200.0
    return float(10 * np.log10(max(signal, 1e-30) / noise))


def classification_output(outputs: dict[str, np.ndarray]) -> str | None:
    """The first output that looks like class scores (a vector of more than one value)."""
    for name, value in outputs.items():
        if value.ndim == 2 and value.shape[1] > 1:
            return name
    return None


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
            labels: np.ndarray | None) -> Metrics:
    """Agreement, accuracy (with labels), cosine, SNR and worst error per output."""
    cls = classification_output(reference)
    agreement = float_acc = acc = None
    if cls is not None:
        ref_top, cand_top = top1(reference[cls]), top1(candidate[cls])
        agreement = float(np.mean(ref_top == cand_top) * 100)
        if labels is not None:
            float_acc = float(np.mean(ref_top == labels) * 100)
            acc = float(np.mean(cand_top == labels) * 100)
    n = len(next(iter(reference.values())))
    return Metrics(
        samples=n, top1_agreement_pct=agreement, float_accuracy_pct=float_acc, accuracy_pct=acc,
        cosine={k: _cosine(reference[k], candidate[k]) for k in reference},
        snr_db={k: _snr_db(reference[k], candidate[k]) for k in reference},
        max_abs_error={k: float(np.max(np.abs(reference[k] - candidate[k]))) for k in reference})


def misses(metrics: Metrics, target: FidelityTarget) -> list[str]:
    """Why ``metrics`` miss the profile's target; empty when the candidate is good enough."""
    reasons = []
    if metrics.top1_agreement_pct is not None and metrics.top1_agreement_pct < target.min_top1_agreement_pct:
        reasons.append(f"top-1 agreement {metrics.top1_agreement_pct:.2f}% < {target.min_top1_agreement_pct:g}%")
    drop = metrics.top1_drop_pct
    if drop is not None and drop > target.max_top1_drop_pct:
        reasons.append(f"top-1 accuracy drop {drop:.2f} points > {target.max_top1_drop_pct:g}")
    if metrics.min_cosine < target.min_cosine:
        reasons.append(f"cosine {metrics.min_cosine:.4f} < {target.min_cosine:g}")
    return reasons
