"""Look inside a produced ``.tflite``: which ops and tensors are not integer, which shapes are dynamic.

The converter's own flags are not trusted: the flatbuffer is read back through the interpreter so
a float op can never ship silently on a profile that requires full integer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.errors import ConversionError

__all__ = ["Inspection", "OpInfo", "inspect_tflite", "make_interpreter"]

_FLOAT = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64)}


def make_interpreter(model: bytes, threads: int = 1, delegates: bool = True) -> Any:
    """A host interpreter (ai-edge-litert, else tf.lite) for ``model``.

    ``delegates=False`` keeps XNNPACK out, so the op list is the model's own, not the delegate's.

    Raises:
        ConversionError: the bytes are not a model the runtime accepts.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:  # pragma: no cover - the converter extra normally has it through TF
        from converter._tf import tf
        Interpreter, OpResolverType = tf.lite.Interpreter, tf.lite.experimental.OpResolverType
    resolver = OpResolverType.AUTO if delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        interp = Interpreter(model_content=model, num_threads=threads, experimental_op_resolver_type=resolver)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ConversionError(f"the produced model does not load in the interpreter: {exc}") from exc
    return interp


@dataclass(frozen=True)
class OpInfo:
    index: int
    name: str
    input_types: tuple[str, ...]
    output_types: tuple[str, ...]

    @property
    def integer(self) -> bool:
        return not any(t in ("float32", "float16", "float64") for t in self.input_types + self.output_types)


@dataclass(frozen=True)
class Inspection:
    """What the flatbuffer really contains."""

    ops: tuple[OpInfo, ...]
    float_tensors: tuple[str, ...]
    dynamic_tensors: tuple[str, ...]

    @property
    def non_integer_ops(self) -> tuple[str, ...]:
        return tuple(f"{op.name}#{op.index}" for op in self.ops if not op.integer)

    @property
    def full_integer(self) -> bool:
        return not self.non_integer_ops and not self.float_tensors

    def op_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(op.name for op in self.ops).items()))


def _type_name(t: Any) -> str:
    try:
        return np.dtype(t).name
    except TypeError:
        return str(t)


def inspect_tflite(model: bytes) -> Inspection:
    """List every op with its operand types, every float activation tensor and every dynamic shape.

    Float *constant* tensors that no op reads as float are not listed; only what runs matters.
    """
    interp = make_interpreter(model, delegates=False)
    ops = tuple(
        OpInfo(int(d["index"]), str(d["op_name"]),
               tuple(_type_name(t) for t in d.get("operand_types", ())),
               tuple(_type_name(t) for t in d.get("result_types", ())))
        for d in interp._get_ops_details())
    produced = {int(o) for d in interp._get_ops_details() for o in d["outputs"]}
    floats, dynamic = [], []
    for t in interp.get_tensor_details():
        if np.dtype(t["dtype"]) in _FLOAT and t["index"] in produced:
            floats.append(t["name"])
        if any(int(d) < 0 for d in t.get("shape_signature", t["shape"])):
            dynamic.append(t["name"])
    return Inspection(ops=ops, float_tensors=tuple(floats), dynamic_tensors=tuple(dynamic))
