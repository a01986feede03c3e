"""The recipe search: which quantization recipes are tried, in which order, and which one ships.

Order (each remedy only if the profile allows it):

1. the baseline: full int8 with the profile's weight granularity (per-channel, or per-tensor +
   equalization);
2. if the baseline meets the target on a per-channel profile, the smaller per-tensor +
   equalization recipe too (it drops 24 bytes of scales and zero points per channel);
3. if the baseline misses it, remedies until one meets it: the other granularity; 16x8 (int16
   activations); float fallback of the 1, 3, 6 most sensitive tensors.

:func:`pick` ships the smallest candidate that meets the target, else the most faithful one
(the artifact is then written as not deployable).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from converter import equalize, fidelity, quantize
from converter.data import SampleSet
from converter.loading import export_keras
from converter.progress import Bars
from converter.tflite_inspect import inspect_tflite
from edgefleet.errors import ConversionError
from edgefleet.profiles import Profile

__all__ = ["Candidate", "SearchResult", "Sources", "evaluate", "pick", "search"]

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
    host_latency_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.model is not None and not self.misses and self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.recipe.name, "size": len(self.model) if self.model else None,
                "gzip_size": len(gzip.compress(self.model, 9)) if self.model else None,
                "metrics": self.metrics.to_dict() if self.metrics else None, "misses": list(self.misses),
                "full_integer": self.model is not None and not self.non_integer_ops,
                "non_integer_ops": list(self.non_integer_ops), "op_counts": self.op_counts, "error": self.error,
                "host_latency_ms": self.host_latency_ms,
                "float_tensors": list(self.recipe.float_tensors)}


@dataclass
class Sources:
    """The SavedModels recipes quantize from: the (pruned) model as given and, built on first use
    by a recipe that asks for it, its twin prepared for per-tensor weights (Keras models only):
    cross-layer equalized, then bias-corrected (see :mod:`converter.equalize`)."""

    plain: Path
    keras_model: Any | None
    io_names: tuple[list[str], list[str]]
    calibration: SampleSet
    workdir: Path
    keep_names: bool
    equalization: equalize.EqualizeSummary | None = None
    _equalized: Path | None = None

    @property
    def can_equalize(self) -> bool:
        return self.keras_model is not None

    def for_recipe(self, recipe: quantize.Recipe) -> Path:
        """The SavedModel ``recipe`` quantizes from.

        Raises:
            ConversionError: equalization failed on this graph (fails that recipe only).
        """
        if not recipe.equalized:
            return self.plain
        if self._equalized is None:
            from converter._tf import keras
            twin = keras.models.clone_model(self.keras_model)
            twin.set_weights(self.keras_model.get_weights())
            inputs = [self.calibration.inputs[n] for n in self.io_names[0]]
            try:
                summary = equalize.equalize(twin, inputs)
                summary = replace(summary, bias_corrected=equalize.correct_bias(twin, inputs))
            except Exception as exc:  # an optimization: a graph it cannot handle fails this recipe only
                raise ConversionError(f"equalization failed: {type(exc).__name__}: {exc}"[:300]) from exc
            self.equalization = summary
            self._equalized = self.workdir / "equalized_saved_model"
            export_keras(twin, self._equalized, self.io_names)
        return self._equalized


@dataclass(frozen=True)
class SearchResult:
    tried: tuple[Candidate, ...]  # in the order they were tried
    chosen: Candidate  # what ships (see pick)


def evaluate(recipe: quantize.Recipe, sources: Sources, evaluation: SampleSet, reference: dict[str, np.ndarray],
             profile: Profile, bars: Bars) -> Candidate:
    """Quantize with ``recipe`` and measure it against the float ``reference`` and the profile."""
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
    return Candidate(recipe, model, metrics, tuple(misses), outputs, inspection.non_integer_ops,
                     inspection.op_counts(), host_latency_ms=fidelity.host_latency_ms(model, evaluation, runs=10))


def _per_channel() -> quantize.Recipe:
    return quantize.Recipe("int8 per-channel", per_channel=True)


def _per_tensor(sources: Sources) -> quantize.Recipe:
    if sources.can_equalize:
        return quantize.Recipe("int8 per-tensor + equalization", per_channel=False, equalized=True)
    return quantize.Recipe("int8 per-tensor", per_channel=False)


def _remedies(sources: Sources, profile: Profile) -> list[quantize.Recipe | str]:
    """What to try after a baseline that misses the target, in order; "fallback" is expanded later
    (it needs the sensitivity ranking, which costs a debugger run)."""
    q = profile.quantization
    remedies: list[quantize.Recipe | str] = [_per_tensor(sources) if q.per_channel else _per_channel()]
    if q.allow_16bit_activations and not q.require_full_integer:
        remedies.append(quantize.Recipe("16x8 (int16 activations)", per_channel=True, int16_activations=True))
    if q.allow_float_fallback and not q.require_full_integer:
        remedies.append("fallback")
    return remedies


def search(sources: Sources, evaluation: SampleSet, reference: dict[str, np.ndarray], profile: Profile,
           bars: Bars) -> SearchResult:
    """Try recipes in the order of the module docstring and pick the one that ships.

    Raises:
        ConversionError: every recipe failed to convert.
    """
    q = profile.quantization

    def run(recipe: quantize.Recipe) -> Candidate:
        return evaluate(recipe, sources, evaluation, reference, profile, bars)

    tried = [run(_per_channel() if q.per_channel else _per_tensor(sources))]
    if tried[0].ok:
        if q.per_channel:
            tried.append(run(_per_tensor(sources)))
        return SearchResult(tuple(tried), pick(tried))
    with bars.bar("fidelity search", None) as tick:
        for remedy in _remedies(sources, profile):
            if isinstance(remedy, quantize.Recipe):
                tried.append(run(remedy))
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
                    tried.append(run(quantize.Recipe(f"int8 + float fallback of {k} layer(s)",
                                                     per_channel=q.per_channel, float_tensors=names)))
                    if tick:
                        tick(1)
                    if tried[-1].ok:
                        break
            if any(c.ok for c in tried):
                break
    return SearchResult(tuple(tried), pick(tried))


def pick(tried: list[Candidate] | tuple[Candidate, ...]) -> Candidate:
    """The smallest candidate that meets the target, else the most faithful one that ran.

    Raises:
        ConversionError: no candidate converted at all.
    """
    ok = [c for c in tried if c.ok]
    if ok:
        return min(ok, key=lambda c: len(c.model or b""))
    ran = [c for c in tried if c.metrics is not None]
    if not ran:
        raise ConversionError("every quantization recipe failed: " + "; ".join(c.error or "" for c in tried))
    return max(ran, key=lambda c: (c.metrics.top1_agreement_pct or 0, c.metrics.min_cosine))  # type: ignore[union-attr]
