"""What the fleet looks like: devices from their retained ``state`` plus their latest telemetry.

The registry is a plain in-memory index fed one message at a time (O(1) work per message), so
``devices``, ``deploy`` and ``watch`` cost grows linearly with the fleet. :func:`collect` fills it
from the broker's retained messages and stops once they stop arriving (a settle window).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from edgefleet.errors import ConfigError
from edgefleet.messages import decode
from edgefleet.mqtt import BrokerAccess, Message, MqttClient, connect
from edgefleet.topics import all_devices, parse_device_topic

__all__ = ["STATE_TOPICS", "TELEMETRY_TOPICS", "Device", "Registry", "collect", "select_devices"]

STATE_TOPICS = (all_devices("state"),)
TELEMETRY_TOPICS = (all_devices("telemetry"),)


@dataclass
class Device:
    """One device as last reported; ``telemetry`` is the newest telemetry payload seen."""

    device_id: str
    online: bool = False
    group: str | None = None
    profile: str | None = None
    agent_version: str | None = None
    model: dict[str, Any] | None = None
    accelerator: str | None = None
    signed_updates: bool | None = None
    state_ts: float | None = None
    telemetry: dict[str, Any] | None = None
    telemetry_ts: float | None = None
    seen_ts: float | None = None
    has_state: bool = False

    @property
    def model_version(self) -> str | None:
        return (self.model or {}).get("version")

    @property
    def model_sha256(self) -> str | None:
        return (self.model or {}).get("sha256")

    def to_json(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id, "online": self.online, "group": self.group,
            "profile": self.profile, "agent_version": self.agent_version, "model": self.model,
            "accelerator": self.accelerator, "signed_updates": self.signed_updates,
            "state_ts": self.state_ts, "last_telemetry_ts": self.telemetry_ts, "last_seen": self.seen_ts,
        }


@dataclass
class Registry:
    devices: dict[str, Device] = field(default_factory=dict)
    ignored: int = 0

    def ingest(self, msg: Message, now: float | None = None) -> str | None:
        """Apply one message; returns the device id it updated, or None if it was not for us."""
        parsed = parse_device_topic(msg.topic)
        if parsed is None:
            return None
        device_id, kind = parsed
        if kind not in ("state", "telemetry"):
            return None
        if not msg.payload:  # a cleared retained state: the device was removed
            if kind == "state":
                self.devices.pop(device_id, None)
            return None
        try:
            payload = decode(msg.payload)
        except (ValueError, UnicodeDecodeError):
            self.ignored += 1
            return None
        now = time.time() if now is None else now
        dev = self.devices.get(device_id)
        if dev is None:
            dev = self.devices[device_id] = Device(device_id)
        if kind == "state":
            dev.has_state = True
            dev.online = bool(payload.get("online", False))
            dev.group = payload.get("group", dev.group)
            dev.profile = payload.get("profile", dev.profile)
            dev.agent_version = payload.get("agent_version", dev.agent_version)
            if "model" in payload:
                dev.model = payload["model"] if isinstance(payload["model"], dict) else None
            dev.accelerator = payload.get("accelerator", dev.accelerator)
            signed = payload.get("signed_updates")
            dev.signed_updates = signed if isinstance(signed, bool) else dev.signed_updates
            ts = payload.get("ts")
            dev.state_ts = float(ts) if isinstance(ts, (int, float)) else dev.state_ts
        else:
            dev.telemetry = payload
            ts = payload.get("ts")
            dev.telemetry_ts = float(ts) if isinstance(ts, (int, float)) else now
            if not msg.retain:
                dev.online = True if not dev.has_state else dev.online
            if isinstance(payload.get("model"), dict) and dev.model is None:
                dev.model = payload["model"]
        if not msg.retain:
            dev.seen_ts = now
        else:
            dev.seen_ts = max(filter(None, (dev.seen_ts, dev.state_ts, dev.telemetry_ts)), default=None)
        return device_id

    def known(self) -> list[Device]:
        """Devices that published a state (telemetry alone does not make a device known)."""
        return sorted((d for d in self.devices.values() if d.has_state), key=lambda d: d.device_id)


def drain_into(registry: Registry, client: MqttClient, settle_s: float, max_s: float) -> int:
    """Feed messages until no *retained* one arrived for ``settle_s`` seconds, or ``max_s`` elapsed.

    Live messages (telemetry) are ingested too but do not extend the window, so a busy fleet
    cannot keep the settle window open.
    """
    count = 0
    start = last_retained = time.monotonic()
    while True:
        now = time.monotonic()
        left = min(max_s - (now - start), settle_s - (now - last_retained))
        if left <= 0:
            return count
        try:
            msg = client.messages.get(timeout=left)
        except queue.Empty:
            return count
        registry.ingest(msg)
        if msg.retain:
            last_retained = time.monotonic()
        count += 1


def collect(broker: str | BrokerAccess, settle_s: float = 0.4, max_s: float = 30.0, telemetry: bool = False,
            client: MqttClient | None = None, listen_s: float = 0.0) -> Registry:
    """Read the retained device states from ``broker`` into a new :class:`Registry`.

    Raises:
        TransportError: the broker cannot be reached.
    """
    own = client is None
    cli = client or connect(broker)
    try:
        registry = Registry()
        cli.subscribe(STATE_TOPICS + (TELEMETRY_TOPICS if telemetry else ()))
        drain_into(registry, cli, settle_s, max_s)
        deadline = time.monotonic() + listen_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                registry.ingest(cli.messages.get(timeout=left))
            except queue.Empty:
                break
        return registry
    finally:
        if own:
            cli.close()


def select_devices(registry: Registry, device_ids: Iterable[str] | None = None, group: str | None = None,
                   all_devices: bool = False) -> list[Device]:
    """Resolve a target selection against the registry.

    Raises:
        ConfigError: an unknown device id, a group nobody is in, or an empty fleet.
    """
    known = {d.device_id: d for d in registry.known()}
    if device_ids:
        ids = list(dict.fromkeys(device_ids))
        missing = [i for i in ids if i not in known]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ConfigError(f"unknown device(s): {shown} (not in the retained states; see `edge-fleet devices`)")
        return [known[i] for i in ids]
    if group is not None:
        members = [d for d in known.values() if d.group == group]
        if not members:
            groups = sorted({d.group for d in known.values() if d.group})
            raise ConfigError(f"unknown group {group!r}: no device reports it (known groups: "
                              f"{', '.join(groups) or 'none'})")
        return sorted(members, key=lambda d: d.device_id)
    if all_devices:
        if not known:
            raise ConfigError("no devices: the broker holds no retained device state")
        return sorted(known.values(), key=lambda d: d.device_id)
    raise ConfigError("no target: give --device ID, --group G or --all")
