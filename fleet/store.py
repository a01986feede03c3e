"""Rollouts, per-device executions and their history, in SQLite (default) or PostgreSQL (teams).

The command id for each (rollout, device) is written here *before* the command is published (the
execution becomes SENT): after a crash the same id is sent again to SENT devices (the device drops
duplicates), and a device that answered (IN_PROGRESS or final) is never sent anything twice. One
transaction per batch of changes keeps large fleets cheap to persist.

One schema and one code path for both engines: every query below is written once (``?``
placeholders, ``ON CONFLICT`` upserts) and a backend (:mod:`fleet.store_sqlite`,
:mod:`fleet.store_postgres`) only connects, opens transactions and translates its driver's
errors. The schema is the numbered files in ``fleet/migrations/``.

Who drives a rollout is a lease on its row (``driver``, ``lease_until``): :meth:`Store.acquire`
takes a free or expired one, and every :meth:`Store.save` by the driver first extends it in the
same transaction, so a driver that lost its lease can neither write nor (persist first) publish.

Errors::

    ConfigError
    ├── StoreUnavailable   the database cannot be reached or dropped the connection (retry later)
    ├── SchemaError        the database's schema is older or newer than this edge-fleet
    ├── RolloutBusy        a target already has a running rollout (``--force`` cancels it)
    └── LeaseLost          another driver holds the rollout now; stop driving it

Where: ``--state sqlite:///path/fleet.db`` or ``--state postgresql://...`` (env
``EDGEFLEET_STATE``); else ``fleet.db`` in ``--data-dir``, ``$EDGEFLEET_DATA`` or
``~/.local/share/edgefleet``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from edgefleet.errors import ConfigError
from edgefleet.messages import ExecState, RolloutState
from fleet.store_errors import StoreUnavailable

__all__ = [
    "ACTIVE_STATES",
    "Execution",
    "LeaseLost",
    "Rollout",
    "RolloutBusy",
    "SchemaError",
    "Store",
    "StoreUnavailable",
    "default_data_dir",
    "make_owner",
    "migrations",
    "open_store",
    "owner_is_dead",
    "public_broker_url",
    "state_url",
]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
ACTIVE_STATES = (RolloutState.IN_PROGRESS.value, RolloutState.ABORTING.value)
_ACTIVE_SQL = "('IN_PROGRESS','ABORTING')"


class SchemaError(ConfigError):
    """The database's schema is not the one this edge-fleet speaks."""


class RolloutBusy(ConfigError):
    """A target device is already part of a running rollout."""


class LeaseLost(ConfigError):
    """Another driver holds the rollout's lease now."""


def default_data_dir() -> Path:
    env = os.environ.get("EDGEFLEET_DATA")
    return Path(env) if env else Path.home() / ".local" / "share" / "edgefleet"


def state_url(state: str | None, data_dir: Path | str | None = None) -> str:
    """The store URL: ``--state``, else ``$EDGEFLEET_STATE``, else SQLite in the data dir."""
    url = state or os.environ.get("EDGEFLEET_STATE")
    if url:
        return url
    return f"sqlite:///{(Path(data_dir or default_data_dir()) / 'fleet.db').resolve()}"


