"""Rollouts, per-device executions and their history in SQLite (WAL), so a killed fleet tool resumes.

The command id for each (rollout, device) is written here *before* the command is published (the
execution becomes SENT): after a crash the same id is sent again to SENT devices (the device drops
duplicates), and a device that answered (IN_PROGRESS or final) is never sent anything twice. One
transaction per batch of changes keeps large fleets cheap to persist.

States are :class:`~edgefleet.messages.ExecState` and :class:`~edgefleet.messages.RolloutState`.
Stores written before SENT existed (a QUEUED row with a command id and an ``answered`` flag) are
migrated in place when opened (schema version 1).

Data dir: ``--data-dir``, else ``$EDGEFLEET_DATA``, else ``~/.local/share/edgefleet``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgefleet.errors import ConfigError
from edgefleet.messages import ExecState, RolloutState

__all__ = [
    "Execution",
    "Rollout",
    "Store",
    "default_data_dir",
]

SCHEMA_VERSION = 1  # 1: SENT is a state; the ``answered`` column is gone

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts(
  id TEXT PRIMARY KEY, kind TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
  state TEXT NOT NULL, reason TEXT, artifact_dir TEXT, name TEXT, version TEXT, sha256 TEXT,
  manifest TEXT, signature TEXT, artifact_url TEXT, serve TEXT, policy TEXT NOT NULL,
  current_wave INTEGER NOT NULL, waves INTEGER NOT NULL, broker TEXT);
CREATE TABLE IF NOT EXISTS executions(
  rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, wave INTEGER NOT NULL, state TEXT NOT NULL,
  ota_state TEXT, command_id TEXT, sent_ts REAL, updated_ts REAL, reason TEXT, prev_version TEXT,
  rollback_state TEXT, rollback_id TEXT, rollback_sent_ts REAL,
  PRIMARY KEY(rollout_id, device_id));
CREATE TABLE IF NOT EXISTS history(
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, rollout_id TEXT, device_id TEXT,
  event TEXT NOT NULL, detail TEXT);
CREATE INDEX IF NOT EXISTS history_rollout ON history(rollout_id, device_id);
"""

# Before SENT: "sent, no answer" was QUEUED + command_id + answered = 0; "answered" was a flag.
_MIGRATE_SENT = "UPDATE executions SET state='SENT' WHERE state='QUEUED' AND command_id IS NOT NULL AND answered=0"
_MIGRATE_ANSWERED = "UPDATE executions SET state='IN_PROGRESS' WHERE state='QUEUED' AND answered<>0"


def default_data_dir() -> Path:
    env = os.environ.get("EDGEFLEET_DATA")
    return Path(env) if env else Path.home() / ".local" / "share" / "edgefleet"


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
        # rows from SQLite and JSON carry the state as its string; keep the enum (ValueError if unknown)
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
    serve: str | None = None
    broker: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", RolloutState(self.state))

    @property
    def terminal(self) -> bool:
        return self.state.terminal


_EXEC_COLS = [f.name for f in fields(Execution)]
_ROLLOUT_COLS = [f.name for f in fields(Rollout)]


