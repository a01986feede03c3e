"""The one ``HOST:PORT`` rule, for every address a program listens on or connects to."""

from __future__ import annotations

from edgefleet.errors import ConfigError

__all__ = ["parse_host_port"]


def parse_host_port(text: str, what: str = "address", default_host: str | None = None) -> tuple[str, int]:
    """``"0.0.0.0:8080"`` -> ``("0.0.0.0", 8080)``; ``"[::1]:80"`` -> ``("::1", 80)``.

    Port 0 means "any free port". An empty host (``":8080"``) takes ``default_host`` when given.

    Raises:
        ConfigError: not HOST:PORT with a port of 0-65535 (the message names ``what``).
    """
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]") or (default_host or "")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{what} {text!r}: expected HOST:PORT such as 127.0.0.1:8080")
    return host, int(port)
