"""Pure helpers over a TFLite interpreter: tensor descriptions and input checks.

Float arrays are quantized with the model's own parameters (:mod:`edgefleet.quant`); arrays
already in the model's integer dtype pass through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.errors import InputError
from edgefleet.quant import quantize

__all__ = [
    "TensorInfo",
    "describe_tensors",
    "split_batch",
    "to_model_dtype",
]


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output as the engine uses it.

    ``name`` is the signature key when the model has a signature (``image``), else the tensor
    name. ``scale == 0`` means the tensor is not quantized.
    """

    name: str
    index: int
    shape: tuple[int, ...]
    dtype: np.dtype
    scale: float
    zero_point: int

    @property
    def quantized(self) -> bool:
        return self.scale != 0.0 and self.dtype.kind in "iu"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype.name}
        if self.quantized:
            spec["quantization"] = {"scale": [self.scale], "zero_point": [self.zero_point]}
        return spec


def _signature_names(interpreter: Any) -> tuple[dict[int, str], dict[int, str]]:
    try:
        signatures = interpreter._get_full_signature_list()
    except AttributeError:
        return {}, {}
    if len(signatures) != 1:
        return {}, {}
    sig = next(iter(signatures.values()))
    return ({idx: key for key, idx in sig.get("inputs", {}).items()},
            {idx: key for key, idx in sig.get("outputs", {}).items()})


def _info(detail: dict[str, Any], names: dict[int, str]) -> TensorInfo:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return TensorInfo(
        name=names.get(detail["index"], detail["name"]),
        index=int(detail["index"]),
        shape=tuple(int(d) for d in detail["shape"]),
        dtype=np.dtype(detail["dtype"]),
        scale=float(scale),
        zero_point=int(zero_point),
    )


def describe_tensors(interpreter: Any) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """Inputs and outputs of an allocated interpreter, sorted by name (stable across runtimes)."""
    in_names, out_names = _signature_names(interpreter)
    inputs = tuple(sorted((_info(d, in_names) for d in interpreter.get_input_details()), key=lambda t: t.name))
    outputs = tuple(sorted((_info(d, out_names) for d in interpreter.get_output_details()), key=lambda t: t.name))
    return inputs, outputs


def to_model_dtype(x: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Convert one input to the model's dtype: quantize floats, pass matching dtypes through.

    Raises:
        InputError: an integer array of another dtype, or a non-numeric array.
    """
    if x.dtype == info.dtype:
        return x
    if x.dtype.kind == "f":
        if info.quantized:
            return quantize(x, info)
        return x.astype(info.dtype)
    if x.dtype.kind in "iub" and info.dtype.kind == "f":
        return x.astype(info.dtype)
    raise InputError(f"input {info.name!r}: expected dtype {info.dtype.name} or a float array, got {x.dtype.name}")


def split_batch(x: np.ndarray, info: TensorInfo) -> int:
    """How many samples ``x`` holds for a model input of ``info.shape`` (batch 1 assumed).

    Accepts the exact shape, the shape without the batch axis, or ``(N, *shape[1:])``.

    Raises:
        InputError: the shape fits none of these.
    """
    model = info.shape
    if x.shape == model:
        return 1
    if len(model) >= 1 and x.shape == model[1:]:
        return 0  # one sample without its batch axis
    if len(model) >= 1 and x.ndim == len(model) and x.shape[1:] == model[1:] and x.shape[0] >= 1:
        return int(x.shape[0])
    raise InputError(f"input {info.name!r}: expected shape {list(model)} "
                     f"(or a batch [N, {', '.join(map(str, model[1:]))}]), got {list(x.shape)}")
