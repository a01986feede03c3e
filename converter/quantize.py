"""Full-integer quantization recipes on top of ``tf.lite.TFLiteConverter``.

A :class:`Recipe` names one way to quantize (per-channel or per-tensor weights, 16-bit
activations, some layers kept in float, int8 activation ranges by min/max, percentile or MSE:
see :mod:`converter.ranges`). The plain full-int8 recipe is the baseline the fidelity
search has to beat; :func:`sensitive_tensors` uses TensorFlow's quantization debugger to find
which layers lose the most, so the remedies touch as little of the model as possible.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from converter._tf import tf
from converter.compact import strip_tensor_names
from converter.data import SampleSet
from converter.ranges import METHODS as RANGE_METHODS
from converter.ranges import refit_ranges
from edgefleet.errors import ConversionError

__all__ = ["MAX_CALIBRATION", "Recipe", "convert_float", "quantize", "quantize_variants", "sensitive_tensors"]

MAX_CALIBRATION = 300  # samples; more rarely moves the ranges and costs linear time
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Recipe:
    """How to quantize; ``name`` is what the report shows."""

    name: str
    per_channel: bool = True
    int16_activations: bool = False
    float_tensors: tuple[str, ...] = field(default=())
    equalized: bool = False  # quantize the cross-layer-equalized model (see converter.equalize)
    bias_corrected: bool = False  # per-channel: quantize a twin whose offsets absorb the weights' rounding bias
    ranges: str = "minmax"  # int8 activation ranges: "minmax" (TFLite's), "percentile" or "mse" (converter.ranges)
    learned_rounding: bool = False  # per-channel: quantize a twin whose weights are rounded by AdaRound (converter.rounding)
    distilled: bool = False  # per-channel: quantize a twin fine-tuned for int8 by distillation (converter.distill)

    def __post_init__(self) -> None:
        if self.ranges not in RANGE_METHODS:
            raise ValueError(f"ranges {self.ranges!r}: expected one of {', '.join(RANGE_METHODS)}")
        if self.ranges != "minmax" and (self.int16_activations or self.float_tensors):
            raise ValueError(f"ranges {self.ranges!r} applies to full-int8 recipes only (not 16x8 or float fallback)")
        if sum((self.equalized, self.bias_corrected, self.learned_rounding, self.distilled)) > 1:
            raise ValueError("equalized, bias_corrected, learned_rounding and distilled each prepare their own twin; "
                             "pick one")
        if (self.learned_rounding or self.distilled) and (not self.per_channel or self.int16_activations):
            raise ValueError("learned rounding and distillation fit the per-channel int8 grid; they need per_channel")

    @property
    def full_integer(self) -> bool:
        return not self.float_tensors


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:300]


def _representative(samples: SampleSet, progress: Progress | None,
                    as_list: bool = False) -> Callable[[], Iterator[Any]]:
    """Calibration feed: dicts keyed by signature input for the converter; lists (inputs in
    name order, which is the interpreter's order for our exported signatures) for the debugger."""
    n = min(len(samples), MAX_CALIBRATION)

    def gen() -> Iterator[Any]:
        for i in range(n):
            if progress:
                progress(1)
            feed = samples.sample(i)
            yield [feed[k] for k in sorted(feed)] if as_list else feed
    return gen


def _finish(model: bytes, keep_names: bool) -> bytes:
    return model if keep_names else strip_tensor_names(model)


def convert_float(saved_model_dir: Path, keep_names: bool = False) -> bytes:
    """The float32 ``.tflite``: the reference every quantized candidate is measured against.

    Its intermediate tensor names are dropped like the candidates', so size ratios compare
    like with like (``keep_names`` keeps them).

    Raises:
        ConversionError: the graph uses ops TFLite cannot express.
    """
    try:
        model = bytes(tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir)).convert())
    except Exception as exc:  # ConverterError, RuntimeError, ValueError depending on the phase
        raise ConversionError(f"float TFLite conversion failed: {_first_line(exc)}") from exc
    return _finish(model, keep_names)


