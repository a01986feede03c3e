"""The one quantize / dequantize / top-1, so golden outputs are computed the way devices compute them.

Written out where it happens (pycoral habit)::

    q = clip(rint(x / scale) + zero_point, dtype.min, dtype.max)
    x = (q - zero_point) * scale

Both run in float32, which is exact for the 8- and 16-bit integers TFLite uses (|q| < 2**24), so
the converter's golden samples, the artifact builder and the agent all get bit-identical floats.
A tensor with ``scale == 0`` (or a float dtype) is not quantized and passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["QuantParams", "Quantized", "dequantize", "first_output", "quantize", "top1"]


class Quantized(Protocol):
    """Anything that carries a tensor's quantization (the agent's ``TensorInfo`` does)."""

    @property
    def scale(self) -> float: ...
    @property
    def zero_point(self) -> int: ...
    @property
    def dtype(self) -> np.dtype: ...


@dataclass(frozen=True)
class QuantParams:
    """A tensor's dtype and per-tensor quantization, as an interpreter reports them."""

    dtype: np.dtype
    scale: float = 0.0
    zero_point: int = 0

    @classmethod
    def from_detail(cls, detail: Mapping[str, Any]) -> QuantParams:
        """From an interpreter's input/output detail (``quantization`` or ``quantization_parameters``).

        Per-channel parameters on an input or output are not something TFLite produces; only the
        first scale is read.
        """
        dtype = np.dtype(detail["dtype"])
        if "quantization" in detail:
            scale, zero = detail["quantization"]
        else:
            q = detail.get("quantization_parameters") or {}
            scales = np.atleast_1d(q.get("scales", []))
            zeros = np.atleast_1d(q.get("zero_points", [0]))
            scale, zero = (float(scales[0]), int(zeros[0]) if zeros.size else 0) if scales.size else (0.0, 0)
        return cls(dtype=dtype, scale=float(scale), zero_point=int(zero))


def _is_quantized(p: Quantized) -> bool:
    return p.scale != 0.0 and np.dtype(p.dtype).kind in "iu"


def quantize(x: np.ndarray, p: Quantized, out: np.ndarray | None = None) -> np.ndarray:
    """Float values -> the tensor's dtype, rounding to nearest and clipping to its range.

    A tensor that is not quantized gets a plain cast to its dtype.
    """
    dtype = np.dtype(p.dtype)
    if not _is_quantized(p):
        if out is None:
            return np.asarray(x).astype(dtype)
        np.copyto(out, x, casting="unsafe")
        return out
    limits = np.iinfo(dtype)
    q = np.rint(np.asarray(x, dtype=np.float32) / np.float32(p.scale))
    q += np.float32(p.zero_point)
    np.clip(q, limits.min, limits.max, out=q)
    if out is None:
        return q.astype(dtype)
    np.copyto(out, q, casting="unsafe")
    return out


def dequantize(q: np.ndarray, p: Quantized) -> np.ndarray:
    """The tensor's values as float32 (a copy)."""
    x = np.asarray(q).astype(np.float32)
    if _is_quantized(p):
        x -= np.float32(p.zero_point)
        x *= np.float32(p.scale)
    return x


def first_output(outputs: Any) -> np.ndarray:
    """The first output of a result that is either one array or a dict of them (sorted by name)."""
    if isinstance(outputs, Mapping):
        return np.asarray(next(iter(outputs.values())))
    return np.asarray(outputs)


def top1(scores: Any) -> np.ndarray:
    """Index of the largest score along the last axis (ties go to the lowest index)."""
    return np.argmax(np.asarray(scores), axis=-1)
