"""The recipe search: which quantization recipes are tried, in which order, and which one ships.

Order (each remedy only if the profile allows it):

1. the baseline: full int8 with the profile's weight granularity (per-channel, or per-tensor +
   equalization);
2. if the baseline meets the target on a per-channel profile, the smaller per-tensor +
   equalization recipe too (it drops 24 bytes of scales and zero points per channel);
3. if the baseline misses it, remedies until one meets it, full int8 first: the other
   granularity; per-channel bias correction; the most faithful full-int8 recipe so far with
   activation ranges by percentile, then by MSE (:mod:`converter.ranges`), so each range method
   builds on the steps that measured best; then, from a Keras model, per-channel weights fitted to
   the int8 grid with the range method that measured best: learned rounding
   (:mod:`converter.rounding`, AdaRound), then a short distillation fine-tune
   (:mod:`converter.distill`) as the last int8 resort; then 16x8 (int16 activations); float
   fallback of the 1, 3, 6 most sensitive tensors.

Speed is part of the target: every candidate is timed on the host in the device's runtime
(XNNPACK on, the profile's threads) and classed by its kernels (:mod:`converter.kernels`); one
slower than ``fidelity.max_slowdown`` times the fastest full-int8 candidate does not meet it, however
faithful. :func:`pick` ships the smallest candidate that meets the whole target; when none does it
writes the most faithful fast one as not deployable and names the fastest faithful one, so a slow
model never ships silently.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from converter import distill, equalize, fakequant, fidelity, quantize, rounding
from converter.data import SampleSet
from converter.edgetpu import check_edgetpu
from converter.kernels import FAST_CLASSES, kernel_class
from converter.loading import export_keras
from converter.progress import Bars
from converter.stats import less_faithful
from converter.tflite_inspect import inspect_tflite
from edgefleet.errors import ConversionError
from edgefleet.profiles import Profile

__all__ = ["Candidate", "SearchResult", "Sources", "evaluate", "host_threads", "judge_speed", "most_faithful",
           "pick", "search"]

_FALLBACK_COUNTS = (1, 3, 6)  # tensors kept in float, most sensitive first


@dataclass(frozen=True)
class Candidate:
    """One recipe tried: its model (None if it failed to convert), fidelity and why it misses."""

    recipe: quantize.Recipe
    model: bytes | None
    metrics: fidelity.Metrics | None
    misses: tuple[str, ...]
    outputs: dict[str, np.ndarray] | None
    non_integer_ops: tuple[str, ...] = ()
    op_counts: dict[str, int] | None = None
    error: str | None = None
    host_latency_ms: float | None = None  # the profile's threads, XNNPACK on (see SearchResult.threads)
    kernel: str | None = None  # converter.kernels.KernelClass
    slowdown: float | None = None  # host latency / the fastest full-int8 candidate's
    too_slow: str | None = None  # why it misses the speed limit; None when within it

    @property
    def faithful(self) -> bool:
        """Meets the fidelity, size and integer targets (speed aside)."""
        return self.model is not None and not self.misses and self.error is None

    @property
    def ok(self) -> bool:
        return self.faithful and self.too_slow is None

    @property
    def rank(self) -> tuple[float, float]:
        """How faithful: the agreement's 95 % lower bound, then the cosine (higher is better)."""
        m = self.metrics
        if m is None:
            return (-1.0, -2.0)
        return (m.agreement.low if m.agreement else 100.0, m.min_cosine)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.recipe.name, "size": len(self.model) if self.model else None,
                "gzip_size": len(gzip.compress(self.model, 9)) if self.model else None,
                "metrics": self.metrics.to_dict() if self.metrics else None, "misses": list(self.misses),
                "full_integer": self.model is not None and not self.non_integer_ops,
                "non_integer_ops": list(self.non_integer_ops), "op_counts": self.op_counts, "error": self.error,
                "host_latency_ms": self.host_latency_ms, "kernel": self.kernel, "slowdown": self.slowdown,
                "too_slow": self.too_slow, "faithful": self.faithful, "meets_target": self.ok,
                "float_tensors": list(self.recipe.float_tensors)}


