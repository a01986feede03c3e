"""Device profiles: every shipped profile loads; every kind of mistake gives one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgefleet.errors import ConfigError
from edgefleet.profiles import list_profiles, load_profile, profile_dir

REQUIRED = {"rpi3b", "rpi4", "rpi5", "rpi-zero-2w", "coral-usb", "coral-devboard", "generic-aarch64", "x86-dev"}


def test_every_required_target_ships_a_valid_profile():
    names = {p.name for p in list_profiles()}
    assert REQUIRED <= names
    for path in profile_dir().glob("*.yaml"):
        assert load_profile(path).name == path.stem, "profile name must match its file name"


def test_edgetpu_profiles_require_full_integer_and_uint8_io():
    for name in ("coral-usb", "coral-devboard"):
        p = load_profile(name)
        assert p.runtime.accelerator == "edgetpu"
        assert p.quantization.require_full_integer and not p.quantization.allow_float_fallback
    assert load_profile("coral-devboard").runtime.accelerator_required
    rpi3b = load_profile("rpi3b")  # 64-bit Pi OS: 32-bit has no runtime wheel for Python 3.11 (docs/profiles.md)
    assert (rpi3b.hardware.arch, rpi3b.runtime.interpreter) == ("aarch64", "ai-edge-litert")


def _write(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load((profile_dir() / "rpi4.yaml").read_text())
    mutate(data)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["runtime"].update(thread=4), "runtime.thread: unknown key"),
        (lambda d: d.pop("limits"), "limits: missing required key"),
        (lambda d: d["runtime"].update(threads="four"), "runtime.threads: Input should be a valid integer"),
        (lambda d: d["runtime"].update(threads=0), "runtime.threads: Input should be greater than or equal to 1"),
        (lambda d: d["fidelity"].update(max_top1_drop_pct=150), "fidelity.max_top1_drop_pct: Input should be less than or equal to 100"),
        (lambda d: d["runtime"].update(accelerator="tpu"), "runtime.accelerator: Input should be 'none' or 'edgetpu'"),
        (lambda d: d["runtime"].update(accelerator="edgetpu"), "needs quantization.require_full_integer"),
    ],
    ids=["unknown-key", "missing-key", "wrong-type", "threads-below-1", "drop-above-100", "bad-enum", "tpu-without-int"],
)
def test_broken_profile_names_file_key_and_expectation(tmp_path, mutate, expected):
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    message = str(err.value)
    assert message.startswith(str(path)), message
    assert expected in message
    assert "\n" not in message


def test_unknown_profile_name_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown profile 'rpi9'.*rpi4"):
        load_profile("rpi9")


def test_profile_that_is_not_yaml_or_not_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_profile(bad)


def test_missing_profile_path(tmp_path):
    with pytest.raises(ConfigError, match="profile file not found"):
        load_profile(tmp_path / "nope.yaml")


def test_cli_prints_one_error_line_without_traceback(tmp_path):
    path = _write(tmp_path, lambda d: d["runtime"].update(threads=0))
    proc = subprocess.run([sys.executable, "-m", "agent.cli", "profile", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
