"""Package a converted model: manifest (golden samples, baseline), signature, atomic directory swap.

The artifact directory is assembled in a temporary directory next to ``--out`` and renamed into
place, so a failed or interrupted conversion never leaves a half-written artifact behind.
"""

from __future__ import annotations

import base64
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import edgefleet
from converter.data import SampleSet
from converter.fidelity import SIGNATURE, classification_output
from converter.tflite_inspect import make_interpreter
from edgefleet.atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from edgefleet.errors import ConfigError
from edgefleet.manifest import (
    MANIFEST_NAME,
    MODEL_NAME,
    SIGNATURE_NAME,
    Baseline,
    Golden,
    GoldenSample,
    Manifest,
    Quantization,
    TensorSpec,
    check_model_bytes,
    parse_manifest,
)
from edgefleet.quant import QuantParams, quantize, top1
from edgefleet.signing import load_private_key, sign_manifest

__all__ = [
    "GoldenChoice",
    "baseline_stats",
    "check_out_dir",
    "choose_golden",
    "converter_version",
    "tensor_specs",
    "utc_now",
    "write_artifact",
]


def converter_version() -> str:
    return f"edgefleet-{edgefleet.__version__}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _spec(name: str, detail: dict[str, Any]) -> TensorSpec:
    dtype = np.dtype(detail["dtype"]).name
    qp = detail.get("quantization_parameters") or {}
    scales = [float(s) for s in np.atleast_1d(qp.get("scales", []))]
    quant = None
    if dtype not in ("float32", "float16") and scales:
        quant = Quantization(scale=scales, zero_point=[int(z) for z in np.atleast_1d(qp["zero_points"])],
                             axis=int(qp.get("quantized_dimension", 0)))
    return TensorSpec(name=name, shape=[int(d) for d in detail["shape"]], dtype=dtype, quantization=quant)


def tensor_specs(model: bytes) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs exactly as the interpreter reports them, keyed by signature name."""
    runner = make_interpreter(model).get_signature_runner(SIGNATURE)
    ins = runner.get_input_details()
    outs = runner.get_output_details()
    return ([_spec(k, ins[k]) for k in sorted(ins)], [_spec(k, outs[k]) for k in sorted(outs)])


@dataclass(frozen=True)
class GoldenChoice:
    golden: Golden
    indices: tuple[int, ...]
    measured_error: float


def choose_golden(model: bytes, samples: SampleSet, reference: dict[str, np.ndarray],
                  candidate: dict[str, np.ndarray], count: int = 5) -> GoldenChoice:
    """Pick confident samples the candidate gets right (top-1 as float), one per class first.

    Inputs are the quantized tensor bytes; outputs are the candidate's own (``candidate``, from
    :func:`converter.fidelity.run_model`, dequantized by :mod:`edgefleet.quant`), so a device with the
    same runtime reproduces them bit for bit. ``atol`` is twice the worst int8-vs-float error seen
    on them plus three output quantization steps: a device runtime may round differently by a step
    or two, a broken model is far outside.
    """
    cls = classification_output(reference)
    n = len(samples)
    if cls is not None:
        ref = reference[cls]
        top2 = np.sort(ref, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        ref_top = top1(ref)
        agree = ref_top == top1(candidate[cls])
        order = [int(i) for i in np.argsort(-margin) if agree[i]]
        picked: list[int] = []
        seen: set[int] = set()
        for i in order:
            if int(ref_top[i]) not in seen:
                picked.append(i)
                seen.add(int(ref_top[i]))
            if len(picked) == count:
                break
        for i in order:
            if len(picked) == count:
                break
            if i not in picked:
                picked.append(i)
    else:
        picked = list(range(min(count, n)))
    runner = make_interpreter(model).get_signature_runner(SIGNATURE)
    in_params = {k: QuantParams.from_detail(d) for k, d in runner.get_input_details().items()}
    step = max((QuantParams.from_detail(d).scale for d in runner.get_output_details().values()), default=0.0)
    error = max((float(np.max(np.abs(reference[k][picked] - candidate[k][picked]))) for k in reference),
                default=0.0) if picked else 0.0
    atol = float(f"{2 * error + 3 * step + 1e-6:.6g}")
    golden_samples = []
    for i in picked:
        raw = {k: base64.b64encode(quantize(v, in_params[k]).tobytes()).decode("ascii")
               for k, v in samples.sample(i).items()}
        outs = {k: [float(x) for x in candidate[k][i].ravel()] for k in candidate}
        golden_samples.append(GoldenSample(inputs=raw, outputs=outs))
    return GoldenChoice(Golden(atol=atol, require_top1=cls is not None, samples=golden_samples),
                        tuple(picked), error)


def baseline_stats(candidate: dict[str, np.ndarray]) -> Baseline:
    """Output statistics of the shipped model on held-out data, for drift monitoring on the device."""
    cls = classification_output(candidate)
    first = candidate[min(candidate)] if cls is None else candidate[cls]
    hist = conf = None
    if cls is not None:
        scores = candidate[cls]
        counts = np.bincount(top1(scores), minlength=scores.shape[1])
        hist = [float(c) for c in counts / counts.sum()]
        if float(scores.min()) >= -1e-3 and np.allclose(scores.sum(1), 1, atol=0.05):
            conf = float(scores.max(1).mean())
    mean = first.reshape(len(first), -1).mean(axis=0)
    return Baseline(class_histogram=hist, mean_confidence=conf, output_mean=[float(v) for v in mean[:1000]])


def check_out_dir(out: Path) -> None:
    """Refuse to replace anything but a previous artifact (a directory with a manifest).

    Raises:
        ConfigError: ``out`` is a file, or a directory that is not empty and not an artifact.
    """
    if not out.exists():
        if not out.parent.is_dir():
            raise ConfigError(f"--out {out}: parent directory {out.parent} does not exist")
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ConfigError(f"--out {out}: exists and is not a previous artifact (no {MANIFEST_NAME}); "
                          "refusing to replace it")


def write_artifact(stage: Path, out: Path, model: bytes, manifest: Manifest, report_json: dict[str, Any],
                   report_md: str, sign_key: Path | None) -> str | None:
    """Write everything into ``stage`` then swap it into ``out``; return the signature if signed.

    Raises:
        ConfigError: the signing key cannot be read.
        ArtifactError: the manifest does not validate against the schema, or its size or sha256 do not
            match ``model`` (a converter bug).
    """
    key = load_private_key(sign_key) if sign_key else None
    raw = manifest.to_json_dict()
    parse_manifest(raw, "generated manifest")  # what the agent will run, validated the same way
    check_model_bytes(model, manifest.model, "generated model")  # the agent's own size + sha256 check
    stage.mkdir(parents=True)
    atomic_write_bytes(stage / MODEL_NAME, model)
    atomic_write_json(stage / MANIFEST_NAME, raw)
    signature = None
    if key is not None:
        signature = sign_manifest(raw, key)
        atomic_write_bytes(stage / SIGNATURE_NAME, (signature + "\n").encode("ascii"))
    atomic_write_json(stage / "report.json", report_json)
    atomic_write_bytes(stage / "report.md", report_md.encode("utf-8"))
    old = stage.parent / "previous"
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    fsync_dir(out.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return signature
