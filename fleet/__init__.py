"""edgefleet fleet tool (``edge-fleet``): registry, staged rollouts, live watch and export over MQTT.

Host-side only. It reads the contract from :mod:`agent.protocol`, :mod:`edgefleet.manifest` and
:mod:`edgefleet.signing` so devices and the fleet tool cannot drift apart.
"""

from __future__ import annotations

__all__: list[str] = []
