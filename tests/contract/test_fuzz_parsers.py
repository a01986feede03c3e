"""Hostile bytes against the contract's parsers: payload decoding, manifests, commands.

Each parser either returns a value of its documented type or raises its documented error; never
anything else, never a hang, and a command reply is always one line. Bounded here (``ci``
profile); ``make fuzz`` runs the same properties with many more examples.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.commands import CommandProcessor
from edgefleet.errors import ArtifactError
from edgefleet.manifest import parse_manifest
from edgefleet.messages import decode
from edgefleet.signing import verify_manifest

pytestmark = pytest.mark.fuzz

NOW = 1_800_000_000.0

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def _json_text(value: Any) -> bytes:
    return json.dumps(value).encode()  # NaN / Infinity written as the non-JSON literals on purpose


@given(st.binary(max_size=512) | json_values.map(_json_text))
def test_decode_returns_an_object_or_raises_value_error(data: bytes) -> None:
    try:
        obj = decode(data)
    except (ValueError, UnicodeDecodeError):
        return
    assert isinstance(obj, dict)


def test_decode_refuses_deep_nesting_cleanly() -> None:
    with pytest.raises(ValueError):
        decode(b"[" * 100_000 + b"]" * 100_000)


@given(st.dictionaries(st.sampled_from(["id", "ts", "ttl_s", "x"]), json_values, max_size=4)
       | st.builds(dict, id=st.text(max_size=200), ts=json_values, ttl_s=json_values))
def test_command_processor_answers_any_payload_with_one_reply_line(cmd: dict[str, Any]) -> None:
    ran: list[dict[str, Any]] = []
    proc = CommandProcessor("pi-1", {"status": lambda c: ran.append(c) or {}}, clock=lambda: NOW)
    reply = proc.handle("status", _json_text(cmd))
    assert set(reply) <= {"id", "ok", "device_id", "result", "error"}
    if not reply["ok"]:
        assert "\n" not in reply["error"] and len(reply["error"]) <= 500
    else:
        assert ran and isinstance(ran[0].get("ts"), (int, float))


_VALID: dict[str, Any] = {
    "schema_version": 1, "name": "clf", "version": "3", "created": "2026-01-01T00:00:00Z",
    "converter_version": "test", "profile": "rpi4", "task": "classification",
    "model": {"file": "model.tflite", "sha256": "ab" * 32, "size": 1234},
    "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
    "outputs": [{"name": "y", "shape": [1, 3], "dtype": "float32"}],
    "deployable": True,
}


def test_the_fuzzed_manifest_is_valid_to_start_with() -> None:
    assert parse_manifest(_json_text(_VALID)).version == "3"


@given(st.sampled_from(sorted(_VALID)), json_values)
def test_a_manifest_with_any_field_replaced_is_parsed_or_refused_as_artifact_error(key: str, value: Any) -> None:
    raw = _json_text({**_VALID, key: value})
    try:
        manifest = parse_manifest(raw, "m.json")
    except ArtifactError as exc:
        assert str(exc).startswith("m.json") and "\n" not in str(exc)
        return
    assert manifest.name and manifest.model.size >= 1


@given(json_values)
def test_verifying_any_manifest_value_never_fails_with_an_internal_error(value: Any) -> None:
    from edgefleet.signing import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    manifest = {**_VALID, "note": value}
    try:
        verify_manifest(manifest, "AAAA", [key.public_key()])
    except ArtifactError:
        return
    raise AssertionError("a bogus signature verified")
