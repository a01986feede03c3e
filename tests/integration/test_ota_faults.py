"""Faults on the device and the network during OTA: crash loops, a full disk, crawling or dropped
links, a cancel, a damaged journal, a bad read. Each test names the fault and asserts what a user
sees: the version served, answers that keep coming, and the reason in the terminal event.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

import agent.ota.manager as manager_module
from agent.ota.download import DownloadPolicy
from edgefleet.errors import ArtifactError, ConfigError
from tests.integration import test_ota_crash_points as crash
from tests.integration import test_ota_manager as base
from tests.integration.test_ota_manager import Device

arts = base.arts    # module-scoped signed artifacts: v1, v2, v3, slow (v2, 107 KB), ...
http = base.http    # one loopback ArtifactServer
setup = crash.setup  # artifacts + server for the real agent process (tests/support/ota_driver.py)


def policy(**kw) -> DownloadPolicy:
    return DownloadPolicy(**{"max_bytes": 1 << 30, "timeout_s": 2.0, "backoff_s": 0.1, "backoff_max_s": 1.0,
                             "reserve_bytes": 0, "chunk_bytes": 8192, **kw})


def staging_of(d: Device) -> list[str]:
    return sorted(p.name for p in d.ota.store.staging.iterdir())


def wait_for_part(d: Device, rollout_id: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not list((d.ota.store.staging / rollout_id).glob("*.part")):
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.005)


# ---------------------------------------------------------------- crash loops
def test_agent_killed_three_times_in_validating_rejects_the_update_instead_of_resuming_it(setup, tmp_path):
    rc, err = crash.run_driver(tmp_path, setup, "validated", "v2", False)
    assert rc == 137, err
    for _ in range(2):  # each boot resumes it, and it kills the agent again at the same step
        rc, err = crash.run_driver(tmp_path, setup, "validated", None, False)
        assert rc == 137, err
    rc, err = crash.run_driver(tmp_path, setup, None, None, False)  # the third boot gives up
    assert rc == 0, err
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["pending"] is None and status["serving"]["version"] == "1"
    assert status["last"]["state"] == "rejected"
    assert status["last"]["reason"] == "crashed the agent 3 times in validating; not resuming it again"
    assert status["failures"] == [] and status["staging"] == []


# ---------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs (root only) holding the agent's state_dir."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` until ``leave`` bytes are free (0: until the kernel says ENOSPC)."""
    filler = disk / "filler"
    with open(filler, "ab") as fh, contextlib.suppress(OSError):
        while (free := shutil.disk_usage(disk).free - leave) > 0:
            fh.write(b"\0" * min(free, 64 << 10))
            fh.flush()
    return filler


def test_update_on_a_nearly_full_disk_is_moved_into_its_slot_not_copied_twice(small_disk, arts):
    d = Device(small_disk / "state", arts, quiet=True)
    try:
        size = arts["slow"].manifest.model.size
        fill(small_disk, leave=size + (64 << 10))  # room for one copy (+ manifest, journal), not two
        d.update(arts["slow"], "r-tight")
        final = d.final("r-tight", timeout=60)
        assert final["state"] == "committed", final
        assert d.host.model_info["version"] == "2" and staging_of(d) == []
    finally:
        d.close()


def test_disk_filling_up_during_the_download_fails_the_update_and_the_next_one_works(small_disk, arts, http):
    data = arts["slow"].model_path.read_bytes()
    crawling = http.add("/fill/model.tflite", data, trickle_s=0.05, trickle_bytes=8192)
    d = Device(small_disk / "state", arts)
    try:
        d.update(arts["slow"], "r-full", crawling)
        wait_for_part(d, "r-full")
        filler = fill(small_disk)  # another writer takes the rest of the disk
        final = d.final("r-full", timeout=30)
        assert final["state"] == "failed" and "No space left on device" in final["reason"], final
        assert d.host.model_info["version"] == "1" and staging_of(d) == [], "temp files are cleaned"
        filler.unlink()
        d.update(arts["slow"], "r-next")  # the worker is alive and the space is back
        assert d.final("r-next", timeout=60)["state"] == "committed"
        assert d.host.model_info["version"] == "2"
    finally:
        d.close()


# ---------------------------------------------------------------- the network
def test_trickling_server_is_cut_off_by_the_download_deadline(tmp_path, arts, http):
    url = http.add("/trickle/model.tflite", arts["v2"].model_path.read_bytes(), trickle_s=0.5, trickle_bytes=1)
    d = Device(tmp_path / "state", arts,
               download_policy=policy(deadline_s=3.0, speed_window_s=1.0, min_bytes_per_s=1000.0))
    try:
        t0 = time.monotonic()
        d.update(arts["v2"], "r-trickle", url)
        final = d.final("r-trickle", timeout=20)
        # cut off by the overall deadline, the minimum speed, or (on a loaded machine) the read timeout
        assert final["state"] == "rejected" and any(
            why in final["reason"] for why in ("deadline", "too slow", "timed out")), final["reason"]
        assert time.monotonic() - t0 < 3.0 + 2.0 + 2.0, "deadline + one socket timeout, with slack"
        assert d.host.model_info["version"] == "1"
    finally:
        d.close()


