"""The shipped systemd unit: valid for systemd, hardened, and restarting only when that helps."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "edge-agent.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")


def _settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def _unit_with_real_binary(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's edge-agent, so verify can resolve it."""
    binary = Path(sys.executable).with_name("edge-agent")
    text = UNIT.read_text().replace("ExecStart=edge-agent ", f"ExecStart={binary} ")
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    return unit


def test_unit_does_not_hard_code_a_checkout_path() -> None:
    assert _settings()["ExecStart"] == ["edge-agent run --config /etc/edge-agent/agent.yaml"]
    assert ".venv" not in UNIT.read_text().replace("venv/bin/edge-agent run", "")


def test_bad_config_is_not_restarted_forever_and_an_oom_killed_child_does_not_stop_the_agent() -> None:
    s = _settings()
    assert s["RestartPreventExitStatus"] == ["2"]
    assert s["OOMPolicy"] == ["continue"]
    assert s["Restart"] == ["on-failure"] and s["WatchdogSec"]


def test_optional_paths_cannot_stop_the_unit_from_starting() -> None:
    for path in _settings().get("ReadWritePaths", []):
        for entry in path.split():
            assert entry.startswith(("-", "/var/lib/edge-agent")), entry


@needs_analyze
def test_systemd_analyze_verify_reports_no_error(tmp_path: Path) -> None:
    proc = subprocess.run([ANALYZE, "verify", str(_unit_with_real_binary(tmp_path))], capture_output=True,
                          text=True, check=False, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


@needs_analyze
def test_systemd_analyze_security_scores_at_most_4_5(tmp_path: Path) -> None:
    proc = subprocess.run([ANALYZE, "security", "--offline=yes", str(_unit_with_real_binary(tmp_path))],
                          capture_output=True, text=True, check=False, timeout=60, cwd=tmp_path)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert match, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert float(match.group(1)) <= 4.5, proc.stdout
