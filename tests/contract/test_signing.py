"""Manifest signatures: what a device accepts and what it refuses."""

from __future__ import annotations

import pytest

from edgefleet.errors import ConfigError, SignatureError
from edgefleet.signing import (
    generate_keypair,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_manifest,
)

MANIFEST = {"name": "digits", "version": "2", "model": {"sha256": "ab" * 32, "size": 10}}


@pytest.fixture
def keys(tmp_path):
    key_path, pub_path = generate_keypair(tmp_path / "keys")
    return load_private_key(key_path), load_public_key(pub_path)


def test_signature_verifies_regardless_of_key_order(keys):
    private, public = keys
    sig = sign_manifest(MANIFEST, private)
    reordered = dict(reversed(list(MANIFEST.items())))
    assert verify_manifest(reordered, sig, [public])


def test_tampered_manifest_is_rejected(keys):
    private, public = keys
    sig = sign_manifest(MANIFEST, private)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest({**MANIFEST, "version": "3"}, sig, [public])


def test_unsigned_manifest_rejected_only_when_keys_are_configured(keys):
    _, public = keys
    assert verify_manifest(MANIFEST, None, []) is None
    with pytest.raises(SignatureError, match="not signed"):
        verify_manifest(MANIFEST, None, [public])
    with pytest.raises(SignatureError, match="base64"):
        verify_manifest(MANIFEST, "not base64!!", [public])


def test_signature_from_untrusted_key_is_rejected(keys, tmp_path):
    _, public = keys
    other_key, _ = generate_keypair(tmp_path / "other")
    sig = sign_manifest(MANIFEST, load_private_key(other_key))
    with pytest.raises(SignatureError):
        verify_manifest(MANIFEST, sig, [public])


def test_keygen_refuses_to_overwrite_and_keeps_private_key_private(tmp_path):
    key_path, _ = generate_keypair(tmp_path)
    assert key_path.stat().st_mode & 0o077 == 0
    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(tmp_path)


def test_garbage_key_file_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.pub"
    bad.write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM Ed25519 public key"):
        load_public_key(bad)
