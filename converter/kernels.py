"""Which kernels a candidate gets on the device, read from the ops and tensor types in its flatbuffer.

The host latency says how fast a candidate is here; the kernel class says why, and whether that
carries over to the device: XNNPACK has int8 kernels for the common ops on every ARM core, 16x8
models (int16 activations) run TFLite's reference kernels (XNNPACK and the Edge TPU have none for
them, 10-100x slower than int8), a float op splits the graph and pays for a dequantize/quantize
pair, and on an Edge TPU profile anything the TPU cannot run falls back to the CPU.
"""

from __future__ import annotations

from typing import Literal

from converter.tflite_inspect import Inspection

__all__ = ["FAST_CLASSES", "XNNPACK_INT8_OPS", "KernelClass", "kernel_class"]

KernelClass = Literal["edgetpu", "xnnpack-int8", "cpu-int8", "reference-int16", "float-fallback"]
FAST_CLASSES: frozenset[str] = frozenset({"edgetpu", "xnnpack-int8", "cpu-int8"})  # the "full-int8" speed reference

# int8/uint8 ops the XNNPACK delegate takes (tensorflow/lite/delegates/xnnpack, QS8/QU8 paths)
XNNPACK_INT8_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTH_TO_SPACE", "DEPTHWISE_CONV_2D", "DEQUANTIZE",
    "ELU", "FULLY_CONNECTED", "HARD_SWISH", "LEAKY_RELU", "LOGISTIC", "MAX_POOL_2D", "MEAN", "MUL", "PAD",
    "PRELU", "QUANTIZE", "RESHAPE", "RESIZE_BILINEAR", "SLICE", "SPACE_TO_DEPTH", "SPLIT", "SQUARED_DIFFERENCE",
    "STRIDED_SLICE", "SUB", "TANH", "TRANSPOSE", "TRANSPOSE_CONV", "RELU", "RELU6", "RELU_N1_TO_1",
})
_CHEAP_OPS = frozenset({"SOFTMAX", "ARG_MAX", "SQUEEZE", "EXPAND_DIMS", "SHAPE", "PACK", "UNPACK", "GATHER"})


def kernel_class(inspection: Inspection, accelerator: str = "none", edgetpu_ok: bool = False) -> KernelClass:
    """The kernel class of a model: the slowest kind of kernel any of its ops will run on.

    ``edgetpu_ok`` is the static Edge TPU check's verdict; on an Edge TPU profile a model that fails
    it runs partly on the CPU and is classed by its CPU kernels.
    """
    if any(not op.integer for op in inspection.ops) or inspection.float_tensors:
        return "float-fallback"
    if any("int16" in op.input_types + op.output_types for op in inspection.ops):
        return "reference-int16"
    if accelerator == "edgetpu" and edgetpu_ok:
        return "edgetpu"
    heavy = {op.name for op in inspection.ops} - _CHEAP_OPS
    return "xnnpack-int8" if heavy <= XNNPACK_INT8_OPS else "cpu-int8"
