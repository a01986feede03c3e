"""The one MQTT wrapper of the contract (paho-mqtt v2), and broker URLs parsed in one place.

:class:`MqttConnection` owns one paho client for the agent and the fleet tool alike: MQTT 5
(falling back to 3.1.1 when the broker refuses it and the settings allow), TLS and
username/password, an optional retained Last Will, subscriptions renewed on every connect, and
incoming messages handed to a callback with the MQTT 5 Response Topic and Correlation Data.
:class:`MqttClient` is the fleet tool's blocking use of it (connect, wait for SUBACKs, flush).

Accepted URLs: ``mqtt://[user[:password]@]host[:port]`` (default port 1883) and ``mqtts://...``
(TLS, default port 8883). Connection failures become a :class:`~edgefleet.errors.TransportError`
that names the URL (without the password).

Callbacks run on paho's network thread while paho holds its own locks: keep them cheap (append
to a queue) and never call back into paho from them with a lock of yours held.
"""

from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.bufsock import ReadBufferedSocket
from edgefleet.errors import ConfigError, TransportError
from edgefleet.messages import encode

__all__ = [
    "BrokerAccess",
    "BrokerURL",
    "LinkSettings",
    "Message",
    "MqttClient",
    "MqttConnection",
    "Outgoing",
    "connect",
    "parse_broker_url",
    "parse_broker_urls",
    "publish_properties",
]

log = logging.getLogger(__name__)

PUBLISH_WINDOW = 200  # QoS 1 publishes outstanding at once in MqttClient.publish_all
# CONNACK reason codes meaning "I do not speak this protocol version" (3.1.1 code 1, MQTT 5 code 132).
_UNSUPPORTED_PROTOCOL = {1, 132}


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


def parse_broker_urls(urls: str | list[str] | tuple[str, ...]) -> tuple[BrokerURL, ...]:
    """Several nodes of one cluster: a list, or one string with commas (``mqtt://a:1883,mqtt://b:1883``).

    Raises:
        ConfigError: no URL, or one that :func:`parse_broker_url` refuses.
    """
    items = [urls] if isinstance(urls, str) else list(urls)
    parsed = tuple(parse_broker_url(u.strip()) for item in items for u in item.split(",") if u.strip())
    if not parsed:
        raise ConfigError("no broker URL: expected mqtt://host[:port], several separated by commas")
    return parsed


@dataclass(frozen=True)
class BrokerAccess:
    """A broker's address and what proves who we are to it, kept apart from the URL.

    The URL is what may be shown, logged and stored (``str()`` gives it); the password and the
    TLS files travel beside it, so a password never has to be written into a URL. Inert: the
    files are read when a client is made.
    """

    url: str                                          # mqtt[s]://[user@]host[:port], several with commas
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None    # CA bundle that signs the broker's certificate (None: the system store)
    cert_file: str | None = None  # client certificate (PEM) for mutual TLS
    key_file: str | None = None   # its private key (PEM); None: in cert_file

    def __str__(self) -> str:
        return self.url


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
    """A received message, with the MQTT 5 request/response properties when present."""

    topic: str
    payload: bytes
    retain: bool = False
    correlation: bytes | None = None
    response_topic: str | None = None


@dataclass(frozen=True)
class Outgoing:
    """A message for :meth:`MqttClient.publish_all`: a dict payload is encoded there."""

    topic: str
    payload: dict[str, Any] | bytes
    response_topic: str | None = None
    correlation: bytes | None = None


@dataclass(frozen=True)
class LinkSettings:
    """How to reach a broker, or the nodes of one cluster. Inert until :meth:`MqttConnection.start`."""

    urls: tuple[BrokerURL, ...]    # tried in order; on loss of a node, the next one
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None     # CA bundle for mqtts (None: the system store)
    cert_file: str | None = None   # client certificate for mutual TLS
    key_file: str | None = None
    keepalive_s: int = 30          # the broker announces the Last Will after ~1.5x this, s
    protocol: Literal["auto", "5", "3.1.1"] = "auto"  # auto: 5, then 3.1.1 if the broker refuses 5
    session_expiry_s: int = 0      # > 0: a persistent session kept this long while offline, s
    reconnect_min_s: float = 0.5   # first reconnect delay, s
    reconnect_max_s: float = 30.0  # longest reconnect delay (before jitter), s
    resubscribe_s: float = 2.0     # wait before asking again for a subscription the broker refused, s
    max_inflight: int = 20         # QoS 1 publishes awaiting PUBACK
    read_linger_s: float = 0.0     # wait before a read that follows a small read of publishes (bufsock), s
    will: tuple[str, bytes] | None = None  # retained QoS 1 Last Will (topic, payload)


