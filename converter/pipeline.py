"""``convert()``: load -> prune -> recipe search -> verify ops -> gate -> package (+sign).

This module only orders the steps; the options are checked in :mod:`converter.options`, which
recipes are tried and which ships is :mod:`converter.search`, the manifest and the report are
built and written by :mod:`converter.writer`. The CLI, the benchmark and the tests all go
through :func:`convert`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from converter import artifact, edgetpu, fidelity, pruning, quantize, writer
from converter.data import SampleSet, check_array, held_out, load_samples
from converter.loading import LoadedModel, export_keras, load_model
from converter.options import ConvertOptions
from converter.progress import Bars
from converter.search import SearchResult, Sources, search
from converter.tflite_inspect import Inspection, inspect_tflite
from edgefleet.errors import ConfigError, ConversionError
from edgefleet.manifest import Manifest
from edgefleet.profiles import Profile, load_profile

__all__ = ["EXIT_NOT_DEPLOYABLE", "ConvertOptions", "ConvertResult", "convert"]

EXIT_NOT_DEPLOYABLE = 3
_OPTION_NAMES = frozenset(f.name for f in fields(ConvertOptions))

Samples = str | Path | SampleSet | np.ndarray


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


def _options(options: ConvertOptions | None, overrides: dict[str, Any]) -> ConvertOptions:
    unknown = sorted(set(overrides) - _OPTION_NAMES)
    if unknown:
        raise TypeError(f"convert() got unknown options {unknown}; expected fields of ConvertOptions")
    if options is None:
        return ConvertOptions(**overrides)
    return replace(options, **overrides) if overrides else options


def _as_samples(data: Samples, loaded: LoadedModel, input_range: tuple[float, float] | None) -> SampleSet:
    if isinstance(data, SampleSet):
        return data
    if isinstance(data, (str, Path)):
        return load_samples(data, loaded.inputs, input_range)
    if isinstance(data, np.ndarray) and len(loaded.inputs) == 1:
        spec = loaded.inputs[0]
        return SampleSet({spec.name: check_array(data, spec, "samples")}, None, "array")
    raise ConfigError(f"samples: expected a path, a SampleSet or one array, got {type(data).__name__}")


_MIN_SPLIT = 10  # calibration samples below which none can be held out for the fidelity check


def _samples(loaded: LoadedModel, calibration: Samples, eval_data: Samples | None,
             opts: ConvertOptions) -> tuple[SampleSet, SampleSet, str]:
    """(calibration, evaluation, where the evaluation samples come from, for the report).

    The two never share a sample: a model calibrated on its test samples would be judged on data
    its ranges were fitted to. Calibration samples identical to an evaluation sample are dropped, and
    identical evaluation samples count once (:func:`converter.data.held_out`).

    Raises:
        ConfigError: too few samples to hold any out, or nothing left to calibrate on.
    """
    cal = _as_samples(calibration, loaded, opts.input_range)
    if eval_data is not None:
        ev = _as_samples(eval_data, loaded, opts.input_range)
        source = ev.source
    elif len(cal.unique()) >= _MIN_SPLIT:  # identical samples would land on both sides of the split
        cal, ev = cal.unique().split(opts.eval_fraction)
        source = f"{opts.eval_fraction:.0%} of the calibration samples held out"
    else:
        raise ConfigError(f"{cal.source}: {len(cal.unique())} samples, expected at least {_MIN_SPLIT} to hold some out "
                          "for the fidelity check, or separate --eval data")
    kept, ev, dropped = held_out(cal, ev)
    if len(kept) == 0:
        raise ConfigError(f"{cal.source}: every calibration sample is also an evaluation sample; "
                          "expected separate calibration and --eval data")
    cal = kept
    if dropped:
        source += f" ({dropped})"
    assert not set(cal.fingerprints()) & set(ev.fingerprints()), "calibration and evaluation samples overlap"
    return cal, ev, source


def _io_names(loaded: LoadedModel) -> tuple[list[str], list[str]]:
    return [t.name for t in loaded.inputs], [t.name for t in loaded.outputs]


def _prune(loaded: LoadedModel, calibration: SampleSet, opts: ConvertOptions, workdir: Path,
           bars: Bars) -> tuple[Path, Any, pruning.PruneSummary]:
    """Prune a copy of the Keras model, fine-tune it from the original, export it as a SavedModel.

    Raises:
        ConfigError: the model is not a Keras model.
        ConversionError: the pruned model's outputs no longer match the original's.
    """
    prune_channels, sparsity, epochs = opts.prune_channels, opts.sparsity, opts.finetune_epochs
    if loaded.keras_model is None:
        raise ConfigError(f"{loaded.path}: pruning needs a Keras model (.keras or .h5); got a {loaded.format}")
    teacher = loaded.keras_model
    student, summary = (pruning.prune_channels(teacher, prune_channels, opts.prune_allocation) if prune_channels > 0 else (None, None))
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
    _, outs = export_keras(student, out_dir, _io_names(loaded))
    if [o.shape for o in outs] != [o.shape for o in loaded.outputs]:
        raise ConversionError("the pruned model's output shapes differ from the original's")
    assert summary is not None
    summary = pruning.PruneSummary(summary.plans, summary.skipped, summary.params_before, student.count_params(),
                                   pruning.kernel_sparsity(student) if sparsity > 0 else None, epochs, losses,
                                   summary.allocation, pruning.conv_macs(teacher), pruning.conv_macs(student))
    return out_dir, student, summary


def _gate(found: SearchResult, profile: Profile) -> tuple[Inspection, edgetpu.EdgeTpuCheck | None, tuple[str, ...]]:
    """Why the chosen model may not ship: its misses (fidelity, speed), plus ops that would leave the Edge TPU."""
    chosen = found.chosen
    assert chosen.model is not None
    inspection = inspect_tflite(chosen.model)
    reasons = list(found.reasons)
    tpu = edgetpu.check_edgetpu(inspection, chosen.model) if profile.runtime.accelerator == "edgetpu" else None
    if tpu and not tpu.static_ok:
        reasons.append("ops would run on the CPU instead of the Edge TPU: " + ", ".join(tpu.cpu_ops[:10]))
    return inspection, tpu, tuple(reasons)


def _preprocessing_range(calibration: Samples, opts: ConvertOptions) -> tuple[float, float] | None:
    """The manifest's input range: as given, else 0..1 for image folders (how they were scaled)."""
    if opts.input_range is not None:
        return opts.input_range
    return (0.0, 1.0) if isinstance(calibration, (str, Path)) and Path(calibration).is_dir() else None


