"""Measure a quantized candidate against the float model on held-out samples.

Both models run in the same host interpreter, one sample at a time with batch 1 exactly as on
the device; inputs are quantized and outputs dequantized with the tensors' own parameters, by
:mod:`edgefleet.quant` (the formulas the agent runs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from converter.data import SampleSet
from converter.stats import (
    ClassAgreement,
    Interval,
    class_agreement,
    expected_calibration_error,
    samples_needed,
    wilson,
)
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
    "interleaved_latency_ms",
    "misses",
    "perturbed",
    "robustness",
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
    """Median ``invoke()`` time on this host, ms: the model alone, without Python glue per call,
    in the device's runtime (ai-edge-litert, XNNPACK on) with ``threads`` threads.

    A host figure, not a device figure: ratios between candidates carry over, milliseconds do not.
    """
    return interleaved_latency_ms({"model": model}, samples.sample(0), runs, threads)["model"]


def interleaved_latency_ms(models: dict[str, bytes], sample: dict[str, np.ndarray], runs: int,
                           threads: int = 1) -> dict[str, float]:
    """Median ``invoke()`` time per model, ms; the models take turns, so a busy neighbour slows
    every one of them alike and their ratios hold."""
    interps = {}
    for name, model in models.items():
        interp = make_interpreter(model, threads=threads)
        feed_interpreter(interp, sample)
        for _ in range(5):
            interp.invoke()
        interps[name] = interp
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(runs):
        for name, interp in interps.items():
            start = time.perf_counter()
            interp.invoke()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t) * 1000) for name, t in times.items()}


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
    agreement: Interval | None = None  # the same agreement with its 95 % Wilson interval
    worst_class: ClassAgreement | None = None  # the float class whose samples agree least
    float_ece_pct: float | None = None  # expected calibration error of the float model (labels), points
    ece_pct: float | None = None  # the same for the candidate
    # per held-out sample: top-1 agrees with the float model (classifiers), to compare candidates pairwise
    agrees: np.ndarray | None = field(default=None, repr=False, compare=False)

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
                "max_abs_error": self.max_abs_error,
                "top1_agreement_interval": self.agreement.to_dict() if self.agreement else None,
                "worst_class": self.worst_class.to_dict() if self.worst_class else None,
                "float_ece_pct": self.float_ece_pct, "ece_pct": self.ece_pct}


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
    """Agreement with its interval and its worst class, accuracy and calibration error (with labels),
    cosine, SNR and worst error per output."""
    cls = classification_output(reference)
    agreement = float_acc = acc = interval = worst = float_ece = ece = None
    if cls is not None:
        ref_top, cand_top = top1(reference[cls]), top1(candidate[cls])
        interval = wilson(int(np.sum(ref_top == cand_top)), len(ref_top))
        agreement = interval.pct
        worst = class_agreement(ref_top, cand_top)[0]
        if labels is not None:
            float_acc = float(np.mean(ref_top == labels) * 100)
            acc = float(np.mean(cand_top == labels) * 100)
            float_ece = expected_calibration_error(reference[cls], labels)
            ece = expected_calibration_error(candidate[cls], labels)
    n = len(next(iter(reference.values())))
    return Metrics(
        samples=n, top1_agreement_pct=agreement, float_accuracy_pct=float_acc, accuracy_pct=acc,
        cosine={k: _cosine(reference[k], candidate[k]) for k in reference},
        snr_db={k: _snr_db(reference[k], candidate[k]) for k in reference},
        max_abs_error={k: float(np.max(np.abs(reference[k] - candidate[k]))) for k in reference},
        agreement=interval, worst_class=worst, float_ece_pct=float_ece, ece_pct=ece,
        agrees=None if cls is None else ref_top == cand_top)


def _agreement_misses(interval: Interval, target_pct: float) -> list[str]:
    """The gate on the interval's lower bound; a point estimate above the target with a lower bound
    below it is not a pass but a held-out set too small to tell, with the count that would tell."""
    if interval.low >= target_pct:
        return []
    if interval.pct < target_pct:
        return [f"top-1 agreement {interval.text()} < {target_pct:g}%"]
    needed = samples_needed(interval.pct, target_pct)
    more = (f"at this rate the 95% lower bound reaches it with {needed} held-out samples" if needed
            else "no held-out set can show it at this rate")
    return [(f"held-out set too small to show top-1 agreement >= {target_pct:g}%: {interval.text()}, 95% lower "
             f"bound {interval.low:.2f}%; {more}")]


def misses(metrics: Metrics, target: FidelityTarget) -> list[str]:
    """Why ``metrics`` miss the profile's target; empty when the candidate is good enough.

    Agreement is judged on its 95 % lower bound; the accuracy drop, the worst class and the cosine
    on their measured values (the worst class's interval is in the report).
    """
    reasons = []
    if metrics.agreement is not None:
        reasons += _agreement_misses(metrics.agreement, target.min_top1_agreement_pct)
    worst = metrics.worst_class
    if worst is not None and target.max_class_drop_pct is not None and \
            100 - worst.agreement.pct > target.max_class_drop_pct:
        reasons.append(f"class {worst.label} agreement {worst.agreement.text()}: drop "
                       f"{100 - worst.agreement.pct:.2f} points > {target.max_class_drop_pct:g}")
    drop = metrics.top1_drop_pct
    if drop is not None and drop > target.max_top1_drop_pct:
        reasons.append(f"top-1 accuracy drop {drop:.2f} points > {target.max_top1_drop_pct:g}")
    if metrics.min_cosine < target.min_cosine:
        reasons.append(f"cosine {metrics.min_cosine:.4f} < {target.min_cosine:g}")
    return reasons


_NOISE = 0.02  # Gaussian noise sigma, fraction of each input's observed span
_BRIGHTNESS = 0.08  # brightness shift, fraction of the span, both ways


def perturbed(samples: SampleSet, kind: str, seed: int = 0) -> SampleSet:
    """A mildly changed copy of ``samples`` (kept inside each input's observed range): ``noise``
    (Gaussian, 2 % of the span), ``brighter`` or ``darker`` (8 % of the span).

    Raises:
        ValueError: unknown ``kind``.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, x in samples.inputs.items():
        lo, hi = float(x.min()), float(x.max())
        span = hi - lo or 1.0
        if kind == "noise":
            y = x + rng.normal(0.0, _NOISE * span, x.shape)
        elif kind in ("brighter", "darker"):
            y = x + (_BRIGHTNESS if kind == "brighter" else -_BRIGHTNESS) * span
        else:
            raise ValueError(f"unknown perturbation {kind!r}; expected noise, brighter or darker")
        out[name] = np.clip(y, lo, hi).astype(np.float32)
    return SampleSet(out, samples.labels, f"{samples.source} ({kind})")


def robustness(float_model: bytes, model: bytes, samples: SampleSet) -> dict[str, Interval]:
    """Top-1 agreement of ``model`` with the float model on mildly perturbed inputs: quantization
    can hold on clean data and flip classes as soon as the input moves (a narrow activation range)."""
    out = {}
    for kind in ("noise", "brighter", "darker"):
        changed = perturbed(samples, kind)
        ref = run_model(float_model, changed)
        cls = classification_output(ref)
        if cls is None:
            return {}
        cand = run_model(model, changed)
        out[kind] = wilson(int(np.sum(top1(ref[cls]) == top1(cand[cls]))), len(changed))
    return out