@dataclass
class Sources:
    """The SavedModels recipes quantize from: the (pruned) model as given and, built on first use
    by a recipe that asks for it, a Keras twin (Keras models only) prepared for it: cross-layer
    equalized then bias-corrected for per-tensor weights, bias-corrected for per-channel ones
    (:mod:`converter.equalize`), or with per-channel weights fitted to the int8 grid by learned
    rounding (:mod:`converter.rounding`) or distillation (:mod:`converter.distill`), one twin per
    activation range method (both fit the ranges the recipe will use)."""

    plain: Path
    keras_model: Any | None
    io_names: tuple[list[str], list[str]]
    calibration: SampleSet
    workdir: Path
    keep_names: bool
    equalization: equalize.EqualizeSummary | None = None
    per_channel_bias_corrected: int | None = None  # layers corrected in the per-channel twin, once built
    rounding: dict[str, rounding.RoundingSummary] = field(default_factory=dict)  # per range method, once built
    distillation: dict[str, distill.DistillSummary] = field(default_factory=dict)  # per range method, once built
    _twins: dict[str, Path] = field(default_factory=dict)
    _models: dict[str, Any] = field(default_factory=dict)  # the Keras twins behind _twins

    @property
    def can_equalize(self) -> bool:
        return self.keras_model is not None

    def fitting(self) -> dict[str, Any]:
        """What learned rounding and distillation did, per activation range method (for the report)."""
        out: dict[str, Any] = {}
        if self.rounding:
            out["learned_rounding"] = {m: r.to_dict() for m, r in self.rounding.items()}
        if self.distillation:
            out["distillation"] = {m: d.to_dict() for m, d in self.distillation.items()}
        return out

    def for_recipe(self, recipe: quantize.Recipe) -> Path:
        """The SavedModel ``recipe`` quantizes from.

        Raises:
            ConversionError: equalization, bias correction, learned rounding or distillation failed on
                this graph (fails that recipe only).
        """
        kind = ("equalized" if recipe.equalized else "bias_corrected" if recipe.bias_corrected
                else f"learned_rounding_{recipe.ranges}" if recipe.learned_rounding
                else f"distilled_{recipe.ranges}" if recipe.distilled else None)  # it fits the recipe's ranges
        if kind is None:
            return self.plain
        if kind not in self._twins:
            from converter._tf import keras
            twin = keras.models.clone_model(self.keras_model)
            twin.set_weights(self.keras_model.get_weights())
            inputs = [self.calibration.inputs[n] for n in self.io_names[0]]
            try:
                if kind == "equalized":
                    summary = equalize.equalize(twin, inputs)
                    self.equalization = replace(summary, bias_corrected=equalize.correct_bias(twin, inputs))
                elif kind == "bias_corrected":
                    self.per_channel_bias_corrected = equalize.correct_bias(twin, inputs, per_channel=True)
                elif recipe.learned_rounding:
                    ranges = fakequant.activation_ranges(self.keras_model, inputs, recipe.ranges)
                    self.rounding[recipe.ranges] = rounding.learn_rounding(twin, self.keras_model, inputs,
                                                                           ranges=ranges)
                else:
                    self.distillation[recipe.ranges] = distill.distill(twin, self.keras_model, inputs, recipe.ranges)
            except Exception as exc:  # an optimization: a graph it cannot handle fails this recipe only
                raise ConversionError(f"{kind.replace('_', ' ')} failed: {type(exc).__name__}: {exc}"[:300]) from exc
            self._models[kind] = twin
            self._twins[kind] = self.workdir / f"{kind}_saved_model"
            export_keras(twin, self._twins[kind], self.io_names)
        return self._twins[kind]


