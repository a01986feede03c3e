"""Signed statements: what an unsigned command may not do, a fleet key can still authorise.

A command channel can be used by anyone who holds a fleet credential or runs the broker, so the
device takes unsigned commands only when they cannot hurt it (status; settings made stricter).
Two things need a statement signed by a trusted key, carried in the command as ``statement``
and ``statement_signature``:

* ``rollback`` below the anti-downgrade floor (the highest version an update ever committed);
* ``config`` that makes the cache looser than the device's approved settings.

A statement names its target (a device or a group), what it allows, an expiry and a nonce. The
device verifies the signature *before* reading any field, checks target and expiry, and burns the
nonce in a persisted :class:`NonceLedger`, so a captured statement is never accepted twice.

Raises from this module are :class:`~edgefleet.errors.SignatureError` (not signed, or not by a
trusted key) or :class:`~edgefleet.errors.ArtifactError` (signed, but not for this, not now).
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgefleet.atomic import atomic_write_json
from edgefleet.errors import ArtifactError, SignatureError
from edgefleet.manifest import parse_version
from edgefleet.signing import Ed25519PrivateKey, Ed25519PublicKey, sign_document, verify_document

__all__ = ["MAX_STATEMENT_LIFETIME_S", "NonceLedger", "Statement", "make_statement", "verify_statement"]

log = logging.getLogger(__name__)

Kind = Literal["rollback", "config"]
MAX_STATEMENT_LIFETIME_S = 7 * 86_400.0
"""Longest a statement may stay valid; bounds how long its nonce must be remembered, s."""
_NONCE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")


@dataclass(frozen=True)
class Statement:
    """A verified statement (only :func:`verify_statement` makes one)."""

    kind: Kind
    device: str | None
    group: str | None
    expires: float  # epoch s
    nonce: str
    key_id: str | None
    version: str | None = None  # rollback: the version it allows going back to
    settings: Mapping[str, Any] | None = None  # config: the settings it allows


def make_statement(kind: Kind, key: Ed25519PrivateKey, *, device: str | None = None, group: str | None = None,
                   version: str | None = None, settings: Mapping[str, Any] | None = None,
                   lifetime_s: float = 3600.0, now: float | None = None) -> tuple[dict[str, Any], str]:
    """A signed statement for ``device`` or ``group``: ``(statement, signature)`` for the command."""
    issued = time.time() if now is None else now
    body: dict[str, Any] = {"kind": kind, "expires": round(issued + lifetime_s, 3), "issued": round(issued, 3),
                            "nonce": secrets.token_hex(16)}
    if device is not None:
        body["device"] = device
    if group is not None:
        body["group"] = group
    if version is not None:
        body["version"] = version
    if settings is not None:
        body["settings"] = dict(settings)
    return body, sign_document(body, key)


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ArtifactError(f"statement field {name!r}: expected {getattr(kind, '__name__', kind)}, got {value!r:.60}")
    return value


def verify_statement(body: object, signature: object, trusted: list[Ed25519PublicKey], *, kind: Kind,
                     device_id: str, group: str, now: float) -> Statement:
    """Verify a statement for this device; the nonce is not burnt here (see :class:`NonceLedger`).

    Raises:
        SignatureError: no trusted key configured, not signed, or not by a trusted key.
        ArtifactError: malformed, of another kind, for another target, expired, or too long-lived.
    """
    if not trusted:
        raise SignatureError(f"a signed {kind} statement is required, and this device has no trusted keys")
    if not isinstance(body, Mapping) or not isinstance(signature, str):
        raise SignatureError(f"a signed {kind} statement is required ('statement' and 'statement_signature')")
    key = verify_document(body, signature, trusted, f"{kind} statement")  # before any field is read
    if body.get("kind") != kind:
        raise ArtifactError(f"statement is for {body.get('kind')!r}, not {kind!r}")
    target_device = _field(body, "device", str, required=False)
    target_group = _field(body, "group", str, required=False)
    if (target_device is None) == (target_group is None):
        raise ArtifactError("statement must name exactly one target: 'device' or 'group'")
    if target_device is not None and target_device != device_id:
        raise ArtifactError(f"statement is for device {target_device!r}, not {device_id!r}")
    if target_group is not None and target_group != group:
        raise ArtifactError(f"statement is for group {target_group!r}, not {group!r}")
    expires = float(_field(body, "expires", (int, float)))
    issued = float(_field(body, "issued", (int, float)))
    if not (math.isfinite(expires) and math.isfinite(issued)) or expires - issued > MAX_STATEMENT_LIFETIME_S:
        raise ArtifactError(f"statement lifetime must be finite and at most {MAX_STATEMENT_LIFETIME_S:g}s")
    if expires < now:
        raise ArtifactError(f"statement expired {now - expires:.0f}s ago")
    nonce = _field(body, "nonce", str)
    if not _NONCE.match(nonce):
        raise ArtifactError("statement nonce: expected 16-128 letters, digits, '_' or '-'")
    version = _field(body, "version", str, required=kind == "rollback")
    if version is not None:
        try:
            parse_version(version)
        except ArtifactError as exc:
            raise ArtifactError(f"statement version: {exc}") from exc
    settings = _field(body, "settings", Mapping, required=kind == "config")
    return Statement(kind, target_device, target_group, expires, nonce, key, version,
                     dict(settings) if settings is not None else None)


class NonceLedger:
    """Nonces of accepted statements, kept (on disk, atomically) until their statement expires.

    Bounded by ``capacity``: when it is full of unexpired nonces, new statements are refused
    rather than an old nonce forgotten, so a replay is always a replay.
    """

    def __init__(self, path: Path | None, capacity: int = 1024) -> None:
        self.path = path
        self.capacity = capacity
        self._lock = threading.Lock()
        self._nonces: dict[str, float] = {}
        if path is not None and path.is_file():
            try:
                self._nonces = {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                # Fail closed: a ledger we cannot read would let every old statement in again.
                raise ArtifactError(f"{path}: unreadable statement ledger ({exc}); remove it only if "
                                    "no statement issued in the last week can be replayed") from exc

    def consume(self, statement: Statement, now: float) -> None:
        """Burn the statement's nonce.

        Raises:
            ArtifactError: the nonce was used before, or the ledger is full.
        """
        with self._lock:
            self._nonces = {n: exp for n, exp in self._nonces.items() if exp >= now}
            if statement.nonce in self._nonces:
                raise ArtifactError("statement was already used (its nonce is spent): a replay")
            if len(self._nonces) >= self.capacity:
                raise ArtifactError(f"too many unexpired statements ({len(self._nonces)}); retry later")
            nonces = {**self._nonces, statement.nonce: statement.expires}
            if self.path is not None:
                atomic_write_json(self.path, nonces)
            self._nonces = nonces
