"""Model files as other tools write them: Keras 2 SavedModels with optimizer state, TF1 graphs with
several signatures and dynamic sizes, Keras files with custom and Lambda layers. Each either converts
or fails with one line naming the file and what was expected (never "unexpected AttributeError")."""

from __future__ import annotations

from pathlib import Path

import pytest

from converter import convert
from converter.cli import main

# Three real-world model files converted end to end with TensorFlow (`make test-slow`, run by CI).
pytestmark = pytest.mark.slow

WILD = Path(__file__).resolve().parents[1] / "data" / "models" / "wild"


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main([*argv, "--quiet"])
    return code, capsys.readouterr().err.strip().splitlines()


def test_keras2_saved_model_with_optimizer_slots_converts(digits, tmp_path: Path) -> None:
    import tensorflow as tf

    with pytest.raises(AttributeError, match="add_slot"):  # what TF 2.21's own loader does with it
        tf.saved_model.load(str(WILD / "keras2_adam_digits"))
    result = convert(WILD / "keras2_adam_digits", "x86-dev", digits.calibration, tmp_path / "art",
                     eval_data=digits.evaluation, latency_runs=3)
    assert result.deployable, result.reasons
    assert [t.name for t in result.manifest.inputs] == ["image"] and result.manifest.outputs[0].shape == [1, 10]
    assert result.report["chosen"]["kernel"] == "xnnpack-int8"


def test_tf1_saved_model_needs_a_signature_then_an_input_shape_then_converts(digits, tmp_path: Path, capsys) -> None:
    model = str(WILD / "tf1_two_signatures")
    base = [model, "--profile", "x86-dev", "--calibration", str(digits.calibration), "--eval", str(digits.evaluation)]
    code, err = _cli(capsys, *base, "--out", str(tmp_path / "a"))
    assert code == 2 and err == [(f"error: {model}: SavedModel has several signatures (classify, features) and no "
                                 "serving_default; pass --signature NAME")]
    code, err = _cli(capsys, *base, "--signature", "classify", "--out", str(tmp_path / "b"))
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {model}: input 'image': shape (None, None, None, 1) has a dynamic dimension")
    assert err[0].endswith("pass --input-shape image=1,D,D,1")
    code, err = _cli(capsys, *base, "--signature", "nope", "--out", str(tmp_path / "c"))
    assert code == 2 and err == [(f"error: --signature nope: {model} has no such signature; expected one of "
                                 "classify, features")]
    code, err = _cli(capsys, *base, "--signature", "features", "--input-shape", "image=1,8,8,1",
                     "--out", str(tmp_path / "d"))
    assert code in (0, 3), err  # converts; 8 float features are not class scores, cosine decides
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    result = convert(model, "x86-dev", digits.calibration, tmp_path / "e", eval_data=digits.evaluation,
                     signature="classify", input_shapes={"image": (1, 8, 8, 1)}, latency_runs=3)
    assert result.manifest.inputs[0].shape == [1, 8, 8, 1] and result.manifest.outputs[0].shape == [1, 10]


def _custom_model(folder: Path) -> tuple[Path, Path, Path]:
    from converter._tf import keras

    source = folder / "layers.py"
    source.write_text(
        "import keras\n\n"
        "class Doubler(keras.layers.Layer):\n"
        "    def call(self, x):\n"
        "        return x * 2.0\n")
    import importlib.util
    spec = importlib.util.spec_from_file_location("layers_under_test", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    inp = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Flatten()(module.Doubler(name="doubler")(inp))
    custom = keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="probs")(h))
    custom.save(folder / "custom.keras")
    h = keras.layers.Lambda(lambda t: t * 2.0, name="times_two")(inp)
    lam = keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="probs")(keras.layers.Flatten()(h)))
    lam.save(folder / "lambda.h5")
    return folder / "custom.keras", folder / "lambda.h5", source


def test_custom_and_lambda_layers_are_named_and_load_with_custom_objects(digits, tmp_path: Path, capsys) -> None:
    custom, lam, source = _custom_model(tmp_path)
    rest = ["--profile", "x86-dev", "--calibration", str(digits.calibration), "--out", str(tmp_path / "out")]
    code, err = _cli(capsys, str(custom), *rest)
    assert code == 2 and err == [(f"error: {custom}: layer 'doubler' of class 'Doubler' is not a Keras built-in; "
                                 "expected --custom-objects module.py defining Doubler")]
    code, err = _cli(capsys, str(lam), *rest)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {lam}: Lambda layer 'times_two' stores Python")
    code, err = _cli(capsys, str(tmp_path / "custom.keras"), *rest, "--custom-objects", str(tmp_path / "nope.py"))
    assert code == 2 and err == [(f"error: --custom-objects {tmp_path / 'nope.py'}: file not found; expected a "
                                 "Python module")]
    assert not (tmp_path / "out").exists()
    result = convert(custom, "x86-dev", digits.calibration, tmp_path / "art", eval_data=digits.evaluation,
                     custom_objects=source, latency_runs=3)
    assert result.manifest.outputs[0].shape == [1, 10]