@dataclass(frozen=True)
class SearchResult:
    tried: tuple[Candidate, ...]  # in the order they were tried, judged for speed against each other
    chosen: Candidate  # what ships (see pick)
    threads: int = 1  # interpreter threads of every host latency: the profile's, at most this host's cores
    fastest_faithful: Candidate | None = None  # when nothing meets the whole target: faithful but too slow
    most_faithful_fast: Candidate | None = None  # ... and the best of those within the speed limit

    @property
    def reasons(self) -> tuple[str, ...]:
        """Why the chosen candidate may not ship: its own misses, and both facts when speed and
        fidelity could not be had together."""
        chosen = self.chosen
        out = list(chosen.misses) + ([chosen.too_slow] if chosen.too_slow else [])
        fast, faithful = self.most_faithful_fast, self.fastest_faithful
        if faithful is not None and not chosen.ok:
            fast_text = (f"most faithful fast candidate {fast.recipe.name!r}: {_agreement_text(fast)}"
                         if fast is not None else "no candidate within the speed limit ran")
            out.append(f"nothing within the speed limit meets the fidelity target: fastest faithful candidate "
                       f"{faithful.recipe.name!r} ({faithful.kernel}) is {faithful.slowdown or 0:.1f}x the fastest "
                       f"full-int8 candidate; {fast_text}")
        return tuple(out)

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads,
                "fastest_faithful": self.fastest_faithful.recipe.name if self.fastest_faithful else None,
                "most_faithful_fast": self.most_faithful_fast.recipe.name if self.most_faithful_fast else None}


def _agreement_text(c: Candidate) -> str:
    m = c.metrics
    if m is None:
        return "did not run"
    if m.agreement is not None:
        return f"top-1 agreement {m.agreement.text()}"
    return f"cosine {m.min_cosine:.4f}"


def host_threads(profile: Profile) -> int:
    """The profile's interpreter threads, at most this host's cores (more would only time contention)."""
    return max(1, min(profile.runtime.threads, os.cpu_count() or 1))


def evaluate(recipe: quantize.Recipe, sources: Sources, evaluation: SampleSet, reference: dict[str, np.ndarray],
             profile: Profile, bars: Bars, latency_runs: int = 30) -> Candidate:
    """Quantize with ``recipe``, measure it against the float ``reference`` and the profile, time it
    on the host with the profile's threads and class its kernels (speed is judged by :func:`judge_speed`)."""
    q = profile.quantization
    calibration = sources.calibration
    try:
        with bars.bar(f"calibrating {recipe.name}", min(len(calibration), quantize.MAX_CALIBRATION)) as tick:
            model = quantize.quantize(sources.for_recipe(recipe), recipe, calibration, q.input_dtype, tick,
                                      sources.keep_names)
    except ConversionError as exc:
        return Candidate(recipe, None, None, (), None, error=str(exc))
    inspection = inspect_tflite(model)
    outputs = fidelity.run_model(model, evaluation)
    metrics = fidelity.compare(reference, outputs, evaluation.labels)
    misses = list(fidelity.misses(metrics, profile.fidelity))
    if q.require_full_integer and not inspection.full_integer:
        misses.append("profile requires full integer; non-integer ops: " + ", ".join(inspection.non_integer_ops))
    if len(model) > profile.limits.max_model_mb * 1024 * 1024:
        misses.append(f"size {len(model) / 1e6:.2f} MB > limit {profile.limits.max_model_mb} MB")
    accelerator = profile.runtime.accelerator
    tpu_ok = accelerator == "edgetpu" and check_edgetpu(inspection).static_ok
    return Candidate(recipe, model, metrics, tuple(misses), outputs, inspection.non_integer_ops,
                     inspection.op_counts(),
                     host_latency_ms=fidelity.host_latency_ms(model, evaluation, latency_runs, host_threads(profile)),
                     kernel=kernel_class(inspection, accelerator, tpu_ok))


def judge_speed(tried: list[Candidate], profile: Profile, evaluation: SampleSet,
                runs: int = 30) -> list[Candidate]:
    """Each candidate with its slowdown against the fastest full-int8 one and, past the profile's
    ``max_slowdown``, why it is too slow. A full-int8 candidate that looks too slow is timed again
    interleaved with the reference on one thread (thread scheduling on a busy host made per-tensor
    MobileNetV2 look 1.7x slower than per-channel at 2 threads; same kernels, same latency alone),
    and its slowdown is that ratio."""
    limit = profile.fidelity.max_slowdown
    fast = [c for c in tried if c.model is not None and c.kernel in FAST_CLASSES and c.host_latency_ms]
    if not fast:
        return tried
    ref = min(fast, key=lambda c: c.host_latency_ms or 0.0)
    ref_ms = ref.host_latency_ms or 0.0
    out = []
    for c in tried:
        if c.model is None or not c.host_latency_ms or ref_ms <= 0:
            out.append(c)
            continue
        lat = c.host_latency_ms
        slowdown = lat / ref_ms
        if limit is not None and slowdown > limit and c.kernel in FAST_CLASSES:
            again = fidelity.interleaved_latency_ms({"c": c.model, "ref": ref.model or b""}, evaluation.sample(0),
                                                    max(runs, 50), threads=1)
            slowdown = again["c"] / again["ref"]
        too_slow = None
        if limit is not None and slowdown > limit:
            too_slow = (f"host latency {lat:.3f} ms is {slowdown:.1f}x the fastest full-int8 candidate "
                        f"{ref.recipe.name!r} ({ref_ms:.3f} ms; {c.kernel} kernels) > max_slowdown {limit:g}")
        out.append(replace(c, slowdown=slowdown, too_slow=too_slow))
    return out


