"""The files a device or broker install needs, shipped inside the wheel.

::

    edge-agent.service             systemd unit of the agent (deploy/edge-agent.service)
    edge-fleet-controller.service  systemd unit of ``edge-fleet serve`` (deploy/)
    agent.yaml                     example agent configuration, every key explained (deploy/)
    mosquitto/acl                  Mosquitto ACL: each device reads and writes only its own topics
    mosquitto/mosquitto.conf       Mosquitto listener, TLS and ACL settings (docs/mosquitto/)

In a checkout these names are symbolic links to ``deploy/`` and ``docs/mosquitto/``, so each file
has one copy; the wheel holds the files themselves. ``python3 -m edgefleet.data`` prints where pip
put them (docs/install.md).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["FILES", "path"]

FILES = ("edge-agent.service", "edge-fleet-controller.service", "agent.yaml", "mosquitto/acl",
         "mosquitto/mosquitto.conf")


def path(name: str = "") -> Path:
    """Where the shipped file ``name`` (one of :data:`FILES`) is; the directory itself for ``""``.

    Raises:
        FileNotFoundError: ``name`` is not a shipped file.
    """
    base = Path(str(resources.files(__name__)))
    if not name:
        return base
    if name not in FILES:
        raise FileNotFoundError(f"{name}: not shipped; expected one of {', '.join(FILES)}")
    return base / name
