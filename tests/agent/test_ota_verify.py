"""Pure OTA decisions: signatures, anti-downgrade, device fit, file checks, contract, probation verdicts, journal."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from agent.ota.commands import parse_rollback, parse_update
from agent.ota.probation import ProbationCounters, ProbationPolicy, ProbationWatcher, judge
from agent.ota.slots import Journal, Outcome, Pending, SlotStore
from agent.ota.verify import DeviceFacts, check_contract, check_manifest, profile_compatible
from edgefleet.errors import ArtifactError, ConfigError, InputError, SignatureError
from edgefleet.manifest import check_model_bytes, check_model_file
from edgefleet.messages import OtaState
from edgefleet.profiles import load_profile, profile_dir
from edgefleet.signing import Ed25519PrivateKey, sign_manifest
from edgefleet.testing.artifacts import build_artifact
from tests.support.models import OTA_MODELS

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
PROFILE = load_profile("x86-dev")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return build_artifact(OTA_MODELS / "clf_a2.tflite", tmp_path_factory.mktemp("v2"), version="2", key=KEY)


NOW = 1_900_000_000.0


def facts(floor: str | None = "1", keys=None, **kw) -> DeviceFacts:
    return DeviceFacts(PROFILE, (KEY.public_key(),) if keys is None else tuple(keys), floor, None, NOW, **kw)


def request(art, **changes):
    cmd = {"id": "c", **art.update_fields(rollout_id="r2"), **changes}
    return parse_update(cmd)


def signed(art, **fields) -> dict:
    raw = {**copy.deepcopy(art.raw), **fields}
    return {"manifest": raw, "signature": sign_manifest(raw, KEY)}


def check(req, f=None):
    check_manifest(req, f or facts(), lambda name: load_profile(name) if name in ("rpi4", "x86-dev", "coral-usb") else None)


def test_signed_newer_manifest_passes(art):
    check(request(art))


def test_unsigned_manifest_is_refused_when_keys_are_configured(art):
    with pytest.raises(SignatureError, match="not signed"):
        check(request(art, signature=None))


def test_unsigned_manifest_is_accepted_when_no_keys_are_configured(art):
    check(request(art, signature=None), facts(keys=()))


def test_manifest_signed_by_an_untrusted_key_is_refused(art):
    with pytest.raises(SignatureError, match="does not verify"):
        check(request(art, signature=sign_manifest(art.raw, OTHER)))


def test_manifest_edited_after_signing_is_refused(art):
    raw = copy.deepcopy(art.raw)
    raw["version"] = "9"
    with pytest.raises(SignatureError):
        check(request(art, manifest=raw))


def test_replayed_older_manifest_is_refused(art):
    with pytest.raises(ArtifactError, match="not newer than 3, the highest version ever committed here"):
        check(request(art), facts(floor="3"))


def test_replayed_same_version_is_refused(art):
    with pytest.raises(ArtifactError, match="not newer"):
        check(request(art), facts(floor="2.0"))


def test_unsigned_manifest_with_hostile_fields_is_refused_for_its_signature_before_parsing(art):
    raw = {**copy.deepcopy(art.raw), "model": {"file": "../../../etc/passwd", "sha256": "x", "size": -1}}
    with pytest.raises(SignatureError, match="not signed"):
        parse_update({"id": "c", **art.update_fields(rollout_id="r2"), "manifest": raw, "signature": None},
                     [KEY.public_key()])


@pytest.mark.parametrize("keys", [(), (KEY.public_key(),)])
def test_manifest_with_infinity_or_nan_is_refused_with_a_reason(art, keys):
    raw = {**copy.deepcopy(art.raw), "fidelity": {"top1": float("inf")}}
    with pytest.raises(ArtifactError, match="update manifest cannot be signed or verified: not plain JSON"):
        parse_update({"id": "c", **art.update_fields(rollout_id="r2"), "manifest": raw}, keys)


def test_expired_manifest_is_refused(art):
    with pytest.raises(ArtifactError, match="expired at 2020-01-01T00:00:00Z"):
        check(parse_update({"id": "c", **art.update_fields(rollout_id="r2"), **signed(art, expires="2020-01-01T00:00:00Z")}))


def test_manifest_for_another_fleet_or_group_is_refused(art):
    other_fleet = parse_update({"id": "c", **art.update_fields(rollout_id="r2"), **signed(art, fleet="acme")})
    with pytest.raises(ArtifactError, match="meant for fleet 'acme'"):
        check(other_fleet, facts(fleet="globex"))
    other_group = parse_update({"id": "c", **art.update_fields(rollout_id="r2"), **signed(art, groups=["canary"])})
    with pytest.raises(ArtifactError, match="meant for groups canary"):
        check(other_group, facts(group="default"))
    check(other_group, facts(group="canary"))


def test_artifact_for_an_unknown_profile_is_refused(art):
    raw = {**art.raw, "profile": "toaster"}
    with pytest.raises(ArtifactError, match="does not know"):
        check(request(art, manifest=raw, signature=sign_manifest(raw, KEY)))


def test_profile_compatibility_is_accelerator_and_dtypes():
    assert profile_compatible(PROFILE, load_profile("rpi4"), "rpi4") is None
    assert "accelerator" in profile_compatible(PROFILE, load_profile("coral-usb"), "coral-usb")


def test_model_larger_than_the_device_limit_is_refused(art, tmp_path: Path):
    small = tmp_path / "small.yaml"
    small.write_text((profile_dir() / "x86-dev.yaml").read_text()
                     .replace("limits: {max_model_mb: 256, latency_budget_ms: 200}",
                              "limits: {max_model_mb: 256, latency_budget_ms: 200, max_download_mb: 0.001}"))
    prof = load_profile(small)
    with pytest.raises(ArtifactError, match="at most"):
        check_manifest(request(art), DeviceFacts(prof, (KEY.public_key(),), "1", None, NOW), lambda n: PROFILE)


def test_truncated_or_padded_file_is_refused(art, tmp_path: Path):
    data = art.model_path.read_bytes()
    short, long = tmp_path / "short.tflite", tmp_path / "long.tflite"
    short.write_bytes(data[:-1])
    long.write_bytes(data + b"\0")
    for path in (short, long):
        with pytest.raises(ArtifactError, match="truncated or padded"):
            check_model_file(path, art.manifest.model)
    with pytest.raises(ArtifactError, match="truncated or padded"):
        check_model_bytes(data[:-1], art.manifest.model, "download")


def test_corrupted_or_substituted_file_is_refused(art, tmp_path: Path):
    data = bytearray(art.model_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted or substituted"):
        check_model_file(bad, art.manifest.model)
    with pytest.raises(ArtifactError, match="corrupted or substituted"):
        check_model_bytes(bytes(data), art.manifest.model, "download")
    check_model_file(art.model_path, art.manifest.model)  # the real file passes


def test_missing_model_file_is_an_artifact_error(art, tmp_path: Path):
    with pytest.raises(ArtifactError, match="cannot read"):
        check_model_file(tmp_path / "absent.tflite", art.manifest.model)


def test_contract_change_needs_new_contract(art, tmp_path: Path):
    wide = build_artifact(OTA_MODELS / "clf_wide.tflite", tmp_path / "w", version="3")
    with pytest.raises(ArtifactError, match="outputs changed"):
        check_contract(wide.manifest, art.manifest)
    flagged = build_artifact(OTA_MODELS / "clf_wide.tflite", tmp_path / "w2", version="3", new_contract=True)
    check_contract(flagged.manifest, art.manifest)


@pytest.mark.parametrize("rid", ["../../etc", "a/b", "", ".."])
def test_rollout_id_that_would_escape_state_dir_is_refused(art, rid):
    with pytest.raises(ConfigError, match="rollout_id"):
        parse_update({**art.update_fields(rollout_id=rid), "id": rid})


def test_manifest_naming_a_file_outside_the_slot_is_refused(art):
    raw = copy.deepcopy(art.raw)
    raw["model"]["file"] = "../../model.tflite"
    with pytest.raises(ArtifactError, match="plain file name"):
        parse_update({**art.update_fields(), "manifest": raw})


def test_slot_store_refuses_names_that_escape(tmp_path: Path):
    store = SlotStore(tmp_path)
    for bad in ("../x", "/etc", "a/../../b", ".."):
        with pytest.raises(ConfigError):
            store.slot_dir(bad)


def test_rollback_command_needs_a_version_or_null():
    assert parse_rollback({"id": "c1", "to": None}).to is None
    with pytest.raises(ConfigError):
        parse_rollback({"id": "c1", "to": "latest"})


POLICY = ProbationPolicy(inferences=50, seconds=30, max_error_rate=0.01, min_agreement=0.9,
                         shadow_fraction=0.25, max_latency_ms=100)


def counters(**kw) -> ProbationCounters:
    base = {"calls": 0, "errors": 0, "nonfinite": 0, "p95_ms": 1.0, "shadow": 0, "agree": 0, "synthetic": 0}
    base.update(kw)
    return ProbationCounters(**base)


def test_probation_commits_after_enough_healthy_inferences():
    assert judge(counters(calls=50, shadow=12, agree=12), POLICY, 1.0).decision == "commit"
    assert judge(counters(calls=10), POLICY, 1.0).decision == "continue"


def test_rollback_after_nan_outputs_in_probation():
    v = judge(counters(calls=3, nonfinite=1), POLICY, 0.1)
    assert v.decision == "rollback" and "NaN" in v.reason


def test_rollback_after_errors_in_probation():
    v = judge(counters(calls=20, errors=2, last_error="ModelError: boom"), POLICY, 1.0)
    assert v.decision == "rollback" and "boom" in v.reason


def test_rollback_after_slow_inferences_in_probation():
    assert judge(counters(calls=20, p95_ms=500.0), POLICY, 1.0).decision == "rollback"


def test_rollback_after_low_shadow_agreement():
    v = judge(counters(calls=50, shadow=12, agree=6), POLICY, 1.0)
    assert v.decision == "rollback" and "agreement" in v.reason


def test_no_traffic_commits_on_golden_evidence_at_the_time_limit():
    v = judge(counters(calls=0, synthetic=4), POLICY, 31.0)
    assert v.decision == "commit" and "no live traffic" in v.reason


def test_journal_commit_keeps_k_versions_and_round_trips():
    j = Journal()
    for i, slot in enumerate(["a", "b", "c", "d"], start=1):
        j = j.with_pending(Pending("update", f"r{i}", str(i), OtaState.PROBATION, slot=slot))
        j = j.committed(slot, str(i), keep=3, outcome=Outcome(f"r{i}", str(i), OtaState.COMMITTED))
    assert j.active == "d" and j.history == ("c", "b") and set(j.versions) == {"b", "c", "d"}
    assert Journal.from_json(j.to_json()) == j


def test_shadow_agreement_compares_the_top1_of_the_first_output():
    watcher = ProbationWatcher(ProbationPolicy(inferences=100, seconds=30, max_error_rate=0.01, min_agreement=0.9,
                                               shadow_fraction=1.0, max_latency_ms=100))
    x = np.zeros((1, 4), np.int8)
    watcher(x, {"a_scores": np.array([[0.1, 0.9, 0.0]]), "b_other": np.zeros((1, 2))}, 0.001, None)
    watcher(x, np.array([[0.8, 0.1, 0.1]]), 0.001, None)
    previous = iter([{"a_scores": np.array([[0.0, 1.0, 0.0]])}, np.array([[0.0, 0.0, 1.0]])])
    watcher.run_shadow(lambda _x: next(previous))
    c = watcher.counters()
    assert (c.shadow, c.agree) == (2, 1)


def test_call_stuck_past_its_deadline_rolls_back_and_is_never_committed():
    lenient = ProbationPolicy(inferences=1000, seconds=30, max_error_rate=0.5, min_agreement=0.9,
                              shadow_fraction=0.25, max_latency_ms=100)
    for c, elapsed in ((counters(calls=10, stuck=1, stuck_s=3.2, deadline_s=0.5), 1.0),
                       (counters(calls=1000, stuck=1, stuck_s=0.6, deadline_s=0.5), 1.0),  # enough calls
                       (counters(calls=0, synthetic=4, stuck=1, stuck_s=0.6, deadline_s=0.5), 31.0)):  # time up
        v = judge(c, lenient, elapsed)
        assert v.decision == "rollback" and "1 inference call(s) stuck past the 0.5 s deadline" in v.reason


def test_wrong_shape_requests_are_counted_apart_and_never_judged():
    watcher = ProbationWatcher(POLICY)
    x = np.zeros((1, 4), np.int8)
    for _ in range(5):
        watcher(x, None, 0.0001, InputError("expected shape [1, 32, 32, 3], got [1, 4]"))
    watcher(x, np.array([[0.8, 0.1, 0.1]]), 0.001, None)
    c = watcher.counters()
    assert (c.input_errors, c.errors, c.calls) == (5, 0, 1)
    assert judge(replace(c, calls=50), POLICY, 1.0).decision == "commit"