def _per_channel() -> quantize.Recipe:
    return quantize.Recipe("int8 per-channel", per_channel=True)


def _per_tensor(sources: Sources) -> quantize.Recipe:
    if sources.can_equalize:
        return quantize.Recipe("int8 per-tensor + equalization", per_channel=False, equalized=True)
    return quantize.Recipe("int8 per-tensor", per_channel=False)


_RANGE_METHODS = ("percentile", "mse")  # in order of cost: one histogram pass each, MSE searches it harder


def _with_ranges(recipe: quantize.Recipe, method: str) -> quantize.Recipe:
    return replace(recipe, name=f"{recipe.name} + {method} ranges", ranges=method)


def _remedies(sources: Sources, profile: Profile) -> list[quantize.Recipe | str]:
    """What to try after a baseline that misses the target, in order of cost to the device (all
    full-int8 remedies first); "fallback" is expanded later (it needs the sensitivity ranking,
    which costs a debugger run), and so are the range methods (they build on the most faithful
    full-int8 recipe measured before them)."""
    q = profile.quantization
    remedies: list[quantize.Recipe | str] = [_per_tensor(sources) if q.per_channel else _per_channel()]
    if sources.can_equalize:
        remedies.append(quantize.Recipe("int8 per-channel + bias correction", per_channel=True, bias_corrected=True))
    remedies += [f"ranges:{method}" for method in _RANGE_METHODS]
    if sources.can_equalize:  # both fit the per-channel grid on the Keras twin
        remedies += ["learned_rounding", "distilled"]
    if q.allow_16bit_activations and not q.require_full_integer:
        remedies.append(quantize.Recipe("16x8 (int16 activations)", per_channel=True, int16_activations=True))
    if q.allow_float_fallback and not q.require_full_integer:
        remedies.append("fallback")
    return remedies


def search(sources: Sources, evaluation: SampleSet, reference: dict[str, np.ndarray], profile: Profile,
           bars: Bars, latency_runs: int = 30) -> SearchResult:
    """Try recipes in the order of the module docstring and pick the one that ships.

    Raises:
        ConversionError: every recipe failed to convert.
    """
    q = profile.quantization
    tried: list[Candidate] = []

    def run(recipe: quantize.Recipe) -> None:
        tried.append(evaluate(recipe, sources, evaluation, reference, profile, bars, latency_runs))
        tried[:] = judge_speed(tried, profile, evaluation, latency_runs)

    run(_per_channel() if q.per_channel else _per_tensor(sources))
    if tried[0].ok:
        if q.per_channel:
            run(_per_tensor(sources))
        return _result(tried, profile)
    with bars.bar("fidelity search", None) as tick:
        for remedy in _remedies(sources, profile):
            if isinstance(remedy, quantize.Recipe):
                run(remedy)
                if tick:
                    tick(1)
            elif remedy in ("learned_rounding", "distilled"):
                run(_fitted(remedy, _best_ranges(tried)))
                if tick:
                    tick(1)
            elif remedy.startswith("ranges:"):
                base = _best_min_max_int8(tried)
                if base is not None:
                    run(_with_ranges(base.recipe, remedy.removeprefix("ranges:")))
                    if tick:
                        tick(1)
            else:
                try:
                    ranked = quantize.sensitive_tensors(sources.plain, sources.calibration, q.input_dtype,
                                                        q.per_channel)
                except ConversionError as exc:
                    tried.append(Candidate(quantize.Recipe("float fallback"), None, None, (), None, error=str(exc)))
                    continue
                for k in _FALLBACK_COUNTS:
                    if k > len(ranked):
                        break
                    names = tuple(name for name, _ in ranked[:k])
                    run(quantize.Recipe(f"int8 + float fallback of {k} layer(s)", per_channel=q.per_channel,
                                        float_tensors=names))
                    if tick:
                        tick(1)
                    if tried[-1].ok:
                        break
            if any(c.ok for c in tried):
                break
    return _result(tried, profile)


