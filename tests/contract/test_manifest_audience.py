"""A signed manifest says until when and for whom it is meant (freeze and mix-and-match attacks)."""

from __future__ import annotations

import json

import pytest

from edgefleet.errors import ArtifactError
from edgefleet.manifest import parse_manifest

NOW = 1_800_000_000.0  # 2027-01-15
BASE = {
    "schema_version": 1, "name": "clf", "version": "3", "created": "2026-01-01T00:00:00Z",
    "converter_version": "test", "profile": "rpi4",
    "model": {"file": "model.tflite", "sha256": "ab" * 32, "size": 1234},
    "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
    "outputs": [{"name": "y", "shape": [1, 3], "dtype": "float32"}],
}


def manifest(**fields):
    return parse_manifest(json.dumps({**BASE, **fields}))


def test_manifest_without_audience_or_expiry_is_meant_for_everyone() -> None:
    manifest().check_meant_for(None, "g1", NOW)


def test_expired_manifest_is_refused_freeze_attack() -> None:
    with pytest.raises(ArtifactError, match="expired at 2026-06-01"):
        manifest(expires="2026-06-01T00:00:00Z").check_meant_for(None, "g1", NOW)
    manifest(expires="2027-06-01T00:00:00Z").check_meant_for(None, "g1", NOW)


def test_manifest_for_another_fleet_or_group_is_refused_mix_and_match() -> None:
    with pytest.raises(ArtifactError, match="fleet 'shops'"):
        manifest(fleet="shops").check_meant_for("farms", "g1", NOW)
    with pytest.raises(ArtifactError, match="groups canary, g2"):
        manifest(fleet="farms", groups=["canary", "g2"]).check_meant_for("farms", "g1", NOW)
    manifest(fleet="farms", groups=["g1"]).check_meant_for("farms", "g1", NOW)


@pytest.mark.parametrize("fields", [{"expires": "next tuesday"}, {"fleet": "a/b"}, {"groups": ["#"]}])
def test_malformed_audience_fields_are_refused_when_parsing(fields) -> None:
    with pytest.raises(ArtifactError):
        manifest(**fields)


def test_labels_are_carried_and_bounded() -> None:
    assert manifest(labels=["cat", "dog", "bird"]).labels == ["cat", "dog", "bird"]
    with pytest.raises(ArtifactError):
        manifest(labels=["x" * 300])
