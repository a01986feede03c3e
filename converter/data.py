"""Sample data for calibration and evaluation: ``.npz``, ``.npy`` or a folder of images.

Every sample set is checked against the model before any conversion starts (shape, dtype,
finite values, the declared input range), so a wrong file fails in a second with one line instead
of deep inside the TFLite calibrator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converter.loading import TensorInfo
from edgefleet.errors import ConfigError

__all__ = ["IMAGE_SUFFIXES", "SampleSet", "held_out", "load_samples", "parse_range"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
MAX_SAMPLES = 100_000


@dataclass(frozen=True)
class SampleSet:
    """Float inputs keyed by model input name (first axis = sample) and optional integer labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    def take(self, index: np.ndarray | slice) -> SampleSet:
        labels = None if self.labels is None else self.labels[index]
        return SampleSet({k: v[index] for k, v in self.inputs.items()}, labels, self.source)

    def split(self, eval_fraction: float, seed: int = 0) -> tuple[SampleSet, SampleSet]:
        """(calibration, evaluation) with a fixed shuffle, so reruns compare like with like."""
        order = np.random.default_rng(seed).permutation(len(self))
        n_eval = max(1, round(len(self) * eval_fraction))
        return self.take(order[n_eval:]), self.take(order[:n_eval])

    def fingerprints(self) -> list[bytes]:
        """One digest per sample (all its inputs), to tell calibration and evaluation samples apart."""
        import hashlib

        names = sorted(self.inputs)
        return [hashlib.sha256(b"".join(np.ascontiguousarray(self.inputs[k][i]).tobytes() for k in names)).digest()
                for i in range(len(self))]

    def without(self, other: SampleSet) -> SampleSet:
        """This set minus every sample identical to one in ``other``."""
        seen = set(other.fingerprints())
        keep = np.array([f not in seen for f in self.fingerprints()], bool)
        return self if keep.all() else self.take(np.flatnonzero(keep))

    def unique(self) -> SampleSet:
        """This set with every sample identical to an earlier one dropped (the first copy is kept)."""
        seen: set[bytes] = set()
        keep = []
        for i, f in enumerate(self.fingerprints()):
            if f not in seen:
                seen.add(f)
                keep.append(i)
        return self if len(keep) == len(self) else self.take(np.array(keep, np.int64))

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """One sample with a batch axis of 1, as the interpreter wants it."""
        return {k: v[i:i + 1] for k, v in self.inputs.items()}


def held_out(calibration: SampleSet, evaluation: SampleSet) -> tuple[SampleSet, SampleSet, str]:
    """(calibration, evaluation, what was dropped) such that no sample counts twice.

    Identical evaluation samples count once: agreement's Wilson interval treats every sample as
    an independent trial, and 330 copies of one picture (fer's bench set had them) turn one
    flipped prediction into 28 points. Calibration samples identical to an evaluation sample are
    dropped: a model whose ranges were fitted to its test samples is judged on data it has seen.
    The text says what was dropped ("" when nothing was).
    """
    ev = evaluation.unique()
    cal = calibration.without(ev)
    notes = []
    if len(cal) < len(calibration):
        notes.append(f"{len(calibration) - len(cal)} calibration samples identical to evaluation samples dropped")
    if len(ev) < len(evaluation):
        notes.append(f"{len(evaluation) - len(ev)} duplicate evaluation samples dropped")
    return cal, ev, "; ".join(notes)


def parse_range(text: str | None) -> tuple[float, float] | None:
    """``"-1,1"`` -> ``(-1.0, 1.0)``.

    Raises:
        ConfigError: not two numbers, or low >= high.
    """
    if text is None:
        return None
    try:
        lo, hi = (float(p) for p in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"--input-range {text!r}: expected LO,HI such as 0,1 or -1,1") from exc
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ConfigError(f"--input-range {text!r}: expected finite LO < HI")
    return lo, hi


def check_array(array: np.ndarray, spec: TensorInfo, where: str) -> np.ndarray:
    """``array`` as float32 (N, ...) samples for input ``spec``, or a ConfigError saying why not."""
    if array.dtype.kind not in "fiub":
        raise ConfigError(f"{where}: dtype {array.dtype} is not numeric; expected float samples")
    want = tuple(spec.shape[1:])
    if array.shape == want:
        array = array[None]
    if array.shape[1:] != want and array.shape[1:] + (1,) == want:
        array = array[..., None]  # grayscale stored without its channel axis
    if array.ndim != len(want) + 1 or array.shape[1:] != want:
        raise ConfigError(f"{where}: samples have shape {array.shape}, expected (N, {', '.join(map(str, want))}) "
                          f"for model input {spec.name!r}")
    if array.shape[0] == 0:
        raise ConfigError(f"{where}: no samples")
    if array.shape[0] > MAX_SAMPLES:
        raise ConfigError(f"{where}: {array.shape[0]} samples, expected at most {MAX_SAMPLES}")
    array = array.astype(np.float32)
    bad = ~np.isfinite(array)
    if bad.any():
        first = int(np.argwhere(bad.reshape(len(array), -1).any(axis=1))[0][0])
        raise ConfigError(f"{where}: {int(bad.sum())} NaN/Inf values (first in sample {first}); "
                          "expected finite numbers")
    return array


