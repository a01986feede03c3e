"""Host-side checks of scripts/arm64_root.sh that need no emulation (`make test-arm64` does the rest)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "arm64_root.sh"


def _as_nobody() -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_prepare_without_root_says_so_in_one_line_and_exits_3(tmp_path: Path) -> None:
    env = {**os.environ, "EDGEFLEET_ARM64_ROOT": str(tmp_path / "root")}
    proc = subprocess.run([*_as_nobody(), "bash", str(SCRIPT), "prepare"], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert proc.returncode == 3
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("arm64 root unavailable: needs root")


def test_status_of_a_missing_root_is_not_ready(tmp_path: Path) -> None:
    env = {**os.environ, "EDGEFLEET_ARM64_ROOT": str(tmp_path / "none")}
    proc = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert proc.returncode == 1
    assert "not prepared" in proc.stdout