def test_five_second_network_drop_does_not_fail_the_update(tmp_path, arts, http):
    data = arts["v2"].model_path.read_bytes()
    url = http.add("/drop/model.tflite", data, cut_after=len(data) // 2, cut_times=1)
    route = http.routes["/drop/model.tflite"]

    def outage() -> None:  # 503 from the first broken transfer on, for 5 s
        while route.served < 1:
            time.sleep(0.002)
        route.status = 503
        time.sleep(5.0)
        route.status = None

    d = Device(tmp_path / "state", arts, download_policy=policy(retry_budget_s=60.0, chunk_bytes=1024))
    try:
        threading.Thread(target=outage, daemon=True).start()
        d.update(arts["v2"], "r-drop", url)
        final = d.final("r-drop", timeout=30)
        assert final["state"] == "committed", final
        requests = http.requests_for("/drop/model.tflite")
        assert len(requests) > 6, "more retries than the old fixed 4"
        assert requests[-1] and int(requests[-1][6:].rstrip("-")) > 0, "the .part file was kept and resumed"
        assert d.host.model_info["version"] == "2"
    finally:
        d.close()


def test_cancel_command_stops_a_download_in_flight(tmp_path, arts, http):
    url = http.add("/slowly/model.tflite", arts["slow"].model_path.read_bytes(), trickle_s=0.1, trickle_bytes=4096)
    d = Device(tmp_path / "state", arts)
    try:
        d.update(arts["slow"], "r-cancel", url)
        wait_for_part(d, "r-cancel")
        reply = d.ota.handle_cancel({"id": "c1", "rollout_id": "r-cancel"})
        assert reply["accepted"] and reply["canceling"]
        final = d.final("r-cancel", timeout=5)
        assert final["state"] == "failed" and final["reason"] == "canceled by command"
        assert d.host.model_info["version"] == "1" and staging_of(d) == []
        with pytest.raises(ConfigError, match="nothing to cancel"):
            d.ota.handle_cancel({"id": "c2", "rollout_id": "r-cancel"})
    finally:
        d.close()


# ---------------------------------------------------------------- damaged state on disk
def test_corrupt_journal_boots_the_last_verified_slot_and_reports_it(tmp_path, arts):
    d = Device(tmp_path / "state", arts, quiet=True)
    d.update(arts["v2"], "r2")
    assert d.final("r2")["state"] == "committed"
    d.ota.wait_idle(10)
    d.close()
    (tmp_path / "state" / "journal.json").write_bytes(b'{"active": "clf-v2-\x00\xff')  # SD card damage
    again = Device(tmp_path / "state", arts, quiet=True)
    try:
        assert again.host.model_info["version"] == "2"
        status = again.ota.status()
        assert "unreadable OTA journal" in status["boot_error"] and status["floor"] == "2"
        assert [e["event"] for e in again.events][:1] == ["model_error"]
        with pytest.raises(ArtifactError, match="anti-downgrade floor"):
            again.update(arts["v1"], "r1-replay")
        again.update(arts["v3"], "r3")
        assert again.final("r3")["state"] == "committed"
    finally:
        again.close()


def test_one_transient_read_error_of_the_active_slot_does_not_demote_the_device(tmp_path, arts, monkeypatch):
    """An EIO cannot be produced on demand without a failing device, so the first read of the active
    slot's file is made to fail the way check_model_file reports it."""
    d = Device(tmp_path / "state", arts, quiet=True)
    d.update(arts["v2"], "r2")
    assert d.final("r2")["state"] == "committed"
    d.ota.wait_idle(10)
    active = d.ota.status()["active"]["slot"]
    d.close()
    real, failed = manager_module.check_model_file, []

    def flaky(path, expected, where=None):
        if active in str(path) and not failed:
            failed.append(path)
            raise ArtifactError(f"{where}: cannot read the model file ({os.strerror(errno.EIO)})")
        return real(path, expected, where)

    monkeypatch.setattr(manager_module, "check_model_file", flaky)
    again = Device(tmp_path / "state", arts, quiet=True)
    try:
        assert failed, "the fault was injected"
        assert again.host.model_info["version"] == "2" and again.ota.status()["active"]["slot"] == active
        assert again.ota.status()["boot_error"] is None
        assert again.ota.store.slot_dir(active).exists()
    finally:
        again.close()
