"""A private Mosquitto per test session: free loopback port, generated config, temp dir.

Never the shared broker on 1883. The broker can be stopped and restarted on the same port to
simulate an outage.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["MosquittoBroker", "find_mosquitto", "free_port"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_mosquitto() -> str | None:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


class MosquittoBroker:
    """Start, stop and restart one mosquitto process with a generated config."""

    def __init__(self, workdir: Path, port: int | None = None, extra_config: str = "") -> None:
        binary = find_mosquitto()
        if binary is None:
            raise RuntimeError("mosquitto binary not found: install it with `apt-get install mosquitto`")
        self.binary = binary
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = self.workdir / "mosquitto.conf"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence false",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "max_queued_messages 100000",
            "message_size_limit 8388608",
        ]
        if "allow_anonymous" not in self.extra_config:
            lines.append("allow_anonymous true")
        self.config_path.write_text("\n".join(lines) + "\n" + self.extra_config + "\n")
        with open(self.workdir / "mosquitto.log", "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen([self.binary, "-c", str(self.config_path)],
                                         stdout=log, stderr=log, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}; see {self.workdir}/mosquitto.log")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> MosquittoBroker:  # noqa: PYI034 (py310: no typing.Self)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
