"""Quantization recipes and the flatbuffer check that stops float ops from shipping silently."""

from __future__ import annotations

import numpy as np
import pytest

from converter.data import SampleSet
from converter.fidelity import compare, run_model
from converter.loading import load_model
from converter.progress import Bars
from converter.quantize import Recipe, convert_float, quantize, sensitive_tensors
from converter.search import Sources, evaluate
from converter.tflite_inspect import inspect_tflite
from edgefleet.profiles import load_profile


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


def test_float_fallback_of_sensitive_layers_is_listed_and_fails_full_integer_profile(prepared, tmp_path) -> None:
    loaded, cal, ev, ref = prepared
    ranked = sensitive_tensors(loaded.saved_model_dir, cal, "int8", per_channel=True)
    assert ranked and ranked[0][1] >= ranked[-1][1]
    recipe = Recipe("fallback", float_tensors=(ranked[0][0],))
    inspection = inspect_tflite(quantize(loaded.saved_model_dir, recipe, cal))
    assert not inspection.full_integer and inspection.non_integer_ops
    # the shipped model drops intermediate names, but a float tensor keeps its name for the report
    assert any(name.strip() for name in inspection.float_tensors)
    coral = load_profile("coral-usb")
    sources = Sources(loaded.saved_model_dir, None, (["image"], ["probs"]), cal, tmp_path, keep_names=False)
    candidate = evaluate(recipe, sources, ev, ref, coral, Bars(enabled=False))
    assert not candidate.ok
    assert any("requires full integer; non-integer ops:" in m for m in candidate.misses)


def test_per_tensor_recipe_is_measurably_different_from_per_channel(prepared) -> None:
    loaded, cal, ev, _ = prepared
    per_channel = quantize(loaded.saved_model_dir, Recipe("pc"), cal)
    per_tensor = quantize(loaded.saved_model_dir, Recipe("pt", per_channel=False), cal)
    assert len(per_tensor) < len(per_channel)  # one scale per tensor instead of per output channel
    assert not np.array_equal(run_model(per_tensor, ev)["probs"], run_model(per_channel, ev)["probs"])


def test_intermediate_tensor_names_are_dropped_without_changing_a_single_output(prepared) -> None:
    from ai_edge_litert.interpreter import Interpreter

    loaded, cal, ev, _ = prepared
    named = quantize(loaded.saved_model_dir, Recipe("pc"), cal, keep_names=True)
    compact = quantize(loaded.saved_model_dir, Recipe("pc"), cal)
    assert len(compact) < len(named)
    np.testing.assert_array_equal(run_model(compact, ev)["probs"], run_model(named, ev)["probs"])
    interp = Interpreter(model_content=compact)
    assert interp.get_signature_list() == Interpreter(model_content=named).get_signature_list()
    names = [t["name"] for t in interp.get_tensor_details()]
    io = {d["name"] for d in interp.get_input_details() + interp.get_output_details()}
    assert all(io) and {n for n in names if n} == io  # only the graph's inputs and outputs keep a name


def test_edgetpu_check_puts_unsupported_op_and_everything_after_it_on_the_cpu(tmp_path) -> None:
    from converter._tf import keras
    from converter.edgetpu import check_edgetpu

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(8, 3, padding="same")(inp)
    h = keras.layers.LeakyReLU(negative_slope=0.1)(h)  # int8 in TFLite, not on the Edge TPU
    h = keras.layers.Flatten()(h)
    model = keras.Model(inp, keras.layers.Dense(4, activation="softmax", name="probs")(h))
    loaded = load_model(_save(model, tmp_path), tmp_path)
    cal = SampleSet({"image": np.random.default_rng(0).random((20, 8, 8, 1), np.float32)}, None, "cal")
    tflite = quantize(loaded.saved_model_dir, Recipe("int8"), cal, io_dtype="uint8")
    check = check_edgetpu(inspect_tflite(tflite), tflite)
    assert not check.static_ok
    assert check.cpu_ops[0].startswith("LEAKY_RELU") and any(op.startswith("FULLY_CONNECTED") for op in check.cpu_ops)
    assert not any(op.startswith("CONV_2D") for op in check.cpu_ops)
    assert "x86-64" in check.note  # no edgetpu_compiler here: the report must say the compile step is pending


def _save(model, folder):
    path = folder / "m.keras"
    model.save(path)
    return path