def make_owner(role: str) -> str:
    """A lease owner id, ``role@host:pid:nonce``: unique per process, and local ones can be checked for life."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def owner_is_dead(owner: str | None) -> bool:
    """True only for an owner on this host whose process is gone (its lease need not be waited out)."""
    m = re.fullmatch(r"[^@]*@(.*):(\d+):\w+", owner or "")
    if not m or m.group(1) != socket.gethostname():
        return False
    try:
        os.kill(int(m.group(2)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True)
class Execution:
    """One device's part in a rollout; moves between states only in :mod:`fleet.rollout`.

    ``rollback_state`` follows the rollback sent when the rollout aborts (None: never sent,
    IN_PROGRESS, then SUCCEEDED, FAILED or TIMED_OUT).
    """

    rollout_id: str
    device_id: str
    wave: int
    state: ExecState = ExecState.QUEUED
    ota_state: str | None = None
    command_id: str | None = None
    sent_ts: float | None = None
    updated_ts: float | None = None
    reason: str | None = None
    prev_version: str | None = None
    rollback_state: ExecState | None = None
    rollback_id: str | None = None
    rollback_sent_ts: float | None = None

    def __post_init__(self) -> None:
        # rows from the database and JSON carry the state as its string; keep the enum (ValueError if unknown)
        object.__setattr__(self, "state", ExecState(self.state))
        if self.rollback_state is not None:
            object.__setattr__(self, "rollback_state", ExecState(self.rollback_state))

    @property
    def terminal(self) -> bool:
        return self.state.terminal


@dataclass(frozen=True)
class Rollout:
    id: str
    kind: str  # "deploy" or "rollback"
    created: float
    updated: float
    state: RolloutState
    policy: dict[str, Any]
    current_wave: int
    waves: int
    reason: str | None = None
    artifact_dir: str | None = None
    name: str | None = None
    version: str | None = None
    sha256: str | None = None
    manifest: dict[str, Any] | None = field(default=None, repr=False)
    signature: str | None = field(default=None, repr=False)
    artifact_url: str | None = None
    serve: str | None = None  # HOST:PORT of the deploy's own server, "controller", or None (--artifact-url)
    broker: str | None = None  # the URL(s) without a password: a resumed rollout is given it again
    target: str | None = None  # what the operator selected, for messages ("group ok", "3 device(s)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", RolloutState(self.state))

    @property
    def terminal(self) -> bool:
        return self.state.terminal


@dataclass(frozen=True)
class Lease:
    """Who drives a rollout, until when, and whether someone asked it to stop."""

    rollout_id: str
    driver: str | None
    lease_until: float | None
    cancel_requested: str | None

    def free(self, now: float) -> bool:
        return self.driver is None or self.lease_until is None or self.lease_until < now or owner_is_dead(self.driver)


History = Sequence[tuple[str | None, str | None, str, dict[str, Any] | None]]
_EXEC_COLS = [f.name for f in fields(Execution)]
_ROLLOUT_COLS = [f.name for f in fields(Rollout)]


def public_broker_url(broker: object) -> str | None:
    """The broker URL(s) as kept in the store and shown: the user name stays, a password never.

    ``broker`` is a URL string (several with commas) or an :class:`edgefleet.mqtt.BrokerAccess`,
    whose ``str()`` is its URL. Nothing is validated here: that happened before the rollout began.
    """
    if broker is None:
        return None
    items = []
    for item in str(broker).split(","):
        parts = urlsplit(item.strip())
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            item = urlunsplit(parts._replace(netloc=f"{parts.username}@{host}" if parts.username else host))
        items.append(item)
    return ",".join(items)


def _upsert_sql(table: str, cols: list[str], key: tuple[str, ...]) -> str:
    sets = ",".join(f"{c}=excluded.{c}" for c in cols if c not in key)
    return (f"INSERT INTO {table}({','.join(cols)}) VALUES({','.join('?' * len(cols))}) "
            f"ON CONFLICT({','.join(key)}) DO UPDATE SET {sets}")


_UPSERT_ROLLOUT = _upsert_sql("rollouts", _ROLLOUT_COLS, ("id",))
_UPSERT_EXEC = _upsert_sql("executions", _EXEC_COLS, ("rollout_id", "device_id"))


def migrations() -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` of every file in ``fleet/migrations``, in order."""
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        found.append((int(path.name[:4]), path.stem, path.read_text()))
    return found


SCHEMA_VERSION = migrations()[-1][0]


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Backend(Protocol):
    """What an engine provides: a connection, transactions, DDL words, and its errors translated."""

    url: str
    conn: Any
    tokens: dict[str, str]

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def transaction(self) -> Any: ...

    def table_exists(self, name: str) -> bool: ...

    def before_migrations(self) -> None: ...

    def migration_lock(self) -> None: ...

    def close(self) -> None: ...


def open_store(url: str, migrate: bool | None = None) -> Store:
    """Open ``sqlite:///path`` or ``postgresql://...``.

    ``migrate``: bring an older schema up to date (default: yes for SQLite, which is one person's
    file; no for PostgreSQL, which other controllers share: run ``edge-fleet migrate`` there).

    Raises:
        ConfigError: an unknown scheme; StoreUnavailable: cannot connect; SchemaError: wrong schema.
    """
    if url.startswith("sqlite:"):
        from fleet.store_sqlite import SqliteBackend

        backend: Backend = SqliteBackend(url)
        return Store(backend, migrate=True if migrate is None else migrate)
    if url.startswith(("postgresql:", "postgres:")):
        from fleet.store_postgres import PostgresBackend

        return Store(PostgresBackend(url), migrate=bool(migrate))
    raise ConfigError(f"--state {url!r}: expected sqlite:///PATH or postgresql://[user@]host[:port]/db")


