"""The store interface on SQLite and PostgreSQL alike: round trips, leases, busy targets, schema versions."""

from __future__ import annotations

import time

import pytest

from edgefleet.messages import ExecState, RolloutState
from fleet.rollout import Policy
from fleet.store import (
    SCHEMA_VERSION,
    Execution,
    LeaseLost,
    Rollout,
    RolloutBusy,
    SchemaError,
    StoreUnavailable,
    make_owner,
    open_store,
    owner_is_dead,
)

T0 = 1_700_000_000.0


def _rollout(rid: str, target: str = "group 'g'") -> Rollout:
    return Rollout(id=rid, kind="deploy", created=T0, updated=T0, state=RolloutState.IN_PROGRESS,
                   policy=Policy().to_json(), current_wave=0, waves=2, name="m", version="2", sha256="ab" * 32,
                   manifest={"name": "m", "version": "2"}, target=target)


def _execs(rid: str, devices: list[str]) -> list[Execution]:
    return [Execution(rid, d, i % 2, updated_ts=T0) for i, d in enumerate(devices)]


def test_round_trip_is_the_same_on_both_engines(state_url):
    store = open_store(state_url)
    r = _rollout("r1")
    execs = _execs("r1", ["a", "b", "c"])
    store.create(r, execs, [("r1", None, "created", {"n": 3})])
    sent = Execution("r1", "a", 0, state=ExecState.SENT, command_id="c1", sent_ts=T0 + 1, updated_ts=T0 + 1)
    store.save(None, [sent], [("r1", "a", "SENT", None)])
    assert store.rollout("r1") == r
    assert store.executions("r1")[0] == sent
    assert store.counts(["r1"]) == {"r1": {"SENT": 1, "QUEUED": 2}}
    assert [h["event"] for h in store.history("r1")] == ["created", "SENT"]
    assert store.schema_version() == SCHEMA_VERSION
    store.put_artifact("cd" * 32, b"\x00model\xff")
    assert store.has_artifact("cd" * 32) and store.artifact("cd" * 32) == b"\x00model\xff"
    store.close()


def test_a_second_rollout_on_busy_devices_is_refused_unless_forced(state_url):
    store = open_store(state_url)
    store.create(_rollout("r1"), _execs("r1", ["a", "b"]), [])
    with pytest.raises(RolloutBusy, match="group 'g' already has rollout r1 IN_PROGRESS.*--force"):
        store.create(_rollout("r2"), _execs("r2", ["b", "c"]), [])
    store.create(_rollout("r3", "other"), _execs("r3", ["x"]), [])  # no shared device: fine
    assert store.create(_rollout("r4"), _execs("r4", ["a"]), [], force=True) == ["r1"]
    assert store.lease("r1").cancel_requested == "canceled by rollout r4 (--force)"
    store.close()


def test_a_lease_is_exclusive_until_it_expires_and_fences_the_old_driver(state_url):
    a, b = open_store(state_url), open_store(state_url)
    a.create(_rollout("r1"), _execs("r1", ["d"]), [], owner="ctl-a@elsewhere:1:aaaaaa", lease_ttl_s=10, now=T0)
    assert not b.acquire("r1", "ctl-b@elsewhere:2:bbbbbb", now=T0 + 5), "the lease still runs"
    assert a.save(None, [], [], now=T0 + 8, lease=("r1", "ctl-a@elsewhere:1:aaaaaa", 10)) is None  # renewed to T0+18
    assert not b.acquire("r1", "ctl-b@elsewhere:2:bbbbbb", now=T0 + 15)
    assert b.acquire("r1", "ctl-b@elsewhere:2:bbbbbb", now=T0 + 19), "expired: taken over"
    with pytest.raises(LeaseLost):
        a.save(None, _execs("r1", ["d"]), [], now=T0 + 20, lease=("r1", "ctl-a@elsewhere:1:aaaaaa", 10))
    assert b.lease("r1").driver == "ctl-b@elsewhere:2:bbbbbb"
    b.release("r1", "ctl-b@elsewhere:2:bbbbbb")
    assert b.lease("r1").driver is None
    a.close()
    b.close()


def test_a_lease_of_a_dead_local_process_need_not_be_waited_out(state_url):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "from fleet.store import make_owner; print(make_owner('deploy'))"],
                          capture_output=True, text=True, check=True)
    dead = proc.stdout.strip()
    assert owner_is_dead(dead) and not owner_is_dead(make_owner("me")) and not owner_is_dead("x@other-host:1:abc")
    store = open_store(state_url)
    now = time.time()
    store.create(_rollout("r1"), _execs("r1", ["d"]), [], owner=dead, now=now)
    assert store.acquire("r1", make_owner("controller"), now=now + 1)
    store.close()


def test_an_ended_rollout_cannot_be_leased(state_url):
    store = open_store(state_url)
    r = _rollout("r1")
    store.create(r, _execs("r1", ["d"]), [])
    from dataclasses import replace

    store.save(replace(r, state=RolloutState.SUCCEEDED))
    assert not store.acquire("r1", "me@h:1:aaaaaa") and store.leases() == []
    store.close()


def test_postgres_with_an_older_schema_is_refused_until_migrated(postgres_server):
    import psycopg

    url = postgres_server.create_database("older")
    with pytest.raises(SchemaError, match="schema version 0, this edge-fleet needs"):
        open_store(url)
    from fleet.store import _statements, migrations

    _, name, sql = migrations()[0]
    with psycopg.connect(url, autocommit=True) as conn:  # a database left at migration 0001
        conn.execute("CREATE TABLE schema_migrations(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied "
                     "DOUBLE PRECISION)")
        for statement in _statements(sql.format(serial_pk="BIGSERIAL PRIMARY KEY", blob="BYTEA")):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES(1, %s, 0)", (name,))
    with pytest.raises(SchemaError, match="schema version 1, this edge-fleet needs 2: run `edge-fleet migrate"):
        open_store(url)
    store = open_store(url, migrate=True)
    assert store.schema_version() == SCHEMA_VERSION
    store.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES(99, 'future', 0)")
    with pytest.raises(SchemaError, match="newer than this edge-fleet"):
        open_store(url)


def test_an_unreachable_database_is_one_clear_error():
    from edgefleet.testing.broker import free_port

    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nope"
    with pytest.raises(StoreUnavailable, match=f"state database {url} unreachable"):
        open_store(url)
    with pytest.raises(Exception, match="expected sqlite:///PATH or postgresql://"):
        open_store("mysql://x")
