"""Small real models and data built without downloads, for tests, the demo and the benchmark.

scikit-learn ships the 8x8 handwritten digits; a tiny CNN reaches ~95% on them in a few seconds
on two cores, which is enough to exercise every step of the pipeline with real numbers.
scikit-learn comes only with the dev extra, so this lives in ``scripts/`` and does not ship:
tests import it as ``scripts.sample_models``, the scripts beside it as ``sample_models``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "build_digits_cnn",
    "build_mobilenet_digits",
    "digits_data",
    "face_crops",
    "train_digits_model",
    "write_samples",
]


def digits_data(size: int = 8, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 (N, size, size, channels) in 0..1, and int labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    if size != 8:
        from converter._tf import tf
        x = tf.image.resize(x, (size, size), method="bilinear").numpy().astype(np.float32)
    if channels != 1:
        x = np.repeat(x, channels, axis=-1)
    return np.clip(x, 0.0, 1.0), digits.target.astype(np.int64)


_CROP_IMAGES = ("astronaut", "camera", "coffee", "chelsea", "coins", "moon", "page", "text", "rocket", "grass",
                "gravel", "brick", "horse", "cell", "hubble_deep_field", "retina", "immunohistochemistry")


def face_crops(count: int = 1500, size: int = 64, value_range: tuple[float, float] = (-1.0, 1.0),
               seed: int = 0) -> np.ndarray:
    """Grayscale (count, size, size, 1) inputs for an image classifier, all from files scikit-image ships:
    its 200 LFW crops (100 faces, 100 not), then random square crops (any scale, flipped at random)
    of its sample photographs, so no two samples are the same picture resized twice."""
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.transform import resize

    rng = np.random.default_rng(seed)
    lfw = skimage.data.lfw_subset()
    photos = []
    for name in _CROP_IMAGES:
        image = np.asarray(getattr(skimage.data, name)(), np.float64)
        # rgb2gray wants [0, 1]: on 0-255 floats it saturates and every crop of the photo is one constant
        image = rgb2gray(image[..., :3] / 255.0) if image.ndim == 3 else image / max(float(image.max()), 1.0)
        photos.append(image)
    out = np.empty((count, size, size, 1), np.float32)
    for i in range(count):
        if i < len(lfw):
            tile = lfw[i]
        else:
            image = photos[int(rng.integers(len(photos)))]
            side = int(rng.integers(24, min(image.shape) + 1))
            top, left = (int(rng.integers(0, d - side + 1)) for d in image.shape)
            tile = image[top:top + side, left:left + side]
            tile = tile[:, ::-1] if rng.random() < 0.5 else tile
        out[i, ..., 0] = resize(tile, (size, size), anti_aliasing=True)
    lo, hi = value_range
    return np.clip(out, 0.0, 1.0) * (hi - lo) + lo


def build_digits_cnn(size: int = 8) -> Any:
    """A small Sequential CNN: conv-BN-relu x2, pooling, dense; channel-prunable end to end."""
    from converter._tf import keras

    layers = keras.layers
    return keras.Sequential([
        keras.Input((size, size, 1), name="image"),
        layers.Conv2D(32, 3, padding="same", use_bias=False),
        layers.BatchNormalization(momentum=0.9),
        layers.ReLU(),
        layers.Conv2D(64, 3, padding="same", use_bias=False),
        layers.BatchNormalization(momentum=0.9),
        layers.ReLU(),
        layers.MaxPooling2D(),
        layers.Conv2D(64, 3, padding="same", activation="relu"),
        layers.Flatten(),
        layers.Dense(64, activation="relu"),
        layers.Dense(10, activation="softmax", name="probs"),
    ], name="digits_cnn")


def _fit(model: Any, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> Any:
    from converter._tf import keras

    keras.utils.set_random_seed(seed)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0, shuffle=True)
    return model


def train_digits_model(epochs: int = 6, seed: int = 0, size: int = 8,
                       train_fraction: float = 0.8) -> tuple[Any, np.ndarray, np.ndarray]:
    """Train :func:`build_digits_cnn` on the first ``train_fraction`` of a fixed shuffle.

    Returns ``(model, x, y)`` with ALL samples in the shuffled order, so callers split the same
    way: ``x[:n_train]`` was trained on, the rest is held out (``n_train = int(len(x) * 0.8)``).
    """
    from converter._tf import keras

    keras.utils.set_random_seed(seed)
    x, y = digits_data(size)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_train = int(len(x) * train_fraction)
    model = _fit(build_digits_cnn(size), x[:n_train], y[:n_train], epochs, seed)
    return model, x, y


def build_mobilenet_digits(size: int = 96, alpha: float = 0.35) -> Any:
    """MobileNetV2 (random init, no download) for 10 digit classes on upscaled RGB digits."""
    from converter._tf import keras

    return keras.applications.MobileNetV2(alpha=alpha, input_shape=(size, size, 3), weights=None, classes=10)


def write_samples(path: Path, x: np.ndarray, y: np.ndarray | None = None) -> Path:
    """Save samples as the ``.npz`` layout ``edge-convert --calibration`` reads (``x``, optional ``y``)."""
    arrays = {"x": x} if y is None else {"x": x, "y": y}
    np.savez(path, **arrays)
    return Path(path)
