"""``convert()``: load -> prune -> quantize -> fidelity search -> verify ops -> package (+sign).

This module only orders the steps and decides; each step lives in its own module. The result
is a small immutable value; the CLI, the demo and the tests all go through here.
"""

from __future__ import annotations

import gzip
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from converter import artifact, edgetpu, equalize, fidelity, pruning, quantize
from converter.data import SampleSet, check_array, load_samples
from converter.loading import LoadedModel, export_keras, load_model
from converter.report import render_markdown
from converter.sizes import size_breakdown
from converter.tflite_inspect import inspect_tflite
from edgefleet.errors import ConfigError, ConversionError
from edgefleet.manifest import Manifest, ModelFile, Preprocessing, Source, parse_version
from edgefleet.profiles import Profile, load_profile

__all__ = ["EXIT_NOT_DEPLOYABLE", "ConvertResult", "convert"]

EXIT_NOT_DEPLOYABLE = 3
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert()`` produced. ``report`` is the full ``report.json`` content."""

    out_dir: Path
    manifest: Manifest
    deployable: bool
    reasons: tuple[str, ...]
    report: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return 0 if self.deployable else EXIT_NOT_DEPLOYABLE


@dataclass(frozen=True)
class _Candidate:
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


class _Bars:
    """tqdm progress bars on stderr, or nothing (``--quiet``, the API default)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    @contextmanager
    def bar(self, desc: str, total: int | None) -> Iterator[Any]:
        if not self.enabled:
            yield None
            return
        from tqdm import tqdm
        # disable=None: no bars when stderr is not a terminal (logs, CI, the demo)
        with tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True, disable=None) as bar:
            yield bar.update


def _as_samples(data: Any, loaded: LoadedModel, input_range: tuple[float, float] | None) -> SampleSet:
    if isinstance(data, SampleSet):
        return data
    if isinstance(data, (str, Path)):
        return load_samples(data, loaded.inputs, input_range)
    if isinstance(data, np.ndarray) and len(loaded.inputs) == 1:
        spec = loaded.inputs[0]
        return SampleSet({spec.name: check_array(data, spec, "samples")}, None, "array")
    raise ConfigError(f"samples: expected a path, a SampleSet or one array, got {type(data).__name__}")


@dataclass
class _Sources:
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


def _evaluate(recipe: quantize.Recipe, sources: _Sources, calibration: SampleSet, evaluation: SampleSet,
              reference: dict[str, np.ndarray], profile: Profile, bars: _Bars) -> _Candidate:
    q = profile.quantization
    try:
        with bars.bar(f"calibrating {recipe.name}", min(len(calibration), quantize.MAX_CALIBRATION)) as tick:
            model = quantize.quantize(sources.for_recipe(recipe), recipe, calibration, q.input_dtype, tick,
                                      sources.keep_names)
    except ConversionError as exc:
        return _Candidate(recipe, None, None, (), None, error=str(exc))
    inspection = inspect_tflite(model)
    outputs = fidelity.run_model(model, evaluation)
    metrics = fidelity.compare(reference, outputs, evaluation.labels)
    misses = list(fidelity.misses(metrics, profile.fidelity))
    if q.require_full_integer and not inspection.full_integer:
        misses.append("profile requires full integer; non-integer ops: " + ", ".join(inspection.non_integer_ops))
    if len(model) > profile.limits.max_model_mb * 1024 * 1024:
        misses.append(f"size {len(model) / 1e6:.2f} MB > limit {profile.limits.max_model_mb} MB")
    return _Candidate(recipe, model, metrics, tuple(misses), outputs, inspection.non_integer_ops,
                      inspection.op_counts(), host_latency_ms=fidelity.host_latency_ms(model, evaluation, runs=10))


def _per_tensor(sources: _Sources) -> quantize.Recipe:
    if sources.can_equalize:
        return quantize.Recipe("int8 per-tensor + equalization", per_channel=False, equalized=True)
    return quantize.Recipe("int8 per-tensor", per_channel=False)


