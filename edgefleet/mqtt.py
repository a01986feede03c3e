"""The one MQTT client of the contract (paho-mqtt v2), and broker URLs parsed in one place.

Accepted URLs: ``mqtt://[user[:password]@]host[:port]`` (default port 1883) and ``mqtts://...``
(TLS with the system CA store, default port 8883). Connection failures become a
:class:`~edgefleet.errors.TransportError` that names the URL (without the password).

Incoming messages are handed to a callback on paho's network thread; callers keep that
callback cheap (append to a queue) so the thread keeps up with large fleets.
"""

from __future__ import annotations

import queue
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.errors import ConfigError, TransportError
from edgefleet.messages import encode

__all__ = ["BrokerURL", "Message", "MqttClient", "connect", "parse_broker_url", "publish_properties"]


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    def display(self) -> str:
        """The URL as shown in messages: never the password."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerURL:
    """Parse ``mqtt://`` / ``mqtts://`` URLs.

    Raises:
        ConfigError: another scheme, no host, or a bad port.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(f"broker URL {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r}: bad port") from exc
    if not parts.hostname:
        raise ConfigError(f"broker URL {url!r}: no host")
    return BrokerURL(parts.hostname, port, tls,
                     unquote(parts.username) if parts.username else None,
                     unquote(parts.password) if parts.password else None)


def publish_properties(response_topic: str | None = None, correlation: bytes | None = None) -> Properties | None:
    """MQTT 5 PUBLISH properties for a request (Response Topic) or a reply (Correlation Data); None if neither."""
    if not response_topic and correlation is None:
        return None
    props = Properties(PacketTypes.PUBLISH)
    if response_topic:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    return props


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    correlation: bytes | None = None
    response_topic: str | None = None


class MqttClient:
    """One connected MQTT 5 client: subscribe, publish JSON, receive into a queue.

    ``messages`` is a :class:`queue.SimpleQueue` of :class:`Message` filled by paho's thread.
    """

    def __init__(self, url: BrokerURL, client_id: str | None = None, persistent: bool = False,
                 on_message: Callable[[Message], None] | None = None) -> None:
        self.url = url
        self.client_id = client_id or f"edge-fleet-{uuid.uuid4().hex[:10]}"
        self.persistent = persistent
        self.messages: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._sink = on_message or self.messages.put
        self._connected = threading.Event()
        self._failure: str | None = None
        self._topics: list[tuple[str, int]] = []
        self._closed = False
        self._acked: set[int] = set()
        self._ack_cond = threading.Condition()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                   protocol=mqtt.MQTTv5)
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        if url.username:
            self._client.username_pw_set(url.username, url.password)
        if url.tls:
            self._client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe

    # paho callbacks (network thread): keep them short.
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._failure = str(reason)
        elif self._connected.is_set() and self._topics:
            # a reconnect (broker restart): the broker may have lost our subscriptions
            client.subscribe(self._topics)
        self._connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = msg.properties
        corr = getattr(props, "CorrelationData", None) if props else None
        resp = getattr(props, "ResponseTopic", None) if props else None
        self._sink(Message(msg.topic, msg.payload, bool(msg.retain), corr, resp))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self._ack_cond:
            self._acked.add(mid)
            self._ack_cond.notify_all()

    def connect(self, timeout: float = 5.0) -> MqttClient:
        """Connect and start the network thread.

        Raises:
            TransportError: the broker refused or could not be reached within ``timeout``.
        """
        props = None
        if self.persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 24 * 3600
        try:
            self._client.connect(self.url.host, self.url.port, keepalive=30,
                                 clean_start=not self.persistent, properties=props)
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"cannot reach MQTT broker {self.url.display()}: {exc}") from exc
        self._client.loop_start()
        if not self._connected.wait(timeout) or self._failure:
            self._client.loop_stop()
            why = self._failure or f"no CONNACK within {timeout:g}s"
            raise TransportError(f"MQTT broker {self.url.display()} refused the connection: {why}")
        return self

    def subscribe(self, topics: Iterable[str], qos: int = 1, timeout: float = 5.0) -> None:
        """Subscribe and wait for the SUBACK, so retained messages are on their way on return."""
        topic_list = [(t, qos) for t in topics]
        self._topics += [t for t in topic_list if t not in self._topics]
        rc, mid = self._client.subscribe(topic_list)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise TransportError(f"subscribe to {self.url.display()} failed: {mqtt.error_string(rc)}")
        with self._ack_cond:
            if not self._ack_cond.wait_for(lambda: mid in self._acked, timeout):
                raise TransportError(f"no SUBACK from {self.url.display()} within {timeout:g}s")
            self._acked.discard(mid)

    def publish(self, topic: str, payload: dict[str, Any] | bytes, qos: int = 1, retain: bool = False,
                response_topic: str | None = None, correlation: bytes | None = None) -> mqtt.MQTTMessageInfo:
        props = publish_properties(response_topic, correlation)
        data = payload if isinstance(payload, bytes) else encode(payload)
        return self._client.publish(topic, data, qos=qos, retain=retain, properties=props)

    def flush(self, infos: Iterable[mqtt.MQTTMessageInfo], timeout: float = 10.0) -> None:
        """Wait until the given publishes left the client (PUBACK for QoS 1)."""
        deadline = time.monotonic() + timeout
        for info in infos:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError(f"publishes to {self.url.display()} not acknowledged within {timeout:g}s")
            try:
                info.wait_for_publish(left)
            except (RuntimeError, ValueError) as exc:
                raise TransportError(f"publish to {self.url.display()} failed: {exc}") from exc

    def close(self, end_session: bool = False) -> None:
        """Disconnect; ``end_session`` also drops a persistent session (nothing is queued for us)."""
        if self._closed:
            return
        self._closed = True
        props = None
        if end_session and self.persistent:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
        try:
            self._client.disconnect(properties=props)
        finally:
            self._client.loop_stop()

    def __enter__(self) -> MqttClient:  # noqa: PYI034 (py3.10: no typing.Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(url: str, client_id: str | None = None, persistent: bool = False,
            on_message: Callable[[Message], None] | None = None, timeout: float = 5.0) -> MqttClient:
    """Parse ``url`` and return a connected :class:`MqttClient`."""
    return MqttClient(parse_broker_url(url), client_id, persistent, on_message).connect(timeout)
