"""Encoded images (PNG, JPEG) -> model input arrays, for every source that takes pictures.

One decoding rule for the directory source and the REST ``{"b64": ...}`` inputs, so a frame gives
the same tensor whichever way it arrives: Pillow, converted to L or RGB, resized bilinearly to
the model's H x W, scaled to ``input_range`` (default 0..1). The pixel count is checked from the
header before any pixel is decoded (a decompression bomb is a small file that would decode to
gigabytes).
"""

from __future__ import annotations

from typing import IO

import numpy as np

from edgefleet.errors import InputError

__all__ = ["MAX_IMAGE_PIXELS", "decode_image"]

MAX_IMAGE_PIXELS = 40_000_000
"""Largest image decoded, pixels (a 4K frame is 8.3 M; Pillow itself only warns below 179 M)."""


def decode_image(fp: IO[bytes], input_shape: tuple[int, ...] | None, input_range: tuple[float, float] | None,
                 what: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode one image from ``fp`` into an ``[H, W, C]`` float32 array for the model input.

    ``what`` names the image in errors (a file name, ``instance 0``).

    Raises:
        InputError: not a readable image, more than ``max_pixels`` pixels, or a model whose input
            is not ``[1, H, W, 1|3]``.
    """
    if input_shape is None or len(input_shape) != 4 or input_shape[-1] not in (1, 3):
        raise InputError(f"{what}: images need a model input of shape [1, H, W, 1|3], "
                         f"got {list(input_shape) if input_shape else None}")
    from PIL import Image, UnidentifiedImageError

    _, height, width, channels = input_shape
    try:
        with Image.open(fp) as img:
            if img.width * img.height > max_pixels:
                raise InputError(f"{what}: image of {img.width}x{img.height} pixels, at most {max_pixels}")
            img = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InputError(f"{what}: not a readable image: {exc}") from exc
    lo, hi = input_range or (0.0, 1.0)
    arr = arr * np.float32(hi - lo) + np.float32(lo)
    return arr.reshape(height, width, channels)
