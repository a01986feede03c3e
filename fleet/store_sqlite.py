"""The SQLite backend of :mod:`fleet.store` (WAL): one person's data dir, and the default.

Safe for one writer at a time and any number of readers, across processes (``BEGIN IMMEDIATE``
waits up to 30 s for the write lock). Data dirs from before the SENT state (a QUEUED row with a
command id and an ``answered`` flag) are converted before the migrations run.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

from edgefleet.errors import ConfigError
from fleet.store_errors import StoreUnavailable

__all__ = ["SqliteBackend"]

# Before SENT: "sent, no answer" was QUEUED + command_id + answered = 0; "answered" was a flag.
_MIGRATE_SENT = "UPDATE executions SET state='SENT' WHERE state='QUEUED' AND command_id IS NOT NULL AND answered=0"
_MIGRATE_ANSWERED = "UPDATE executions SET state='IN_PROGRESS' WHERE state='QUEUED' AND answered<>0"


def sqlite_path(url: str) -> Path:
    """``sqlite:///abs/path`` (or ``sqlite:relative``) -> the file path."""
    parts = urlsplit(url)
    path = unquote(parts.path if parts.netloc == "" else parts.netloc + parts.path)
    if not path:
        raise ConfigError(f"--state {url!r}: expected sqlite:///PATH/fleet.db")
    return Path(path)


class SqliteBackend:
    tokens: ClassVar[dict[str, str]] = {"serial_pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB"}

    def __init__(self, url: str) -> None:
        self.path = sqlite_path(url)
        self.url = f"sqlite:///{self.path}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"data dir {self.path.parent}: cannot open the fleet database ({exc})") from exc

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        try:
            return self.conn.execute(sql, tuple(args))
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"{self.path}: {exc}") from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            self.conn.executemany(sql, rows)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"{self.path}: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.execute("COMMIT")

    def table_exists(self, name: str) -> bool:
        return self.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None

    def before_migrations(self) -> None:
        """Convert a pre-SENT data dir in place (it then matches migration 0001)."""
        if not self.table_exists("executions"):
            return
        columns = {row[1] for row in self.execute("PRAGMA table_info(executions)")}
        if "answered" not in columns:
            return
        with self.transaction():
            self.execute(_MIGRATE_SENT)
            self.execute(_MIGRATE_ANSWERED)
            if sqlite3.sqlite_version_info >= (3, 35):  # older SQLite keeps the column; it has a default
                self.execute("ALTER TABLE executions DROP COLUMN answered")

    def migration_lock(self) -> None:
        return  # BEGIN IMMEDIATE already holds the write lock

    def close(self) -> None:
        self.conn.close()
