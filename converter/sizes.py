"""Where the bytes of a ``.tflite`` go: weights, biases, quantization parameters, graph.

Size targets ("int8 <= 0.28x float", "sparse gzip <= 0.6x") depend on more than the weights:
per-channel quantization stores a float32 scale and an int64 zero point (the schema's type) for
every output channel, and the graph (ops, tensor shapes and names) does not shrink at all. This
breakdown makes the report say which part a target is really about.
"""

from __future__ import annotations

import gzip
from typing import Any

import numpy as np

__all__ = ["size_breakdown"]

_INT8, _INT32, _FLOAT32 = 9, 2, 0  # tflite.TensorType values


def size_breakdown(model: bytes) -> dict[str, Any]:
    """Bytes of a ``.tflite`` by kind, raw and gzip-compressed (level 9).

    Keys: ``weights`` (every constant tensor that is not int32: the int8 weights, or in a float
    model the float weights and biases), ``bias`` (int32 constants: quantized biases), ``quant_scales`` (4 bytes per scale), ``quant_zero_points`` (8 bytes per zero
    point), ``graph`` (everything else: ops, shapes, names, flatbuffer tables), ``total``,
    ``per_channel_axes`` (number of per-channel scales), and ``gzip_*`` for weights, quantization
    parameters and the whole file.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    fb = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    seen: set[int] = set()
    out = {"weights": 0, "bias": 0, "quant_scales": 0, "quant_zero_points": 0, "per_channel_axes": 0}
    weights, quant = bytearray(), bytearray()
    for subgraph in fb.subgraphs:
        for tensor in subgraph.tensors:
            q = tensor.quantization
            if q is not None and q.scale is not None:
                scales = np.asarray(q.scale, np.float32)
                zeros = np.asarray(q.zeroPoint if q.zeroPoint is not None else [], np.int64)
                out["quant_scales"] += scales.nbytes
                out["quant_zero_points"] += zeros.nbytes
                out["per_channel_axes"] += len(scales) if len(scales) > 1 else 0
                quant += scales.tobytes() + zeros.tobytes()
            data = fb.buffers[tensor.buffer].data
            if data is None or tensor.buffer in seen:
                continue
            seen.add(tensor.buffer)
            if tensor.type == _INT32:
                out["bias"] += len(data)
            else:
                out["weights"] += len(data)
                weights += bytes(data)
    out["total"] = len(model)
    out["graph"] = len(model) - out["weights"] - out["bias"] - out["quant_scales"] - out["quant_zero_points"]
    out["gzip_total"] = len(gzip.compress(model, 9))
    out["gzip_weights"] = len(gzip.compress(bytes(weights), 9))
    out["gzip_quant"] = len(gzip.compress(bytes(quant), 9))
    return out
