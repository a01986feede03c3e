"""Fixtures for the fleet tool: a private broker per module, artifacts, simulators, a CLI runner."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import MosquittoBroker

REPO = Path(__file__).resolve().parents[2]


def make_artifact(directory: Path, version: str, name: str = "demo", deployable: bool = True,
                  payload: bytes | None = None) -> Path:
    """An artifact dir as the fleet tool sees it: model bytes + a valid manifest.

    The fleet tool never runs the model (it checks the manifest, the file's sha256 and serves
    it), so simulator tests use placeholder bytes; the real-agent test uses real models.
    """
    directory.mkdir(parents=True, exist_ok=True)
    model = payload or (b"TFL3" + hashlib.sha256(f"{name}-{version}".encode()).digest() * 64)
    (directory / "model.tflite").write_bytes(model)
    manifest: dict[str, Any] = {
        "schema_version": 1, "name": name, "version": version, "created": "2026-11-23T00:00:00Z",
        "converter_version": "test", "profile": "rpi4", "task": "classification",
        "model": {"file": "model.tflite", "sha256": hashlib.sha256(model).hexdigest(), "size": len(model)},
        "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": [1, 3], "dtype": "float32"}],
        "deployable": deployable,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


@pytest.fixture(scope="module")
def fleet_broker(tmp_path_factory: pytest.TempPathFactory):
    """A broker for one test module, so retained device states from other modules never leak in."""
    with MosquittoBroker(tmp_path_factory.mktemp("fleet-mosquitto")) as b:
        yield b


def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``edge-fleet`` as a separate process, as an operator would."""
    return subprocess.run([sys.executable, "-m", "fleet.cli", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)
