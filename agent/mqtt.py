"""The broker connection (paho-mqtt v2) and the outbox drain.

:class:`MqttLink` owns one paho client: MQTT 5 (falling back to 3.1.1 when the broker refuses
it), TLS and username/password, a retained Last Will on the state topic, subscriptions renewed on
every connect, and incoming messages handed to a callback with the MQTT 5 Response Topic and
Correlation Data. It publishes only while connected: the durable queue is the outbox, not
paho's memory.

:class:`Forwarder` drains the :class:`~agent.outbox.Outbox` in order at a bounded rate, keeps at
most ``max_inflight`` QoS 1 publishes unacknowledged, and deletes a row only on its PUBACK.
paho callbacks run on paho's network thread while paho holds its own locks, so they only append
to a deque; all bookkeeping happens on the forwarder thread (no lock-order deadlock possible).
"""

from __future__ import annotations

import collections
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import BrokerConfig
from agent.outbox import Outbox
from edgefleet.errors import ConfigError
from edgefleet.mqtt import publish_properties

__all__ = ["Forwarder", "Incoming", "MqttLink"]

log = logging.getLogger(__name__)

# CONNACK reason codes meaning "I do not speak this protocol version" (3.1.1 code 1, MQTT 5 code 132).
_UNSUPPORTED_PROTOCOL = {1, 132}


@dataclass(frozen=True)
class Incoming:
    """A received message, with the MQTT 5 request/response properties when present."""

    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None


class MqttLink:
    """One broker connection that reconnects by itself.

    ``on_connected`` runs on paho's thread after every successful connect (publish the birth
    there); ``on_message`` gets every message on the subscriptions; ``on_published(mid)`` every
    acknowledged QoS 1 publish. Callbacks must be quick and must not call back into paho with
    locks held.
    """

    def __init__(self, cfg: BrokerConfig, client_id: str, *, password: str | None,
                 will_topic: str, will_payload: bytes, subscriptions: list[str],
                 on_connected: Callable[[], None], on_message: Callable[[Incoming], None],
                 on_published: Callable[[int], None], max_inflight: int = 20) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self._password = password
        self._will = (will_topic, will_payload)
        self._subscriptions = list(subscriptions)
        self._on_connected = on_connected
        self._on_message = on_message
        self._on_published = on_published
        self._max_inflight = max_inflight
        self._protocol = paho.MQTTv311 if cfg.protocol == "3.1.1" else paho.MQTTv5
        self._connected = threading.Event()
        self._stopping = False
        self._switch_lock = threading.Lock()
        self.connects = 0
        self._client = self._make_client()

    @property
    def protocol(self) -> str:
        return "5" if self._protocol == paho.MQTTv5 else "3.1.1"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # -- lifecycle ----------------------------------------------------------------------------
    def _make_client(self) -> paho.Client:
        v5 = self._protocol == paho.MQTTv5
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=self._protocol,
                             clean_session=None if v5 else self.cfg.session_expiry_s == 0)
        if self.cfg.username is not None:
            client.username_pw_set(self.cfg.username, self._password)
        if self.cfg.tls:
            try:
                client.tls_set(ca_certs=str(self.cfg.ca_file) if self.cfg.ca_file else None,
                               certfile=str(self.cfg.cert_file) if self.cfg.cert_file else None,
                               keyfile=str(self.cfg.key_file) if self.cfg.key_file else None,
                               cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"broker TLS files: {exc}") from exc
        topic, payload = self._will
        client.will_set(topic, payload, qos=1, retain=True)
        # paho types these as int but only multiplies and sleeps on them: fractions work.
        client.reconnect_delay_set(min_delay=self.cfg.reconnect_min_s,  # type: ignore[arg-type]
                                   max_delay=self.cfg.reconnect_max_s)  # type: ignore[arg-type]
        client.max_inflight_messages_set(self._max_inflight)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        return client

    def start(self) -> None:
        """Connect in the background; never blocks on an unreachable broker."""
        kwargs: dict[str, Any] = {}
        if self._protocol == paho.MQTTv5:
            # A persistent session: commands sent while the device is offline are queued by the
            # broker (up to session_expiry_s) and judged by their TTL when they arrive.
            kwargs["clean_start"] = self.cfg.session_expiry_s == 0
            if self.cfg.session_expiry_s:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = int(self.cfg.session_expiry_s)
                kwargs["properties"] = props
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive_s, **kwargs)
        self._client.loop_start()

    def set_will(self, payload: bytes) -> None:
        """Replace the Last Will used from the next connect on (e.g. after a model change)."""
        self._will = (self._will[0], payload)
        try:
            self._client.will_set(self._will[0], payload, qos=1, retain=True)
        except ValueError:
            pass  # paho refuses while connected on some versions; the old will stays valid

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 3.0) -> None:
        """Publish ``final`` (retained, QoS 1) if connected, then disconnect cleanly."""
        self._stopping = True
        client = self._client
        if final is not None and self.connected:
            try:
                info = client.publish(final[0], final[1], qos=1, retain=True)
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        try:
            client.disconnect()
        finally:
            client.loop_stop()
        self._connected.clear()

    # -- I/O ----------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                properties: Properties | None = None) -> int | None:
        """Hand one message to paho; the mid, or None when not connected or refused."""
        if not self.connected:
            return None
        if self._protocol != paho.MQTTv5:
            properties = None
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return None
        return int(info.mid)

    def reply(self, topic: str, payload: bytes, correlation_data: bytes | None) -> None:
        props = publish_properties(correlation=correlation_data) if self._protocol == paho.MQTTv5 else None
        self.publish(topic, payload, qos=1, properties=props)

    # -- paho callbacks (paho's thread) -------------------------------------------------------
    def _handle_connect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any,
                        properties: Any) -> None:
        if reason_code.is_failure:
            value = int(getattr(reason_code, "value", 0))
            if value in _UNSUPPORTED_PROTOCOL and self.cfg.protocol == "auto" and self._protocol == paho.MQTTv5:
                log.warning("broker refused MQTT 5 (%s); falling back to 3.1.1", reason_code)
                threading.Thread(target=self._fall_back, name="mqtt-fallback", daemon=True).start()
            else:
                log.warning("broker refused the connection: %s", reason_code)
            return
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self.connects += 1
        self._connected.set()
        try:
            self._on_connected()
        except Exception:  # a birth that fails must not kill paho's thread
            log.exception("on_connected callback failed")

    def _handle_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any,
                           properties: Any) -> None:
        self._connected.clear()
        if not self._stopping:
            log.warning("disconnected from the broker: %s", reason_code)

    def _handle_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        try:
            self._on_message(Incoming(msg.topic, bytes(msg.payload), response_topic, correlation))
        except Exception:
            log.exception("message handler failed for %s", msg.topic)

    def _handle_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: Any,
                        properties: Any) -> None:
        self._on_published(int(mid))

    def _fall_back(self) -> None:
        with self._switch_lock:
            if self._stopping or self._protocol == paho.MQTTv311:
                return
            old = self._client
            old.loop_stop()
            self._protocol = paho.MQTTv311
            self._client = self._make_client()
            self.start()


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