class Store:
    """A SQLite database in the data dir; safe for one writer and any number of readers."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"data dir {self.path.parent}: cannot open the fleet database ({exc})") from exc

    @classmethod
    def open(cls, data_dir: Path | str | None = None) -> Store:
        return cls(Path(data_dir or default_data_dir()) / "fleet.db")

    def close(self) -> None:
        self._db.close()

    def _version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        """Bring a store written by an older fleet tool to :data:`SCHEMA_VERSION`, in one transaction."""
        if self._version() >= SCHEMA_VERSION:
            return
        with self._tx():
            if self._version() >= SCHEMA_VERSION:
                return  # another process migrated it meanwhile
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(executions)")}
            if "answered" in columns:
                self._db.execute(_MIGRATE_SENT)
                self._db.execute(_MIGRATE_ANSWERED)
                if sqlite3.sqlite_version_info >= (3, 35):  # older SQLite keeps the column; it has a default
                    self._db.execute("ALTER TABLE executions DROP COLUMN answered")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # -- writes -------------------------------------------------------------------------------
    def _upsert(self, table: str, cols: list[str], rows: Iterable[dict[str, Any]]) -> None:
        sql = f"INSERT OR REPLACE INTO {table}({','.join(cols)}) VALUES({','.join('?' * len(cols))})"
        self._db.executemany(sql, ([r[c] for c in cols] for r in rows))

    @staticmethod
    def _rollout_row(r: Rollout) -> dict[str, Any]:
        row = asdict(r)
        row["state"] = r.state.value
        row["policy"] = json.dumps(r.policy)
        row["manifest"] = json.dumps(r.manifest) if r.manifest is not None else None
        return row

    @staticmethod
    def _exec_row(e: Execution) -> dict[str, Any]:
        row = asdict(e)
        row["state"] = e.state.value
        row["rollback_state"] = e.rollback_state.value if e.rollback_state is not None else None
        return row

    def save(self, rollout: Rollout | None = None, executions: Sequence[Execution] = (),
             history: Sequence[tuple[str | None, str | None, str, dict[str, Any] | None]] = (),
             now: float | None = None) -> None:
        """Write a rollout, changed executions and history rows in one transaction.

        ``history`` rows are ``(rollout_id, device_id, event, detail)``.
        """
        now = time.time() if now is None else now
        with self._tx():
            if rollout is not None:
                self._upsert("rollouts", _ROLLOUT_COLS, [self._rollout_row(rollout)])
            if executions:
                self._upsert("executions", _EXEC_COLS, (self._exec_row(e) for e in executions))
            if history:
                self._db.executemany(
                    "INSERT INTO history(ts, rollout_id, device_id, event, detail) VALUES(?,?,?,?,?)",
                    ((now, r, d, str(ev), json.dumps(det) if det is not None else None)
                     for r, d, ev, det in history))

    def _tx(self) -> _Tx:
        return _Tx(self._db)

    # -- reads --------------------------------------------------------------------------------
    def rollout(self, rollout_id: str) -> Rollout:
        """Raises ConfigError for an unknown id."""
        cur = self._db.execute(f"SELECT {','.join(_ROLLOUT_COLS)} FROM rollouts WHERE id=?", (rollout_id,))
        row = cur.fetchone()
        if row is None:
            raise ConfigError(f"unknown rollout {rollout_id!r} in {self.path} (see `edge-fleet status`)")
        return self._to_rollout(row)

    def rollouts(self, limit: int = 50) -> list[Rollout]:
        cur = self._db.execute(
            f"SELECT {','.join(_ROLLOUT_COLS)} FROM rollouts ORDER BY created DESC LIMIT ?", (limit,))
        return [self._to_rollout(row) for row in cur.fetchall()]

    def latest(self) -> Rollout | None:
        found = self.rollouts(limit=1)
        return found[0] if found else None

    def executions(self, rollout_id: str) -> list[Execution]:
        cur = self._db.execute(
            f"SELECT {','.join(_EXEC_COLS)} FROM executions WHERE rollout_id=? ORDER BY wave, device_id",
            (rollout_id,))
        return [Execution(**dict(zip(_EXEC_COLS, row))) for row in cur.fetchall()]

    def history(self, rollout_id: str, device_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT ts, rollout_id, device_id, event, detail FROM history WHERE rollout_id=?"
        args: tuple[Any, ...] = (rollout_id,)
        if device_id:
            sql += " AND device_id=?"
            args += (device_id,)
        rows = self._db.execute(sql + " ORDER BY id", args).fetchall()
        return [{"ts": ts, "rollout_id": r, "device_id": d, "event": ev,
                 "detail": json.loads(det) if det else None} for ts, r, d, ev, det in rows]

    @staticmethod
    def _to_rollout(row: Sequence[Any]) -> Rollout:
        d = dict(zip(_ROLLOUT_COLS, row))
        d["policy"] = json.loads(d["policy"])
        d["manifest"] = json.loads(d["manifest"]) if d["manifest"] else None
        return Rollout(**d)


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