class Store:
    """Rollouts on one database connection. Not shared between threads: open one per thread."""

    def __init__(self, backend: Backend, migrate: bool = True) -> None:
        self._backend = backend
        self._db = backend.conn
        self.url = backend.url
        try:
            self._migrate(migrate)
        except BaseException:
            backend.close()
            raise

    @classmethod
    def open(cls, data_dir: Path | str | None = None) -> Store:
        """The SQLite store in a data dir (the default of every in-process command)."""
        return open_store(state_url(None, data_dir))

    @property
    def path(self) -> str:
        """Where the data lives, for messages (never a password)."""
        return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1@", self.url)

    def close(self) -> None:
        self._backend.close()

    # -- schema -------------------------------------------------------------------------------
    def schema_version(self) -> int:
        if not self._backend.table_exists("schema_migrations"):
            return 0
        row = self._backend.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def _migrate(self, allowed: bool) -> None:
        """Apply the missing migrations in one transaction each, or refuse an unexpected schema."""
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise SchemaError(f"{self.path}: schema version {current} is newer than this edge-fleet's "
                              f"{SCHEMA_VERSION}: upgrade edge-fleet")
        if current == SCHEMA_VERSION:
            return
        if not allowed:
            raise SchemaError(f"{self.path}: schema version {current}, this edge-fleet needs {SCHEMA_VERSION}: "
                              f"run `edge-fleet migrate --state URL` once (with every controller stopped)")
        self._backend.before_migrations()
        for version, name, sql in migrations():
            with self._tx():
                self._backend.migration_lock()
                self._backend.execute("CREATE TABLE IF NOT EXISTS schema_migrations("
                                      "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied DOUBLE PRECISION)")
                if self.schema_version() >= version:
                    continue  # another process applied it meanwhile
                for statement in _statements(sql.format(**self._backend.tokens)):
                    self._backend.execute(statement)
                self._backend.execute("INSERT INTO schema_migrations(version, name, applied) VALUES(?,?,?)",
                                      (version, name, time.time()))

    @contextmanager
    def _tx(self) -> Iterator[None]:
        with self._backend.transaction():
            yield

    # -- writes -------------------------------------------------------------------------------
    @staticmethod
    def _rollout_row(r: Rollout) -> list[Any]:
        row = asdict(r)
        row["state"] = r.state.value
        row["policy"] = json.dumps(r.policy)
        row["manifest"] = json.dumps(r.manifest) if r.manifest is not None else None
        row["broker"] = public_broker_url(r.broker)
        return [row[c] for c in _ROLLOUT_COLS]

    @staticmethod
    def _exec_row(e: Execution) -> list[Any]:
        return [e.rollout_id, e.device_id, e.wave, e.state.value, e.ota_state, e.command_id, e.sent_ts,
                e.updated_ts, e.reason, e.prev_version,
                e.rollback_state.value if e.rollback_state is not None else None, e.rollback_id,
                e.rollback_sent_ts]

    def _write(self, rollout: Rollout | None, executions: Sequence[Execution], history: History,
               now: float) -> None:
        if rollout is not None:
            self._backend.execute(_UPSERT_ROLLOUT, self._rollout_row(rollout))
        if executions:
            self._backend.executemany(_UPSERT_EXEC, [self._exec_row(e) for e in executions])
        if history:
            self._backend.executemany(
                "INSERT INTO history(ts, rollout_id, device_id, event, detail) VALUES(?,?,?,?,?)",
                [(now, r, d, str(ev), json.dumps(det) if det is not None else None) for r, d, ev, det in history])

    def save(self, rollout: Rollout | None = None, executions: Sequence[Execution] = (),
             history: History = (), now: float | None = None, lease: tuple[str, str, float] | None = None
             ) -> str | None:
        """Write a rollout, changed executions and history rows in one transaction.

        ``history`` rows are ``(rollout_id, device_id, event, detail)``. With ``lease`` =
        ``(rollout_id, owner, ttl_s)`` the lease is extended first, in the same transaction.

        Returns:
            The rollout's pending cancel request (a reason), when a lease was given, else None.

        Raises:
            LeaseLost: ``owner`` no longer holds the lease (nothing was written).
        """
        now = time.time() if now is None else now
        cancel = None
        with self._tx():
            if lease is not None:
                cancel = self._renew(lease, now)
            self._write(rollout, executions, history, now)
        return cancel

    def _renew(self, lease: tuple[str, str, float], now: float) -> str | None:
        rid, owner, ttl = lease
        cur = self._backend.execute("UPDATE rollouts SET lease_until=? WHERE id=? AND driver=?",
                                    (now + ttl, rid, owner))
        if cur.rowcount != 1:
            raise LeaseLost(f"rollout {rid}: the lease of {owner} was taken over")
        row = self._backend.execute("SELECT cancel_requested FROM rollouts WHERE id=?", (rid,)).fetchone()
        return row[0] if row else None

    def create(self, rollout: Rollout, executions: Sequence[Execution], history: History,
               owner: str | None = None, lease_ttl_s: float = 10.0, force: bool = False,
               now: float | None = None) -> list[str]:
        """Persist a new rollout unless one of its devices is in a running rollout.

        Check and insert happen under one lock row, so two controllers cannot both start a
        rollout on the same group. ``owner`` takes the lease at once (nobody else adopts it).

        Returns:
            The running rollouts asked to cancel (``force``).

        Raises:
            RolloutBusy: a running rollout shares devices with this one, and not ``force``.
        """
        now = time.time() if now is None else now
        devices = {e.device_id for e in executions}
        with self._tx():
            self._backend.execute("UPDATE locks SET ts=? WHERE name='create-rollout'", (now,))
            busy = [r for r in self._active() if devices & self._devices_of(r.id)]
            if busy and not force:
                r = busy[0]
                raise RolloutBusy(
                    f"{r.target or 'these devices'} already has rollout {r.id} {r.state} "
                    f"({r.kind} {r.name or ''}@{r.version or 'previous'}, wave {r.current_wave + 1}/{r.waves}): "
                    "wait for it to end, or pass --force to cancel it")
            for r in busy:
                self._backend.execute("UPDATE rollouts SET cancel_requested=? WHERE id=?",
                                      (f"canceled by rollout {rollout.id} (--force)", r.id))
            self._write(rollout, executions, history, now)
            if owner is not None:
                self._backend.execute("UPDATE rollouts SET driver=?, lease_until=? WHERE id=?",
                                      (owner, now + lease_ttl_s, rollout.id))
        return [r.id for r in busy]

    def _active(self) -> list[Rollout]:
        cur = self._backend.execute(
            f"SELECT {','.join(_ROLLOUT_COLS)} FROM rollouts WHERE state IN {_ACTIVE_SQL} ORDER BY created")
        return [self._to_rollout(row) for row in cur.fetchall()]

    def _devices_of(self, rollout_id: str) -> set[str]:
        cur = self._backend.execute("SELECT device_id FROM executions WHERE rollout_id=?", (rollout_id,))
        return {row[0] for row in cur.fetchall()}

    # -- leases -------------------------------------------------------------------------------
    def leases(self) -> list[Lease]:
        """The lease of every running rollout (what a controller may adopt)."""
        cur = self._backend.execute("SELECT id, driver, lease_until, cancel_requested FROM rollouts "
                                    f"WHERE state IN {_ACTIVE_SQL} ORDER BY created")
        return [Lease(*row) for row in cur.fetchall()]

    def acquire(self, rollout_id: str, owner: str, ttl_s: float = 10.0, now: float | None = None) -> bool:
        """Take the lease when it is free, expired, ours, or held by a dead local process."""
        now = time.time() if now is None else now
        with self._tx():
            row = self._backend.execute("SELECT driver, lease_until FROM rollouts WHERE id=? "
                                        f"AND state IN {_ACTIVE_SQL}", (rollout_id,)).fetchone()
            if row is None:
                return False
            lease = Lease(rollout_id, row[0], row[1], None)
            if lease.driver != owner and not lease.free(now):
                return False
            cur = self._backend.execute(
                "UPDATE rollouts SET driver=?, lease_until=? WHERE id=? AND "
                "(driver IS NULL OR driver=? OR lease_until IS NULL OR lease_until=?)",
                (owner, now + ttl_s, rollout_id, row[0], row[1]))
            return cur.rowcount == 1

    def release(self, rollout_id: str, owner: str) -> None:
        """Give the lease up (the rollout ended, or its driver stops cleanly)."""
        with self._tx():
            self._backend.execute("UPDATE rollouts SET driver=NULL, lease_until=NULL WHERE id=? AND driver=?",
                                  (rollout_id, owner))

    def lease(self, rollout_id: str) -> Lease:
        row = self._backend.execute("SELECT id, driver, lease_until, cancel_requested FROM rollouts WHERE id=?",
                                    (rollout_id,)).fetchone()
        if row is None:
            raise ConfigError(f"unknown rollout {rollout_id!r} in {self.path} (see `edge-fleet status`)")
        return Lease(*row)

    def request_cancel(self, rollout_id: str, reason: str) -> None:
        with self._tx():
            self._backend.execute("UPDATE rollouts SET cancel_requested=? WHERE id=?", (reason, rollout_id))

    # -- artifacts ----------------------------------------------------------------------------
    def put_artifact(self, sha256: str, data: bytes, now: float | None = None) -> None:
        """Keep an uploaded model (checked by the caller), so any controller can serve it."""
        with self._tx():
            self._backend.execute("DELETE FROM artifacts WHERE sha256=?", (sha256,))
            self._backend.execute("INSERT INTO artifacts(sha256, size, created, data) VALUES(?,?,?,?)",
                                  (sha256, len(data), time.time() if now is None else now, data))

    def has_artifact(self, sha256: str) -> bool:
        return self._backend.execute("SELECT 1 FROM artifacts WHERE sha256=?", (sha256,)).fetchone() is not None

    def artifact(self, sha256: str) -> bytes | None:
        row = self._backend.execute("SELECT data FROM artifacts WHERE sha256=?", (sha256,)).fetchone()
        return bytes(row[0]) if row else None

    # -- reads --------------------------------------------------------------------------------
    def rollout(self, rollout_id: str) -> Rollout:
        """Raises ConfigError for an unknown id."""
        cur = self._backend.execute(f"SELECT {','.join(_ROLLOUT_COLS)} FROM rollouts WHERE id=?", (rollout_id,))
        row = cur.fetchone()
        if row is None:
            raise ConfigError(f"unknown rollout {rollout_id!r} in {self.path} (see `edge-fleet status`)")
        return self._to_rollout(row)

    def rollouts(self, limit: int = 50) -> list[Rollout]:
        cur = self._backend.execute(
            f"SELECT {','.join(_ROLLOUT_COLS)} FROM rollouts ORDER BY created DESC LIMIT ?", (limit,))
        return [self._to_rollout(row) for row in cur.fetchall()]

    def latest(self) -> Rollout | None:
        found = self.rollouts(limit=1)
        return found[0] if found else None

    def executions(self, rollout_id: str) -> list[Execution]:
        cur = self._backend.execute(
            f"SELECT {','.join(_EXEC_COLS)} FROM executions WHERE rollout_id=? ORDER BY wave, device_id",
            (rollout_id,))
        return [Execution(*row) for row in cur.fetchall()]

    def counts(self, rollout_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """Executions per state for each rollout, counted by the database (for listings and metrics)."""
        out: dict[str, dict[str, int]] = {rid: {} for rid in rollout_ids}
        if not rollout_ids:
            return out
        cur = self._backend.execute(
            f"SELECT rollout_id, state, COUNT(*) FROM executions WHERE rollout_id IN "
            f"({','.join('?' * len(rollout_ids))}) GROUP BY rollout_id, state", list(rollout_ids))
        for rid, state, n in cur.fetchall():
            out[rid][state] = int(n)
        return out

    def history(self, rollout_id: str, device_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT ts, rollout_id, device_id, event, detail FROM history WHERE rollout_id=?"
        args: tuple[Any, ...] = (rollout_id,)
        if device_id:
            sql += " AND device_id=?"
            args += (device_id,)
        rows = self._backend.execute(sql + " ORDER BY id", args).fetchall()
        return [{"ts": ts, "rollout_id": r, "device_id": d, "event": ev,
                 "detail": json.loads(det) if det else None} for ts, r, d, ev, det in rows]

    @staticmethod
    def _to_rollout(row: Sequence[Any]) -> Rollout:
        d = dict(zip(_ROLLOUT_COLS, row))
        d["policy"] = json.loads(d["policy"])
        d["manifest"] = json.loads(d["manifest"]) if d["manifest"] else None
        return Rollout(**d)


def _statements(sql: str) -> list[str]:
    """A migration file split into statements (comments dropped; no ``;`` inside our SQL)."""
    text = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in text.split(";") if s.strip()]
