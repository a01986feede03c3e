"""The device's broker connection and the outbox drain.

:class:`MqttLink` is the contract's one paho wrapper (:class:`edgefleet.mqtt.MqttConnection`)
set up from agent.yaml: a retained Last Will on the state topic and the command subscriptions.
It publishes only while connected: the durable queue is the outbox, not paho's memory.

:class:`Forwarder` drains the :class:`~agent.outbox.Outbox` in order at a bounded rate, keeps at
most ``max_inflight`` QoS 1 publishes unacknowledged, and deletes a row only on its PUBACK.
paho callbacks run on paho's network thread while paho holds its own locks, so they only append
to a deque; all bookkeeping happens on the forwarder thread (no lock-order deadlock possible).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.config import BrokerConfig
from agent.outbox import Outbox
from edgefleet.mqtt import LinkSettings, Message, MqttConnection

__all__ = ["Forwarder", "Incoming", "MqttLink", "link_settings"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Incoming:
    """A received command, with the MQTT 5 request/response properties when present."""

    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None


def link_settings(cfg: BrokerConfig, password: str | None, will: tuple[str, bytes],
                  max_inflight: int = 20) -> LinkSettings:
    """agent.yaml's ``broker:`` block as the contract's connection settings."""
    return LinkSettings(
        urls=cfg.nodes, username=cfg.username, password=password,
        ca_file=str(cfg.ca_file) if cfg.ca_file else None, cert_file=str(cfg.cert_file) if cfg.cert_file else None,
        key_file=str(cfg.key_file) if cfg.key_file else None, keepalive_s=cfg.keepalive_s, protocol=cfg.protocol,
        session_expiry_s=cfg.session_expiry_s, reconnect_min_s=cfg.reconnect_min_s,
        reconnect_max_s=cfg.reconnect_max_s, max_inflight=max_inflight, will=will)


class MqttLink(MqttConnection):
    """The device's broker connection: a retained Last Will on its state topic, its command
    subscriptions, and commands handed over as :class:`Incoming`."""

    def __init__(self, cfg: BrokerConfig, client_id: str, *, password: str | None,
                 will_topic: str, will_payload: bytes, subscriptions: list[str],
                 on_connected: Callable[[], None], on_message: Callable[[Incoming], None],
                 on_published: Callable[[int], None], max_inflight: int = 20) -> None:
        self.cfg = cfg

        def deliver(msg: Message) -> None:
            on_message(Incoming(msg.topic, msg.payload, msg.response_topic, msg.correlation))

        super().__init__(link_settings(cfg, password, (will_topic, will_payload), max_inflight), client_id,
                         subscriptions=subscriptions, on_connected=on_connected, on_message=deliver,
                         on_published=on_published)


class Forwarder:
    """Publish outbox rows in order, at most ``drain_per_s`` per second, delete them on PUBACK."""

    def __init__(self, outbox: Outbox, link: MqttLink | None = None, *, max_inflight: int = 20,
                 drain_per_s: float = 50.0, resend_after_s: float = 30.0) -> None:
        self.outbox = outbox
        self.link = link
        self.max_inflight = max_inflight
        self.drain_per_s = drain_per_s
        self.resend_after_s = resend_after_s
        self._acks: collections.deque[int] = collections.deque()
        self._inflight: dict[int, tuple[int, float]] = {}  # mid -> (row id, sent at)
        self._cursor = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._tokens = max(1.0, drain_per_s)
        self._last_refill = time.monotonic()
        self._thread: threading.Thread | None = None
        self._connects_seen = 0
        self.published = 0

    def attach(self, link: MqttLink) -> None:
        self.link = link

    def notify(self) -> None:
        """Something was appended or acknowledged: look again now."""
        self._wake.set()

    def on_published(self, mid: int) -> None:
        """paho's thread: record the PUBACK and wake the drain (no locks, see module doc)."""
        self._acks.append(mid)
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox-forwarder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.outbox.pending() == 0:
                return True
            self._wake.set()
            time.sleep(0.02)
        return self.outbox.pending() == 0

    def _run(self) -> None:
        backlog = False
        while not self._stop.is_set():
            # With a backlog, come back as soon as one more token is earned; else sleep on events.
            self._wake.wait(min(0.25, 1.0 / self.drain_per_s) if backlog else 0.25)
            self._wake.clear()
            try:
                backlog = self._step()
            except Exception:  # a disk or broker hiccup must not end the drain for good
                log.exception("outbox forwarder step failed")
                backlog = False
                self._stop.wait(0.5)

    def _step(self) -> bool:
        """One round of bookkeeping and publishing; True while rows wait for a token or a slot."""
        done: list[int] = []
        while self._acks:
            entry = self._inflight.pop(self._acks.popleft(), None)
            if entry is not None:
                done.append(entry[0])
        self.outbox.delete(done)
        link = self.link
        if link is None or not link.connected:
            return False
        now = time.monotonic()
        if link.connects != self._connects_seen:
            # Reconnected: paho resends what it had in flight; give those a fresh deadline.
            self._connects_seen = link.connects
            self._inflight = {mid: (row, now) for mid, (row, _) in self._inflight.items()}
        if self._inflight and min(t for _, t in self._inflight.values()) < now - self.resend_after_s:
            # paho lost track of them (or the broker never answered): send them again, same seq.
            self._cursor = min(row for row, _ in self._inflight.values()) - 1
            self._inflight.clear()
        self._tokens = min(max(1.0, self.drain_per_s),
                           self._tokens + (now - self._last_refill) * self.drain_per_s)
        self._last_refill = now
        room = min(self.max_inflight - len(self._inflight), int(self._tokens))
        if room > 0:
            for row in self.outbox.after(self._cursor, room):
                mid = link.publish(row.topic, row.payload, qos=1)
                if mid is None:
                    return False
                self._inflight[mid] = (row.id, now)
                self._cursor = row.id
                self._tokens -= 1
                self.published += 1
        return self.outbox.pending() > len(self._inflight)