class _BufferedClient(mqtt.Client):
    """paho's client reading through :class:`~edgefleet.bufsock.ReadBufferedSocket`.

    ``_create_socket`` is paho 2's (private) socket factory; were it renamed, this override would
    simply not run and paho would read unbuffered, as before.
    """

    read_linger_s = 0.0

    def _create_socket(self) -> Any:
        return ReadBufferedSocket(super()._create_socket(), self.read_linger_s)

    def limit_inflight(self, most: int) -> None:
        """Keep at most ``most`` QoS 1 publishes unacknowledged on this connection (paho queues the rest).

        MQTT 5 forbids more than the broker's Receive Maximum, which it states in each CONNACK;
        paho 2 neither honours it nor lets ``max_inflight_messages`` change while connected, so
        this sets its window from ``on_connect``, before paho resends what it holds. Both values
        are > 0, the case paho's guard is not about (it fears a switch to or from unlimited).
        """
        self._max_inflight_messages = max(1, most)


class MqttConnection:
    """One broker connection that reconnects by itself.

    ``on_connected`` runs on paho's thread after every successful connect (publish the birth
    there); ``on_message`` gets every message on the subscriptions; ``on_published(mid)`` every
    acknowledged QoS 1 publish; ``on_subscribed(mid)`` every SUBACK.
    """

    def __init__(self, settings: LinkSettings, client_id: str, *, subscriptions: Iterable[str] = (),
                 on_connected: Callable[[], None] | None = None,
                 on_message: Callable[[Message], None] | None = None,
                 on_published: Callable[[int], None] | None = None,
                 on_subscribed: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.client_id = client_id
        self._will = settings.will
        self._subscriptions: list[tuple[str, int]] = [(t, 1) for t in subscriptions]
        self._on_connected = on_connected
        self._on_message = on_message
        self._on_published = on_published
        self._on_subscribed = on_subscribed
        if not settings.urls:
            raise ConfigError("no broker URL")
        self._url_index = 0
        self._attempts = 0  # failed attempts since the last successful connect
        self._pending_subs: dict[int, list[tuple[str, int]]] = {}  # SUBACK mid -> what it answers
        self.refused_subscriptions: set[str] = set()  # topics the broker refused and we still retry
        self._protocol = mqtt.MQTTv311 if settings.protocol == "3.1.1" else mqtt.MQTTv5
        self._connected = threading.Event()
        self._answered = threading.Event()  # a CONNACK came, good or bad
        self.failure: str | None = None     # why the broker refused the last attempt
        self._stopping = False
        self._switch_lock = threading.Lock()
        self._switching = False  # a protocol fall-back is replacing the paho client
        self.connects = 0
        self.receive_maximum: int | None = None  # the broker's MQTT 5 Receive Maximum, once connected
        self._client = self._make_client()

    @property
    def protocol(self) -> str:
        return "5" if self._protocol == mqtt.MQTTv5 else "3.1.1"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def url(self) -> BrokerURL:
        """The broker node in use (or being tried)."""
        return self.settings.urls[self._url_index]

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # -- lifecycle ----------------------------------------------------------------------------
    def _make_client(self) -> _BufferedClient:
        s = self.settings
        v5 = self._protocol == mqtt.MQTTv5
        client = _BufferedClient(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=self._protocol,
                                 clean_session=None if v5 else s.session_expiry_s == 0)
        client.read_linger_s = s.read_linger_s
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if self.url.tls:
            try:
                client.tls_set(ca_certs=s.ca_file, certfile=s.cert_file, keyfile=s.key_file,
                               cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"broker TLS files: {exc}") from exc
        if self._will is not None:
            client.will_set(self._will[0], self._will[1], qos=1, retain=True)
        # paho types these as int but only multiplies and sleeps on them: fractions work.
        client.reconnect_delay_set(min_delay=s.reconnect_min_s,  # type: ignore[arg-type]
                                   max_delay=s.reconnect_max_s)  # type: ignore[arg-type]
        client.max_inflight_messages_set(s.max_inflight)
        client.max_queued_messages_set(0)
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        return client

    def _connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"keepalive": self.settings.keepalive_s}
        if self._protocol == mqtt.MQTTv5:
            # A persistent session: what is sent while we are offline is queued by the broker.
            expiry = self.settings.session_expiry_s
            kwargs["clean_start"] = expiry == 0
            if expiry:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = int(expiry)
                kwargs["properties"] = props
        return kwargs

    def start(self, blocking: bool = False) -> None:
        """Connect and start the network thread.

        In the background by default (never blocks on an unreachable broker); ``blocking`` opens
        the socket first, so an unreachable broker is an error at once.

        Raises:
            TransportError: with ``blocking``, the broker could not be reached.
        """
        if blocking:
            errors = []
            for _ in self.settings.urls:  # the first node that answers
                try:
                    self._client.connect(self.url.host, self.url.port, **self._connect_kwargs())
                    break
                except (OSError, ssl.SSLError) as exc:
                    errors.append(f"{self.url.display()}: {exc}")
                    self._url_index = (self._url_index + 1) % len(self.settings.urls)
            else:
                raise TransportError(f"cannot reach MQTT broker {'; '.join(errors)}")
        else:
            self._client.connect_async(self.url.host, self.url.port, **self._connect_kwargs())
        self._client.loop_start()

    def wait_answer(self, timeout: float) -> None:
        """Wait for the first CONNACK after :meth:`start`.

        Raises:
            TransportError: no CONNACK within ``timeout``, or the broker refused us.
        """
        if not self._answered.wait(timeout) or not self.connected:
            why = self.failure or f"no CONNACK within {timeout:g}s"
            raise TransportError(f"MQTT broker {self.url.display()} refused the connection: {why}")

    def set_will(self, payload: bytes) -> None:
        """Replace the Last Will's payload from the next connect on (e.g. after a model change)."""
        if self._will is None:
            return
        self._will = (self._will[0], payload)
        try:
            self._client.will_set(self._will[0], payload, qos=1, retain=True)
        except ValueError:
            pass  # paho refuses while connected on some versions; the old will stays valid

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 3.0,
             properties: Properties | None = None) -> None:
        """Publish ``final`` (retained, QoS 1) if connected, then disconnect cleanly."""
        self._stopping = True
        client = self._client
        if final is not None and self.connected:
            try:
                client.publish(final[0], final[1], qos=1, retain=True).wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        try:
            client.disconnect(properties=properties if self._protocol == mqtt.MQTTv5 else None)
        finally:
            client.loop_stop()
        self._connected.clear()

    # -- I/O ----------------------------------------------------------------------------------
    def subscribe(self, topics: Iterable[str], qos: int = 1) -> int | None:
        """Add subscriptions (renewed on every reconnect); the SUBACK's mid, None when offline."""
        new = [(t, qos) for t in topics if (t, qos) not in self._subscriptions]
        self._subscriptions += new
        if not new or not self.connected:
            return None
        return self._send_subscribe(new)

    def _send_subscribe(self, topics: list[tuple[str, int]]) -> int:
        rc, mid = self._client.subscribe(topics)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise TransportError(f"subscribe to {self.url.display()} failed: {mqtt.error_string(rc)}")
        self._pending_subs[int(mid)] = topics
        return int(mid)

    def send(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
             properties: Properties | None = None) -> mqtt.MQTTMessageInfo:
        """Hand one message to paho, which queues it while offline (the fleet tool's publish)."""
        if self._protocol != mqtt.MQTTv5:
            properties = None
        return self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                properties: Properties | None = None) -> int | None:
        """Publish only while connected (the durable queue is the caller's); the mid, or None."""
        if not self.connected:
            return None
        info = self.send(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        return int(info.mid)

    def reply(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        """Answer a request, echoing its Correlation Data on MQTT 5."""
        self.publish(topic, payload, qos=1, properties=publish_properties(correlation=correlation))

    # -- paho callbacks (paho's thread) -------------------------------------------------------
    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                        properties: Any) -> None:
        if client is not self._client:
            return
        if reason_code.is_failure:
            self.failure = str(reason_code)
            value = int(getattr(reason_code, "value", 0))
            if value in _UNSUPPORTED_PROTOCOL and self.settings.protocol == "auto" and self._protocol == mqtt.MQTTv5:
                log.info("broker refused MQTT 5 (%s); falling back to 3.1.1", reason_code)
                self._switching = True
                threading.Thread(target=self._fall_back, name="mqtt-fallback", daemon=True).start()
                return
            log.warning("broker refused the connection: %s", reason_code)
            self._answered.set()
            return
        self.failure = None
        self._attempts = 0
        self.receive_maximum = int(getattr(properties, "ReceiveMaximum", 0) or 0) or None
        ours = self.settings.max_inflight
        self._client.limit_inflight(min(ours, self.receive_maximum or ours))  # may change on every connect
        client.reconnect_delay_set(self.settings.reconnect_min_s, self.settings.reconnect_max_s)  # type: ignore[arg-type]
        if self._subscriptions:
            # every connect: a broker that lost our session must not leave us without commands
            self._send_subscribe(list(self._subscriptions))
        self.connects += 1
        self._connected.set()
        self._answered.set()
        if self._on_connected is not None:
            try:
                self._on_connected()
            except Exception:  # a birth that fails must not kill paho's thread
                log.exception("on_connected callback failed")

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                           properties: Any) -> None:
        if client is not self._client or self._switching:
            return  # the client being replaced by a protocol fall-back
        self._connected.clear()
        if not self._stopping:
            log.warning("disconnected from %s: %s", self.url.display(), reason_code)
            self._next_attempt()

    def _handle_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if not self._stopping and client is self._client and not self._switching:
            self._next_attempt()

    def _next_attempt(self) -> None:
        """After a lost connection or a failed attempt: the next node, after a jittered backoff.

        Exponential from ``reconnect_min_s`` to ``reconnect_max_s``, times a random 0.5-1.0, so
        a fleet that lost its broker does not come back all in the same second.
        """
        s = self.settings
        self._attempts += 1
        if len(s.urls) > 1:
            self._url_index = (self._url_index + 1) % len(s.urls)
            self._client.connect_async(self.url.host, self.url.port, **self._connect_kwargs())
        delay = min(s.reconnect_max_s, s.reconnect_min_s * 2 ** min(self._attempts - 1, 30)) * random.uniform(0.5, 1.0)
        self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self._on_message is None:
            return
        props = getattr(msg, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        try:
            self._on_message(Message(msg.topic, bytes(msg.payload), bool(msg.retain), correlation, response_topic))
        except Exception:
            log.exception("message handler failed for %s", msg.topic)

    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any,
                        properties: Any) -> None:
        if self._on_published is not None:
            self._on_published(int(mid))

    def _handle_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any,
                          properties: Any) -> None:
        asked = self._pending_subs.pop(int(mid), [])
        refused = [topic for (topic, qos), code in zip(asked, reason_codes) if code.is_failure]
        granted = {topic for topic, _ in asked} - set(refused)
        self.refused_subscriptions -= granted
        if refused:
            # A clustered broker may refuse under load (NATS: 0x80 when it cannot create the
            # stream behind a QoS 1 subscription in time). Never leave it silently missing.
            self.refused_subscriptions.update(refused)
            log.warning("broker %s refused subscription(s) %s; asking again in %gs", self.url.display(),
                        ", ".join(refused), self.settings.resubscribe_s)
            retry = [(t, q) for t, q in asked if t in refused]
            timer = threading.Timer(self.settings.resubscribe_s, self._resubscribe, (retry,))
            timer.daemon = True
            timer.start()
        if self._on_subscribed is not None:
            self._on_subscribed(int(mid))

    def _resubscribe(self, topics: list[tuple[str, int]]) -> None:
        if self.connected and not self._stopping:
            try:
                self._send_subscribe(topics)
            except TransportError as exc:
                log.warning("%s", exc)

    def _fall_back(self) -> None:
        with self._switch_lock:
            if self._stopping or self._protocol == mqtt.MQTTv311:
                return
            self._client.loop_stop()
            self._protocol = mqtt.MQTTv311
            self._client = self._make_client()
            self._switching = False
            self.start()


