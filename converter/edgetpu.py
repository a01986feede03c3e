"""Edge TPU readiness: supported ops, integer types and static shapes, and ``edgetpu_compiler`` when present.

The compiler only runs on x86-64 Linux and is usually not installed where models are trained, so
the check is done in two layers: a static check here that predicts which ops would fall back to
the CPU (the Edge TPU runs the graph up to the first unsupported op; everything after it runs on
the CPU), and the real compiler's op mapping when it is on ``PATH``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.tflite_inspect import Inspection

__all__ = ["SUPPORTED_OPS", "EdgeTpuCheck", "check_edgetpu", "run_compiler"]

# https://coral.ai/docs/edgetpu/models-intro/#supported-operations (compiler 16)
SUPPORTED_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "DEQUANTIZE",
    "EXPAND_DIMS", "FULLY_CONNECTED", "GATHER", "HARD_SWISH", "L2_NORMALIZATION", "LOGISTIC", "LSTM",
    "MAX_POOL_2D", "MAXIMUM", "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE",
    "REDUCE_MAX", "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUARED_DIFFERENCE",
    "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM", "TANH", "TRANSPOSE", "TRANSPOSE_CONV", "UNPACK",
})


@dataclass(frozen=True)
class EdgeTpuCheck:
    """Which ops would stay on the CPU, and what the real compiler said (if it ran)."""

    static_ok: bool
    cpu_ops: tuple[str, ...]
    problems: tuple[str, ...]
    compiler: str | None          # compiler version line, None when not installed
    compiler_mapping: dict[str, Any] | None
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {"static_ok": self.static_ok, "cpu_ops": list(self.cpu_ops), "problems": list(self.problems),
                "compiler": self.compiler, "compiler_mapping": self.compiler_mapping, "note": self.note}


def check_edgetpu(inspection: Inspection, model: bytes | None = None) -> EdgeTpuCheck:
    """Predict the Edge TPU mapping of a model and run ``edgetpu_compiler`` when available."""
    problems = []
    first_bad = None
    for op in inspection.ops:
        reason = None
        if op.name not in SUPPORTED_OPS:
            reason = f"{op.name}#{op.index}: not supported by the Edge TPU"
        elif not op.integer:
            reason = f"{op.name}#{op.index}: float operands"
        if reason:
            problems.append(reason)
            if first_bad is None:
                first_bad = op.index
    if inspection.dynamic_tensors:
        problems.append(f"dynamic shapes: {', '.join(inspection.dynamic_tensors[:5])}")
    cpu_ops = tuple(f"{op.name}#{op.index}" for op in inspection.ops
                    if first_bad is not None and op.index >= first_bad)
    compiler = shutil.which("edgetpu_compiler")
    mapping, version = (run_compiler(model, compiler) if (compiler and model is not None) else (None, None))
    if compiler:
        note = "edgetpu_compiler ran; see compiler_mapping"
    else:
        note = ("edgetpu_compiler is not on PATH, so only the static check above ran; run "
                "`edgetpu_compiler model.tflite` on an x86-64 Linux host that has it before deploying to a Coral")
    return EdgeTpuCheck(static_ok=not problems, cpu_ops=cpu_ops, problems=tuple(problems),
                        compiler=version, compiler_mapping=mapping, note=note)


_ROW = re.compile(r"^\s*([A-Z0-9_]+)\s+(\d+)\s+(.*\S)\s*$")


def run_compiler(model: bytes, compiler: str, timeout_s: float = 300) -> tuple[dict[str, Any] | None, str | None]:
    """Run ``edgetpu_compiler -s`` and parse its op table into {op: {count, status}}."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "model.tflite"
        src.write_bytes(model)
        try:
            proc = subprocess.run([compiler, "-s", "-o", tmp, str(src)], capture_output=True, text=True,
                                  timeout=timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {"error": str(exc)}, None
        text = proc.stdout + proc.stderr
        version = next((line.strip() for line in text.splitlines() if "version" in line.lower()), None)
        ops: dict[str, Any] = {}
        for line in text.splitlines():
            match = _ROW.match(line)
            if match:
                ops.setdefault(match.group(1), []).append({"count": int(match.group(2)), "status": match.group(3)})
        return {"returncode": proc.returncode, "ops": ops}, version
