"""Drop the debug names of intermediate tensors from a ``.tflite``: fewer bytes over the air.

TFLiteConverter names every tensor after the TensorFlow ops fused into it
(``model/block_3_expand_BN/FusedBatchNormV3;model/block_3_expand/Conv2D;...``). Nothing at run
time reads those names: the signature maps inputs and outputs by tensor index. On MobileNetV2
0.35 they are 31 KB, 7 % of a per-tensor int8 model. TensorFlow's own ``strip_strings`` tool drops
them too, but also the signature, which the agent relies on; this keeps it.

Kept: the names of the graph's inputs and outputs, and, in a quantized model, of every float
tensor, so reports and errors about float fallback still name the layer.
"""

from __future__ import annotations

__all__ = ["strip_tensor_names"]

_FLOAT_TYPES = {0, 1, 11}  # tflite TensorType FLOAT32, FLOAT16, FLOAT64
_QUANTIZED_TYPES = {2, 3, 7, 9}  # INT32, UINT8, INT16, INT8


def strip_tensor_names(model: bytes) -> bytes:
    """``model`` with intermediate tensor names removed (see the module docstring for what stays)."""
    from tensorflow.lite.tools import flatbuffer_utils

    fb = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    quantized = any(t.type in _QUANTIZED_TYPES and t.quantization is not None and t.quantization.scale is not None
                    for sg in fb.subgraphs for t in sg.tensors)
    for subgraph in fb.subgraphs:
        keep = set(subgraph.inputs if subgraph.inputs is not None else []) | set(
            subgraph.outputs if subgraph.outputs is not None else [])
        for index, tensor in enumerate(subgraph.tensors):
            if index in keep or (quantized and tensor.type in _FLOAT_TYPES):
                continue
            tensor.name = None
    return bytes(flatbuffer_utils.convert_object_to_bytearray(fb))
