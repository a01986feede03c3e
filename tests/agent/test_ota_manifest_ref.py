"""Schema-2 update commands, pure: parsed without a manifest, resolved only from the announced bytes."""

from __future__ import annotations

import hashlib

import pytest

from agent.ota.commands import command_schema, parse_update, resolve_manifest
from edgefleet.errors import ArtifactError, ConfigError, SignatureError
from edgefleet.manifest import MAX_MANIFEST_BYTES
from edgefleet.signing import Ed25519PrivateKey, canonical_bytes, sign_manifest

KEY = Ed25519PrivateKey.generate()
RAW = {"schema_version": 1, "name": "clf", "version": "2", "created": "2026-01-01T00:00:00Z",
       "converter_version": "t", "profile": "x86-dev", "model": {"sha256": "a" * 64, "size": 10},
       "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
       "outputs": [{"name": "y", "shape": [1, 3], "dtype": "float32"}]}
DATA = canonical_bytes(RAW)


def _cmd(**changes):
    return {"schema": 2, "rollout_id": "r2", "version": "2", "manifest_url": "http://f/m.json",
            "manifest_sha256": hashlib.sha256(DATA).hexdigest(), "manifest_size": len(DATA),
            "signature": sign_manifest(RAW, KEY), "artifact_url": "http://f/model.tflite", **changes}


def test_a_manifest_by_url_is_used_only_after_its_bytes_and_signature_verify():
    req = parse_update(_cmd(), [KEY.public_key()])
    assert req.manifest is None and req.version == "2"
    with pytest.raises(RuntimeError, match="not fetched"):
        req.verified  # noqa: B018 (the guard is the point)
    assert resolve_manifest(req, DATA, [KEY.public_key()]).verified.version == "2"


def test_bytes_other_than_announced_are_refused_before_parsing():
    req = parse_update(_cmd())
    junk = b"{" * len(DATA)  # would fail to parse: the sha256 must fail first
    with pytest.raises(ArtifactError, match="sha256 .* not parsed"):
        resolve_manifest(req, junk)
    with pytest.raises(ArtifactError, match="bytes, the command says"):
        resolve_manifest(req, DATA + b" ")


def test_a_forged_or_mislabelled_manifest_is_refused():
    other = dict(RAW, version="3")
    forged = canonical_bytes(other)
    req = parse_update(_cmd(manifest_sha256=hashlib.sha256(forged).hexdigest(), manifest_size=len(forged)))
    with pytest.raises(SignatureError):
        resolve_manifest(req, forged, [KEY.public_key()])
    with pytest.raises(ArtifactError, match="version 3, the command says 2"):
        resolve_manifest(req, forged)


def test_oversize_or_newer_schema_commands_are_refused_at_once():
    with pytest.raises(ArtifactError, match="at most"):
        parse_update(_cmd(manifest_size=MAX_MANIFEST_BYTES + 1))
    with pytest.raises(ConfigError, match=r"command schema 3 is newer than this agent understands \(1-2\)"):
        parse_update(_cmd(schema=3))
    with pytest.raises(ConfigError, match="positive integer"):
        command_schema({"schema": True}, "update")
    assert command_schema({}, "rollback") == 1
