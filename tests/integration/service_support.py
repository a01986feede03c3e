"""Helpers for the agent service tests: a real agent subprocess, a plain MQTT observer.

Not a test module (no ``test_`` prefix). Everything is real: the agent runs as
``python -m agent.cli run --config ...`` against a private Mosquitto; the observer is a plain
paho client, as the fleet tool would be.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.mqtt import publish_properties
from edgefleet.testing.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]

__all__ = ["HANGING_INPUT", "REPO", "AgentProcess", "NotifySocket", "Observer", "agent_config",
           "broker_files_access", "build_hanging_model", "command", "http_json"]


def broker_files_access() -> str:
    """Mosquitto started as root drops to the ``mosquitto`` user, which cannot enter pytest's
    0700 temp dirs: keep it as the test's own user so it can read password files and write its
    persistence file there (ignored by mosquitto when not started as root)."""
    return "user root\n" if os.geteuid() == 0 else ""


def agent_config(tmp: Path, broker_url: str, *, device_id: str = "pi-1", group: str = "g1",
                 model: Path | None = None, **sections: Any) -> dict[str, Any]:
    """A config dict with test-friendly timings (short keepalive and intervals)."""
    cfg: dict[str, Any] = {
        "device_id": device_id, "group": group, "profile": "x86-dev", "state_dir": str(tmp / "state"),
        "broker": {"url": broker_url, "keepalive_s": 2, "reconnect_min_s": 0.5, "reconnect_max_s": 1},
        "http": {"listen": None},
        "telemetry": {"interval_s": 0.5},
        "cache": {"enabled": False},
    }
    if model is not None:
        cfg["model"] = str(model)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


class AgentProcess:
    """``edge-agent run`` as a child process, with its stderr kept in a file."""

    def __init__(self, workdir: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.extra_env = dict(env or {})
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "agent.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.workdir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        env.pop("NOTIFY_SOCKET", None)
        env.update(self.extra_env)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(self.config_path)],
                                     cwd=REPO, env=env, stdout=log, stderr=log)
        return self

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def stop_all(agents: list[AgentProcess], timeout: float = 15.0) -> None:
    """SIGTERM every agent at once, then wait for each (kill the ones that do not stop)."""
    for a in agents:
        if a.proc and a.proc.poll() is None:
            a.proc.terminate()
    for a in agents:
        try:
            if a.proc:
                a.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            a.stop_quietly()


class Observer:
    """A plain MQTT 5 client that records everything under ``edgefleet/#``.

    ``session=True`` keeps a persistent session (the broker queues QoS 1 messages for it while
    it or the broker is away -- with broker persistence on).
    """

    def __init__(self, port: int, *, topic: str = "edgefleet/#", session: bool = False,
                 username: str | None = None, password: str | None = None, client_id: str | None = None) -> None:
        self.messages: list[tuple[str, dict[str, Any] | None, bool, Any]] = []
        self._lock = threading.Lock()
        self.topic = topic
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"obs-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.subscribed = threading.Event()
        self.granted: list[Any] = []
        props = None
        if session:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", port, keepalive=5, clean_start=not session, properties=props)
        self.client.loop_start()
        wait_for(self.subscribed.is_set, 10, what="observer subscription")

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not rc.is_failure:
            client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self.granted = list(codes)
        self.subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            body = None
        props = getattr(msg, "properties", None)
        with self._lock:
            self.messages.append((msg.topic, body, bool(msg.retain), props))

    def on(self, suffix: str) -> list[dict[str, Any]]:
        """Bodies of messages whose topic ends with ``suffix``, in arrival order."""
        with self._lock:
            return [b for t, b, _, _ in self.messages if t.endswith(suffix) and b is not None]

    def raw(self) -> list[tuple[str, dict[str, Any] | None, bool, Any]]:
        with self._lock:
            return list(self.messages)

    def publish(self, topic: str, payload: bytes | str | dict[str, Any], *, response_topic: str | None = None,
                correlation: bytes | None = None) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = publish_properties(response_topic, correlation)
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def command(name: str, cid: str | None = None, ts: float | None = None, ttl_s: float = 60.0,
            **fields: Any) -> dict[str, Any]:
    return {"id": cid or uuid.uuid4().hex, "ts": time.time() if ts is None else ts, "ttl_s": ttl_s, **fields}



def http_json(port: int, method: str, path: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    """One request to an agent's REST endpoint: ``(status, parsed JSON body)``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


class NotifySocket:
    """Plays systemd's ``NOTIFY_SOCKET``: records every datagram with its arrival time (monotonic)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self.received: list[tuple[float, str]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                self.received.append((time.monotonic(), self._sock.recv(256).decode()))
            except (TimeoutError, OSError):
                continue

    def pings_after(self, t: float) -> list[float]:
        return [at for at, msg in list(self.received) if msg == "WATCHDOG=1" and at > t]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2)
        self._sock.close()


_HANGING_MODEL = """
import os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf
w = tf.constant(np.random.default_rng(3).normal(0, 0.5, (4, 4)).astype(np.float32))
@tf.function(input_signature=[tf.TensorSpec((1, 4), tf.float32, name="x")])
def fn(x):
    # One loop step for inputs in [-1, 1]; about 1e9 steps (many minutes) when x[0, 0] >= 2.
    n = 1 + tf.cast(tf.nn.relu(x[0, 0] - 1.5) * 2e9, tf.int32)
    _, h = tf.while_loop(lambda i, h: i < n, lambda i, h: (i + 1, tf.tanh(tf.matmul(h, w))), (tf.constant(0), x))
    return tf.nn.softmax(h)
conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
open(sys.argv[1], "wb").write(conv.convert())
"""
HANGING_INPUT = [[2.0, 0.0, 0.0, 0.0]]
"""The one input on which :func:`build_hanging_model`'s model hangs (any input in [-1, 1] answers at once)."""


def build_hanging_model(path: Path) -> Path:
    """A real float32 ``[1, 4] -> [1, 4]`` TFLite model whose WHILE loop hangs on :data:`HANGING_INPUT`.

    Built with TensorFlow in a child process (the test process never imports it); skips the test
    when TensorFlow is not installed.
    """
    import pytest

    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("building the hanging model needs TensorFlow (a development dependency)")
    subprocess.run([sys.executable, "-c", _HANGING_MODEL, str(path)], check=True, timeout=300,
                   capture_output=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    return path
