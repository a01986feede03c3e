"""The ``update`` and ``rollback`` commands: parse them, decide whether they may start, keep them.

Pure except :func:`save_command` / :func:`load_command`, which keep an accepted update in its
staging directory (``staging/<rollout_id>/command.json``) so a restarted agent can resume it.
What each part stops:

- :func:`command_schema`: a command of a newer schema than this agent understands (it would be
  misread), refused with a reason that says to upgrade the agent.
- :func:`parse_update` / :func:`parse_rollback`: malformed commands, ids that would escape the
  staging directory, unknown URL schemes; a manifest that is not plain JSON (NaN, Infinity) or
  whose signature does not verify is refused *before* any of its fields is parsed or used.
- :func:`resolve_manifest`: a schema-2 update names its manifest by URL, sha256 and size (so the
  command fits a managed broker's message cap); the fetched bytes are checked against both
  before they are parsed, then verified as above.
- :func:`admit_update` / :func:`refuse_busy` / :func:`rollback_target`: a second update or
  rollback while one is in flight ("busy"); a rollback to a version this device no longer keeps.
  A redelivered copy of the update in flight (MQTT QoS 1) gets its current state instead of
  starting again.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from agent.ota.slots import Journal, SlotStore
from edgefleet.atomic import atomic_write_json
from edgefleet.errors import ArtifactError, ConfigError, EdgefleetError, StorageError
from edgefleet.ids import validate_id
from edgefleet.manifest import MAX_MANIFEST_BYTES, Manifest, ManifestRef, parse_manifest, parse_version
from edgefleet.messages import COMMAND_SCHEMA, SCHEMA_TOO_NEW, parse_json
from edgefleet.signing import canonical_bytes, verify_manifest

__all__ = [
    "COMMAND_FILE",
    "RollbackRequest",
    "UpdateRequest",
    "admit_update",
    "claimed_ids",
    "command_schema",
    "load_command",
    "parse_rollback",
    "parse_update",
    "refuse_busy",
    "resolve_manifest",
    "rollback_target",
    "save_command",
]

COMMAND_FILE = "command.json"
_SCHEMES = ("http://", "https://", "file://")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class UpdateRequest:
    rollout_id: str
    manifest: Manifest | None  # None until a schema-2 manifest is fetched (resolve_manifest)
    raw: dict[str, Any]        # what the signature covers ({} until fetched)
    signature: str | None
    url: str
    ref: ManifestRef | None = None     # schema 2: the manifest by URL
    claimed_version: str | None = None  # schema 2: unverified, names the update until it is fetched

    @property
    def version(self) -> str:
        return self.manifest.version if self.manifest is not None else str(self.claimed_version)

    @property
    def verified(self) -> Manifest:
        """The verified manifest. Raises RuntimeError before it is fetched (a step out of order)."""
        if self.manifest is None:
            raise RuntimeError(f"update {self.rollout_id}: its manifest is not fetched and verified yet")
        return self.manifest


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


def command_schema(cmd: Mapping[str, Any], what: str) -> int:
    """The command's ``schema`` (absent: 1).

    Raises:
        ConfigError: not a positive integer, or newer than :data:`COMMAND_SCHEMA` (the reason says
            to upgrade the agent, and the fleet tool counts it).
    """
    schema = cmd.get("schema", 1)
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
        raise ConfigError(f"{what} command: 'schema' must be a positive integer, got {schema!r}")
    if schema > COMMAND_SCHEMA:
        raise ConfigError(SCHEMA_TOO_NEW.format(schema=schema, known=COMMAND_SCHEMA))
    return schema


def _url(cmd: Mapping[str, Any], key: str) -> str:
    url = cmd.get(key)
    if not isinstance(url, str) or not url.startswith(_SCHEMES):
        raise ConfigError(f"update command: {key} {url!r}: expected an http://, https:// or file:// URL")
    return url


def _manifest_ref(cmd: Mapping[str, Any]) -> ManifestRef:
    sha, size = cmd.get("manifest_sha256"), cmd.get("manifest_size")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise ConfigError(f"update command: manifest_sha256 {sha!r}: expected 64 lowercase hex digits")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"update command: manifest_size {size!r}: expected a positive number of bytes")
    if size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"update manifest is {size} bytes, expected at most {MAX_MANIFEST_BYTES}")
    return ManifestRef(_url(cmd, "manifest_url"), sha, size)


def _verified_manifest(raw: Any, signature: str | None, trusted_keys: Sequence[Any]) -> Manifest:
    """Plain JSON, then the signature, then the schema: no field is used before it is verified."""
    if not isinstance(raw, dict):
        raise ArtifactError(f"update manifest: expected a JSON object, got {type(raw).__name__}")
    try:
        canonical_bytes(raw)  # NaN/Infinity (also 1e400): refused even where no signature is required
    except ArtifactError as exc:
        raise ArtifactError(f"update manifest {exc}") from exc
    verify_manifest(raw, signature, list(trusted_keys))
    return parse_manifest(raw, "update manifest")


def parse_update(cmd: Mapping[str, Any], trusted_keys: Sequence[Any] = ()) -> UpdateRequest:
    """Turn an ``update`` command into a typed request; a manifest's signature is checked before its schema.

    Schema 1 carries the manifest inline (verified here); schema 2 names it by URL, sha256 and
    size, and the request has no manifest until :func:`resolve_manifest` (the OTA worker fetches it).

    Raises:
        ConfigError: missing fields, a rollout id that is not a plain name, an unsupported URL, a
            schema newer than this agent understands.
        SignatureError: ``trusted_keys`` are given and the manifest's signature is missing or wrong.
        ArtifactError: the manifest is not plain JSON (NaN, Infinity), does not fit schema v1, or
            is announced larger than MAX_MANIFEST_BYTES.
    """
    if not isinstance(cmd, Mapping):
        raise ConfigError(f"update command: expected a JSON object, got {type(cmd).__name__}")
    schema = command_schema(cmd, "update")
    rid = _rollout_id(cmd)
    url = _url(cmd, "artifact_url")
    sig = cmd.get("signature")
    if sig is not None and not isinstance(sig, str):
        raise ConfigError("update command: 'signature' must be base64 text or null")
    if schema >= 2:
        ref = _manifest_ref(cmd)
        version = cmd.get("version")
        try:
            parse_version(version)  # type: ignore[arg-type]
        except ArtifactError as exc:
            raise ConfigError(f"update command: {exc}") from exc
        return UpdateRequest(rid, None, {}, sig or None, url, ref=ref, claimed_version=version)
    raw = cmd.get("manifest")
    if not isinstance(raw, dict):
        raise ConfigError(f"update command: 'manifest' must be the manifest object, got {type(raw).__name__}")
    manifest = _verified_manifest(raw, sig or None, trusted_keys)
    return UpdateRequest(rollout_id=rid, manifest=manifest, raw=dict(raw), signature=sig or None, url=url)


def resolve_manifest(req: UpdateRequest, data: bytes, trusted_keys: Sequence[Any] = ()) -> UpdateRequest:
    """``req`` with the manifest fetched for it: size and sha256 first, then strict JSON, then the signature.

    Raises:
        RuntimeError: ``req`` carries its manifest inline (a step out of order).
        ArtifactError: the bytes are not the announced ones (checked before parsing), not strict
            JSON, not schema v1, or a manifest of another version than the command claimed.
        SignatureError: ``trusted_keys`` are given and the signature is missing or wrong.
    """
    ref = req.ref
    if ref is None or req.manifest is not None:
        raise RuntimeError(f"update {req.rollout_id}: nothing to resolve, its manifest came inline")
    if len(data) != ref.size:
        raise ArtifactError(f"fetched manifest: {len(data)} bytes, the command says {ref.size}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != ref.sha256:
        raise ArtifactError(f"fetched manifest: sha256 {digest[:12]}..., the command says {ref.sha256[:12]}... "
                            "(corrupted or substituted; not parsed)")
    try:
        raw = parse_json(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"fetched manifest: not valid JSON ({exc})") from exc
    manifest = _verified_manifest(raw, req.signature, trusted_keys)
    if parse_version(manifest.version) != parse_version(req.version):
        raise ArtifactError(f"fetched manifest is version {manifest.version}, the command says {req.version}")
    return replace(req, manifest=manifest, raw=dict(raw))


def claimed_ids(cmd: Any) -> tuple[str, str] | None:
    """Rollout id and version a refused update claims (unverified: only for its ``rejected`` event).

    None when the rollout id itself is unusable; the version is ``"?"`` unless it looks like one.
    """
    try:
        rid = _rollout_id(cmd)
    except (ConfigError, AttributeError):
        return None
    raw = cmd.get("manifest")
    version = raw.get("version") if isinstance(raw, Mapping) else cmd.get("version")
    try:
        parse_version(version)  # type: ignore[arg-type]
    except ArtifactError:
        version = "?"
    return rid, str(version)


def parse_rollback(cmd: Mapping[str, Any]) -> RollbackRequest:
    """Raises ConfigError for a malformed rollback command, or one of a newer schema."""
    if not isinstance(cmd, Mapping):
        raise ConfigError(f"rollback command: expected a JSON object, got {type(cmd).__name__}")
    command_schema(cmd, "rollback")
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
        atomic_write_json(staging / COMMAND_FILE, _as_command(req))
    except OSError as exc:
        raise StorageError(f"cannot keep the update command: {exc.strerror or exc}") from exc


def _as_command(req: UpdateRequest) -> dict[str, Any]:
    """The command as it came (a schema-2 one by reference: its manifest is kept beside it once fetched)."""
    cmd: dict[str, Any] = {"rollout_id": req.rollout_id, "signature": req.signature, "artifact_url": req.url}
    if req.ref is None:
        return {**cmd, "manifest": req.raw}
    return {**cmd, "schema": 2, "version": req.claimed_version, "manifest_url": req.ref.url,
            "manifest_sha256": req.ref.sha256, "manifest_size": req.ref.size}


def load_command(store: SlotStore, rollout_id: str, trusted_keys: Sequence[Any] = ()) -> UpdateRequest | None:
    """The update kept by :func:`save_command`; None when it is missing, unreadable or unsigned."""
    try:
        path = store.staging_dir(rollout_id) / COMMAND_FILE
        return parse_update(json.loads(path.read_text(encoding="utf-8")), trusted_keys)
    except (OSError, ValueError, EdgefleetError):
        return None
