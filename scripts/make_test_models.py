"""Build the tiny .tflite models the agent tests use and write them to ``tests/data/models/``.

The files are committed (a few KB each) so the runtime tests never need TensorFlow; run this
script again only to change them::

    .venv/bin/python scripts/make_test_models.py [--out tests/data/models]

Models (all batch 1):
    float.tflite        float32 in (1,16,16,3) -> softmax (1,10)
    int8.tflite         the same network, full int8 with int8 input and output
    uint8.tflite        the same network, full int8 inside with uint8 input and output
    multi_io.tflite     float: inputs "a" (1,4) and "b" (1,6) -> outputs "sum" (1,3) and "prod" (1,2)
    custom_op.tflite    float.tflite with one op rewritten to the custom op "EdgefleetSecretOp"
    tiny.tflite         float32 (1,8) -> dense (1,4): the per-call overhead benchmark

Artifact directories with golden samples are built by the tests from these files
(tests/support/artifacts.py); corrupted variants are made at test time.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CUSTOM_OP_NAME = "EdgefleetSecretOp"


def _classifier():
    import keras

    keras.utils.set_random_seed(7)
    inp = keras.Input((16, 16, 3), batch_size=1, name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(10, activation="softmax", name="scores")(x)
    return keras.Model(inp, out)


def _convert(model, quant: str | None = None) -> bytes:
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if quant:
        rng = np.random.default_rng(0)
        shape = [1, *model.inputs[0].shape[1:]]

        def rep():
            for _ in range(32):
                yield [rng.uniform(0, 1, shape).astype(np.float32)]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8 if quant == "int8" else tf.uint8
        conv.inference_output_type = tf.int8 if quant == "int8" else tf.uint8
    return conv.convert()


def _multi_io() -> bytes:
    import keras

    keras.utils.set_random_seed(11)
    a = keras.Input((4,), batch_size=1, name="a")
    b = keras.Input((6,), batch_size=1, name="b")
    s = keras.layers.Dense(3, name="sum")(keras.layers.Concatenate()([a, b]))
    p = keras.layers.Dense(2, activation="tanh", name="prod")(b)
    return _convert(keras.Model([a, b], {"sum": s, "prod": p}))


def _tiny() -> bytes:
    import keras

    keras.utils.set_random_seed(3)
    inp = keras.Input((8,), batch_size=1, name="x")
    return _convert(keras.Model(inp, keras.layers.Dense(4, name="y")(inp)))


def _with_custom_op(model_bytes: bytes, op_name: str = CUSTOM_OP_NAME) -> bytes:
    """Rewrite the first operator's opcode into a custom op no runtime knows."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(model_bytes, 0))
    first_op = model.subgraphs[0].operators[0]
    code = model.operatorCodes[first_op.opcodeIndex]
    code.builtinCode = schema.BuiltinOperator.CUSTOM
    code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode = op_name
    first_op.builtinOptionsType = 0
    first_op.builtinOptions = None
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def build(out: Path) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    clf = _classifier()
    float_bytes = _convert(clf)
    files = {
        "float.tflite": float_bytes,
        "int8.tflite": _convert(clf, "int8"),
        "uint8.tflite": _convert(clf, "uint8"),
        "multi_io.tflite": _multi_io(),
        "custom_op.tflite": _with_custom_op(float_bytes),
        "tiny.tflite": _tiny(),
    }
    for name, data in files.items():
        (out / name).write_bytes(data)
    return {name: len(data) for name, data in files.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "models")
    args = parser.parse_args()
    for name, size in build(args.out).items():
        print(f"{name:20s} {size:7d} bytes")


if __name__ == "__main__":
    main()
