"""A private Prometheus per test: Debian's ``prometheus`` binary, a generated config, a free port.

Never the machine's service on 9090. It scrapes the given targets every ``scrape_interval`` and
answers PromQL through its HTTP API (:meth:`PrometheusServer.query`). ``make broker``
installs the package.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgefleet.testing.broker import free_port

__all__ = ["PrometheusServer", "find_prometheus"]


def find_prometheus() -> str | None:
    for candidate in (shutil.which("prometheus"), "/usr/bin/prometheus"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


class PrometheusServer:
    def __init__(self, targets: Sequence[str], scrape_interval: str = "1s", port: int | None = None) -> None:
        self.binary = find_prometheus() or ""
        if not self.binary:
            raise RuntimeError("prometheus binary not found: run `make broker` "
                               "(apt-get install prometheus)")
        self.port = port or free_port()
        self.targets = list(targets)
        self.scrape_interval = scrape_interval
        self.workdir = Path(tempfile.mkdtemp(prefix="edgefleet-prom-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> PrometheusServer:
        config = self.workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {self.scrape_interval}\n"
            f"  evaluation_interval: {self.scrape_interval}\n"
            "scrape_configs:\n"
            "  - job_name: edgefleet\n"
            f"    static_configs:\n      - targets: {json.dumps(self.targets)}\n")
        with open(self.workdir / "prometheus.log", "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=log, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}; see {self.workdir}/prometheus.log")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready on {self.port} within {timeout}s")

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query results (``[{"metric": {...}, "value": [ts, "v"]}, ...]``)."""
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise RuntimeError(f"query {promql!r}: {body}")
        return list(body["data"]["result"])

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:  # it did not stop on SIGTERM
            proc.kill()
            proc.wait(5)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:  # noqa: PYI034 (py310: no typing.Self)
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
