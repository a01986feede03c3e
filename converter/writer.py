"""From a finished conversion to the artifact on disk: manifest, ``report.json``, ``report.md``.

:class:`Conversion` is everything the pipeline measured and decided; this module only turns it
into the two documents (the manifest through the pydantic model, the report as a plain dict for
JSON) and hands them to :func:`converter.artifact.write_artifact` for the atomic swap.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converter import artifact
from converter.fidelity import classification_output
from converter.report import render_markdown
from converter.sizes import size_breakdown
from edgefleet.errors import ConfigError
from edgefleet.manifest import Manifest, ModelFile, Preprocessing, Source

if TYPE_CHECKING:
    import numpy as np

    from converter.edgetpu import EdgeTpuCheck
    from converter.equalize import EqualizeSummary
    from converter.loading import LoadedModel
    from converter.options import ConvertOptions
    from converter.pruning import PruneSummary
    from converter.search import SearchResult
    from converter.stats import Interval
    from converter.tflite_inspect import Inspection
    from edgefleet.profiles import Profile

__all__ = ["Conversion", "build_manifest", "build_report", "write"]

_LATENCY_NOTE = ("host figures on this machine (ai-edge-litert, XNNPACK on, {threads} interpreter thread(s): the "
                 "profile's, at most this host's cores), not device figures; the ratios and kernel classes carry over")


@dataclass(frozen=True)
class Conversion:
    """What one conversion measured and decided; the manifest and the report are written from it."""

    out: Path
    name: str
    options: ConvertOptions
    profile: Profile
    loaded: LoadedModel
    search: SearchResult
    inspection: Inspection  # of the chosen model
    reference: dict[str, np.ndarray]  # float model outputs on the evaluation samples
    eval_source: str
    calibration_samples: int
    float_model: bytes
    float_latency_ms: float  # host, search.threads threads, median of options.latency_runs, interleaved
    chosen_latency_ms: float  # likewise
    preprocessing_range: tuple[float, float] | None
    reasons: tuple[str, ...]  # why it is not deployable; empty when it is
    edgetpu: EdgeTpuCheck | None
    pruning: PruneSummary | None
    equalization: EqualizeSummary | None
    golden: artifact.GoldenChoice
    robustness: dict[str, Interval]  # chosen vs float agreement on perturbed held-out inputs, by perturbation
    fitting: dict[str, Any] | None = None  # what learned rounding / distillation did (search.Sources.fitting)

    @property
    def deployable(self) -> bool:
        return not self.reasons


def _layout(shape: list[int]) -> str:
    return {4: "NHWC", 2: "NC"}.get(len(shape), "other")


def _fidelity_block(c: Conversion) -> dict[str, Any]:
    """The manifest's fidelity block: the chosen model's figures with their intervals, its speed, and
    why it may not ship."""
    chosen = c.search.chosen
    assert chosen.metrics is not None
    return {**chosen.metrics.to_dict(), "recipe": chosen.recipe.name, "target": c.profile.fidelity.model_dump(),
            "misses": list(c.reasons), "non_integer_ops": list(c.inspection.non_integer_ops),
            "recipes_tried": [t.recipe.name for t in c.search.tried],
            "robustness": {k: v.to_dict() for k, v in c.robustness.items()},
            "kernel": chosen.kernel, "host_latency_ms": chosen.host_latency_ms, "slowdown": chosen.slowdown,
            "host_threads": c.search.threads, **c.search.to_dict()}


def build_manifest(c: Conversion, created: str) -> Manifest:
    """The manifest the agent verifies (validated again against the schema when written)."""
    chosen = c.search.chosen
    assert chosen.model is not None and chosen.metrics is not None and chosen.outputs is not None
    inputs, outputs = artifact.tensor_specs(chosen.model)
    fidelity_info = _fidelity_block(c)
    return Manifest(
        name=c.name, version=c.options.version, created=created, converter_version=artifact.converter_version(),
        profile=c.profile.name, task="classification" if classification_output(c.reference) else "other",
        model=ModelFile(sha256=hashlib.sha256(chosen.model).hexdigest(), size=len(chosen.model)),
        source=Source(format=c.loaded.format, sha256=c.loaded.sha256),
        inputs=inputs, outputs=outputs,
        preprocessing=Preprocessing(input_range=c.preprocessing_range, layout=_layout(inputs[0].shape)),
        fidelity=fidelity_info, golden=c.golden.golden, baseline=artifact.baseline_stats(chosen.outputs),
        deployable=c.deployable, labels=_labels(c), expires=c.options.expires, fleet=c.options.fleet,
        groups=list(c.options.groups) if c.options.groups is not None else None)


def _labels(c: Conversion) -> list[str] | None:
    """The class names, checked against the classifier's output width.

    Raises:
        ConfigError: not a classifier, or another number of classes than labels.
    """
    labels = c.options.labels
    if labels is None:
        return None
    name = classification_output(c.reference)
    if name is None:
        raise ConfigError("--labels: the model has no classifier output (a vector of class scores)")
    classes = int(c.reference[name].shape[1])
    if classes != len(labels):
        raise ConfigError(f"--labels: {len(labels)} labels, the output {name!r} has {classes} classes")
    return list(labels)


def build_report(c: Conversion, manifest: Manifest, seconds: float) -> dict[str, Any]:
    """The ``report.json`` content: every number of the conversion, for scripts and ``report.md``."""
    chosen, opts = c.search.chosen, c.options
    assert chosen.model is not None
    return {
        "out": str(c.out), "name": c.name, "version": opts.version, "profile": c.profile.name,
        "created": manifest.created, "converter_version": manifest.converter_version,
        "source": {"path": str(c.loaded.path), "format": c.loaded.format, "sha256": c.loaded.sha256},
        "deployable": c.deployable, "reasons": list(c.reasons), "target": c.profile.fidelity.model_dump(),
        "eval_source": c.eval_source, "calibration_samples": c.calibration_samples,
        "float": {"size": len(c.float_model), "gzip_size": len(gzip.compress(c.float_model, 9)),
                  "size_breakdown": size_breakdown(c.float_model), "host_latency_ms": c.float_latency_ms},
        "recipes": [t.to_dict() for t in c.search.tried],
        "chosen": {**chosen.to_dict(), "size_breakdown": size_breakdown(chosen.model),
                   "host_latency_ms": c.chosen_latency_ms},
        "fidelity": _fidelity_block(c),
        "pruning": c.pruning.to_dict() if c.pruning else None,
        "equalization": c.equalization.to_dict() if c.equalization else None,
        "weight_fitting": c.fitting or None,
        "tensor_names": "kept" if opts.keep_tensor_names else "intermediate names dropped",
        "edgetpu": c.edgetpu.to_dict() if c.edgetpu else None,
        "golden": {"count": len(c.golden.golden.samples), "atol": c.golden.golden.atol,
                   "measured_error": c.golden.measured_error},
        "latency_note": _LATENCY_NOTE.format(threads=c.search.threads), "host_threads": c.search.threads,
        "signed": opts.sign_key is not None,
        "seconds": seconds,
    }


def write(c: Conversion, stage: Path, created: str, seconds: float) -> tuple[Manifest, dict[str, Any]]:
    """Build the manifest and the report and swap the artifact into ``c.out`` (via ``stage``).

    Raises:
        ConfigError: the signing key cannot be read.
        ArtifactError: the manifest does not validate or does not describe the model (a converter bug).
    """
    chosen = c.search.chosen
    assert chosen.model is not None
    manifest = build_manifest(c, created)
    report = build_report(c, manifest, seconds)
    artifact.write_artifact(stage, c.out, chosen.model, manifest, report, render_markdown(report), c.options.sign_key)
    return manifest, report
