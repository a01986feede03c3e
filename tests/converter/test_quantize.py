"""Quantization recipes and the flatbuffer check that stops float ops from shipping silently."""

from __future__ import annotations

import numpy as np
import pytest

from agent.profiles import load_profile
from converter.data import SampleSet
from converter.fidelity import compare, run_model
from converter.inspect import inspect_tflite
from converter.loading import load_model
from converter.pipeline import _evaluate
from converter.quantize import Recipe, convert_float, quantize, sensitive_tensors


@pytest.fixture(scope="module")
def prepared(digits, tmp_path_factory):
    loaded = load_model(digits.keras_path, tmp_path_factory.mktemp("q"))
    cal = SampleSet({"image": digits.x[:300]}, digits.y[:300], "cal")
    ev = SampleSet({"image": digits.x[digits.n_train:]}, digits.y[digits.n_train:], "eval")
    ref = run_model(convert_float(loaded.saved_model_dir), ev)
    return loaded, cal, ev, ref


def test_full_int8_uint8_io_has_only_integer_ops_and_uint8_io(prepared) -> None:
    loaded, cal, ev, ref = prepared
    model = quantize(loaded.saved_model_dir, Recipe("int8"), cal, io_dtype="uint8")
    inspection = inspect_tflite(model)
    assert inspection.full_integer and inspection.non_integer_ops == ()
    assert "CONV_2D" in inspection.op_counts()
    metrics = compare(ref, run_model(model, ev), ev.labels)
    assert metrics.top1_agreement_pct >= 98 and metrics.min_cosine > 0.99


def test_float_fallback_of_sensitive_layers_is_listed_and_fails_full_integer_profile(prepared) -> None:
    loaded, cal, ev, ref = prepared
    ranked = sensitive_tensors(loaded.saved_model_dir, cal, "int8", per_channel=True)
    assert ranked and ranked[0][1] >= ranked[-1][1]
    recipe = Recipe("fallback", float_tensors=(ranked[0][0],))
    inspection = inspect_tflite(quantize(loaded.saved_model_dir, recipe, cal))
    assert not inspection.full_integer and inspection.non_integer_ops
    coral = load_profile("coral-usb")
    candidate = _evaluate(recipe, loaded.saved_model_dir, cal, ev, ref, coral, _NoBars())
    assert not candidate.ok
    assert any("requires full integer; non-integer ops:" in m for m in candidate.misses)


def test_per_tensor_recipe_is_measurably_different_from_per_channel(prepared) -> None:
    loaded, cal, ev, _ = prepared
    per_channel = quantize(loaded.saved_model_dir, Recipe("pc"), cal)
    per_tensor = quantize(loaded.saved_model_dir, Recipe("pt", per_channel=False), cal)
    assert len(per_tensor) < len(per_channel)  # one scale per tensor instead of per output channel
    assert not np.array_equal(run_model(per_tensor, ev)["probs"], run_model(per_channel, ev)["probs"])


class _NoBars:
    from contextlib import contextmanager

    @contextmanager
    def bar(self, desc, total):
        yield None
