"""Fixtures for the fleet tool: a private broker per module, artifacts, simulators, a CLI runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.testing.broker import MosquittoBroker
from edgefleet.testing.simulator import write_placeholder_artifact

REPO = Path(__file__).resolve().parents[2]


def make_artifact(directory: Path, version: str, name: str = "demo", deployable: bool = True) -> Path:
    """A placeholder artifact: the fleet tool never runs the model (it checks the manifest and the
    file's sha256 and serves it), so simulator tests need no real model; the real-agent test does."""
    return write_placeholder_artifact(directory, version, name=name, deployable=deployable)


@pytest.fixture(scope="module")
def fleet_broker(tmp_path_factory: pytest.TempPathFactory):
    """A broker for one test module, so retained device states from other modules never leak in."""
    with MosquittoBroker(tmp_path_factory.mktemp("fleet-mosquitto")) as b:
        yield b


def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``edge-fleet`` as a separate process, as an operator would."""
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)