def _fitted(kind: str, ranges: str) -> quantize.Recipe:
    """Per-channel int8 from a twin fitted to the int8 grid (learned rounding or distillation),
    with the activation range method that measured best before it."""
    name = "int8 per-channel + " + ("learned rounding" if kind == "learned_rounding" else "distillation")
    recipe = quantize.Recipe(name, per_channel=True, learned_rounding=kind == "learned_rounding",
                             distilled=kind == "distilled")
    return _with_ranges(recipe, ranges) if ranges != "minmax" else recipe


def _best_ranges(tried: list[Candidate]) -> str:
    """The activation range method of the most faithful full-int8 candidate so far."""
    ran = [c for c in tried if c.recipe.full_integer and not c.recipe.int16_activations and c.metrics is not None
           and c.error is None]
    return max(ran, key=lambda c: c.rank).recipe.ranges if ran else "minmax"


def _best_min_max_int8(tried: list[Candidate]) -> Candidate | None:
    """The most faithful full-int8 candidate with TensorFlow's min/max ranges: what a range method
    is tried on, so it adds to the weight steps that measured best instead of replacing them."""
    base = [c for c in tried if c.recipe.ranges == "minmax" and c.recipe.full_integer
            and not c.recipe.int16_activations and c.metrics is not None and c.error is None]
    return max(base, key=lambda c: c.rank) if base else None


def _result(tried: list[Candidate], profile: Profile) -> SearchResult:
    chosen = pick(tried)
    faithful = [c for c in tried if c.faithful]
    fast = [c for c in tried if c.metrics is not None and c.too_slow is None]
    stuck = not chosen.ok and bool(faithful)
    return SearchResult(tuple(tried), chosen, host_threads(profile),
                        min(faithful, key=lambda c: c.host_latency_ms or 0.0) if stuck else None,
                        most_faithful(fast) if stuck and fast else None)


def most_faithful(pool: list[Candidate]) -> Candidate:
    """The highest-ranked candidate of ``pool``, or the smallest of those its held-out samples cannot
    tell from it (:func:`converter.stats.less_faithful`, paired on the same samples).

    Why: when nothing meets the target, the candidate written is the best there is; one sample in
    360 is no reason to write a model a third larger (MobileNetV2 at 50 % sparsity: learned
    rounding 332/360 against per-tensor's 331/360, 597.6 KB against 433.5 KB).
    """
    best = max(pool, key=lambda c: c.rank)
    ours = best.metrics.agrees if best.metrics is not None else None
    if ours is None:
        return best
    peers = [c for c in pool if c is best or (c.metrics is not None and c.metrics.agrees is not None
                                              and not less_faithful(ours, c.metrics.agrees))]
    return min(peers, key=lambda c: (len(c.model or b""), tuple(-x for x in c.rank)))


def pick(tried: list[Candidate] | tuple[Candidate, ...]) -> Candidate:
    """The smallest candidate that meets the whole target (fidelity and speed), else the most
    faithful one within the speed limit, else the most faithful one that ran (:func:`most_faithful`:
    a smaller one that the held-out samples cannot tell from the best is preferred).

    Raises:
        ConversionError: no candidate converted at all.
    """
    ok = [c for c in tried if c.ok]
    if ok:
        return min(ok, key=lambda c: len(c.model or b""))
    ran = [c for c in tried if c.metrics is not None]
    if not ran:
        raise ConversionError("every quantization recipe failed: " + "; ".join(c.error or "" for c in tried))
    fast = [c for c in ran if c.too_slow is None]
    return most_faithful(fast or ran)
