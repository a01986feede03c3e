"""Ed25519 signatures over manifests (key files shared by edge-fleet keygen, edge-convert and the agent).

Keys are PEM files: ``signing.key`` (PKCS#8, unencrypted or encrypted with a passphrase) and
``signing.pub`` (SubjectPublicKeyInfo). A signature covers the manifest's canonical JSON (sorted keys, no
spaces) and is stored base64 in ``manifest.json.sig`` next to the manifest.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.errors import ArtifactError, ConfigError, SignatureError

__all__ = [
    "canonical_bytes",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "load_trusted_keys",
    "sign_document",
    "sign_manifest",
    "verify_document",
    "verify_manifest",
]


def canonical_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The exact bytes a signature covers: independent of key order and whitespace.

    Raises:
        ArtifactError: the value holds something JSON cannot carry (NaN, Infinity, bytes...).
    """
    try:
        return json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"cannot be signed or verified: not plain JSON ({exc})") from exc


def generate_keypair(out_dir: Path, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """Write ``signing.key`` (mode 0600; encrypted when a ``passphrase`` is given) and ``signing.pub``.

    Raises:
        ConfigError: either file already exists (a key is never overwritten), or an empty passphrase.
    """
    if passphrase is not None and not passphrase:
        raise ConfigError("empty passphrase: expected at least one character")
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out_dir / "signing.key", out_dir / "signing.pub"
    for path in (key_path, pub_path):
        if path.exists():
            raise ConfigError(f"{path}: already exists; refusing to overwrite a key")
    private = Ed25519PrivateKey.generate()
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    key_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    pub_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    pub_path.write_bytes(pub_pem)
    return key_path, pub_path


def _load_pem(path: Path | str, kind: type[Any], load: Any, expected: str, missing: str) -> Any:
    """Read one PEM key of ``kind``: the one place key files become keys, and errors one line."""
    path = Path(path)
    try:
        key = load(path.read_bytes())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: {missing} not found") from exc
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not {expected} ({exc})") from exc
    if not isinstance(key, kind):
        raise ConfigError(f"{path}: expected {expected}, got {type(key).__name__}")
    return key


def load_private_key(path: Path | str, passphrase: bytes | None = None,
                     ask: Callable[[], bytes] | None = None) -> Ed25519PrivateKey:
    """The Ed25519 private key in ``path``; an encrypted one is opened with ``passphrase``, else ``ask()``.

    ``ask`` (a prompt) is called only when the key is encrypted and no passphrase was given. A
    passphrase given for an unencrypted key is not needed and not an error.

    Raises:
        ConfigError: missing, not an Ed25519 PEM private key, encrypted without a passphrase, or
            the passphrase is wrong.
    """
    path = Path(path)

    def load(data: bytes) -> Any:
        if not data.lstrip().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"):
            return serialization.load_pem_private_key(data, password=None)
        secret = passphrase if passphrase is not None else ask() if ask is not None else None
        if secret is None:
            raise ConfigError(f"{path}: the signing key is encrypted and no passphrase was given")
        try:
            return serialization.load_pem_private_key(data, password=secret)
        except ValueError as exc:  # cryptography: "Bad decrypt. Incorrect password?"
            raise ConfigError(f"{path}: wrong passphrase for the signing key") from exc

    return _load_pem(path, Ed25519PrivateKey, load, "a PEM Ed25519 private key", "signing key")


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """Raises ConfigError: missing or not an Ed25519 PEM public key."""
    return _load_pem(path, Ed25519PublicKey, serialization.load_pem_public_key, "a PEM Ed25519 public key",
                     "public key")


def load_trusted_keys(paths: Iterable[Path | str]) -> list[Ed25519PublicKey]:
    return [load_public_key(p) for p in paths]


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_document(document: Mapping[str, Any], key: Ed25519PrivateKey) -> str:
    """Base64 signature of a document's canonical bytes (a manifest or a signed statement)."""
    return base64.b64encode(key.sign(canonical_bytes(document))).decode("ascii")


def verify_document(document: Mapping[str, Any], signature: str | None, trusted: list[Ed25519PublicKey],
                    what: str = "manifest") -> str | None:
    """Check the signature against any trusted key; return the key id that verified it.

    With no trusted keys configured, signatures are not required and None is returned.

    Raises:
        SignatureError: keys are configured and the signature is missing, malformed or untrusted.
        ArtifactError: the document is not plain JSON (it cannot have been signed).
    """
    if not trusted:
        return None
    if not signature:
        raise SignatureError(f"{what} is not signed, but this device requires a signature from a trusted key")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{what} signature is not valid base64") from exc
    data = canonical_bytes(document)
    for key in trusted:
        try:
            key.verify(raw, data)
            return key_id(key)
        except InvalidSignature:
            continue
    raise SignatureError(f"{what} signature does not verify against any of {len(trusted)} trusted key(s)")


def sign_manifest(manifest: Mapping[str, Any], key: Ed25519PrivateKey) -> str:
    """Base64 signature of the manifest's canonical bytes."""
    return sign_document(manifest, key)


def verify_manifest(manifest: Mapping[str, Any], signature: str | None,
                    trusted: list[Ed25519PublicKey]) -> str | None:
    """:func:`verify_document` for a manifest (same errors)."""
    return verify_document(manifest, signature, trusted, "manifest")
