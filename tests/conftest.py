"""Session-wide fixtures: a private Mosquitto broker and the repo paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgefleet.testing.broker import MosquittoBroker

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory):
    """A private Mosquitto on a free loopback port for the whole test session."""
    with MosquittoBroker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b
