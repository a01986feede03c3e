"""Attacks on the OTA path, through an OtaManager + ModelHost driven like the real agent.

Each test names the attack; each asserts what a user sees: the version served, answers that keep
coming, and the refusal reason in the reply or the event.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import time

import numpy as np
import pytest

from agent.host import ModelHost
from agent.ota import OtaManager
from edgefleet.commands import CommandProcessor
from edgefleet.errors import ArtifactError, SignatureError
from edgefleet.messages import decode
from edgefleet.signing import sign_manifest
from edgefleet.statements import make_statement
from edgefleet.testing.artifacts import build_artifact
from tests.integration import test_ota_manager as base
from tests.integration.test_ota_manager import FAST, KEY, PROFILE, Device
from tests.support.models import OTA_MODELS

# A 1.3 KB model whose one Tile op needs an 8 GiB tensor: tf.tile(x[1,1], [1 << 14, 1 << 17]) then
# reduce_sum, converted by TFLiteConverter (tensorflow 2.21). Never load it without a memory limit.
MEMORY_HOG = base64.b64decode(
    "HAAAAFRGTDMUACAAHAAYABQAEAAMAAAACAAEABQAAAAcAAAAHAAAAGwAAACIAQAAmAEAANgEAAADAAAAAAAAAAIAAAAsAAAA"
    "BAAAABD+//8KAAAABAAAABMAAABDT05WRVJTSU9OX01FVEFEQVRBADT+//8JAAAABAAAABMAAABtaW5fcnVudGltZV92ZXJz"
    "aW9uAAsAAAAYAQAAEAEAAPgAAADYAAAAxAAAAKwAAACkAAAAnAAAAJQAAAB0AAAABAAAADL///8EAAAAYAAAABAAAAAAAAAA"
    "CAAOAAgABAAIAAAAEAAAACQAAAAAAAYACAAEAAYAAAAEAAAAAAAAAAwAGAAUABAADAAEAAwAAADjHwFF2/nTxwMAAAACAAAA"
    "BAAAAAYAAAAyLjIxLjAAAJ7///8EAAAAEAAAADEuMTAuMQAAAAAAAAAAAABc/P//YPz//2T8///G////BAAAAAgAAAAAQAAA"
    "AAACANr///8EAAAABAAAAAEAAADq////BAAAAAgAAAAAAAAAAAAAAAAABgAIAAQABgAAAAQAAAAIAAAAAQAAAAEAAAC8/P//"
    "wPz//w8AAABNTElSIENvbnZlcnRlZC4AAQAAABQAAAAAAA4AGAAUABAADAAIAAQADgAAABQAAAAcAAAA+AAAAPwAAAAAAQAA"
    "BAAAAG1haW4AAAAAAwAAALwAAABwAAAAFAAAAAAADgAYABQAEAAMAAsABAAOAAAAHAAAAAAAACAgAAAAJAAAAAIAAAAIAAwA"
    "CAAEAAgAAAACAAAAAwAAAAEAAAAHAAAABAAAAAYAAAACAAAAAQAAAAEAAAAAAA4AGgAUABAADAALAAQADgAAABwAAAAAAAAb"
    "HAAAACAAAAABAAAAAAAGAAgABwAGAAAAAAAAAQEAAAAGAAAAAgAAAAUAAAADAAAAAAAKAAwAAAAIAAQACgAAAAgAAAAMAAAA"
    "AQAAAAUAAAACAAAAAAAAAAQAAAABAAAABwAAAAEAAAAAAAAACAAAAOABAACIAQAAMAEAAOwAAACsAAAAdAAAAEAAAAAEAAAA"
    "Vv7//wAAAAEQAAAAEAAAAAgAAAAYAAAAQP7//wgAAABJZGVudGl0eQAAAAACAAAAAQAAAAEAAACO/v//AAAAARAAAAAQAAAA"
    "BwAAABAAAAB4/v//AwAAAFN1bQACAAAAAEAAAAEAAAC+/v//AAAAARAAAAAQAAAABgAAABQAAACo/v//BAAAAFRpbGUAAAAA"
    "AgAAAABAAAAAAAIARv///wAAAAEUAAAAFAAAAAUAAAAAAAACHAAAAOD+//8OAAAAVGlsZS9tdWx0aXBsZXMAAAEAAAACAAAA"
    "gv///wAAAAEUAAAAFAAAAAQAAAAAAAACJAAAABz///8VAAAAU3VtL3JlZHVjdGlvbl9pbmRpY2VzAAAAAAAAAML///8AAAAB"
    "FAAAABQAAAADAAAAAAAAAhwAAABc////DQAAAHN0cmlkZWRfc2xpY2UAAAABAAAAAgAAAAAAFgAcABgAFwAQAAwACAAAAAAA"
    "AAAHABYAAAAAAAABFAAAABQAAAACAAAAAAAAAhwAAACw////DgAAAGFyaXRoLmNvbnN0YW50AAABAAAAAgAAAAAAFgAYABQA"
    "AAAQAAwACAAAAAAAAAAHABYAAAAAAAABFAAAABQAAAABAAAAFAAAAAQABAAEAAAAAQAAAHgAAAACAAAAAQAAAAEAAAADAAAA"
    "MAAAABQAAAAEAAAA6P///y0AAAAAAAAt9P///0oAAAAAAABKDAAMAAsAAAAAAAQADAAAAEUAAAAAAABF"
)


arts = base.arts  # the same module-scoped artifacts (v1, v2, v3, ...)


def committed(device: Device, art, rollout_id: str) -> None:
    device.update(art, rollout_id)
    assert device.final(rollout_id)["state"] == "committed"
    device.ota.wait_idle(10)


@pytest.fixture
def on_v3(tmp_path, arts):
    d = Device(tmp_path / "state", arts)
    committed(d, arts["v2"], "r2")
    committed(d, arts["v3"], "r3")
    yield d
    d.close()


# ---------------------------------------------------------------- downgrade and rollback
def test_replayed_update_after_unsigned_rollback_is_refused(on_v3, arts):
    captured = {"id": "r2-replay", **arts["v2"].update_fields(rollout_id="r2-replay")}  # same manifest + signature
    with pytest.raises(SignatureError, match="below the anti-downgrade floor 3: a signed rollback statement"):
        on_v3.ota.handle_rollback({"id": "rb-unsigned", "to": "1"})
    assert on_v3.events[-1]["state"] == "failed" and "statement" in on_v3.events[-1]["reason"]
    with pytest.raises(ArtifactError, match="not newer than 3, the highest version ever committed"):
        on_v3.ota.handle_update(captured)
    assert on_v3.host.model_info["version"] == "3" and on_v3.ota.status()["floor"] == "3"
    assert on_v3.events[-1]["state"] == "rejected"


def test_replayed_update_after_a_signed_rollback_is_still_below_the_floor_even_after_a_restart(on_v3, arts,
                                                                                                tmp_path):
    on_v3.rollback("rb1", "1")
    assert on_v3.final("rb1")["state"] == "committed"
    on_v3.ota.wait_idle(10)
    assert on_v3.host.model_info["version"] == "1"
    on_v3.close()
    again = Device(tmp_path / "state", arts, quiet=True)
    try:
        assert again.ota.status()["floor"] == "3" and again.host.model_info["version"] == "1"
        with pytest.raises(ArtifactError, match="anti-downgrade floor"):
            again.update(arts["v2"], "r2-replay")
        assert again.host.model_info["version"] == "1"
    finally:
        again.close()


def test_replayed_rollback_statement_is_refused(on_v3, arts):
    statement, signature = make_statement("rollback", KEY, device="device", version="2")
    cmd = {"to": "2", "statement": statement, "statement_signature": signature}
    on_v3.ota.handle_rollback({"id": "rb1", **cmd})
    assert on_v3.final("rb1")["state"] == "committed"
    on_v3.ota.wait_idle(10)
    on_v3.rollback("rb-up", "3")  # back to the floor: needs no statement
    assert on_v3.final("rb-up")["state"] == "committed"
    on_v3.ota.wait_idle(10)
    with pytest.raises(ArtifactError, match="already used"):
        on_v3.ota.handle_rollback({"id": "rb1-replay", **cmd})
    assert on_v3.host.model_info["version"] == "3"


@pytest.mark.parametrize(("target", "why"), [({"device": "someone-else"}, "is for device 'someone-else'"),
                                             ({"group": "canary"}, "is for group 'canary'"),
                                             ({"device": "device", "version": "2"}, "allows version 2, not 1")])
def test_rollback_statement_for_another_device_group_or_version_is_refused(on_v3, target, why):
    statement, signature = make_statement("rollback", KEY, version=target.pop("version", "1"), **target)
    with pytest.raises(ArtifactError, match=why):
        on_v3.ota.handle_rollback({"id": "rb", "to": "1", "statement": statement, "statement_signature": signature})
    assert on_v3.host.model_info["version"] == "3"


def test_development_mode_rollback_needs_no_statement_but_the_floor_still_stops_a_replay(tmp_path, arts):
    events: list[dict] = []
    host = ModelHost(PROFILE, autotune=False)
    ota = OtaManager(tmp_path / "state", PROFILE, [], host, events.append, reserve_free_mb=0)
    try:
        ota.boot()
        ota.install_initial(arts["v1"].dir)
        for art, rid in ((arts["v2"], "r2"), (arts["v3"], "r3")):
            ota.handle_update({"id": rid, **art.update_fields(rollout_id=rid)})
            assert ota.wait_idle(30) and ota.status()["last"]["state"] == "committed"
        ota.handle_rollback({"id": "rb", "to": "1"})
        assert ota.wait_idle(30) and host.model_info["version"] == "1"
        with pytest.raises(ArtifactError, match="anti-downgrade floor"):
            ota.handle_update({"id": "r2-replay", **arts["v2"].update_fields(rollout_id="r2-replay")})
        assert host.model_info["version"] == "1"
    finally:
        ota.close()
        host.close()


# ---------------------------------------------------------------- manifests
def signed_update(art, rollout_id: str, **fields) -> dict:
    raw = {**copy.deepcopy(art.raw), **fields}
    return {"id": rollout_id, **art.update_fields(rollout_id=rollout_id), "manifest": raw,
            "signature": sign_manifest(raw, KEY)}


def test_frozen_mirror_replaying_an_expired_manifest_is_refused(tmp_path, arts):
    d = Device(tmp_path / "state", arts, quiet=True)
    try:
        with pytest.raises(ArtifactError, match="expired at 2020-01-01T00:00:00Z"):
            d.ota.handle_update(signed_update(arts["v2"], "r-old", expires="2020-01-01T00:00:00Z"))
        assert d.events[-1]["state"] == "rejected" and "expired" in d.events[-1]["reason"]
        assert d.host.model_info["version"] == "1"
    finally:
        d.close()


def test_another_fleets_model_is_refused(tmp_path, arts):
    d = Device(tmp_path / "state", arts, quiet=True, fleet="globex", group="lobby")
    try:
        with pytest.raises(ArtifactError, match="meant for fleet 'acme'"):
            d.ota.handle_update(signed_update(arts["v2"], "r-acme", fleet="acme"))
        with pytest.raises(ArtifactError, match="meant for groups canary"):
            d.ota.handle_update(signed_update(arts["v2"], "r-canary", fleet="globex", groups=["canary"]))
        d.ota.handle_update(signed_update(arts["v2"], "r-ours", fleet="globex", groups=["lobby"]))
        assert d.final("r-ours")["state"] == "committed"
    finally:
        d.close()


def test_manifest_with_an_overflowing_number_from_the_wire_is_rejected_with_a_reason(tmp_path, arts):
    # 1e400 is valid JSON text that strict decoding still turns into float('inf').
    payload = json.dumps({"id": "c-inf", "ts": time.time(), **arts["v2"].update_fields(rollout_id="r-inf")}).replace(
        '"converter_version"', '"fidelity": {"top1": 1e400}, "converter_version"').encode()
    assert decode(payload)["manifest"]["fidelity"]["top1"] == float("inf")
    d = Device(tmp_path / "state", arts, quiet=True)
    try:
        processor = CommandProcessor("device", {"update": d.ota.handle_update}, memory_path=None)
        reply = processor.handle("update", payload)
        assert reply["ok"] is False and "internal error" not in reply["error"]
        assert "not plain JSON" in reply["error"]
        assert d.events[-1]["state"] == "rejected" and d.host.model_info["version"] == "1"
    finally:
        d.close()


# ---------------------------------------------------------------- the validation sandbox
def test_model_that_needs_gigabytes_is_rejected_by_the_memory_limit_and_the_agent_keeps_serving(tmp_path, arts):
    raw = copy.deepcopy(arts["v2"].raw)
    raw.update(model={"file": "model.tflite", "sha256": hashlib.sha256(MEMORY_HOG).hexdigest(), "size": len(MEMORY_HOG)},
               inputs=[{"name": "x", "shape": [1, 1], "dtype": "float32"}],
               outputs=[{"name": "output_0", "shape": [1, 1], "dtype": "float32"}], new_contract=True)
    raw.pop("golden", None)
    hog = tmp_path / "hog.tflite"
    hog.write_bytes(MEMORY_HOG)
    d = Device(tmp_path / "state", arts)
    try:
        d.ota.handle_update({"id": "r-hog", "rollout_id": "r-hog", "manifest": raw,
                             "signature": sign_manifest(raw, KEY), "artifact_url": hog.as_uri()})
        final = d.final("r-hog", timeout=60)
        assert final["state"] == "rejected" and "RLIMIT_AS" in final["reason"], final
        assert d.host.model_info["version"] == "1"
        d.host.infer(np.zeros((1, 32, 32, 3), np.int8))
    finally:
        d.close()


# ---------------------------------------------------------------- what a model may do once served
def test_cache_allowed_false_is_honoured_for_a_model_served_from_its_slot(tmp_path):
    v1 = build_artifact(OTA_MODELS / "clf_a.tflite", tmp_path / "v1", version="1", key=KEY, golden_samples=1)
    v2 = build_artifact(OTA_MODELS / "clf_a2.tflite", tmp_path / "v2", version="2", key=KEY, golden_samples=1,
                        probation=FAST, cache_allowed=False)
    host = ModelHost(PROFILE, cache=True, autotune=False)
    ota = OtaManager(tmp_path / "state", PROFILE, [KEY.public_key()], host, lambda e: None, reserve_free_mb=0)
    try:
        ota.boot()
        ota.install_initial(v1.dir)
        assert host.stats()["engine"]["cache"]["enabled"] is not False, "v1 allows the cache"
        ota.handle_update({"id": "r2", **v2.update_fields(rollout_id="r2")})
        assert ota.wait_idle(30) and host.model_info["version"] == "2"
        assert host.stats()["engine"]["cache"] == {"enabled": False, "reason": "manifest says cache_allowed: false"}
        ota.close()
        host.close()
        host = ModelHost(PROFILE, cache=True, autotune=False)  # and after a restart, from the slot
        ota = OtaManager(tmp_path / "state", PROFILE, [KEY.public_key()], host, lambda e: None)
        ota.boot()
        assert host.model_info["version"] == "2"
        assert host.stats()["engine"]["cache"]["reason"] == "manifest says cache_allowed: false"
    finally:
        ota.close()
        host.close()
