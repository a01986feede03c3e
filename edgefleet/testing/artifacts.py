"""Build a real artifact directory (model.tflite + manifest.json [+ manifest.json.sig]) from any .tflite.

For tests of every part (OTA, service, fleet): the manifest's tensor specs are read from a real
interpreter, and the golden samples are computed by running the model on seeded random inputs,
so the artifact passes the agent's checks exactly like one made by ``edge-convert`` (outputs are
dequantized by :mod:`edgefleet.quant`, as the agent does).

    from edgefleet.testing.artifacts import build_artifact
    art = build_artifact(Path("clf_a.tflite"), tmp_path / "v1", version="1", key=private_key)
    art.dir, art.model_path, art.manifest, art.raw, art.signature, art.file_url, art.update_fields()

Models that cannot be allocated (unresolved custom op) get no golden samples; outputs that are
NaN/Inf cannot be written to JSON, so such samples keep their inputs and leave those outputs out
(the validator still runs the inputs and sees the NaN).
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.manifest import MANIFEST_NAME, MODEL_NAME, SIGNATURE_NAME, Manifest, parse_manifest
from edgefleet.quant import QuantParams, dequantize
from edgefleet.signing import sign_manifest

__all__ = ["Artifact", "build_artifact", "copy_artifact", "interpreter_for"]



def interpreter_for(model: bytes) -> Any:
    """A bare interpreter from whichever runtime is installed (not allocated yet)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # the tflite-runtime venv
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
    return Interpreter(model_content=model, num_threads=1)


@dataclass(frozen=True)
class Artifact:
    """A built artifact directory and what an update command needs to deliver it."""

    dir: Path
    manifest: Manifest
    raw: dict[str, Any]
    signature: str | None

    @property
    def model_path(self) -> Path:
        return self.dir / self.manifest.model.file

    @property
    def file_url(self) -> str:
        return self.model_path.resolve().as_uri()

    def update_fields(self, artifact_url: str | None = None, rollout_id: str = "r1") -> dict[str, Any]:
        """The body of an ``update`` command (without id/ts/ttl_s)."""
        return {"rollout_id": rollout_id, "manifest": self.raw, "signature": self.signature,
                "artifact_url": artifact_url or self.file_url}


def _named(interp: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Input/output details named like the agent's Engine names them (signature keys when there is one)."""
    try:
        sigs = interp._get_full_signature_list()
    except AttributeError:
        sigs = {}
    ins, outs = interp.get_input_details(), interp.get_output_details()
    if len(sigs) == 1:
        sig = next(iter(sigs.values()))
        by_in = {idx: key for key, idx in sig.get("inputs", {}).items()}
        by_out = {idx: key for key, idx in sig.get("outputs", {}).items()}
        ins = [{**d, "name": by_in.get(d["index"], d["name"])} for d in ins]
        outs = [{**d, "name": by_out.get(d["index"], d["name"])} for d in outs]
    return ins, outs


def _spec(detail: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": detail["name"], "shape": [int(d) for d in detail["shape"]],
                            "dtype": np.dtype(detail["dtype"]).name}
    q = detail.get("quantization_parameters") or {}
    scales = [float(s) for s in np.atleast_1d(q.get("scales", []))]
    if scales and spec["dtype"] in ("int8", "uint8", "int16"):
        spec["quantization"] = {"scale": scales,
                                "zero_point": [int(z) for z in np.atleast_1d(q.get("zero_points", []))],
                                "axis": int(q.get("quantized_dimension", 0))}
    return spec


def _random_input(detail: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    shape = tuple(int(d) for d in detail["shape"])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, size=shape).astype(dtype)
    return rng.uniform(-1.0, 1.0, size=shape).astype(dtype)


def build_artifact(model: Path | bytes, out_dir: Path, *, name: str = "clf", version: str = "1",
                   profile: str = "x86-dev", golden_samples: int = 4, atol: float = 0.05, seed: int = 0,
                   key: Any = None, new_contract: bool = False, probation: dict[str, Any] | None = None,
                   **extra: Any) -> Artifact:
    """Write ``out_dir/model.tflite`` + ``manifest.json`` (+ ``manifest.json.sig`` if ``key``).

    ``key`` is an Ed25519 private key (edgefleet.signing); ``extra`` adds or overrides manifest keys.
    """
    data = Path(model).read_bytes() if isinstance(model, (str, Path)) else bytes(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MODEL_NAME).write_bytes(data)
    interp = interpreter_for(data)
    inputs, outputs = _named(interp)
    try:
        interp.allocate_tensors()
        runnable = True
    except (RuntimeError, ValueError):
        runnable = False
    samples = []
    rng = np.random.default_rng(seed)
    for _ in range(golden_samples if runnable else 0):
        feed = {d["name"]: _random_input(d, rng) for d in inputs}
        for d in inputs:
            interp.set_tensor(d["index"], feed[d["name"]])
        interp.invoke()
        outs = {}
        for d in outputs:
            value = dequantize(interp.get_tensor(d["index"]), QuantParams.from_detail(d))
            if np.all(np.isfinite(value)):
                outs[d["name"]] = [float(v) for v in value.ravel()]
        samples.append({"inputs": {k: base64.b64encode(v.tobytes()).decode("ascii") for k, v in feed.items()},
                        "outputs": outs})
    raw: dict[str, Any] = {
        "schema_version": 1,
        "name": name,
        "version": version,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "converter_version": "tests",
        "profile": profile,
        "task": "classification",
        "model": {"file": MODEL_NAME, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)},
        "inputs": [_spec(d) for d in inputs],
        "outputs": [_spec(d) for d in outputs],
        "new_contract": new_contract,
    }
    if samples:
        raw["golden"] = {"atol": atol, "require_top1": True, "samples": samples}
    if probation:
        raw["probation"] = probation
    raw.update(extra)
    manifest = parse_manifest(raw)
    (out_dir / MANIFEST_NAME).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    signature = None
    sig_path = out_dir / SIGNATURE_NAME
    if key is not None:
        signature = sign_manifest(raw, key)
        sig_path.write_text(signature + "\n")
    elif sig_path.exists():
        sig_path.unlink()
    return Artifact(dir=out_dir, manifest=manifest, raw=raw, signature=signature)


def copy_artifact(art: Artifact, out_dir: Path) -> Artifact:
    """A copy of ``art`` in ``out_dir`` (to tamper with one file without touching the original)."""
    shutil.copytree(art.dir, out_dir, dirs_exist_ok=True)
    return Artifact(dir=Path(out_dir), manifest=art.manifest, raw=dict(art.raw), signature=art.signature)
