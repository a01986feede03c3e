"""Rollouts, per-device executions and their history in SQLite (WAL), so a killed fleet tool resumes.

The command id for each (rollout, device) is written here *before* the command is published:
after a crash the same id is sent again (the device drops duplicates), and a device that already
answered is never sent anything twice. One transaction per batch of changes keeps large fleets
cheap to persist.

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

__all__ = [
    "EXEC_FAILURES",
    "EXEC_STATES",
    "EXEC_TERMINAL",
    "ROLLOUT_STATES",
    "ROLLOUT_TERMINAL",
    "Execution",
    "Rollout",
    "Store",
    "default_data_dir",
]

# Names follow AWS IoT Jobs so operators and dashboards need no translation.
EXEC_STATES = ("QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED")
EXEC_TERMINAL = frozenset({"SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED"})
EXEC_FAILURES = frozenset({"FAILED", "REJECTED", "TIMED_OUT"})
ROLLOUT_STATES = ("IN_PROGRESS", "ABORTING", "SUCCEEDED", "FAILED", "ABORTED")
ROLLOUT_TERMINAL = frozenset({"SUCCEEDED", "FAILED", "ABORTED"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts(
  id TEXT PRIMARY KEY, kind TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
  state TEXT NOT NULL, reason TEXT, artifact_dir TEXT, name TEXT, version TEXT, sha256 TEXT,
  manifest TEXT, signature TEXT, artifact_url TEXT, serve TEXT, policy TEXT NOT NULL,
  current_wave INTEGER NOT NULL, waves INTEGER NOT NULL, broker TEXT);
CREATE TABLE IF NOT EXISTS executions(
  rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, wave INTEGER NOT NULL, state TEXT NOT NULL,
  ota_state TEXT, command_id TEXT, sent_ts REAL, answered INTEGER NOT NULL DEFAULT 0,
  updated_ts REAL, reason TEXT, prev_version TEXT,
  rollback_state TEXT, rollback_id TEXT, rollback_sent_ts REAL,
  PRIMARY KEY(rollout_id, device_id));
CREATE TABLE IF NOT EXISTS history(
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, rollout_id TEXT, device_id TEXT,
  event TEXT NOT NULL, detail TEXT);
CREATE INDEX IF NOT EXISTS history_rollout ON history(rollout_id, device_id);
"""


def default_data_dir() -> Path:
    env = os.environ.get("EDGEFLEET_DATA")
    return Path(env) if env else Path.home() / ".local" / "share" / "edgefleet"


@dataclass(frozen=True)
class Execution:
    """One device's part in a rollout. ``answered``: the device replied or sent an event."""

    rollout_id: str
    device_id: str
    wave: int
    state: str = "QUEUED"
    ota_state: str | None = None
    command_id: str | None = None
    sent_ts: float | None = None
    answered: bool = False
    updated_ts: float | None = None
    reason: str | None = None
    prev_version: str | None = None
    rollback_state: str | None = None
    rollback_id: str | None = None
    rollback_sent_ts: float | None = None

    @property
    def terminal(self) -> bool:
        return self.state in EXEC_TERMINAL


@dataclass(frozen=True)
class Rollout:
    id: str
    kind: str  # "deploy" or "rollback"
    created: float
    updated: float
    state: str
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

    @property
    def terminal(self) -> bool:
        return self.state in ROLLOUT_TERMINAL


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
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"data dir {self.path.parent}: cannot open the fleet database ({exc})") from exc

    @classmethod
    def open(cls, data_dir: Path | str | None = None) -> Store:
        return cls(Path(data_dir or default_data_dir()) / "fleet.db")

    def close(self) -> None:
        self._db.close()

    # -- writes -------------------------------------------------------------------------------
    def _upsert(self, table: str, cols: list[str], rows: Iterable[dict[str, Any]]) -> None:
        sql = f"INSERT OR REPLACE INTO {table}({','.join(cols)}) VALUES({','.join('?' * len(cols))})"
        self._db.executemany(sql, ([r[c] for c in cols] for r in rows))

    @staticmethod
    def _rollout_row(r: Rollout) -> dict[str, Any]:
        row = asdict(r)
        row["policy"] = json.dumps(r.policy)
        row["manifest"] = json.dumps(r.manifest) if r.manifest is not None else None
        return row

    @staticmethod
    def _exec_row(e: Execution) -> dict[str, Any]:
        row = asdict(e)
        row["answered"] = int(e.answered)
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
                    ((now, r, d, ev, json.dumps(det) if det is not None else None) for r, d, ev, det in history))

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
        out = []
        for row in cur.fetchall():
            d = dict(zip(_EXEC_COLS, row))
            d["answered"] = bool(d["answered"])
            out.append(Execution(**d))
        return out

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
