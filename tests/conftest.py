"""Session-wide fixtures: a private Mosquitto broker and the repo paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from edgefleet.testing.broker import MosquittoBroker

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Fuzzing: bounded in `make test`, deep in `make fuzz` (HYPOTHESIS_PROFILE=deep).
settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory):
    """A private Mosquitto on a free loopback port for the whole test session."""
    with MosquittoBroker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b