def _search(sources: _Sources, calibration: SampleSet, evaluation: SampleSet, reference: dict[str, np.ndarray],
            profile: Profile, bars: _Bars) -> list[_Candidate]:
    """Baseline full-int8, then the smaller per-tensor recipe if the baseline is good enough, or
    remedies in order until one meets the target. :func:`_pick` keeps the smallest that does."""
    q = profile.quantization
    baseline = (quantize.Recipe("int8 per-channel", per_channel=True) if q.per_channel else _per_tensor(sources))
    tried = [_evaluate(baseline, sources, calibration, evaluation, reference, profile, bars)]
    if tried[0].ok:
        if q.per_channel:  # per-tensor drops 24 bytes of scales and zero points per channel
            tried.append(_evaluate(_per_tensor(sources), sources, calibration, evaluation, reference, profile, bars))
        return tried
    remedies: list[Any] = [_per_tensor(sources) if q.per_channel else quantize.Recipe("int8 per-channel")]
    if q.allow_16bit_activations and not q.require_full_integer:
        remedies.append(quantize.Recipe("16x8 (int16 activations)", per_channel=True, int16_activations=True))
    if q.allow_float_fallback and not q.require_full_integer:
        remedies.append("fallback")
    with bars.bar("fidelity search", None) as tick:
        for remedy in remedies:
            if remedy == "fallback":
                try:
                    ranked = quantize.sensitive_tensors(sources.plain, calibration, q.input_dtype, q.per_channel)
                except ConversionError as exc:
                    tried.append(_Candidate(quantize.Recipe("float fallback"), None, None, (), None, error=str(exc)))
                    continue
                for k in (1, 3, 6):
                    if k > len(ranked) or (k > 1 and len(ranked) < k):
                        break
                    names = tuple(name for name, _ in ranked[:k])
                    recipe = quantize.Recipe(f"int8 + float fallback of {k} layer(s)", per_channel=q.per_channel,
                                             float_tensors=names)
                    tried.append(_evaluate(recipe, sources, calibration, evaluation, reference, profile, bars))
                    if tick:
                        tick(1)
                    if tried[-1].ok:
                        break
            else:
                tried.append(_evaluate(remedy, sources, calibration, evaluation, reference, profile, bars))
                if tick:
                    tick(1)
            if any(c.ok for c in tried):
                break
    return tried


def _pick(tried: list[_Candidate]) -> _Candidate:
    ok = [c for c in tried if c.ok]
    if ok:
        return min(ok, key=lambda c: len(c.model or b""))
    ran = [c for c in tried if c.metrics is not None]
    if not ran:
        raise ConversionError("every quantization recipe failed: " + "; ".join(c.error or "" for c in tried))
    return max(ran, key=lambda c: (c.metrics.top1_agreement_pct or 0, c.metrics.min_cosine))  # type: ignore[union-attr]


def _prune(loaded: LoadedModel, calibration: SampleSet, prune_channels: float, sparsity: float, epochs: int,
           workdir: Path, bars: _Bars, allocation: str = "cost") -> tuple[Path, Any, pruning.PruneSummary]:
    if loaded.keras_model is None:
        raise ConfigError(f"{loaded.path}: pruning needs a Keras model (.keras or .h5); got a {loaded.format}")
    teacher = loaded.keras_model
    student, summary = (pruning.prune_channels(teacher, prune_channels, allocation) if prune_channels > 0 else (None, None))
    if student is None:
        from converter._tf import keras
        student = keras.models.clone_model(teacher)
        student.set_weights(teacher.get_weights())
        summary = pruning.PruneSummary(params_before=teacher.count_params(), params_after=teacher.count_params())
    masks = pruning.apply_sparsity(student, sparsity) if sparsity > 0 else None
    inputs = [calibration.inputs[t.name] for t in loaded.inputs]
    with bars.bar("fine-tuning", epochs) as tick:
        losses = pruning.finetune(student, teacher, inputs, calibration.labels, epochs, masks, tick)
    out_dir = workdir / "pruned_saved_model"
    _, outs = export_keras(student, out_dir, ([t.name for t in loaded.inputs], [t.name for t in loaded.outputs]))
    if [o.shape for o in outs] != [o.shape for o in loaded.outputs]:
        raise ConversionError("the pruned model's output shapes differ from the original's")
    assert summary is not None
    summary = pruning.PruneSummary(summary.plans, summary.skipped, summary.params_before, student.count_params(),
                                   pruning.kernel_sparsity(student) if sparsity > 0 else None, epochs, losses,
                                   summary.allocation, pruning.conv_macs(teacher), pruning.conv_macs(student))
    return out_dir, student, summary


