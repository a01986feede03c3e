"""The artifact manifest (``manifest.json``): what a model is, how to feed it, how to check it.

Written by the converter, signed by the publisher, verified by the agent before a single byte of
the model is used. Schema version 1 is the :class:`Manifest` model below, field by field (optional
``output_roles``: docs/cache.md, "Output roles"); update commands carry it as in ``docs/protocol.md``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from edgefleet.errors import ArtifactError
from edgefleet.ids import ID_RULE, is_plain_file_name, is_valid_id
from edgefleet.messages import parse_json
from edgefleet.profiles import format_validation_error

__all__ = [
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "MODEL_NAME",
    "SCHEMA_VERSION",
    "SIGNATURE_NAME",
    "Baseline",
    "Golden",
    "GoldenSample",
    "Manifest",
    "ManifestRef",
    "OutputRole",
    "Quantization",
    "TensorSpec",
    "check_model_bytes",
    "check_model_file",
    "load_manifest",
    "parse_manifest",
    "parse_version",
    "resolve_output_roles",
    "sha256_file",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.json.sig"
MODEL_NAME = "model.tflite"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

@dataclass(frozen=True)
class ManifestRef:
    """How a schema-2 update command names its manifest: where to fetch it and the exact bytes it
    must be, so the command stays small and the device checks what it fetched before parsing it."""

    url: str
    sha256: str
    size: int  # bytes, at most MAX_MANIFEST_BYTES

    @classmethod
    def of(cls, url: str, data: bytes) -> ManifestRef:
        """The reference to ``data`` served at ``url``."""
        return cls(url, hashlib.sha256(data).hexdigest(), len(data))


_VERSION = re.compile(r"^\d{1,6}(\.\d{1,6}){0,3}$")

DType = Literal["int8", "uint8", "int16", "int32", "int64", "float16", "float32", "bool"]


def parse_version(text: str) -> tuple[int, ...]:
    """``"1.10.2"`` -> ``(1, 10, 2)``, comparable; trailing zeros do not matter (1.0 == 1)."""
    if not isinstance(text, str) or not _VERSION.match(text):
        raise ArtifactError(f"version {text!r}: expected dotted numbers such as 3 or 1.4.2")
    parts = [int(p) for p in text.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_digest(where: str, expected: ModelFile, size: int, digest: str) -> None:
    if size != expected.size:
        raise ArtifactError(f"{where}: {size} bytes, manifest says {expected.size} (truncated or padded)")
    if digest != expected.sha256:
        raise ArtifactError(f"{where}: sha256 {digest[:12]}..., manifest says {expected.sha256[:12]}... "
                            "(corrupted or substituted)")


def check_model_file(path: Path, expected: ModelFile, where: str | None = None) -> None:
    """The one check that a model file on disk is the one its manifest describes (size, then sha256).

    ``where`` names the file in the message (default: its path; devices pass the manifest's
    file name so their own paths do not travel to the fleet).

    Raises:
        ArtifactError: the file is missing, or its size or sha256 differ from ``expected``.
    """
    try:
        size = path.stat().st_size
        digest = sha256_file(path) if size == expected.size else ""
    except OSError as exc:
        raise ArtifactError(f"{where or path}: cannot read the model file ({exc.strerror or exc})") from exc
    _check_digest(where or str(path), expected, size, digest)


def check_model_bytes(data: bytes, expected: ModelFile, where: str = "model") -> None:
    """:func:`check_model_file` for a model already in memory.

    Raises:
        ArtifactError: the size or sha256 of ``data`` differ from ``expected``.
    """
    _check_digest(where, expected, len(data), hashlib.sha256(data).hexdigest())


def _epoch(iso: str) -> float:
    """ISO 8601 (``2026-12-31T00:00:00Z``) -> epoch seconds; a time without a zone is UTC."""
    try:
        when = datetime.datetime.fromisoformat(iso)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"expected an ISO 8601 time such as 2026-12-31T00:00:00Z, got {iso!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Quantization(_Strict):
    scale: list[float] = Field(description="One scale per tensor, or per channel")
    zero_point: list[int] = Field(description="Zero points matching scale")
    axis: int = Field(default=0, description="Channel axis for per-channel parameters")


class TensorSpec(_Strict):
    name: str = Field(description="Tensor name as the interpreter reports it (signature key when present)")
    shape: list[int] = Field(description="Shape with batch 1")
    dtype: DType
    quantization: Quantization | None = Field(default=None, description="None for float tensors")


class ModelFile(_Strict):
    file: str = Field(default=MODEL_NAME, description="File name inside the artifact directory")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=1, description="Bytes")

    @field_validator("file")
    @classmethod
    def _no_escape(cls, value: str) -> str:
        if not is_plain_file_name(value):
            raise ValueError("expected a plain file name without directories")
        return value


class Source(_Strict):
    format: Literal["keras", "h5", "saved_model", "tflite"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Preprocessing(_Strict):
    input_range: tuple[float, float] | None = Field(default=None, description="Float value range the model expects")
    layout: Literal["NHWC", "NCHW", "NC", "other"] = "other"


class GoldenSample(_Strict):
    inputs: dict[str, str] = Field(description="Input name -> base64 of the raw tensor bytes in the model's dtype")
    outputs: dict[str, list[float]] = Field(description="Output name -> float model's output, flattened")


class Golden(_Strict):
    atol: float = Field(ge=0, description="Largest absolute difference allowed per dequantized output value")
    require_top1: bool = Field(default=True, description="The argmax must match the float model's")
    samples: list[GoldenSample] = Field(default_factory=list, max_length=64)


class Baseline(_Strict):
    class_histogram: list[float] | None = Field(default=None, description="Fraction of top-1 per class")
    mean_confidence: float | None = Field(default=None, description="Mean top-1 score")
    output_mean: list[float] | None = Field(default=None, description="Per-output mean of the first output")


OutputRoleName = Literal["logits", "scores", "boxes", "landmarks", "regression"]
_GEOMETRY = ("boxes", "landmarks")


class OutputRole(_Strict):
    """What one output means, so the input-locality cache judges a reused answer in its own terms.

    ``logits``: class scores, judged on their top-1. ``regression``: values judged within
    ``output_tolerance`` x their range (the default for an output with no role). ``scores``:
    per-anchor detection scores, judged after ``activation`` and only where some result detects
    (score >= ``threshold``), so background anchors that swing under noise do not count.
    ``boxes`` / ``landmarks``: per-anchor geometry (last axis: the values of one anchor), judged
    only at the anchors the ``scores`` output detects (docs/cache.md, "Output roles").
    """

    output: StrictStr | StrictInt = Field(description="The output: its name in `outputs`, or its 0-based index there")
    role: OutputRoleName = Field(description="What the output holds: logits, scores, boxes, landmarks or regression")
    activation: Literal["none", "sigmoid", "softmax"] | None = Field(
        default=None, description="scores only: applied before judging (raw logits need sigmoid); default none")
    threshold: float | None = Field(
        default=None, description="scores only: a detection is a score >= this after activation "
                                  "(default 0.5 for sigmoid/softmax; required for none)")
    scores: StrictStr | StrictInt | None = Field(
        default=None, description="boxes/landmarks only: the scores output whose detections say which anchors "
                                  "count (default: the one output with role scores)")

    @model_validator(mode="after")
    def _fields_fit_the_role(self) -> OutputRole:
        if self.role != "scores" and (self.activation is not None or self.threshold is not None):
            raise ValueError(f"role {self.role}: activation and threshold apply to role scores only")
        if self.role not in _GEOMETRY and self.scores is not None:
            raise ValueError(f"role {self.role}: scores applies to roles boxes and landmarks only")
        if self.role == "scores":
            if (self.activation or "none") == "none" and self.threshold is None:
                raise ValueError("role scores without an activation needs a threshold in the scores' own units")
            if self.activation in ("sigmoid", "softmax") and self.threshold is not None \
                    and not 0.0 < self.threshold < 1.0:
                raise ValueError(f"threshold {self.threshold}: expected 0 < threshold < 1 after {self.activation}")
            if self.threshold is not None and not math.isfinite(self.threshold):
                raise ValueError("threshold must be finite")
        return self

    @property
    def score_threshold(self) -> float:
        """The detection threshold in force (scores only)."""
        return self.threshold if self.threshold is not None else 0.5


def resolve_output_roles(roles: list[OutputRole], names: list[str]) -> dict[int, tuple[OutputRole, int]]:
    """Map declared roles onto output positions: index -> (role, index of its scores output or -1).

    ``names`` are the outputs in order. Shared by the manifest's own validation and the engine.

    Raises:
        ValueError: an output named or numbered that does not exist, an output declared twice,
            boxes/landmarks without exactly one scores output to follow, or one that is not scores.
    """
    def index(ref: str | int, what: str) -> int:
        if isinstance(ref, int):
            if not 0 <= ref < len(names):
                raise ValueError(f"{what} {ref}: expected an index 0..{len(names) - 1}")
            return ref
        if ref not in names:
            raise ValueError(f"{what} {ref!r}: expected one of the outputs {names}")
        return names.index(ref)

    placed: dict[int, OutputRole] = {}
    for role in roles:
        i = index(role.output, "output")
        if i in placed:
            raise ValueError(f"output {names[i]!r} has two roles; expected one")
        placed[i] = role
    scores = [i for i, r in placed.items() if r.role == "scores"]
    resolved: dict[int, tuple[OutputRole, int]] = {}
    for i, role in placed.items():
        link = -1
        if role.role in _GEOMETRY:
            if role.scores is not None:
                link = index(role.scores, "scores")
                if placed.get(link) is None or placed[link].role != "scores":
                    raise ValueError(f"output {names[i]!r}: its scores output {names[link]!r} has no role scores")
            elif len(scores) == 1:
                link = scores[0]
            else:
                raise ValueError(f"output {names[i]!r} ({role.role}): expected exactly one output with role "
                                 f"scores to follow, found {len(scores)}; name it with `scores`")
        resolved[i] = (role, link)
    return resolved


class ProbationOverrides(_Strict):
    inferences: int | None = Field(default=None, ge=1)
    seconds: float | None = Field(default=None, gt=0)
    min_agreement: float | None = Field(default=None, ge=0, le=1)


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(description=f"Artifact name: {ID_RULE}")
    version: str
    created: str = Field(description="ISO 8601 UTC")
    converter_version: str
    profile: str = Field(description="Profile name the model was built for")
    task: Literal["classification", "regression", "other"] = "classification"
    model: ModelFile
    source: Source | None = None
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    preprocessing: Preprocessing = Preprocessing()
    fidelity: dict[str, Any] = Field(default_factory=dict, description="Metrics from the fidelity search")
    golden: Golden | None = None
    baseline: Baseline | None = None
    deployable: bool = True
    cache_allowed: bool = Field(default=True, description="False when outputs must never be reused")
    new_contract: bool = Field(default=False, description="Inputs/outputs differ from the previous model on purpose")
    probation: ProbationOverrides | None = None
    expires: str | None = Field(default=None, description="ISO 8601 UTC; devices refuse the manifest after it "
                                                           "(a frozen mirror cannot serve it for ever)")
    fleet: str | None = Field(default=None, description="Fleet it is meant for; devices of another fleet refuse it")
    groups: list[str] | None = Field(default=None, description="Groups it is meant for (None: any group)")
    labels: list[Annotated[str, Field(max_length=256)]] | None = Field(
        default=None, max_length=100_000, description="Class names by output index (classifiers; edge-convert --labels)")
    output_roles: list[OutputRole] | None = Field(
        default=None, max_length=64, description="What each output means (logits, scores, boxes, landmarks, "
                                                  "regression), so a reused answer is judged in its own terms; "
                                                  "outputs left out are judged as regression")

    @model_validator(mode="after")
    def _roles_fit_the_outputs(self) -> Manifest:
        if not self.output_roles:
            return self
        resolved = resolve_output_roles(self.output_roles, [t.name for t in self.outputs])
        for i, (role, link) in resolved.items():
            if link < 0:
                continue
            shape, linked = self.outputs[i].shape, self.outputs[link].shape
            anchors = math.prod(shape[1:-1]) if len(shape) >= 3 else 0
            per_anchor, rest = divmod(math.prod(linked[1:]), anchors) if anchors else (0, 1)
            if rest or not per_anchor:
                raise ValueError(f"output {self.outputs[i].name!r} ({role.role}) has shape {shape}: expected "
                                 f"[1, anchors, values] with the anchors of its scores "
                                 f"{self.outputs[link].name!r} (shape {linked})")
        return self

    @field_validator("expires")
    @classmethod
    def _expires(cls, value: str | None) -> str | None:
        if value is not None:
            _epoch(value)
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not is_valid_id(value):
            raise ValueError(f"expected {ID_RULE}")
        return value

    @field_validator("fleet")
    @classmethod
    def _fleet(cls, value: str | None) -> str | None:
        if value is not None and not is_valid_id(value):
            raise ValueError(f"expected {ID_RULE}")
        return value

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: list[str] | None) -> list[str] | None:
        for group in value or ():
            if not is_valid_id(group):
                raise ValueError(f"group {group!r}: expected {ID_RULE}")
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not _VERSION.match(value):
            raise ValueError("expected dotted numbers such as 3 or 1.4.2")
        return value

    @property
    def version_key(self) -> tuple[int, ...]:
        return parse_version(self.version)

    def check_meant_for(self, fleet: str | None, group: str, now: float) -> None:
        """Refuse a manifest that has expired, or that names another fleet or other groups.

        ``now`` is epoch seconds, read once by the caller.

        Raises:
            ArtifactError: expired (a freeze attack replays an old signed manifest) or meant for
                someone else (a mix-and-match attack sends one fleet's model to another).
        """
        if self.expires is not None and _epoch(self.expires) < now:
            raise ArtifactError(f"manifest {self.name} v{self.version} expired at {self.expires}")
        if self.fleet is not None and self.fleet != fleet:
            raise ArtifactError(f"manifest {self.name} v{self.version} is meant for fleet {self.fleet!r}, "
                                f"this device is in {fleet!r}")
        if self.groups is not None and group not in self.groups:
            raise ArtifactError(f"manifest {self.name} v{self.version} is meant for groups "
                                f"{', '.join(self.groups)}, not {group!r}")

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def golden_arrays(self) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """Decode golden samples into (inputs, expected float outputs) with the manifest's shapes."""
        if not self.golden:
            return []
        specs = {t.name: t for t in self.inputs}
        out: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
        for sample in self.golden.samples:
            inputs = {}
            for name, b64 in sample.inputs.items():
                if name not in specs:
                    raise ArtifactError(f"golden sample names input {name!r}, which the manifest does not declare")
                spec = specs[name]
                raw = np.frombuffer(base64.b64decode(b64), dtype=spec.dtype)
                if raw.size != int(np.prod(spec.shape)):
                    raise ArtifactError(f"golden input {name!r}: expected {int(np.prod(spec.shape))} values, got {raw.size}")
                inputs[name] = raw.reshape(spec.shape)
            outputs = {k: np.asarray(v, dtype=np.float32) for k, v in sample.outputs.items()}
            out.append((inputs, outputs))
        return out


def parse_manifest(data: dict[str, Any] | bytes | str, source: str = "manifest") -> Manifest:
    """Validate a manifest given as a dict or JSON text.

    Raises:
        ArtifactError: not JSON, too large, or not schema version 1.
    """
    if isinstance(data, (bytes, str)):
        if len(data) > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{source}: {len(data)} bytes, expected at most {MAX_MANIFEST_BYTES}")
        try:
            data = parse_json(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ArtifactError(f"{source}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("schema_version") not in (None, SCHEMA_VERSION):
        raise ArtifactError(f"{source}: schema_version {data.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ArtifactError(format_validation_error(source, exc)) from exc


def load_manifest(artifact_dir: Path) -> tuple[Manifest, dict[str, Any], str | None]:
    """Read ``manifest.json`` (and its signature if present) from an artifact directory.

    Returns the parsed manifest, the raw dict (what the signature covers) and the signature.
    """
    path = Path(artifact_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{artifact_dir}: no {MANIFEST_NAME} (expected an artifact directory from edge-convert)")
    raw_bytes = path.read_bytes()
    manifest = parse_manifest(raw_bytes, str(path))
    raw = json.loads(raw_bytes)  # parse_manifest above refused anything that is not plain JSON
    sig_path = path.with_name(SIGNATURE_NAME)
    signature = sig_path.read_text().strip() if sig_path.is_file() else None
    return manifest, raw, signature
