"""OtaManager end to end: real ModelHost/Engine, real child-process validation, real loopback HTTP.

Each attack test checks three things: the update ends ``rejected`` (or ``rolled_back``) with a
reason in the event, the device still serves version 1, and live requests keep succeeding.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.host import ModelHost
from agent.ota import OtaManager
from edgefleet.errors import ArtifactError, ConfigError, SignatureError
from edgefleet.profiles import load_profile
from edgefleet.signing import Ed25519PrivateKey, sign_manifest
from edgefleet.statements import make_statement
from edgefleet.testing.artifacts import build_artifact
from edgefleet.testing.http_server import ArtifactServer
from edgefleet.testing.waiting import wait_for
from tests.support.models import OTA_MODELS

KEY = Ed25519PrivateKey.generate()
PROFILE = load_profile("x86-dev")
FAST = {"inferences": 10, "seconds": 1}


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    base = tmp_path_factory.mktemp("ota-arts")

    def make(model, name, version, **kw):
        kw.setdefault("probation", FAST)
        return build_artifact(OTA_MODELS / f"{model}.tflite", base / name, version=version, key=KEY,
                              golden_samples=2, **kw)

    return {
        "v1": make("clf_a", "v1", "1"),
        "v2": make("clf_a2", "v2", "2"),
        "v3": make("clf_a", "v3", "3"),
        "disagree": make("clf_b", "disagree", "2", probation={"inferences": 40, "seconds": 10}),
        "wide": make("clf_wide", "wide", "2"),
        "nan": make("nan", "nan", "2", new_contract=True),
        "custom_op": make("custom_op", "custom_op", "2", new_contract=True),
        "slow": make("slow", "slow", "2"),
    }


@pytest.fixture(scope="module")
def http():
    with ArtifactServer() as srv:
        yield srv


class Traffic:
    """Live requests on the host from a background thread, counting failures."""

    def __init__(self, host: ModelHost, interval_s: float = 0.002) -> None:
        self.host, self.interval_s = host, interval_s
        self.ok, self.failed = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(1)
        while not self._stop.is_set():
            try:
                self.host.infer(rng.integers(-128, 128, (1, 32, 32, 3)).astype(np.int8))
                self.ok += 1
            except Exception as exc:  # noqa: BLE001
                self.failed.append(exc)
            time.sleep(self.interval_s)

    def __enter__(self) -> Traffic:  # noqa: PYI034 (py310: no typing.Self)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Device:
    """An OtaManager + ModelHost with v1 installed and, unless ``quiet``, live background traffic."""

    def __init__(self, state_dir: Path, arts, profile=PROFILE, quiet: bool = False, **kw) -> None:
        self.events: list[dict] = []
        self.host = ModelHost(profile, autotune=False)
        self.traffic: Traffic | None = None
        kw = {"reserve_free_mb": 0, "backoff_s": 0.01, "download_timeout_s": 2.0, **kw}
        self.ota = OtaManager(state_dir, profile, [KEY.public_key()], self.host, self.events.append, **kw)
        self.ota.boot()
        self.ota.install_initial(arts["v1"].dir)
        if not quiet:
            self.traffic = Traffic(self.host, interval_s=0.003).__enter__()

    def update(self, art, rollout_id: str, url: str | None = None, **changes) -> dict:
        return self.ota.handle_update({"id": rollout_id, **art.update_fields(url, rollout_id=rollout_id), **changes})

    def rollback(self, rollout_id: str, to: str | None, version: str | None = None) -> dict:
        """A rollback signed by the fleet key (needed below the anti-downgrade floor)."""
        statement, signature = make_statement("rollback", KEY, device="device", version=version or to)
        return self.ota.handle_rollback({"id": rollout_id, "to": to, "statement": statement,
                                         "statement_signature": signature})

    def final(self, rollout_id: str, timeout: float = 20) -> dict:
        return wait_for(lambda: next((e for e in self.events if e.get("rollout_id") == rollout_id
                                      and e["state"] in ("committed", "rejected", "failed", "rolled_back")), None),
                        timeout, what=f"terminal event for {rollout_id}")

    def states(self, rollout_id: str) -> list[str]:
        return [e["state"] for e in self.events if e.get("rollout_id") == rollout_id]

    def close(self) -> None:
        if self.traffic is not None:
            self.traffic.__exit__()
            assert self.traffic.failed == [], self.traffic.failed[:3]
        self.ota.close()
        self.host.close()


@pytest.fixture
def device(tmp_path, arts):
    d = Device(tmp_path / "state", arts)
    yield d
    d.close()


def assert_still_serving_v1(device: Device, traffic: Traffic | None = None) -> None:
    assert device.host.model_info["version"] == "1"
    assert device.ota.status()["active"]["version"] == "1"
    device.host.infer(np.zeros((1, 32, 32, 3), np.int8))
    if traffic is not None:
        assert traffic.failed == []


# ---------------------------------------------------------------- the healthy path
def test_update_over_http_passes_every_state_and_commits_without_failing_a_request(device, arts, http):
    url = http.add("/v2/model.tflite", arts["v2"].model_path.read_bytes())
    with Traffic(device.host) as traffic:
        assert device.update(arts["v2"], "r-ok", url)["state"] == "queued"
        final = device.final("r-ok")
    assert final["state"] == "committed", final
    assert device.states("r-ok") == ["queued", "downloading", "verifying", "validating", "installing",
                                     "probation", "committed"]
    assert traffic.failed == [] and traffic.ok > 10
    assert device.host.model_info["version"] == "2"
    status = device.ota.status()
    assert status["active"]["version"] == "2" and [k["version"] for k in status["kept"]] == ["1"]


def test_update_resumes_a_broken_transfer_with_range(device, arts, http):
    data = arts["v2"].model_path.read_bytes()
    url = http.add("/cut/model.tflite", data, cut_after=len(data) // 2, cut_times=1)
    device.update(arts["v2"], "r-cut", url)
    assert device.final("r-cut")["state"] == "committed"
    assert http.requests_for("/cut/model.tflite")[1].startswith("bytes=")


def test_duplicate_delivery_of_the_same_update_is_idempotent(device, arts):
    device.update(arts["v2"], "r-dup")
    again = device.update(arts["v2"], "r-dup")
    assert again["accepted"] is True
    assert device.final("r-dup")["state"] == "committed"
    assert device.states("r-dup").count("queued") == 1


def test_operator_rollback_to_previous_then_named_version(device, arts):
    device.update(arts["v2"], "r2")
    assert device.final("r2")["state"] == "committed"
    device.ota.wait_idle(10)
    device.update(arts["v3"], "r3")
    assert device.final("r3")["state"] == "committed"
    device.ota.wait_idle(10)
    device.rollback("rb1", None, version="2")
    done = device.final("rb1")
    assert done == {"event": "ota", "rollout_id": "rb1", "version": "2", "state": "committed", "rollback": True}
    device.ota.wait_idle(10)
    device.rollback("rb2", "1")
    assert device.final("rb2")["version"] == "1"
    assert device.host.model_info["version"] == "1"


def test_serving_changed_hook_runs_after_each_commit_and_rollback_and_cannot_break_them(tmp_path, arts, caplog):
    seen: list[str] = []

    def hook() -> None:
        seen.append(d.host.model_info["version"])
        raise RuntimeError("the service tripped")  # logged, never raised into the OTA worker

    d = Device(tmp_path / "state", arts, quiet=True, on_serving_changed=hook)
    try:
        d.update(arts["v2"], "r2")
        assert d.final("r2")["state"] == "committed"
        d.ota.wait_idle(10)
        d.rollback("rb", None, version="1")
        assert d.final("rb")["state"] == "committed"
        d.ota.wait_idle(10)
        with pytest.raises(ArtifactError):
            d.update(arts["v1"], "r1-replay")  # rejected: the served model does not change
        assert seen == ["2", "1"]
        assert d.ota.status()["active"]["version"] == "1" and d.ota.status()["last"]["reported"]
        assert "on_serving_changed failed" in caplog.text
    finally:
        d.close()


def test_rollback_to_a_version_not_kept_is_refused(device):
    with pytest.raises(ConfigError, match="not kept"):
        device.ota.handle_rollback({"id": "rb", "to": "7"})
    assert device.events[-1]["state"] == "failed" and "not kept" in device.events[-1]["reason"]
    assert device.host.model_info["version"] == "1"


# ---------------------------------------------------------------- probation
def test_rollback_after_low_shadow_agreement_in_probation(device, arts):
    with Traffic(device.host, interval_s=0.001) as traffic:
        device.update(arts["disagree"], "r-dis")
        final = device.final("r-dis")
    assert final["state"] == "rolled_back" and "agreement" in final["reason"]
    assert "installing" in device.states("r-dis") and "probation" in device.states("r-dis")
    assert device.ota.last_revert_s is not None and device.ota.last_revert_s < 1.0
    assert_still_serving_v1(device, traffic)


def test_no_live_traffic_commits_on_golden_evidence(tmp_path, arts):
    quiet = build_artifact(OTA_MODELS / "clf_a2.tflite", tmp_path / "quiet", version="2", key=KEY, golden_samples=2,
                           probation={"inferences": 50, "seconds": 0.5})
    d = Device(tmp_path / "state", arts, quiet=True)
    try:
        d.update(quiet, "r-quiet")
        final = d.final("r-quiet")
        assert final["state"] == "committed"
        assert final["probation"]["calls"] == 0 and final["probation"]["synthetic"] == 2
    finally:
        d.close()


# ---------------------------------------------------------------- attacks and bad inputs
def test_corrupted_file_is_rejected(device, arts, http):
    data = bytearray(arts["v2"].model_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    url = http.add("/corrupt/model.tflite", bytes(data))
    with Traffic(device.host) as traffic:
        device.update(arts["v2"], "r-corrupt", url)
        final = device.final("r-corrupt")
    assert final["state"] == "rejected" and "corrupted or substituted" in final["reason"]
    assert_still_serving_v1(device, traffic)


def test_truncated_file_is_rejected(device, arts, tmp_path):
    short = tmp_path / "short.tflite"
    short.write_bytes(arts["v2"].model_path.read_bytes()[:1000])
    device.update(arts["v2"], "r-short", short.as_uri())
    final = device.final("r-short")
    assert final["state"] == "rejected" and "ended at 1000" in final["reason"]
    assert_still_serving_v1(device)


def test_wrong_hash_in_signed_manifest_is_rejected(device, arts):
    raw = copy.deepcopy(arts["v2"].raw)
    raw["model"]["sha256"] = "ab" * 32
    device.update(arts["v2"], "r-hash", manifest=raw, signature=sign_manifest(raw, KEY))
    final = device.final("r-hash")
    assert final["state"] == "rejected" and "sha256" in final["reason"]
    assert_still_serving_v1(device)


def test_missing_signature_is_refused(device, arts):
    with pytest.raises(SignatureError):
        device.update(arts["v2"], "r-nosig", signature=None)
    assert device.events[-1]["state"] == "rejected" and "not signed" in device.events[-1]["reason"]
    assert_still_serving_v1(device)


def test_bad_signature_is_refused(device, arts):
    with pytest.raises(SignatureError):
        device.update(arts["v2"], "r-badsig", signature=sign_manifest(arts["v2"].raw, Ed25519PrivateKey.generate()))
    assert device.events[-1]["state"] == "rejected" and "does not verify" in device.events[-1]["reason"]
    assert_still_serving_v1(device)


def test_model_with_a_custom_op_the_runtime_lacks_is_rejected(device, arts):
    device.update(arts["custom_op"], "r-op")
    final = device.final("r-op")
    assert final["state"] == "rejected" and "MatrixInverse" in final["reason"]
    assert_still_serving_v1(device)


def test_model_that_outputs_nan_is_rejected(device, arts):
    device.update(arts["nan"], "r-nan")
    final = device.final("r-nan")
    assert final["state"] == "rejected" and "NaN" in final["reason"]
    assert_still_serving_v1(device)


def test_model_too_slow_for_the_budget_is_rejected(tmp_path, arts):
    # slow.tflite takes ~2 ms here and clf_a ~0.05 ms: a 0.5 ms budget separates them on any CI box.
    src = (Path(__file__).resolve().parents[2] / "device_profiles" / "x86-dev.yaml").read_text()
    path = tmp_path / "x86-dev-tight.yaml"
    path.write_text(src.replace("name: x86-dev", "name: x86-dev-tight").replace("latency_budget_ms: 200",
                                                                                "latency_budget_ms: 0.5"))
    d = Device(tmp_path / "state", arts, profile=load_profile(path))
    try:
        d.update(arts["slow"], "r-slow")
        final = d.final("r-slow")
        assert final["state"] == "rejected" and "budget" in final["reason"]
        assert_still_serving_v1(d)
    finally:
        d.close()


def test_contract_change_without_new_contract_is_rejected(device, arts):
    device.update(arts["wide"], "r-wide")
    final = device.final("r-wide")
    assert final["state"] == "rejected" and "outputs changed" in final["reason"]
    assert_still_serving_v1(device)


def test_full_disk_is_rejected_before_downloading(tmp_path, arts):
    # Simulated full disk: a free-space reserve larger than the disk (the check is size + reserve <= free).
    d = Device(tmp_path / "state", arts, reserve_free_mb=1 << 40)
    try:
        d.update(arts["v2"], "r-full")
        final = d.final("r-full")
        assert final["state"] == "rejected" and "free disk space" in final["reason"]
        assert_still_serving_v1(d)
    finally:
        d.close()


def test_404_is_rejected_without_retrying(device, arts, http):
    device.update(arts["v2"], "r-404", http.url("/nope/model.tflite"))
    final = device.final("r-404")
    assert final["state"] == "rejected" and "404" in final["reason"]
    assert len(http.requests_for("/nope/model.tflite")) == 1
    assert_still_serving_v1(device)


def test_hung_download_is_rejected_after_the_timeout(tmp_path, arts, http):
    url = http.add("/hang/model.tflite", arts["v2"].model_path.read_bytes(), hang_s=60)
    d = Device(tmp_path / "state", arts, download_timeout_s=0.3, download_retries=1)
    try:
        with Traffic(d.host) as traffic:
            d.update(arts["v2"], "r-hang", url)
            final = d.final("r-hang", timeout=10)
        assert final["state"] == "rejected" and "timed out" in final["reason"]
        assert_still_serving_v1(d, traffic)
    finally:
        d.close()


def test_oversize_artifact_is_refused(device, arts):
    raw = copy.deepcopy(arts["v2"].raw)
    raw["model"]["size"] = 300 * 1024 * 1024  # beyond max_download_mb 256
    with pytest.raises(ArtifactError, match="at most"):
        device.update(arts["v2"], "r-big", manifest=raw, signature=sign_manifest(raw, KEY))
    assert device.events[-1]["state"] == "rejected"
    assert_still_serving_v1(device)


def test_rollout_id_escaping_state_dir_is_refused(device, arts, tmp_path):
    with pytest.raises(ConfigError, match="rollout_id"):
        device.update(arts["v2"], "../../escape")
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()
    assert_still_serving_v1(device)


def test_manifest_file_name_escaping_the_slot_is_refused(device, arts):
    raw = copy.deepcopy(arts["v2"].raw)
    raw["model"]["file"] = "../../../model.tflite"
    with pytest.raises(ArtifactError, match="plain file name"):
        device.update(arts["v2"], "r-path", manifest=raw, signature=sign_manifest(raw, KEY))
    assert_still_serving_v1(device)


def test_replayed_older_manifest_is_refused(device, arts):
    device.update(arts["v2"], "r2")
    assert device.final("r2")["state"] == "committed"
    device.ota.wait_idle(10)
    with pytest.raises(ArtifactError, match="not newer"):
        device.update(arts["v2"], "r2-replay")
    with pytest.raises(ArtifactError, match="not newer"):
        device.update(arts["v1"], "r1-replay")
    assert device.events[-1]["state"] == "rejected"
    assert device.host.model_info["version"] == "2"


def test_update_while_another_is_in_flight_is_refused(device, arts):
    device.update(arts["v2"], "r-a")
    with pytest.raises(ConfigError, match="busy"):
        device.update(arts["v3"], "r-b")
    assert device.final("r-a")["state"] == "committed"


def test_rollback_after_nan_outputs_on_live_traffic_in_probation(tmp_path):
    # float_nan_live passes validation (golden and synthetic inputs are bright) but returns NaN on
    # the dark frames this device really sees: only probation on live traffic can catch it.
    v1 = build_artifact(OTA_MODELS / "float_ok.tflite", tmp_path / "v1", version="1", key=KEY, golden_samples=2)
    v2 = build_artifact(OTA_MODELS / "float_nan_live.tflite", tmp_path / "v2", version="2", key=KEY,
                        golden_samples=2, probation={"inferences": 50, "seconds": 10})
    events: list[dict] = []
    host = ModelHost(PROFILE, autotune=False)
    ota = OtaManager(tmp_path / "state", PROFILE, [KEY.public_key()], host, events.append, reserve_free_mb=0)
    ota.boot()
    ota.install_initial(v1.dir)
    dark = np.full((1, 32, 32, 3), -0.9, np.float32)
    stop, errors = threading.Event(), []

    def frames():
        while not stop.is_set():
            try:
                host.infer(dark)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
            time.sleep(0.002)

    feeder = threading.Thread(target=frames, daemon=True)
    feeder.start()
    try:
        ota.handle_update({"id": "r-nan-live", **v2.update_fields(rollout_id="r-nan-live")})
        final = wait_for(lambda: next((e for e in events if e["state"] in ("committed", "rolled_back", "rejected")),
                                      None), 20, what="terminal event")
        assert final["state"] == "rolled_back" and "NaN" in final["reason"], final
        assert "validating" in [e["state"] for e in events], "it passed validation first"
        assert host.model_info["version"] == "1"
        assert np.all(np.isfinite(host.infer(dark)))
        assert errors == []
    finally:
        stop.set()
        feeder.join()
        ota.close()
        host.close()


def test_damaged_committed_model_is_not_served_and_the_kept_version_serves_without_deleting_it(device, arts,
                                                                                               tmp_path):
    device.update(arts["v2"], "r2")
    assert device.final("r2")["state"] == "committed"
    device.ota.wait_idle(10)
    active = device.ota.status()["active"]["slot"]
    device.close()
    model = device.ota.store.model_path(active)
    data = bytearray(model.read_bytes())
    data[100] ^= 0xFF  # bit rot on the SD card
    model.write_bytes(bytes(data))
    again = Device(tmp_path / "state", arts, quiet=True)
    try:
        assert again.host.model_info["version"] == "1"
        status = again.ota.status()
        assert status["active"]["slot"] == active and model.exists(), "not demoted for good: retried next boot"
        assert "serving the kept version 1" in status["boot_error"]
        assert any(e["event"] == "model_error" for e in again.events)
    finally:
        again.close()


def test_initial_bare_tflite_is_installed_once_as_version_0(tmp_path):
    events: list[dict] = []
    host = ModelHost(PROFILE, autotune=False)
    ota = OtaManager(tmp_path / "state", PROFILE, [], host, events.append)
    try:
        assert ota.boot() is None
        info = ota.install_initial(OTA_MODELS / "clf_a.tflite")
        assert info["name"] == "clf_a" and info["version"] == "0"
        assert ota.install_initial(OTA_MODELS / "clf_b.tflite") is None, "a committed model already exists"
        assert host.model_info["name"] == "clf_a"
    finally:
        ota.close()
        host.close()


def test_contract_change_from_a_bare_initial_model_is_rejected(tmp_path, arts):
    # The initial model came without a manifest: the contract is read from the running engine.
    events: list[dict] = []
    host = ModelHost(PROFILE, autotune=False)
    ota = OtaManager(tmp_path / "state", PROFILE, [KEY.public_key()], host, events.append, reserve_free_mb=0)
    try:
        ota.boot()
        ota.install_initial(OTA_MODELS / "clf_a.tflite")
        ota.handle_update({"id": "r-wide0", **arts["wide"].update_fields(rollout_id="r-wide0")})
        final = wait_for(lambda: next((e for e in events if e["state"] == "rejected"), None), 20, what="rejection")
        assert "outputs changed" in final["reason"]
        assert host.model_info["name"] == "clf_a"
    finally:
        ota.close()
        host.close()
