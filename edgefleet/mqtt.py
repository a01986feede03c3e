"""The MQTT client side of the contract (paho-mqtt v2): broker URLs and request/reply properties.

Accepted URLs: ``mqtt://[user[:password]@]host[:port]`` (default port 1883) and ``mqtts://...``
(TLS, default port 8883).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefleet.errors import ConfigError

__all__ = ["BrokerURL", "parse_broker_url", "publish_properties"]


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
