"""Build the tiny models the OTA tests use and write them to tests/data/models/ota/.

Run once on the host (needs TensorFlow; the agent never does): ``python scripts/make_ota_test_models.py``.
``--big PATH`` writes a ~4 MB model with the same contract instead (scripts/bench_ota.py uses it).
The outputs are committed, so tests never convert anything. Every model but ``nan`` and
``custom_op`` shares one contract: input ``[1, 32, 32, 3]`` int8, output ``[1, 4]`` int8.

- ``clf_a.tflite``     the "v1" classifier.
- ``clf_a2.tflite``    clf_a with slightly perturbed weights: a healthy "v2" that agrees with v1.
- ``clf_b.tflite``     same contract, unrelated weights: a "v2" that disagrees with v1 in shadow.
- ``clf_wide.tflite``  five classes instead of four: a contract change.
- ``slow.tflite``      same contract, ~850 MMAC of convolutions at 96x96: too slow for a tight budget.
- ``nan.tflite``       float32 in/out, outputs sqrt(-1 - x^2) = NaN for every input.
- ``custom_op.tflite`` float32, contains a MatrixInverse custom op no runtime resolves.
- ``float_ok.tflite``  float32 in/out, sqrt(mean(x) * w + 2): finite for any input in [-1, 1].
- ``float_nan_live.tflite`` same contract, sqrt(mean(x) * w + 0.5): finite on the golden and
  synthetic inputs (mean near 0 or positive) but NaN on dark live frames (mean < -0.5), so
  only probation on live traffic can catch it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "models" / "ota"
SHAPE = (1, 32, 32, 3)


def _rep_data():
    rng = np.random.default_rng(0)
    for _ in range(32):
        yield [rng.uniform(-1, 1, SHAPE).astype(np.float32)]


def _int8(fn) -> bytes:
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = _rep_data
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    return conv.convert()


def _float(fn, custom: bool = False) -> bytes:
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    if custom:
        conv.allow_custom_ops = True
    return conv.convert()


def classifier(seed: int, classes: int = 4, perturb: float = 0.0):
    rng = np.random.default_rng(seed)
    k = rng.normal(0, 0.5, (3, 3, 3, 8)).astype(np.float32)
    w = rng.normal(0, 0.3, (8 * 8 * 8, classes)).astype(np.float32)
    if perturb:
        noise = np.random.default_rng(seed + 100)
        k = k + noise.normal(0, perturb, k.shape).astype(np.float32)
        w = w + noise.normal(0, perturb, w.shape).astype(np.float32)
    kc, wc = tf.constant(k), tf.constant(w)

    @tf.function(input_signature=[tf.TensorSpec(SHAPE, tf.float32, name="image")])
    def fn(x):
        h = tf.nn.relu(tf.nn.conv2d(x, kc, strides=4, padding="SAME"))
        return tf.nn.softmax(tf.matmul(tf.reshape(h, (1, -1)), wc))

    return fn


def slow():
    rng = np.random.default_rng(7)
    kin = tf.constant(rng.normal(0, 0.3, (3, 3, 3, 32)).astype(np.float32))
    ks = [tf.constant(rng.normal(0, 0.1, (3, 3, 32, 32)).astype(np.float32)) for _ in range(10)]
    w = tf.constant(rng.normal(0, 0.3, (32, 4)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec(SHAPE, tf.float32, name="image")])
    def fn(x):
        h = tf.nn.relu(tf.nn.conv2d(tf.image.resize(x, (96, 96)), kin, strides=1, padding="SAME"))
        for k in ks:
            h = tf.nn.relu(tf.nn.conv2d(h, k, strides=1, padding="SAME"))
        return tf.nn.softmax(tf.matmul(tf.reduce_mean(h, axis=(1, 2)), w))

    return fn


def nan():
    @tf.function(input_signature=[tf.TensorSpec(SHAPE, tf.float32, name="image")])
    def fn(x):
        m = tf.reduce_mean(x, axis=(1, 2))  # [1, 3]
        v = tf.concat([m, m[:, :1]], axis=1)  # [1, 4]
        return tf.sqrt(-1.0 - v * v)

    return fn


def sqrt_of_mean(offset: float):
    """float32 [1,32,32,3] -> [1,4]: sqrt(mean(x) * w + offset); NaN once mean(x) < -offset."""
    w = tf.constant(np.array([[1.0, 0.5, 0.25, 0.125]], np.float32))

    @tf.function(input_signature=[tf.TensorSpec(SHAPE, tf.float32, name="image")])
    def fn(x):
        m = tf.reduce_mean(x, axis=(1, 2, 3))[:, None]  # [1, 1]
        return tf.sqrt(m * w + offset)

    return fn


def custom_op():
    @tf.function(input_signature=[tf.TensorSpec((1, 4, 4), tf.float32, name="matrix")])
    def fn(x):
        return tf.linalg.inv(x + 4.0 * tf.eye(4))

    return fn


def big(seed: int = 5):
    """~4 MB int8 classifier with the common contract (for scripts/bench_ota.py, not committed)."""
    rng = np.random.default_rng(seed)
    w1 = tf.constant(rng.normal(0, 0.02, (32 * 32 * 3, 1024)).astype(np.float32))
    w2 = tf.constant(rng.normal(0, 0.05, (1024, 1024)).astype(np.float32))
    w3 = tf.constant(rng.normal(0, 0.1, (1024, 4)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec(SHAPE, tf.float32, name="image")])
    def fn(x):
        h = tf.nn.relu(tf.matmul(tf.reshape(x, (1, -1)), w1))
        h = tf.nn.relu(tf.matmul(h, w2))
        return tf.nn.softmax(tf.matmul(h, w3))

    return fn


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--big":
        data = _int8(big())
        Path(sys.argv[2]).write_bytes(data)
        print(f"big        {len(data):8d} bytes -> {sys.argv[2]}")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    models = {
        "clf_a": _int8(classifier(1)),
        "clf_a2": _int8(classifier(1, perturb=0.02)),
        "clf_b": _int8(classifier(2)),
        "clf_wide": _int8(classifier(3, classes=5)),
        "slow": _int8(slow()),
        "nan": _float(nan()),
        "custom_op": _float(custom_op(), custom=True),
        "float_ok": _float(sqrt_of_mean(2.0)),
        "float_nan_live": _float(sqrt_of_mean(0.5)),
    }
    for name, data in models.items():
        (OUT / f"{name}.tflite").write_bytes(data)
        print(f"{name:10s} {len(data):8d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
