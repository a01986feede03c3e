"""A private PostgreSQL cluster per test session: ``initdb`` into a temp dir, ``pg_ctl`` on a free port.

Never the machine's shared server on 5432. Binaries come from Debian's postgresql package
(``/usr/lib/postgresql/<version>/bin``; ``make broker`` installs it). PostgreSQL
refuses to run as root, so under root the cluster runs as the ``postgres`` user (created by the
package) in a directory it owns. Trust authentication on 127.0.0.1 only; fsync off (tests only).
The server can be stopped and started again on the same port and data to simulate an outage.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from edgefleet.testing.broker import free_port

__all__ = ["PostgresServer", "find_pg_bin", "wait_until_accepting"]


def find_pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` holding initdb and pg_ctl, or None."""
    found = []
    for bin_dir in Path("/usr/lib/postgresql").glob("*/bin"):
        if (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file():
            try:
                found.append((int(bin_dir.parent.name.split(".")[0]), bin_dir))
            except ValueError:
                continue
    return max(found)[1] if found else None


class PostgresServer:
    """One private cluster; ``url`` is ``postgresql://postgres@127.0.0.1:PORT/postgres``."""

    def __init__(self, port: int | None = None) -> None:
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL binaries not found under /usr/lib/postgresql/*/bin: "
                               "run `make broker` (apt-get install postgresql)")
        self.bin = bin_dir
        self.port = port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
        self.data = self.workdir / "data"
        self.log = self.workdir / "postgres.log"
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise RuntimeError("running as root needs the 'postgres' user (from the postgresql package)") from exc
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)
            self._user = {"user": pw.pw_uid, "group": pw.pw_gid}
        self._initdb()

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / args[0]), *args[1:]], check=True, capture_output=True, text=True,
                              timeout=timeout, cwd=self.workdir, **self._user)

    def _initdb(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync",
                  "--no-instructions" if self._has_flag("--no-instructions") else "-q")

    def _has_flag(self, flag: str) -> bool:
        out = subprocess.run([str(self.bin / "initdb"), "--help"], capture_output=True, text=True, check=False)
        return flag in out.stdout

    def start(self, timeout: float = 30) -> PostgresServer:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.workdir} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", str(int(timeout)),
                  "start", timeout=timeout + 10)
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_database(self, name: str) -> str:
        """A fresh database (each test gets its own); returns its URL."""
        self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-q",
                  "-c", f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:  # noqa: PYI034 (py310: no typing.Self)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_until_accepting(url: str, timeout: float = 10.0) -> None:
    """Poll until a psycopg connection to ``url`` succeeds (after a restart)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