class MqttClient:
    """The fleet tool's client: connect now or fail, subscribe and wait for the SUBACK, flush.

    ``messages`` is a :class:`queue.SimpleQueue` of :class:`Message` filled by paho's thread
    unless an ``on_message`` callback is given.
    """

    SESSION_EXPIRY_S = 24 * 3600
    # Answers that arrive a message per TCP segment (NATS) are read in bursts: 5 ms later, not one
    # wake-up each (deploy CPU per device on a 3-node NATS cluster: 2.0-2.4 -> 1.6-1.9 ms at 1,000 devices).
    READ_LINGER_S = 0.005

    def __init__(self, urls: BrokerURL | tuple[BrokerURL, ...], client_id: str | None = None,
                 persistent: bool = False, on_message: Callable[[Message], None] | None = None,
                 protocol: Literal["auto", "5", "3.1.1"] = "auto", *, password: str | None = None,
                 ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None) -> None:
        """``password`` (else the URL's) goes with the URL's user name; the TLS files are for mqtts.

        Raises:
            ConfigError: a TLS file cannot be read or is not PEM.
        """
        urls = (urls,) if isinstance(urls, BrokerURL) else tuple(urls)
        self.client_id = client_id or f"edge-fleet-{uuid.uuid4().hex[:10]}"
        self.persistent = persistent
        self.messages: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._closed = False
        self._acked: set[int] = set()
        self._ack_cond = threading.Condition()
        settings = LinkSettings(urls=urls, username=urls[0].username,
                                password=password if password is not None else urls[0].password,
                                ca_file=ca_file, cert_file=cert_file, key_file=key_file, protocol=protocol,
                                session_expiry_s=self.SESSION_EXPIRY_S if persistent else 0,
                                max_inflight=1000, read_linger_s=self.READ_LINGER_S)
        self._link = MqttConnection(settings, self.client_id, on_message=on_message or self.messages.put,
                                    on_subscribed=self._on_subscribed)

    @property
    def url(self) -> BrokerURL:
        """The broker node in use."""
        return self._link.url

    @property
    def protocol(self) -> str:
        """The MQTT version the broker accepted: "5" or "3.1.1"."""
        return self._link.protocol

    def _on_subscribed(self, mid: int) -> None:
        with self._ack_cond:
            self._acked.add(mid)
            self._ack_cond.notify_all()

    def connect(self, timeout: float = 5.0) -> MqttClient:
        """Connect and start the network thread.

        Raises:
            TransportError: the broker refused or could not be reached within ``timeout``.
        """
        self._link.start(blocking=True)
        try:
            self._link.wait_answer(timeout)
        except TransportError as exc:
            self._link.stop()
            if self.url.tls and self._link.settings.cert_file is None and self._link.failure is None:
                # TLS 1.3: a broker that requires a client certificate closes the link after the handshake
                raise TransportError(f"{exc} (does it require a client certificate?)") from exc
            raise
        return self

    def subscribe(self, topics: Iterable[str], qos: int = 1, timeout: float = 5.0,
                  refused_timeout: float = 30.0) -> None:
        """Subscribe and wait until the broker granted it, so retained messages are on their way.

        A cluster electing new leaders after losing a node refuses subscriptions for a while:
        they are asked for again for up to ``refused_timeout`` seconds.

        Raises:
            TransportError: no SUBACK within ``timeout``, or still refused after ``refused_timeout``.
        """
        topics = list(topics)
        deadline = time.monotonic() + refused_timeout
        mid = self._link.subscribe(topics, qos)
        if mid is None:
            return
        with self._ack_cond:
            if not self._ack_cond.wait_for(lambda: mid in self._acked, timeout):
                raise TransportError(f"no SUBACK from {self.url.display()} within {timeout:g}s")
            self._acked.discard(mid)
        while refused := self._link.refused_subscriptions & set(topics):  # the link asks again by itself
            if time.monotonic() > deadline:
                raise TransportError(f"broker {self.url.display()} refused the subscription to "
                                     f"{', '.join(sorted(refused))}")
            time.sleep(0.05)

    def publish(self, topic: str, payload: dict[str, Any] | bytes, qos: int = 1, retain: bool = False,
                response_topic: str | None = None, correlation: bytes | None = None) -> mqtt.MQTTMessageInfo:
        data = payload if isinstance(payload, bytes) else encode(payload)
        return self._link.send(topic, data, qos=qos, retain=retain,
                               properties=publish_properties(response_topic, correlation))

    def publish_all(self, messages: Iterable[Outgoing], stall_s: float = 10.0) -> int:
        """Publish QoS 1 messages and wait for every acknowledgement; returns how many were sent.

        At most PUBLISH_WINDOW are outstanding at once, fewer if the broker's Receive Maximum
        says so (MQTT 5 forbids a client to exceed it). On each PUBACK paho walks the messages it
        holds up to the first one not sent yet: a whole wave handed over at once costs its whole
        in-flight limit per acknowledgement (20,000 commands on Mosquitto: 3.2 s of CPU, against
        1.9 s paced).

        Raises:
            TransportError: as :meth:`flush`.
        """
        outstanding: deque[mqtt.MQTTMessageInfo] = deque()
        sent = 0
        for m in messages:
            # an MQTT 5 broker says how many unacknowledged QoS 1 publishes it takes (Mosquitto: 20)
            while len(outstanding) >= min(PUBLISH_WINDOW, self._link.receive_maximum or PUBLISH_WINDOW):
                self._wait_acknowledged(outstanding.popleft(), stall_s)
            outstanding.append(self.publish(m.topic, m.payload, response_topic=m.response_topic,
                                            correlation=m.correlation))
            sent += 1
        self.flush(outstanding, stall_s)
        return sent

    def flush(self, infos: Iterable[mqtt.MQTTMessageInfo], stall_s: float = 10.0) -> None:
        """Wait until the given publishes left the client (PUBACK for QoS 1).

        However long that takes while acknowledgements keep coming: a replicated broker (JetStream
        R3) acknowledges a large wave at its own pace. Fails once ``stall_s`` pass without one.

        Raises:
            TransportError: a publish was refused, or no acknowledgement came for ``stall_s``.
        """
        for info in infos:
            self._wait_acknowledged(info, stall_s)

    def _wait_acknowledged(self, info: mqtt.MQTTMessageInfo, stall_s: float) -> None:
        try:
            info.wait_for_publish(stall_s)
        except (RuntimeError, ValueError) as exc:
            raise TransportError(f"publish to {self.url.display()} failed: {exc}") from exc
        if not info.is_published():
            raise TransportError(f"publishes to {self.url.display()}: no acknowledgement for {stall_s:g}s")

    def close(self, end_session: bool = False) -> None:
        """Disconnect; ``end_session`` also drops a persistent session (nothing is queued for us)."""
        if self._closed:
            return
        self._closed = True
        props = None
        if end_session and self.persistent:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
        self._link.stop(properties=props)

    def __enter__(self) -> MqttClient:  # noqa: PYI034 (py3.10: no typing.Self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(urls: str | list[str] | tuple[str, ...] | BrokerAccess, client_id: str | None = None,
            persistent: bool = False, on_message: Callable[[Message], None] | None = None,
            timeout: float = 5.0) -> MqttClient:
    """Parse ``urls`` (one, several, or a comma list) and return a connected :class:`MqttClient`.

    A :class:`BrokerAccess` also brings the password and the TLS files (private CA, client
    certificate). MQTT 5 first, then 3.1.1 when the broker refuses 5; ``client.protocol`` says which.

    Raises:
        ConfigError: a bad URL or TLS file; TransportError: the broker cannot be reached or refused us.
    """
    if isinstance(urls, BrokerAccess):
        a = urls
        return MqttClient(parse_broker_urls(a.url), client_id, persistent, on_message, password=a.password,
                          ca_file=a.ca_file, cert_file=a.cert_file, key_file=a.key_file).connect(timeout)
    return MqttClient(parse_broker_urls(urls), client_id, persistent, on_message).connect(timeout)
