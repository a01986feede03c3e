"""Camera-like test streams made from scikit-image's real photos, for the input-locality cache.

Why: a cache tuned on streams where the answer never changes proves nothing. These streams
cover what a fixed camera and a busy one see (sensor noise and lighting drift everywhere, moving
objects, scene cuts, cross-fades, handheld jitter, strong noise, people-sized occluders, and a
scene the model is unsure about), at any size and in gray or colour, deterministically from a
seed. Frames are uint8 ``[T, H, W, C]``; callers convert them to what their model takes.

    from scripts.streams import STREAMS, photo, make_stream
    frames = make_stream("handheld", 600, scenes=[photo("astronaut", 224)], seed=1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CROPS", "STREAMS", "Stream", "make_stream", "photo"]

# (photo, rows, cols) as fractions of the photo: faces and textures, where classifiers are unsure
CROPS: dict[str, tuple[str, tuple[float, float], tuple[float, float]]] = {
    "astronaut": ("astronaut", (0.0, 1.0), (0.0, 1.0)),
    "astronaut_face": ("astronaut", (0.06, 0.48), (0.28, 0.66)),
    "camera_face": ("camera", (0.1, 0.4), (0.36, 0.62)),
    "chelsea_face": ("chelsea", (0.15, 0.85), (0.2, 0.68)),
    "coffee": ("coffee", (0.0, 1.0), (0.0, 1.0)),
    "chelsea": ("chelsea", (0.0, 1.0), (0.0, 1.0)),
    "rocket": ("rocket", (0.0, 1.0), (0.0, 1.0)),
    "immunohistochemistry": ("immunohistochemistry", (0.0, 1.0), (0.0, 1.0)),
    "hubble_deep_field": ("hubble_deep_field", (0.0, 1.0), (0.0, 1.0)),
    "grass": ("grass", (0.0, 0.5), (0.0, 0.5)),
    "gravel": ("gravel", (0.0, 0.5), (0.0, 0.5)),
    "brick": ("brick", (0.0, 0.5), (0.0, 0.5)),
}


@dataclass(frozen=True)
class Stream:
    """One kind of stream: ``camera`` is ``fixed`` or ``busy`` (the bench's targets differ)."""

    name: str
    camera: str
    description: str


STREAMS: tuple[Stream, ...] = (
    Stream("static", "fixed", "one scene, sensor noise sigma 2, lighting drift +-6 %"),
    Stream("moving_object", "fixed", "the same with an object 1/7 of the frame crossing, over and over"),
    Stream("scene_cuts", "fixed", "a cut to the next scene every 200 frames"),
    Stream("uncertain", "fixed", "300-frame spells of a scene the model is sure of and one it is not (noise sigma 3)"),
    Stream("cross_fades", "busy", "60-frame cross-fades from one scene to the next, without pause"),
    Stream("handheld", "busy", "handheld jitter: a random walk of +-8 px plus +-2 px shake, noise sigma 3"),
    Stream("strong_noise", "busy", "one scene under sensor noise sigma 12"),
    Stream("occluders", "busy", "people-sized shapes walking through the view every 45 frames"),
)


def photo(crop: str, size: int, gray: bool = False) -> np.ndarray:
    """A crop of a scikit-image sample photo, resized to ``size`` x ``size``, uint8 (H, W, 3 or 1)."""
    from skimage import color, data, transform

    name, (r0, r1), (c0, c1) = CROPS[crop]
    img = np.asarray(getattr(data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    h, w = img.shape[:2]
    img = img[int(r0 * h):int(r1 * h), int(c0 * w):int(c1 * w)]
    out = transform.resize(img, (size, size), anti_aliasing=True, preserve_range=True)
    if gray:
        out = color.rgb2gray(out / 255.0)[..., None] * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _finish(img: np.ndarray, rng: np.random.Generator, sigma: float, gain: float) -> np.ndarray:
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(np.rint(img * np.float32(gain) + noise), 0, 255).astype(np.uint8)


def make_stream(name: str, frames: int, scenes: Sequence[np.ndarray], *, uncertain: np.ndarray | None = None,
                seed: int = 0) -> np.ndarray:
    """Frames ``[frames, H, W, C]`` uint8 of stream ``name`` (one of :data:`STREAMS`) over ``scenes``.

    ``scenes[0]`` is the main scene; cuts, fades and occluders use the others. ``uncertain`` is
    the scene the ``uncertain`` stream alternates with (default: the last scene).

    Raises:
        ValueError: an unknown stream name, or no scene.
    """
    if name not in {s.name for s in STREAMS}:
        raise ValueError(f"unknown stream {name!r}: expected one of {[s.name for s in STREAMS]}")
    if not scenes:
        raise ValueError("make_stream needs at least one scene")
    rng = np.random.default_rng(seed)
    base = [s.astype(np.float32) for s in scenes]
    size, channels = base[0].shape[0], base[0].shape[2]
    hard = (uncertain if uncertain is not None else scenes[-1]).astype(np.float32)
    pad = 8
    padded = np.pad(base[0], ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    walk = np.zeros(2, np.int64)
    side = max(2, size // 7)
    out = np.empty((frames, size, size, channels), np.uint8)
    for t in range(frames):
        gain = 1.0 + 0.06 * np.sin(2 * np.pi * t / max(frames, 1))
        sigma = 2.0
        img = base[0]
        if name == "moving_object":
            img = img.copy()
            x = (t * 2) % (size + side) - side
            y = (size // 3 + (t // ((size + side) // 2)) * side) % (size - side)
            img[y:y + side, max(x, 0):max(x + side, 0)] = np.float32([40, 200, 60][:channels] if channels == 3 else 120)
        elif name == "scene_cuts":
            img = base[(t // 200) % len(base)]
        elif name == "uncertain":
            img = base[0] if (t // 300) % 2 == 0 else hard
            sigma = 3.0
        elif name == "cross_fades":
            k, phase = divmod(t, 60)
            a, b = base[k % len(base)], base[(k + 1) % len(base)]
            img = a * np.float32(1 - phase / 60) + b * np.float32(phase / 60)
        elif name == "handheld":
            walk = np.clip(walk + rng.integers(-1, 2, 2), -pad + 2, pad - 2)
            dy, dx = walk + rng.integers(-2, 3, 2)
            img = padded[pad + dy:pad + dy + size, pad + dx:pad + dx + size]
            sigma = 3.0
        elif name == "strong_noise":
            sigma = 12.0
        elif name == "occluders":
            k, phase = divmod(t, 45)
            if phase < 30:  # a person takes 30 frames to cross, then 15 frames of empty scene
                img = img.copy()
                width = size // 4
                x = int((phase / 30) * (size + width)) - width
                shade = base[(k + 1) % len(base)] * np.float32(0.5) if len(base) > 1 else img * np.float32(0.3)
                lo, hi = max(x, 0), min(x + width, size)
                if hi > lo:
                    img[size // 6:, lo:hi] = shade[size // 6:, lo:hi]
        out[t] = _finish(img, rng, sigma, gain)
    return out
