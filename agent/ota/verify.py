"""Decide whether an update may proceed: pure functions, no I/O (python-tuf style).

Each check takes typed values and either returns or raises with "expected X, got Y". Commands are
parsed in :mod:`agent.ota.commands`; the manager (:mod:`agent.ota.manager`) does the downloading,
writing and swapping around the checks, so everything here is testable without a network, a disk
or an interpreter.

What each check stops:

- :func:`check_manifest`: a bad or missing signature (when keys are configured), a replayed or
  older manifest (anti-downgrade: only an explicit rollback may go back), an artifact built for
  an incompatible device, an oversize model.
- the downloaded file is checked by :func:`edgefleet.manifest.check_model_file` (size, then
  sha256): a truncated, padded, corrupted or substituted file.
- :func:`check_contract`: a model whose inputs/outputs differ from the active one's, unless its
  manifest says ``new_contract: true``.
- :func:`check_report`: whatever the child-process validation found (unresolved ops, golden
  mismatch, NaN/Inf, too slow).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.ota.commands import UpdateRequest
from edgefleet.errors import ArtifactError
from edgefleet.manifest import Manifest, parse_version
from edgefleet.profiles import Profile
from edgefleet.signing import verify_manifest

__all__ = [
    "DeviceFacts",
    "check_contract",
    "check_manifest",
    "check_report",
    "contract_of",
    "profile_compatible",
]


@dataclass(frozen=True)
class DeviceFacts:
    """What the checks need to know about this device, taken once per operation."""

    profile: Profile
    trusted_keys: tuple[Any, ...]
    committed_version: str | None
    active_manifest: Manifest | None


def profile_compatible(device: Profile, built_for: Profile | None, name: str) -> str | None:
    """None when a model built for profile ``name`` may run here, else the reason.

    Same profile name always fits. Another profile fits when it targets the same accelerator and
    the same quantized input/output dtypes (and full-integer requirement): the model then needs
    nothing this device lacks. An unknown profile name does not fit.
    """
    if name == device.name:
        return None
    if built_for is None:
        return f"artifact was built for profile {name!r}, which this device does not know (it is {device.name!r})"
    for what, want, got in (
        ("accelerator", device.runtime.accelerator, built_for.runtime.accelerator),
        ("input dtype", device.quantization.input_dtype, built_for.quantization.input_dtype),
        ("output dtype", device.quantization.output_dtype, built_for.quantization.output_dtype),
        ("require_full_integer", device.quantization.require_full_integer,
         built_for.quantization.require_full_integer),
    ):
        if want != got:
            return (f"artifact was built for profile {name!r} ({what} {got}), "
                    f"this device is {device.name!r} ({what} {want})")
    return None


def check_manifest(req: UpdateRequest, facts: DeviceFacts,
                   resolve_profile: Callable[[str], Profile | None]) -> None:
    """Signature, anti-downgrade, device fit and size limits, in that order.

    Raises:
        SignatureError: keys are configured and the signature is missing or does not verify.
        ArtifactError: not newer than the committed version, built for another kind of device,
            or larger than this device accepts.
    """
    verify_manifest(req.raw, req.signature, list(facts.trusted_keys))
    m = req.manifest
    if facts.committed_version is not None:
        have = parse_version(facts.committed_version)
        if m.version_key <= have:
            raise ArtifactError(f"version {m.version} is not newer than the committed {facts.committed_version}; "
                                "an older or equal version is only installed by an explicit rollback")
    if not m.deployable:
        raise ArtifactError("manifest says deployable: false (the converter's checks failed)")
    built_for = None if m.profile == facts.profile.name else resolve_profile(m.profile)
    reason = profile_compatible(facts.profile, built_for, m.profile)
    if reason:
        raise ArtifactError(reason)
    limits = facts.profile.limits
    max_model = int(limits.max_model_mb * 1024 * 1024)
    max_download = int(limits.max_download_mb * 1024 * 1024)
    if m.model.size > min(max_model, max_download):
        raise ArtifactError(f"model is {m.model.size} bytes, expected at most {min(max_model, max_download)} "
                            f"(profile {facts.profile.name} limits)")


Contract = list[tuple[str, tuple[int, ...], str]]


def contract_of(specs: Any) -> Contract:
    """(name, shape, dtype) per tensor, from manifest TensorSpecs or an Engine's tensor details."""
    return [(t.name, tuple(int(d) for d in t.shape), str(getattr(t.dtype, "name", t.dtype))) for t in specs]


def check_contract(new: Manifest, active: Manifest | tuple[Contract, Contract] | None) -> None:
    """Raises ArtifactError when inputs/outputs change without ``new_contract: true``.

    ``active`` is the active model's manifest, or its (inputs, outputs) contract when it was
    installed without a manifest (a bare .tflite).
    """
    if active is None or new.new_contract:
        return
    have_in, have_out = ((contract_of(active.inputs), contract_of(active.outputs))
                         if isinstance(active, Manifest) else active)
    for kind, want, got in (("inputs", have_in, contract_of(new.inputs)),
                            ("outputs", have_out, contract_of(new.outputs))):
        if want != got:
            raise ArtifactError(f"{kind} changed: active model has {want}, new model has {got}; "
                                "set new_contract: true in the manifest if this is intended")


def check_report(report: Any) -> None:
    """Raises ArtifactError with the validator's reason when the child-process validation failed."""
    if not report.ok:
        raise ArtifactError(f"validation failed: {report.reason}")
