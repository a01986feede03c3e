"""Session-scoped real models and data for the converter tests: trained once, reused everywhere.

Everything is built without downloads: scikit-learn's bundled digits, a small CNN trained for a
few epochs, and a two-output SavedModel exported from Keras.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


def pytest_configure(config: pytest.Config) -> None:
    # TFLiteConverter itself still uses tf.lite.Interpreter internally; our code uses ai-edge-litert.
    config.addinivalue_line("filterwarnings", "ignore:.*tf.lite.Interpreter is deprecated:UserWarning")


@dataclass(frozen=True)
class Digits:
    model: object
    keras_path: Path
    h5_path: Path
    calibration: Path
    evaluation: Path
    x: np.ndarray
    y: np.ndarray
    n_train: int


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    from scripts.sample_models import train_digits_model, write_samples

    folder = tmp_path_factory.mktemp("digits")
    model, x, y = train_digits_model(epochs=5)
    n = int(len(x) * 0.8)
    model.save(folder / "digits.keras")
    model.save(folder / "digits.h5")
    write_samples(folder / "cal.npz", x[:n], y[:n])
    write_samples(folder / "eval.npz", x[n:], y[n:])
    return Digits(model, folder / "digits.keras", folder / "digits.h5", folder / "cal.npz", folder / "eval.npz",
                  x, y, n)


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from edgefleet.signing import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def digits_result(digits: Digits, signing_keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """One full conversion (x86-dev, signed) that many tests inspect."""
    from converter import convert

    out = tmp_path_factory.mktemp("artifacts") / "digits-art"
    return convert(digits.keras_path, "x86-dev", digits.calibration, out, eval_data=digits.evaluation,
                   version="1.2", name="digits", sign_key=signing_keys[0], latency_runs=10)


@pytest.fixture(scope="session")
def two_output_saved_model(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A SavedModel (dynamic batch) with two named inputs and two outputs: class scores and ink amount."""
    from converter._tf import keras

    keras.utils.set_random_seed(1)
    pixels = keras.Input((64,), name="pixels")
    hint = keras.Input((4,), name="hint")
    h = keras.layers.Concatenate()([pixels, hint])
    h = keras.layers.Dense(32, activation="relu")(h)
    scores = keras.layers.Dense(10, activation="softmax", name="digit")(h)
    ink = keras.layers.Dense(1, name="ink")(h)
    model = keras.Model([pixels, hint], [scores, ink])
    model.compile("adam", ["sparse_categorical_crossentropy", "mse"])
    flat = digits.x.reshape(len(digits.x), 64)
    hints = np.tile(np.linspace(0, 1, 4, dtype=np.float32), (len(flat), 1))
    ink_amount = flat.mean(axis=1, keepdims=True)
    model.fit([flat, hints], [digits.y, ink_amount], epochs=3, batch_size=64, verbose=0)
    folder = tmp_path_factory.mktemp("saved")
    model.export(str(folder / "two_out"), format="tf_saved_model", verbose=False)
    samples = folder / "two_in.npz"
    np.savez(samples, pixels=flat[:300], hint=hints[:300], y=digits.y[:300])
    return folder / "two_out", samples