def _layout(shape: list[int]) -> str:
    return {4: "NHWC", 2: "NC"}.get(len(shape), "other")


def convert(model: str | Path, profile: str | Path | Profile, calibration: str | Path | SampleSet | np.ndarray,
            out: str | Path, *, eval_data: str | Path | SampleSet | np.ndarray | None = None,
            input_range: tuple[float, float] | None = None, prune_channels: float = 0.0, sparsity: float = 0.0,
            finetune_epochs: int = 3, prune_allocation: str = "cost", version: str = "1", name: str | None = None,
            sign_key: str | Path | None = None, progress: bool = False, eval_fraction: float = 0.2,
            latency_runs: int = 30, keep_tensor_names: bool = False) -> ConvertResult:
    """Convert a trained model into a signed, checked artifact directory for ``profile``.

    Without ``eval_data``, ``eval_fraction`` of the calibration samples is held out for the
    fidelity measurement. Intermediate tensor names are dropped from the shipped model unless
    ``keep_tensor_names``. A candidate that misses the profile's fidelity target is still written,
    with ``deployable: false`` in its manifest (``result.exit_code == 3``).

    Raises:
        ConfigError: bad profile, samples, options or output directory.
        ModelError: the model is missing, unsupported or does not load.
        ConversionError: the model cannot be converted or quantized at all.
    """
    started = time.monotonic()
    bars = _Bars(progress)
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    model_path, out = Path(model), Path(out).resolve()
    try:
        parse_version(version)
    except Exception as exc:
        raise ConfigError(f"--version {version!r}: expected dotted numbers such as 3 or 1.4.2") from exc
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "-", model_path.stem if model_path.suffix else model_path.name)
    if not _NAME.match(name):
        raise ConfigError(f"--name {name!r}: expected letters, digits, '.', '_' or '-' (at most 64)")
    for label, value in (("--prune-channels", prune_channels), ("--sparsity", sparsity)):
        if not 0 <= value < 1:
            raise ConfigError(f"{label} {value}: expected a fraction in [0, 1)")
    if prune_allocation not in pruning.ALLOCATIONS:
        raise ConfigError(f"--prune-allocation {prune_allocation!r}: expected one of {', '.join(pruning.ALLOCATIONS)}")
    if finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs {finetune_epochs}: expected 0 or more")
    if sign_key is not None and not Path(sign_key).is_file():
        raise ConfigError(f"--sign-key {sign_key}: signing key not found")
    artifact.check_out_dir(out)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.edge-convert-", dir=out.parent))
    try:
        loaded = load_model(model_path, workdir)
        cal = _as_samples(calibration, loaded, input_range)
        if eval_data is not None:
            ev = _as_samples(eval_data, loaded, input_range)
            eval_source = ev.source
        elif len(cal) >= 10:
            cal, ev = cal.split(eval_fraction)
            eval_source = f"{eval_fraction:.0%} of the calibration samples held out"
        else:
            ev, eval_source = cal, "the calibration samples (too few to hold any out)"
        pruned = None
        source_dir, source_keras = loaded.saved_model_dir, loaded.keras_model
        if prune_channels > 0 or sparsity > 0:
            source_dir, source_keras, pruned = _prune(loaded, cal, prune_channels, sparsity, finetune_epochs, workdir,
                                                      bars, prune_allocation)
        sources = _Sources(source_dir, source_keras, ([t.name for t in loaded.inputs], [t.name for t in loaded.outputs]),
                           cal, workdir, keep_tensor_names)
        float_model = quantize.convert_float(loaded.saved_model_dir, keep_tensor_names)
        reference = fidelity.run_model(float_model, ev)
        tried = _search(sources, cal, ev, reference, prof, bars)
        chosen = _pick(tried)
        assert chosen.model is not None and chosen.metrics is not None and chosen.outputs is not None
        inspection = inspect_tflite(chosen.model)
        reasons = list(chosen.misses)
        tpu = edgetpu.check_edgetpu(inspection, chosen.model) if prof.runtime.accelerator == "edgetpu" else None
        if tpu and not tpu.static_ok:
            reasons.append("ops would run on the CPU instead of the Edge TPU: " + ", ".join(tpu.cpu_ops[:10]))
        deployable = not reasons
        golden = artifact.choose_golden(chosen.model, ev, reference, chosen.outputs)
        inputs, outputs = artifact.tensor_specs(chosen.model)
        preprocessing_range = input_range or ((0.0, 1.0) if isinstance(calibration, (str, Path))
                                              and Path(calibration).is_dir() else None)
        metrics = chosen.metrics.to_dict()
        created = artifact.utc_now()
        fidelity_info = {**metrics, "recipe": chosen.recipe.name, "target": prof.fidelity.model_dump(),
                         "misses": reasons, "non_integer_ops": list(inspection.non_integer_ops),
                         "recipes_tried": [c.recipe.name for c in tried]}
        manifest = Manifest(
            name=name, version=version, created=created, converter_version=artifact.converter_version(),
            profile=prof.name, task="classification" if fidelity.classification_output(reference) else "other",
            model=ModelFile(sha256=__import__("hashlib").sha256(chosen.model).hexdigest(), size=len(chosen.model)),
            source=Source(format=loaded.format, sha256=loaded.sha256),
            inputs=inputs, outputs=outputs,
            preprocessing=Preprocessing(input_range=preprocessing_range, layout=_layout(inputs[0].shape)),
            fidelity=fidelity_info, golden=golden.golden, baseline=artifact.baseline_stats(chosen.outputs),
            deployable=deployable)
        threads = 1
        report = {
            "out": str(out), "name": name, "version": version, "profile": prof.name, "created": created,
            "converter_version": manifest.converter_version,
            "source": {"path": str(model_path), "format": loaded.format, "sha256": loaded.sha256},
            "deployable": deployable, "reasons": reasons, "target": prof.fidelity.model_dump(),
            "eval_source": eval_source, "calibration_samples": min(len(cal), quantize.MAX_CALIBRATION),
            "float": {"size": len(float_model), "gzip_size": len(gzip.compress(float_model, 9)),
                      "size_breakdown": size_breakdown(float_model),
                      "host_latency_ms": fidelity.host_latency_ms(float_model, ev, latency_runs, threads)},
            "recipes": [c.to_dict() for c in tried],
            "chosen": {**chosen.to_dict(), "size_breakdown": size_breakdown(chosen.model),
                       "host_latency_ms": fidelity.host_latency_ms(chosen.model, ev, latency_runs, threads)},
            "pruning": pruned.to_dict() if pruned else None,
            "equalization": sources.equalization.to_dict() if sources.equalization else None,
            "tensor_names": "kept" if keep_tensor_names else "intermediate names dropped",
            "edgetpu": tpu.to_dict() if tpu else None,
            "golden": {"count": len(golden.golden.samples), "atol": golden.golden.atol,
                       "measured_error": golden.measured_error},
            "latency_note": "host figures on this machine with 1 interpreter thread, not device figures",
            "signed": sign_key is not None,
        }
        report["seconds"] = round(time.monotonic() - started, 2)
        artifact.write_artifact(workdir / "artifact", out, chosen.model, manifest, report, render_markdown(report),
                                Path(sign_key) if sign_key else None)
        return ConvertResult(out, manifest, deployable, tuple(reasons), report)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
