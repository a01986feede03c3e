"""validate_model runs the checks in a child process: bad files never take the caller down."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import time

import numpy as np
import pytest

from agent import Engine
from agent.validation import ValidationReport, validate_model
from agent.validation.parent import SandboxLimits, sandbox_limits
from edgefleet.errors import ModelError
from edgefleet.profiles import load_profile, profile_dir
from edgefleet.testing.artifacts import build_artifact

pytestmark = pytest.mark.runtime


def test_valid_artifact_passes_with_golden_samples_and_latency(models, tmp_path):
    art = build_artifact(models / "int8.tflite", tmp_path / "a", golden_samples=3)
    report = validate_model(art.dir, profile="x86-dev")
    assert report.ok, report.reason
    assert report.golden["samples"] == 3 and report.golden["passed"] == 3
    assert report.latency_ms is not None and report.latency_ms > 0
    assert report.inputs[0]["name"] == "image" and report.outputs[0]["dtype"] == "int8"
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.ok = False  # type: ignore[misc]


def test_golden_outputs_that_do_not_match_fail_with_the_difference(models, tmp_path):
    art = build_artifact(models / "int8.tflite", tmp_path / "a", golden_samples=2)
    raw = dict(art.raw)
    golden = dict(raw["golden"])
    sample = dict(golden["samples"][0])
    sample["outputs"] = {k: [v + 0.5 for v in vals] for k, vals in sample["outputs"].items()}
    golden["samples"] = [sample]
    raw["golden"] = golden
    report = validate_model(art.model_path, profile="x86-dev", manifest=raw)
    assert not report.ok
    assert "golden sample 0" in report.reason and "exceeds atol" in report.reason


def test_manifest_that_declares_other_tensors_is_rejected(models, tmp_path):
    art = build_artifact(models / "int8.tflite", tmp_path / "a", golden_samples=0)
    report = validate_model(models / "uint8.tflite", profile="x86-dev", manifest=art.raw)
    assert not report.ok and "manifest says int8" in report.reason


def test_custom_op_model_is_invalid_and_names_the_op(models):
    report = validate_model(models / "custom_op.tflite", profile="x86-dev")
    assert not report.ok and "EdgefleetSecretOp" in report.reason


@pytest.mark.parametrize("damage", ["empty", "truncated", "bitflip_header", "garbage"])
def test_corrupted_model_files_are_invalid_and_the_caller_survives(models, tmp_path, damage):
    data = bytearray((models / "int8.tflite").read_bytes())
    if damage == "empty":
        data = bytearray()
    elif damage == "truncated":
        data = data[: len(data) // 3]
    elif damage == "bitflip_header":
        data[4] ^= 0xFF  # the file identifier "TFL3"
        data[0] ^= 0x40  # and the root table offset
    else:
        data = bytearray(os.urandom(2048))
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(bytes(data))
    report = validate_model(bad, profile="x86-dev", timeout_s=30)
    assert isinstance(report, ValidationReport)
    assert not report.ok and report.reason and "\n" not in report.reason


def _child_instead(monkeypatch, code: str) -> None:
    """Replace the validation child by ``python -c code`` (still started, limited and waited for as one)."""
    real_popen = subprocess.Popen

    def fake(cmd, **kwargs):
        return real_popen([sys.executable, "-c", code], **kwargs)

    monkeypatch.setattr(subprocess, "Popen", fake)


def test_runtime_killed_by_a_signal_is_reported_with_the_signal_and_the_platform(monkeypatch, models):
    """A segfault cannot be produced on demand by the runtime, so the child itself is killed by SIGSEGV."""
    _child_instead(monkeypatch, "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    report = validate_model(models / "int8.tflite", profile="x86-dev")
    assert not report.ok and "died (SIGSEGV)" in report.reason and "on this platform" in report.reason
    assert platform.machine() in report.reason and "corrupt" not in report.reason


def test_a_hanging_child_times_out(monkeypatch, models):
    _child_instead(monkeypatch, "import time; time.sleep(30)")
    report = validate_model(models / "int8.tflite", profile="x86-dev", timeout_s=0.5)
    assert not report.ok and "timed out" in report.reason


def test_model_that_spins_is_stopped_by_the_cpu_time_limit(monkeypatch, models):
    """Stands for a model whose ops loop: the child burns CPU until RLIMIT_CPU sends SIGXCPU."""
    _child_instead(monkeypatch, "while True: pass")
    limits = SandboxLimits(address_space_bytes=1 << 30, cpu_s=1, file_bytes=1 << 20)
    t0 = time.monotonic()
    report = validate_model(models / "int8.tflite", profile="x86-dev", timeout_s=30, limits=limits)
    assert not report.ok and "RLIMIT_CPU 1 s" in report.reason and "SIGXCPU" in report.reason
    assert time.monotonic() - t0 < 10, "the CPU limit, not the 30 s timeout, ended it"


def test_validation_runs_under_limits_derived_from_the_device_ram(models):
    report = validate_model(models / "int8.tflite", profile="rpi-zero-2w")  # 512 MB of RAM: the floor
    assert report.details["limits"]["applied"] is True
    assert report.details["limits"]["address_space_bytes"] == 512 * 1024 * 1024 + 3 * (models / "int8.tflite").stat().st_size
    assert sandbox_limits(load_profile("x86-dev"), 0, 60.0).address_space_bytes == 2048 * 1024 * 1024


def test_latency_over_the_profile_budget_fails(models, tmp_path):
    profile = tmp_path / "slowpoke.yaml"
    text = (profile_dir() / "x86-dev.yaml").read_text()
    profile.write_text(text.replace("name: x86-dev", "name: slowpoke").replace("latency_budget_ms: 200",
                                                                               "latency_budget_ms: 0.000001"))
    report = validate_model(models / "int8.tflite", profile=str(profile))
    assert not report.ok and "exceeds the profile's budget" in report.reason


def test_engine_validate_true_refuses_a_corrupt_file_without_dying(models, tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes((models / "int8.tflite").read_bytes()[:500])
    with pytest.raises(ModelError, match="bad.tflite"):
        Engine(bad, profile="x86-dev", validate=True)
    ok = Engine(models / "int8.tflite", profile="x86-dev", validate=True, autotune=False)
    assert ok.infer(np.zeros((1, 16, 16, 3), np.float32)).shape == (1, 10)
