"""Bounded store-and-forward for telemetry and events (SQLite in WAL mode).

Why: a device is offline for minutes or days, and a power cut must not lose what it measured.
Every message is committed to disk (``synchronous=FULL``) *before* it is published and deleted
only after the broker acknowledged it (QoS 1 PUBACK). On reconnect the backlog drains in order.
A message acknowledged but not yet deleted when power fails is sent again after the reboot, with
the same ``seq`` (the QoS 1 duplicate consumers already tolerate).

Bounded by rows and bytes: when full, the oldest rows are dropped and counted (``dropped``),
because fresh telemetry is worth more than old. Sequence numbers per stream live in the same
database and are assigned in the same transaction as the insert, so ``seq`` never repeats and
never skips across restarts.

Thread-safety: one connection guarded by a lock; every call is short.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.errors import ConfigError
from edgefleet.messages import encode

__all__ = ["Outbox", "OutboxRow"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class OutboxRow:
    id: int
    topic: str
    payload: bytes


class Outbox:
    """A durable FIFO of (topic, payload) with per-stream sequence numbers.

    Raises:
        ConfigError: the database cannot be opened (bad ``state_dir``, corrupt file).
    """

    def __init__(self, path: Path | str, max_rows: int = 10_000, max_bytes: int = 16 * 1024 * 1024) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.recovered_from: Path | None = None
        try:
            self._db, row = self._open()
        except sqlite3.DatabaseError as exc:
            # A damaged file must not keep the device offline for good: keep it for inspection and
            # start a fresh outbox (what it held is lost, and the seq restart shows that).
            self.recovered_from = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("%s is damaged (%s); moved to %s, starting an empty outbox", self.path, exc,
                      self.recovered_from)
            os.replace(self.path, self.recovered_from)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            try:
                self._db, row = self._open()
            except sqlite3.Error as again:
                raise ConfigError(f"{self.path}: cannot create the outbox database: {again}") from again
        except sqlite3.Error as exc:
            raise ConfigError(f"{self.path}: cannot open the outbox database: {exc}") from exc
        self._rows, self._bytes = int(row[0]), int(row[1])

    def _open(self) -> tuple[sqlite3.Connection, tuple[int, int]]:
        db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone()
        except sqlite3.Error:
            db.close()
            raise
        return db, (int(row[0]), int(row[1]))

    # -- writing ------------------------------------------------------------------------------
    def append(self, topic: str, body: dict[str, Any], stream: str) -> int:
        """Give ``body`` the next ``seq`` of ``stream``, store it, and return that seq.

        The sequence bump, the insert and any drop-oldest happen in one transaction.
        """
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                seq = self._meta_get(cur, f"seq:{stream}") + 1
                self._meta_set(cur, f"seq:{stream}", seq)
                payload = encode({**body, "seq": seq})
                cur.execute("INSERT INTO outbox (topic, payload, size) VALUES (?, ?, ?)",
                            (topic, payload, len(payload)))
                rows, nbytes = self._rows + 1, self._bytes + len(payload)
                dropped = 0
                while rows > self.max_rows or nbytes > self.max_bytes:
                    old = cur.execute("SELECT id, size FROM outbox ORDER BY id LIMIT 1").fetchone()
                    if old is None:
                        break
                    cur.execute("DELETE FROM outbox WHERE id = ?", (old[0],))
                    rows, nbytes, dropped = rows - 1, nbytes - int(old[1]), dropped + 1
                if dropped:
                    self._meta_set(cur, "dropped", self._meta_get(cur, "dropped") + dropped)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            self._rows, self._bytes = rows, nbytes
            return seq

    def delete(self, ids: list[int]) -> None:
        """Forget rows the broker acknowledged (ids already gone are ignored)."""
        if not ids:
            return
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                removed = 0
                freed = 0
                for row_id in ids:
                    row = cur.execute("SELECT size FROM outbox WHERE id = ?", (row_id,)).fetchone()
                    if row is not None:
                        cur.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
                        removed += 1
                        freed += int(row[0])
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            self._rows -= removed
            self._bytes -= freed

    # -- reading ------------------------------------------------------------------------------
    def after(self, last_id: int, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` rows with id > ``last_id``, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT id, topic, payload FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                    (last_id, limit)).fetchall()
        return [OutboxRow(int(r[0]), str(r[1]), bytes(r[2])) for r in rows]

    def pending(self) -> int:
        return self._rows

    def pending_bytes(self) -> int:
        return self._bytes

    def dropped(self) -> int:
        with self._lock:
            return self._meta_get(self._db.cursor(), "dropped")

    def last_seq(self, stream: str) -> int:
        with self._lock:
            return self._meta_get(self._db.cursor(), f"seq:{stream}")

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()

    @staticmethod
    def _meta_get(cur: sqlite3.Cursor, key: str) -> int:
        row = cur.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _meta_set(cur: sqlite3.Cursor, key: str, value: int) -> None:
        cur.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))
