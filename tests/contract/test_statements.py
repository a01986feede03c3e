"""Signed statements: what a leaked fleet credential cannot forge or replay."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.errors import ArtifactError, SignatureError
from edgefleet.signing import Ed25519PrivateKey
from edgefleet.statements import NonceLedger, make_statement, verify_statement

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
NOW = 1_800_000_000.0


def _verify(body, sig, **kw):
    args = {"kind": "rollback", "device_id": "pi-1", "group": "g1", "now": NOW, **kw}
    return verify_statement(body, sig, [KEY.public_key()], **args)


def test_a_statement_for_this_device_verifies_and_says_what_it_allows() -> None:
    body, sig = make_statement("rollback", KEY, device="pi-1", version="1", now=NOW)
    st = _verify(body, sig)
    assert (st.kind, st.device, st.version) == ("rollback", "pi-1", "1") and st.expires == NOW + 3600


def test_unsigned_or_foreign_key_statement_is_refused() -> None:
    body, _ = make_statement("rollback", KEY, device="pi-1", version="1", now=NOW)
    _, foreign = make_statement("rollback", OTHER, device="pi-1", version="1", now=NOW)
    with pytest.raises(SignatureError, match="required"):
        _verify(body, None)
    with pytest.raises(SignatureError, match="does not verify"):
        _verify(body, foreign)
    with pytest.raises(SignatureError, match="no trusted keys"):
        verify_statement(body, "x", [], kind="rollback", device_id="pi-1", group="g1", now=NOW)


def test_a_tampered_statement_is_refused_before_its_fields_are_read() -> None:
    body, sig = make_statement("rollback", KEY, device="pi-1", version="3", now=NOW)
    with pytest.raises(SignatureError):
        _verify({**body, "version": "1"}, sig)
    with pytest.raises(ArtifactError, match="not plain JSON"):
        _verify({**body, "expires": float("nan")}, sig)


@pytest.mark.parametrize("target, error", [
    ({"device": "pi-2"}, "for device 'pi-2'"), ({"group": "g2"}, "for group 'g2'"),
])
def test_statement_for_another_target_is_refused(target, error) -> None:
    body, sig = make_statement("rollback", KEY, version="1", now=NOW, **target)
    with pytest.raises(ArtifactError, match=error):
        _verify(body, sig)


def test_expired_statement_or_one_of_another_kind_is_refused() -> None:
    body, sig = make_statement("rollback", KEY, group="g1", version="1", now=NOW - 7200)
    with pytest.raises(ArtifactError, match="expired"):
        _verify(body, sig)
    body, sig = make_statement("config", KEY, group="g1", settings={"near_threshold": 0.5}, now=NOW)
    with pytest.raises(ArtifactError, match="not 'rollback'"):
        _verify(body, sig)
    body, sig = make_statement("rollback", KEY, group="g1", version="1", now=NOW, lifetime_s=30 * 86_400)
    with pytest.raises(ArtifactError, match="lifetime"):
        _verify(body, sig)


def test_replayed_statement_is_refused_even_after_a_restart(tmp_path: Path) -> None:
    body, sig = make_statement("rollback", KEY, device="pi-1", version="1", now=NOW)
    st = _verify(body, sig)
    NonceLedger(tmp_path / "nonces.json").consume(st, NOW)
    with pytest.raises(ArtifactError, match="replay"):
        NonceLedger(tmp_path / "nonces.json").consume(_verify(body, sig), NOW + 1)


def test_a_full_ledger_refuses_rather_than_forgetting_a_nonce(tmp_path: Path) -> None:
    ledger = NonceLedger(tmp_path / "nonces.json", capacity=2)
    statements = [make_statement("rollback", KEY, device="pi-1", version="1", now=NOW) for _ in range(3)]
    for body, sig in statements[:2]:
        ledger.consume(_verify(body, sig), NOW)
    with pytest.raises(ArtifactError, match="too many"):
        ledger.consume(_verify(*statements[2]), NOW)
    ledger.consume(_verify(*statements[2], now=NOW), NOW + 3601)  # the first two expired meanwhile


def test_a_damaged_ledger_fails_closed(tmp_path: Path) -> None:
    (tmp_path / "nonces.json").write_text("{broken")
    with pytest.raises(ArtifactError, match="unreadable statement ledger"):
        NonceLedger(tmp_path / "nonces.json")
