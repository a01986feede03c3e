"""The near-duplicate layer's view of an input: a strided subsample mapped to 0..255 (the signature),
and the distance between two of them. Computed on every lookup, so both are one gather and a few
ufunc passes into preallocated buffers."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from agent.tensors import TensorInfo

__all__ = ["input_signature", "signature_distance"]

_SIGNATURE_CELLS = 32  # samples per spatial axis


def _strides(shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Index that subsamples a batch-1 tensor to at most ~_SIGNATURE_CELLS per axis."""
    index: list[slice] = [slice(0, 1)]
    body = shape[1:]
    for axis, size in enumerate(body):
        last_and_small = axis == len(body) - 1 and size <= 4  # channels: keep them all
        step = 1 if last_and_small else max(1, size // _SIGNATURE_CELLS)
        index.append(slice(step // 2, None, step))
    return tuple(index)


@lru_cache(maxsize=64)
def _signature_index(shape: tuple[int, ...]) -> np.ndarray:
    """Flat positions of the strided subsample of a ``shape`` tensor, in C order, computed once.

    Why: one gather (``take``) of 3072 bytes costs a fifth of slicing the 4-d view and copying it
    (numpy walks a 3-byte inner loop a thousand times for the latter).
    """
    size = int(np.prod(shape))
    index = np.arange(size, dtype=np.intp).reshape(shape)[_strides(shape)].ravel()
    index.setflags(write=False)
    return index


def _signature_part(arr: np.ndarray, index: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """One input's signature: the samples at ``index``, mapped to 0..255 over ``lo..hi``, as uint8.

    One new array per call (it may become the reference) and no other temporary: the float
    path scales that array in place.
    """
    sub = arr.reshape(-1).take(index)
    if sub.dtype == np.uint8:
        return sub
    if sub.dtype == np.int8:  # v + 128 is v's two's-complement byte with the sign bit flipped
        flipped = sub.view(np.uint8)
        np.bitwise_xor(flipped, 0x80, out=flipped)
        return flipped
    if sub.dtype != np.float32:
        sub = sub.astype(np.float32)
    np.subtract(sub, lo, out=sub)
    np.multiply(sub, 255.0 / max(hi - lo, 1e-12), out=sub)
    np.rint(sub, out=sub)
    np.clip(sub, 0, 255, out=sub)
    return sub.astype(np.uint8)


def input_signature(sample: Sequence[np.ndarray], infos: Sequence[TensorInfo],
                    ranges: Sequence[tuple[float, float]]) -> np.ndarray:
    """Strided subsample of every input, mapped to 0..255 over its value range, as uint8."""
    parts = [_signature_part(arr, _signature_index(info.shape), lo, hi)
             for arr, info, (lo, hi) in zip(sample, infos, ranges)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _distance(signature: np.ndarray, reference: np.ndarray, scratch: np.ndarray) -> float:
    """Mean absolute difference of a uint8 signature and an int16 one, as a fraction of 0..255.

    ``scratch`` (int16, the signatures' size) takes the difference, so nothing is allocated:
    three ufunc passes over 3 KB instead of two casts, a subtraction, an abs and a mean.
    """
    np.subtract(signature, reference, out=scratch)
    np.abs(scratch, out=scratch)
    return int(np.add.reduce(scratch, dtype=np.int32)) / scratch.size / 255.0


def signature_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two signatures, as a fraction of the full range (0..1)."""
    return _distance(a, b.astype(np.int16), np.empty(a.size, np.int16))


def _value_range(arr: np.ndarray, info: TensorInfo) -> tuple[float, float]:
    """The range a signature is scaled over: the dtype's for integers, else the first sample's."""
    if arr.dtype.kind in "iu":
        limits = np.iinfo(arr.dtype)
        return float(limits.min), float(limits.max)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    if lo >= -1.0 and hi <= 1.0:
        return -1.0, 1.0
    if lo >= 0.0 and hi <= 255.0:
        return 0.0, 255.0
    return lo, hi if hi > lo else lo + 1.0
