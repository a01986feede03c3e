"""The PostgreSQL backend of :mod:`fleet.store` (psycopg 3): shared state for teams and controllers.

Autocommit outside explicit transactions, so reads never hold locks. A lost connection becomes
:class:`~fleet.store.StoreUnavailable` and the next call connects again: a driver that hits it
retries its write (nothing is published before the write succeeds) until the database is back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from edgefleet.errors import ConfigError
from fleet.store_errors import StoreUnavailable

__all__ = ["PostgresBackend"]

_CONNECT_TIMEOUT_S = 5


def _display(url: str) -> str:
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1@", url)


class PostgresBackend:
    tokens: ClassVar[dict[str, str]] = {"serial_pk": "BIGSERIAL PRIMARY KEY", "blob": "BYTEA"}

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise ConfigError("--state postgresql://...: psycopg is not installed "
                              "(pip install 'edgefleet[fleet]')") from exc
        self._psycopg = psycopg
        self.url = url
        self.conn: Any = None
        self._connect()

    def _connect(self) -> None:
        psycopg = self._psycopg
        try:
            self.conn = psycopg.connect(self.url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S)
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreUnavailable(f"state database {_display(self.url)} unreachable: {first}") from exc
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"--state {_display(self.url)}: {exc}") from exc

    def _live(self) -> Any:
        if self.conn is None or self.conn.closed:
            self._connect()
        return self.conn

    def _translate(self, exc: Exception) -> StoreUnavailable:
        if self.conn is not None and self.conn.broken:
            self.conn = None  # connect again on the next call
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return StoreUnavailable(f"state database {_display(self.url)}: {first}")

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        conn = self._live()
        try:
            return conn.execute(sql.replace("?", "%s"), tuple(args))
        except (self._psycopg.OperationalError, self._psycopg.InterfaceError) as exc:
            raise self._translate(exc) from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        conn = self._live()
        try:
            with conn.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), list(rows))
        except (self._psycopg.OperationalError, self._psycopg.InterfaceError) as exc:
            raise self._translate(exc) from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        conn = self._live()
        try:
            with conn.transaction():
                yield
        except (self._psycopg.OperationalError, self._psycopg.InterfaceError) as exc:
            raise self._translate(exc) from exc

    def table_exists(self, name: str) -> bool:
        return self.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()[0]

    def before_migrations(self) -> None:
        return

    def migration_lock(self) -> None:
        """Several `edge-fleet migrate` at once: one migrates, the others wait for its commit."""
        self.execute("SELECT pg_advisory_xact_lock(7241001)")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
