"""Decide whether an update may proceed: pure functions, no I/O (python-tuf style).

Each check takes typed values and either returns or raises with "expected X, got Y". Commands are
parsed in :mod:`agent.ota.commands`; the manager (:mod:`agent.ota.manager`) does the downloading,
writing and swapping around the checks, so everything here is testable without a network, a disk
or an interpreter.

What each check stops:

- :func:`check_manifest`: a bad or missing signature (when keys are configured), an expired
  manifest or one meant for another fleet or group, a replayed or older manifest (anti-downgrade:
  an update must be above the floor, the highest version an update ever committed here), an
  artifact built for an incompatible device, an oversize model.
- :func:`check_rollback`: a rollback below the floor without a signed rollback statement for this
  device (or its group) and that version.
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

from agent.ota.commands import RollbackRequest, UpdateRequest
from edgefleet.errors import ArtifactError, SignatureError
from edgefleet.manifest import Manifest, parse_version
from edgefleet.profiles import Profile
from edgefleet.signing import verify_manifest
from edgefleet.statements import Statement, verify_statement

__all__ = [
    "DeviceFacts",
    "check_contract",
    "check_manifest",
    "check_report",
    "check_rollback",
    "contract_of",
    "profile_compatible",
]


@dataclass(frozen=True)
class DeviceFacts:
    """What the checks need to know about this device, taken once per operation."""

    profile: Profile
    trusted_keys: tuple[Any, ...]
    floor: str | None  # the highest version an update ever committed (None: nothing yet)
    active_manifest: Manifest | None
    now: float  # epoch s, read once per operation
    device_id: str = "device"
    group: str = "default"
    fleet: str | None = None


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
    """Signature, meant for this device and not expired, anti-downgrade floor, device fit, size.

    Raises:
        SignatureError: keys are configured and the signature is missing or does not verify.
        ArtifactError: expired or meant for another fleet/group, not above the floor, built for
            another kind of device, or larger than this device accepts.
    """
    m = req.verified  # a schema-2 manifest is checked once fetched (RuntimeError before)
    verify_manifest(req.raw, req.signature, list(facts.trusted_keys))
    m.check_meant_for(facts.fleet, facts.group, facts.now)
    if facts.floor is not None and m.version_key <= parse_version(facts.floor):
        raise ArtifactError(f"version {m.version} is not newer than {facts.floor}, the highest version ever "
                            "committed here (anti-downgrade floor); going back is only done by a rollback")
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


def check_rollback(req: RollbackRequest, version: str, facts: DeviceFacts) -> Statement | None:
    """The verified statement a rollback to ``version`` needs (its nonce still to burn), or None.

    Going back to the floor or above needs none; below it, a signed ``rollback`` statement for
    this device or its group naming exactly ``version``. Without trusted keys (development) none.

    Raises:
        SignatureError / ArtifactError: below the floor without a valid statement (the reason says why).
    """
    if not facts.trusted_keys or facts.floor is None or parse_version(version) >= parse_version(facts.floor):
        return None
    below = f"version {version} is below the anti-downgrade floor {facts.floor}"
    try:
        statement = verify_statement(req.statement, req.statement_signature, list(facts.trusted_keys),
                                     kind="rollback", device_id=facts.device_id, group=facts.group, now=facts.now)
    except SignatureError as exc:
        raise SignatureError(f"{below}: {exc}") from exc
    except ArtifactError as exc:
        raise ArtifactError(f"{below}: {exc}") from exc
    if statement.version is None or parse_version(statement.version) != parse_version(version):
        raise ArtifactError(f"{below}: the rollback statement allows version {statement.version}, not {version}")
    return statement


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
