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


@pytest.fixture(scope="session")
def postgres_server():
    """A private PostgreSQL cluster for the session (never the shared one on 5432); skips without binaries."""
    from edgefleet.testing.postgres import PostgresServer, find_pg_bin

    if find_pg_bin() is None:
        pytest.skip("PostgreSQL binaries missing (/usr/lib/postgresql/*/bin): run `make broker`")
    pytest.importorskip("psycopg", reason="psycopg missing: pip install 'psycopg[binary]>=3.1'")
    server = PostgresServer().start()
    yield server
    server.close()


_databases = iter(range(1, 1_000_000))


@pytest.fixture()
def pg_url(postgres_server):
    """A fresh, migrated database on the private cluster, one per test."""
    from fleet.store import open_store

    url = postgres_server.create_database(f"t{next(_databases)}")
    open_store(url, migrate=True).close()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def state_url(request, tmp_path):
    """Every store test runs on both engines: one schema, one code path."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    return request.getfixturevalue("pg_url")