def _converter(saved_model_dir: Path, recipe: Recipe, calibration: SampleSet, io_dtype: str,
               progress: Progress | None, allow_float: bool = False) -> tf.lite.TFLiteConverter:
    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir))
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = _representative(calibration, progress)
    ops = tf.lite.OpsSet
    if recipe.int16_activations:
        conv.target_spec.supported_ops = [ops.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        conv.inference_input_type = conv.inference_output_type = tf.int16
    else:
        conv.target_spec.supported_ops = ([ops.TFLITE_BUILTINS_INT8, ops.TFLITE_BUILTINS] if recipe.float_tensors or allow_float
                                          else [ops.TFLITE_BUILTINS_INT8])
        conv.inference_input_type = conv.inference_output_type = tf.as_dtype(io_dtype)
    if not recipe.per_channel:
        conv._experimental_disable_per_channel = True
    if recipe.ranges != "minmax":
        _refit_before_quantizing(conv, calibration, recipe.ranges)
    return conv


def _refit_before_quantizing(conv: Any, calibration: SampleSet, method: str,
                             keep: dict[str, Any] | None = None) -> None:
    """Make ``conv`` quantize with activation ranges chosen by ``method`` (see :mod:`converter.ranges`).

    TFLiteConverter calibrates, then hands the calibrated float model to the MLIR quantizer in one
    private step, ``_quantize``. This wraps that step on this instance only: calibrate as TensorFlow
    would (``_experimental_calibrate_only``), refit the recorded ranges, then call the quantizer with
    the very arguments TensorFlow's own int8 path passes. Everything after it (buffer
    deduplication, conversion metadata) is TensorFlow's, so with unchanged ranges the bytes are
    plain int8's. ``keep``, when given, receives the refit model (``"refit"``) and that quantizer
    call (``"quantize"``: calibrated bytes to int8 bytes) for :func:`quantize_variants`.
    """
    from tensorflow.lite.python.convert import mlir_quantize

    original = conv._quantize

    def quantize_with_ranges(result: Any, input_type: Any, output_type: Any, activations_type: Any,
                             bias_type: Any, allow_float: Any, enable_variable_quantization: Any,
                             debug_options: Any) -> Any:
        if not conv.experimental_new_quantizer or activations_type == tf.int16:
            raise RuntimeError("activation ranges need the MLIR quantizer and int8 activations")
        conv._experimental_calibrate_only = True
        try:
            calibrated = original(result, input_type, output_type, activations_type, bias_type, allow_float,
                                  enable_variable_quantization, debug_options)
        finally:
            conv._experimental_calibrate_only = False
        refit, _ = refit_ranges(bytes(calibrated), calibration, method, MAX_CALIBRATION)

        def quantizer(model: bytes) -> Any:
            return mlir_quantize(
                model, conv._experimental_disable_per_channel, input_data_type=input_type,
                output_data_type=output_type, enable_variable_quantization=enable_variable_quantization,
                disable_per_channel_for_dense_layers=conv._experimental_disable_per_channel_quantization_for_dense_layers,
                debug_options_str=debug_options.SerializeToString())
        if keep is not None:
            keep.update(refit=refit, quantize=quantizer)
        return quantizer(refit)

    conv._quantize = quantize_with_ranges


def quantize(saved_model_dir: Path, recipe: Recipe, calibration: SampleSet, io_dtype: str = "int8",
             progress: Progress | None = None, keep_names: bool = False) -> bytes:
    """Convert with ``recipe``, calibrating on (up to ``MAX_CALIBRATION``) samples.

    Intermediate tensor names are dropped (:mod:`converter.compact`) unless ``keep_names``.

    Raises:
        ConversionError: an op has no integer kernel (full-integer recipes) or calibration failed.
    """
    conv = _converter(saved_model_dir, recipe, calibration, io_dtype, progress)
    try:
        if recipe.float_tensors:
            options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(recipe.float_tensors))
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=conv, debug_dataset=_representative(calibration, None, as_list=True), debug_options=options)
            model = bytes(debugger.get_nondebug_quantized_model())
        else:
            model = bytes(conv.convert())
    except Exception as exc:  # the converter raises ConverterError, RuntimeError or ValueError
        raise ConversionError(f"quantization recipe {recipe.name!r} failed: {_first_line(exc)}") from exc
    return _finish(model, keep_names)


def quantize_variants(saved_model_dir: Path, recipe: Recipe, calibration: SampleSet,
                      edits: Iterable[Callable[[bytes], bytes]], io_dtype: str = "int8") -> Iterator[bytes]:
    """``recipe`` (full int8, no float tensors) quantized once per edit of its calibrated model,
    whose ranges ``recipe.ranges`` has already refit; calibration runs once for all of them.

    This measures how much an int8 figure owes to the exact ranges calibration happened to give
    (the benchmark jitters them by a fraction of a percent). The models skip the steps TensorFlow
    runs after quantizing (buffer deduplication, metadata): their bytes differ, their outputs not.

    Raises:
        ValueError: a recipe with float tensors or 16-bit activations.
        ConversionError: calibration or quantization failed.
    """
    if recipe.float_tensors or recipe.int16_activations:  # checked at the call, not at the first model
        raise ValueError(f"recipe {recipe.name!r}: variants are edits of full-int8 ranges only")
    return _variants(saved_model_dir, recipe, calibration, edits, io_dtype)


def _variants(saved_model_dir: Path, recipe: Recipe, calibration: SampleSet,
              edits: Iterable[Callable[[bytes], bytes]], io_dtype: str) -> Iterator[bytes]:
    conv = _converter(saved_model_dir, replace(recipe, ranges="minmax"), calibration, io_dtype, None)
    keep: dict[str, Any] = {}
    _refit_before_quantizing(conv, calibration, recipe.ranges, keep)
    try:
        conv.convert()
        for edit in edits:
            yield bytes(keep["quantize"](edit(keep["refit"])))
    except Exception as exc:  # the converter raises ConverterError, RuntimeError or ValueError
        raise ConversionError(f"quantization recipe {recipe.name!r} failed: {_first_line(exc)}") from exc


def sensitive_tensors(saved_model_dir: Path, calibration: SampleSet, io_dtype: str, per_channel: bool,
                      debug_samples: int = 64) -> list[tuple[str, float]]:
    """Quantized tensors ranked by quantization error (RMSE / scale), worst first.

    This is the metric TensorFlow's quantization-debugger guide uses to pick layers for selective
    quantization: the error in units of one quantization step.

    Raises:
        ConversionError: the debugger could not run the model.
    """
    conv = _converter(saved_model_dir, Recipe("debug", per_channel=per_channel), calibration, io_dtype, None,
                      allow_float=True)
    subset = calibration.take(slice(0, debug_samples))
    try:
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=conv, debug_dataset=_representative(subset, None, as_list=True))
        debugger.run()
        dump = io.StringIO()
        debugger.layer_statistics_dump(dump)
    except Exception as exc:
        raise ConversionError(f"quantization debugger failed: {_first_line(exc)}") from exc
    ranked = []
    for row in csv.DictReader(io.StringIO(dump.getvalue())):
        scale = float(row.get("scale") or 0.0)
        if scale > 0:
            ranked.append((row["tensor_name"], float(np.sqrt(max(float(row["mean_squared_error"]), 0.0))) / scale))
    ranked.sort(key=lambda item: -item[1])
    return ranked