def _load_arrays(path: Path, specs: Sequence[TensorInfo]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable {path.suffix} file ({exc})") from exc
    if isinstance(data, np.ndarray):
        if len(specs) != 1:
            raise ConfigError(f"{path}: one array for a model with {len(specs)} inputs; "
                              f"use an .npz with arrays named {', '.join(s.name for s in specs)}")
        return {specs[0].name: data}, None
    with data:
        keys = set(data.files)
        labels = data["y"] if "y" in keys else None
        if len(specs) == 1 and "x" in keys:
            arrays = {specs[0].name: data["x"]}
        else:
            missing = [s.name for s in specs if s.name not in keys]
            if missing:
                expected = "x" if len(specs) == 1 else ", ".join(s.name for s in specs)
                raise ConfigError(f"{path}: no array named {missing[0]!r}; expected arrays {expected} "
                                  f"(found {', '.join(sorted(keys)) or 'none'})")
            arrays = {s.name: data[s.name] for s in specs}
    return arrays, labels


def _load_images(folder: Path, spec: TensorInfo, value_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray | None]:
    from PIL import Image, UnidentifiedImageError

    if len(spec.shape) != 4 or spec.shape[3] not in (1, 3):
        raise ConfigError(f"{folder}: image folders need a model input of shape (1, H, W, 1 or 3), "
                          f"got {spec.shape}")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    if len(files) > MAX_SAMPLES:
        raise ConfigError(f"{folder}: {len(files)} images, expected at most {MAX_SAMPLES}")
    classes = sorted({p.parent.name for p in files if p.parent != folder})
    labelled = bool(classes) and all(p.parent != folder for p in files)
    h, w, c = spec.shape[1:]
    out = np.empty((len(files), h, w, c), np.float32)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as img:
                img = img.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                pixels = np.asarray(img, np.float32).reshape(h, w, c)
        except (OSError, UnidentifiedImageError) as exc:
            raise ConfigError(f"{file}: not a readable image ({exc})") from exc
        out[i] = pixels
    lo, hi = value_range
    out = out / 255.0 * (hi - lo) + lo
    labels = np.array([classes.index(p.parent.name) for p in files]) if labelled else None
    return out, labels


def load_samples(path: Path | str, specs: Sequence[TensorInfo],
                 input_range: tuple[float, float] | None = None) -> SampleSet:
    """Read and check samples for a model with inputs ``specs``.

    Images are scaled from 0..255 to ``input_range`` (default 0..1); images in sub-folders get the
    sorted sub-folder index as their label. Array files are used as they are, and must lie inside
    ``input_range`` when one is given.

    Raises:
        ConfigError: missing file, unknown format, shape/dtype mismatch, NaN/Inf, out-of-range values.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: sample data not found")
    if path.is_dir():
        if len(specs) != 1:
            raise ConfigError(f"{path}: image folders only work for single-input models")
        images, labels = _load_images(path, specs[0], input_range or (0.0, 1.0))
        arrays = {specs[0].name: images}
    elif path.suffix.lower() in (".npz", ".npy"):
        arrays, labels = _load_arrays(path, specs)
    else:
        raise ConfigError(f"{path}: unsupported sample format {path.suffix!r}; expected .npz, .npy or an image folder")
    inputs = {s.name: check_array(np.asarray(arrays[s.name]), s, str(path)) for s in specs}
    counts = {len(v) for v in inputs.values()}
    if len(counts) != 1:
        raise ConfigError(f"{path}: inputs have different sample counts {sorted(counts)}")
    n = counts.pop()
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.shape != (n,):
            raise ConfigError(f"{path}: labels 'y' have shape {labels.shape} and dtype {labels.dtype}, "
                              f"expected ({n},) integers")
        labels = labels.astype(np.int64)
    if input_range is not None and not path.is_dir():
        lo, hi = input_range
        slack = 1e-3 * (hi - lo)
        for name, arr in inputs.items():
            if arr.min() < lo - slack or arr.max() > hi + slack:
                raise ConfigError(f"{path}: input {name!r} spans [{arr.min():.3g}, {arr.max():.3g}], "
                                  f"outside --input-range {lo:g},{hi:g}")
    return SampleSet(inputs, labels, str(path))
