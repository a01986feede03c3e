"""Private NATS servers with JetStream and their MQTT 3.1.1 listener, alone or as a routed cluster.

NATS is a clustered engine whose MQTT gateway speaks 3.1.1 only (no MQTT 5 properties), so it
shows that the contract works without them and that agents fail over between cluster nodes.
Free loopback ports and a temp dir per server; never the machine's shared nats-server on 4222.

    with NatsCluster(tmp_path, size=3) as cluster:
        cluster.mqtt_urls        # ["mqtt://127.0.0.1:p1", ...]
        cluster.nodes[0].stop()  # kill the node the agents are on
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from edgefleet.testing.broker import free_port

__all__ = ["NatsCluster", "NatsServer", "find_nats_server"]


def find_nats_server() -> str | None:
    for candidate in (shutil.which("nats-server"), "/usr/sbin/nats-server", "/usr/bin/nats-server"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _mqtt_session_works(port: int) -> bool:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    answers: list[bool] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"ready-probe-{port}", protocol=mqtt.MQTTv311,
                         clean_session=False)
    client.on_connect = lambda c, u, f, rc, p: answers.append(not rc.is_failure)
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except OSError:
        return False
    client.loop_start()
    try:
        deadline = time.monotonic() + 6.0
        while not answers and time.monotonic() < deadline:
            time.sleep(0.05)
        return bool(answers and answers[0])
    finally:
        client.disconnect()
        client.loop_stop()


class NatsServer:
    """One nats-server process: client port, MQTT port and (in a cluster) a route port."""

    def __init__(self, workdir: Path, name: str = "n1", cluster_routes: list[int] | None = None,
                 cluster_port: int | None = None, max_consumers: int | None = None) -> None:
        binary = find_nats_server()
        if binary is None:
            raise RuntimeError("nats-server not found: install it with `apt-get install nats-server`")
        self.binary = binary
        self.name = name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.mqtt_port = free_port()
        self.cluster_port = cluster_port
        self.routes = cluster_routes or []
        self.max_consumers = max_consumers  # a JetStream limit: QoS 1 subscriptions past it get SUBACK 0x80
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def _config(self) -> str:
        store = self.workdir / "jetstream"
        lines = [
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.port}",
            f'jetstream {{ store_dir: "{store}" }}',
            # in a cluster every MQTT stream on all 3 nodes: losing one node keeps a quorum of 2
            f"mqtt {{ listen: 127.0.0.1:{self.mqtt_port}"
            + (f", stream_replicas: {len(self.routes) + 1}" if self.cluster_port is not None else "") + " }",
            "max_payload: 8MB",
        ]
        if self.max_consumers is not None:
            lines.append("accounts { EF: { jetstream: { max_mem: 64MB, max_file: 256MB, "
                         f"max_consumers: {self.max_consumers} }}, users: [{{user: ef, password: ef}}] }} }}")
            lines.append("no_auth_user: ef")
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            lines.append(f"cluster {{ name: edgefleet, listen: 127.0.0.1:{self.cluster_port}, routes: [{routes}] }}")
        return "\n".join(lines) + "\n"

    def start(self) -> NatsServer:
        config = self.workdir / "nats.conf"
        config.write_text(self._config())
        log = open(self.workdir / "nats.log", "ab")  # noqa: SIM115 (the process owns it)
        self.proc = subprocess.Popen([self.binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until an MQTT client gets a successful CONNACK with a session (JetStream is up for that:
        a cluster first elects its JetStream leader)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"nats-server {self.name} exited: {self.log_tail()}")
            if _mqtt_session_works(self.mqtt_port):
                return
            time.sleep(0.2)
        raise RuntimeError(f"nats-server {self.name} MQTT not ready after {timeout:g}s: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        path = self.workdir / "nats.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> NatsServer:  # noqa: PYI034 (py3.10: no typing.Self)
        self.start().wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsCluster:
    """``size`` routed nats-server nodes with JetStream; MQTT sessions live in replicated streams."""

    def __init__(self, workdir: Path, size: int = 3, node_class: type[NatsServer] = NatsServer,
                 ready_timeout_s: float = 60.0) -> None:
        ports = [free_port() for _ in range(size)]
        self.nodes = [node_class(Path(workdir) / f"n{i + 1}", name=f"n{i + 1}",
                                 cluster_routes=[p for j, p in enumerate(ports) if j != i], cluster_port=ports[i])
                      for i in range(size)]
        self.ready_timeout_s = ready_timeout_s

    @property
    def mqtt_urls(self) -> list[str]:
        return [n.mqtt_url for n in self.nodes]

    def __enter__(self) -> NatsCluster:  # noqa: PYI034
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_ready(self.ready_timeout_s)
        return self

    def __exit__(self, *exc: object) -> None:
        for node in self.nodes:
            node.stop()
