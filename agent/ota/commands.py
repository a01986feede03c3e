"""The ``update`` and ``rollback`` commands: parse them, decide whether they may start, keep them.

Pure except :func:`save_command` / :func:`load_command`, which keep an accepted update in its
staging directory (``staging/<rollout_id>/command.json``) so a restarted agent can resume it.
What each part stops:

- :func:`parse_update` / :func:`parse_rollback`: malformed commands, ids that would escape the
  staging directory, unknown URL schemes; a manifest that is not plain JSON (NaN, Infinity) or
  whose signature does not verify is refused *before* any of its fields is parsed or used.
- :func:`admit_update` / :func:`refuse_busy` / :func:`rollback_target`: a second update or
  rollback while one is in flight ("busy"); a rollback to a version this device no longer keeps.
  A redelivered copy of the update in flight (MQTT QoS 1) gets its current state instead of
  starting again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.ota.slots import Journal, SlotStore
from edgefleet.atomic import atomic_write_json
from edgefleet.errors import ArtifactError, ConfigError, EdgefleetError, StorageError
from edgefleet.ids import validate_id
from edgefleet.manifest import Manifest, parse_manifest, parse_version
from edgefleet.signing import canonical_bytes, verify_manifest

__all__ = [
    "COMMAND_FILE",
    "RollbackRequest",
    "UpdateRequest",
    "admit_update",
    "claimed_ids",
    "load_command",
    "parse_rollback",
    "parse_update",
    "refuse_busy",
    "rollback_target",
    "save_command",
]

COMMAND_FILE = "command.json"
_SCHEMES = ("http://", "https://", "file://")


@dataclass(frozen=True)
class UpdateRequest:
    rollout_id: str
    manifest: Manifest
    raw: dict[str, Any]
    signature: str | None
    url: str

    @property
    def version(self) -> str:
        return self.manifest.version


@dataclass(frozen=True)
class RollbackRequest:
    rollout_id: str
    to: str | None  # version, or None for the previous one
    statement: Any = None  # signed rollback statement (needed below the floor), not verified yet
    statement_signature: Any = None


def _rollout_id(cmd: Mapping[str, Any]) -> str:
    rid = cmd.get("rollout_id") or cmd.get("id")
    try:
        return validate_id(rid, "rollout_id")  # same rule as topic ids: no '/', no leading '.'
    except ConfigError as exc:
        raise ConfigError(f"{exc} (it names a directory under the agent's state_dir)") from exc


def parse_update(cmd: Mapping[str, Any], trusted_keys: Sequence[Any] = ()) -> UpdateRequest:
    """Turn an ``update`` command into a typed request; the signature is checked before the schema.

    Raises:
        ConfigError: missing fields, a rollout id that is not a plain name, an unsupported URL.
        SignatureError: ``trusted_keys`` are given and the manifest's signature is missing or wrong.
        ArtifactError: the manifest is not plain JSON (NaN, Infinity) or does not fit schema v1.
    """
    if not isinstance(cmd, Mapping):
        raise ConfigError(f"update command: expected a JSON object, got {type(cmd).__name__}")
    rid = _rollout_id(cmd)
    raw = cmd.get("manifest")
    if not isinstance(raw, dict):
        raise ConfigError(f"update command: 'manifest' must be the manifest object, got {type(raw).__name__}")
    url = cmd.get("artifact_url")
    if not isinstance(url, str) or not url.startswith(_SCHEMES):
        raise ConfigError(f"update command: artifact_url {url!r}: expected an http://, https:// or file:// URL")
    sig = cmd.get("signature")
    if sig is not None and not isinstance(sig, str):
        raise ConfigError("update command: 'signature' must be base64 text or null")
    try:
        canonical_bytes(raw)  # NaN/Infinity: refused even where no signature is required
    except ArtifactError as exc:
        raise ArtifactError(f"update manifest {exc}") from exc
    verify_manifest(raw, sig or None, list(trusted_keys))  # before any field of it is used
    manifest = parse_manifest(raw, "update manifest")
    return UpdateRequest(rollout_id=rid, manifest=manifest, raw=dict(raw), signature=sig or None, url=url)


def claimed_ids(cmd: Any) -> tuple[str, str] | None:
    """Rollout id and version a refused update claims (unverified: only for its ``rejected`` event).

    None when the rollout id itself is unusable; the version is ``"?"`` unless it looks like one.
    """
    try:
        rid = _rollout_id(cmd)
    except (ConfigError, AttributeError):
        return None
    raw = cmd.get("manifest")
    version = raw.get("version") if isinstance(raw, Mapping) else None
    try:
        parse_version(version)  # type: ignore[arg-type]
    except ArtifactError:
        version = "?"
    return rid, str(version)


def parse_rollback(cmd: Mapping[str, Any]) -> RollbackRequest:
    """Raises ConfigError for a malformed rollback command."""
    if not isinstance(cmd, Mapping):
        raise ConfigError(f"rollback command: expected a JSON object, got {type(cmd).__name__}")
    to = cmd.get("to")
    if to is not None:
        if not isinstance(to, str):
            raise ConfigError(f"rollback command: 'to' must be a version string or null, got {to!r}")
        try:
            parse_version(to)
        except ArtifactError as exc:
            raise ConfigError(f"rollback command: {exc}") from exc
    return RollbackRequest(rollout_id=_rollout_id(cmd), to=to, statement=cmd.get("statement"),
                           statement_signature=cmd.get("statement_signature"))


def refuse_busy(journal: Journal) -> None:
    """Raises ConfigError ("busy: ...") while an update or rollback is in flight: one at a time."""
    p = journal.pending
    if p is not None:
        raise ConfigError(f"busy: {p.kind} {p.rollout_id} (version {p.version}) is {p.state.value}")


def admit_update(journal: Journal, req: UpdateRequest) -> dict[str, Any] | None:
    """None when ``req`` may start; the reply for a redelivery of the update already in flight.

    Raises:
        ConfigError: another update or rollback is in flight ("busy").
    """
    p = journal.pending
    if p is not None and p.kind == "update" and p.rollout_id == req.rollout_id and p.version == req.version:
        return {"accepted": True, "state": p.state.value, "duplicate": True}
    refuse_busy(journal)
    return None


def rollback_target(journal: Journal, req: RollbackRequest) -> tuple[str, str]:
    """The kept slot a rollback returns to, and its version.

    Raises:
        ConfigError: no kept slot has that version (or none is kept); the message is the reason.
    """
    target = journal.slot_for_version(parse_version(req.to) if req.to else None, parse_version)
    if target is None:
        kept = ", ".join(journal.versions.get(s, "?") for s in journal.history) or "none"
        raise ConfigError(f"version {req.to} is not kept on this device (kept: {kept})" if req.to
                          else "no previous version is kept on this device")
    return target, journal.versions.get(target, "?")


def save_command(store: SlotStore, req: UpdateRequest) -> None:
    """Keep an accepted update in its staging directory, where a restarted agent finds it.

    Raises:
        ConfigError: the rollout id escapes the staging area (parse_update already refuses it).
        StorageError: the disk is full or failed.
    """
    staging = store.staging_dir(req.rollout_id)
    try:
        staging.mkdir(parents=True, exist_ok=True)
        atomic_write_json(staging / COMMAND_FILE, {"rollout_id": req.rollout_id, "manifest": req.raw,
                                                   "signature": req.signature, "artifact_url": req.url})
    except OSError as exc:
        raise StorageError(f"cannot keep the update command: {exc.strerror or exc}") from exc


def load_command(store: SlotStore, rollout_id: str, trusted_keys: Sequence[Any] = ()) -> UpdateRequest | None:
    """The update kept by :func:`save_command`; None when it is missing, unreadable or unsigned."""
    try:
        path = store.staging_dir(rollout_id) / COMMAND_FILE
        return parse_update(json.loads(path.read_text(encoding="utf-8")), trusted_keys)
    except (OSError, ValueError, EdgefleetError):
        return None
