"""Write the SavedModels in ``tests/data/models/wild/`` the way other tools write them (run once, by hand).

Not a test and not a project dependency: it needs ``tf_keras`` (Keras 2), which the project never
installs. Run it in a throwaway venv that sees the project's TensorFlow::

    python3 -m venv /tmp/tfk
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/tfk/lib/python3.11/site-packages/project.pth
    /tmp/tfk/bin/pip install --no-deps tf_keras==2.21.0
    TF_USE_LEGACY_KERAS=1 /tmp/tfk/bin/python tests/converter/make_wild_models.py

- ``keras2_adam_digits/``: a Keras 2 CNN trained with Adam and saved with ``model.save(dir)``, so
  the object graph holds the optimizer and its slot variables (what TF 2.16+'s loader trips over).
- ``tf1_two_signatures/``: a TF1 ``SavedModelBuilder`` graph with two signatures (``classify``,
  ``features``), no ``serving_default``, and dynamic height and width.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parents[1] / "data" / "models" / "wild"


def keras2_adam_digits(out: Path) -> None:
    import tf_keras as keras

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.layers.Input((8, 8, 1), name="image"),
        keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax", name="probs"),
    ])
    # the legacy (OptimizerV2) Adam: what TF <= 2.10 used, its slots are linked in the object graph
    model.compile(optimizer=keras.optimizers.legacy.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(x, digits.target, epochs=3, batch_size=64, verbose=0)
    model.save(str(out), save_format="tf")


def tf1_two_signatures(out: Path) -> None:
    import tensorflow as tf

    v1 = tf.compat.v1
    rng = np.random.default_rng(0)
    with tf.Graph().as_default(), v1.Session() as sess:
        image = v1.placeholder(tf.float32, [None, None, None, 1], name="image")
        kernel = tf.Variable(rng.normal(0, 0.5, (3, 3, 1, 8)).astype(np.float32), name="kernel")
        dense = tf.Variable(rng.normal(0, 0.5, (8, 10)).astype(np.float32), name="dense")
        features = tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(image, kernel, 1, "SAME")), axis=[1, 2], name="features")
        probs = tf.nn.softmax(tf.matmul(features, dense), name="probs")
        sess.run(v1.global_variables_initializer())
        builder = v1.saved_model.Builder(str(out))
        sig = v1.saved_model.predict_signature_def
        builder.add_meta_graph_and_variables(sess, [v1.saved_model.tag_constants.SERVING], signature_def_map={
            "classify": sig({"image": image}, {"probs": probs}),
            "features": sig({"image": image}, {"features": features})})
        builder.save()


if __name__ == "__main__":
    for name, make in (("keras2_adam_digits", keras2_adam_digits), ("tf1_two_signatures", tf1_two_signatures)):
        shutil.rmtree(OUT / name, ignore_errors=True)
        make(OUT / name)
        print(OUT / name, sum(p.stat().st_size for p in (OUT / name).rglob("*") if p.is_file()), "bytes")