def convert(model: str | Path, profile: str | Path | Profile, calibration: Samples, out: str | Path,
            options: ConvertOptions | None = None, *, eval_data: Samples | None = None,
            **overrides: Any) -> ConvertResult:
    """Convert a trained model into a signed, checked artifact directory for ``profile``.

    ``overrides`` are :class:`ConvertOptions` fields (``version="2", prune_channels=0.3``), applied
    over ``options``. Without ``eval_data``, ``eval_fraction`` of the calibration samples is held out
    for the fidelity measurement. A candidate that misses the profile's fidelity target is still
    written, with ``deployable: false`` in its manifest (``result.exit_code == 3``).

    Raises:
        TypeError: an override is not a ConvertOptions field.
        ConfigError: bad profile, samples, options or output directory.
        ModelError: the model is missing, unsupported or does not load.
        ConversionError: the model cannot be converted or quantized at all.
    """
    started = time.monotonic()
    opts = _options(options, overrides)
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    model_path, out = Path(model), Path(out).resolve()
    name = opts.artifact_name(model_path)
    if opts.sign_key is not None and not opts.sign_key.is_file():
        raise ConfigError(f"--sign-key {opts.sign_key}: signing key not found")
    if opts.custom_objects is not None and not opts.custom_objects.is_file():
        raise ConfigError(f"--custom-objects {opts.custom_objects}: file not found; expected a Python module")
    artifact.check_out_dir(out)
    bars = Bars(opts.progress)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.edge-convert-", dir=out.parent))
    try:
        loaded = load_model(model_path, workdir, signature=opts.signature, input_shapes=dict(opts.input_shapes),
                            custom_objects=opts.custom_objects)
        cal, ev, eval_source = _samples(loaded, calibration, eval_data, opts)
        source_dir, source_keras, pruned = loaded.saved_model_dir, loaded.keras_model, None
        if opts.prunes:
            source_dir, source_keras, pruned = _prune(loaded, cal, opts, workdir, bars)
        sources = Sources(source_dir, source_keras, _io_names(loaded), cal, workdir, opts.keep_tensor_names)
        float_model = quantize.convert_float(loaded.saved_model_dir, opts.keep_tensor_names)
        reference = fidelity.run_model(float_model, ev)
        found = search(sources, ev, reference, prof, bars, opts.latency_runs)
        chosen = found.chosen
        assert chosen.model is not None and chosen.outputs is not None
        inspection, tpu, reasons = _gate(found, prof)
        latency = fidelity.interleaved_latency_ms({"float": float_model, "chosen": chosen.model}, ev.sample(0),
                                                  opts.latency_runs, found.threads)
        conversion = writer.Conversion(
            out=out, name=name, options=opts, profile=prof, loaded=loaded, search=found, inspection=inspection,
            reference=reference, eval_source=eval_source, calibration_samples=min(len(cal), quantize.MAX_CALIBRATION),
            float_model=float_model, float_latency_ms=latency["float"], chosen_latency_ms=latency["chosen"],
            robustness=fidelity.robustness(float_model, chosen.model, ev),
            preprocessing_range=_preprocessing_range(calibration, opts), reasons=reasons, edgetpu=tpu,
            pruning=pruned, equalization=sources.equalization, fitting=sources.fitting(),
            golden=artifact.choose_golden(chosen.model, ev, reference, chosen.outputs))
        manifest, report = writer.write(conversion, workdir / "artifact", artifact.utc_now(),
                                        round(time.monotonic() - started, 2))
        return ConvertResult(out, manifest, conversion.deployable, reasons, report)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
