"""The four device commands (``status``, ``update``, ``rollback``, ``config``), one function each.

Each takes the running service and the validated command body and returns the reply's
``result``; :class:`~edgefleet.commands.CommandRejected` becomes ``ok: false`` with its message.
Dedup, TTL and rate limits are the :class:`~edgefleet.commands.CommandProcessor`'s job, before
these run. The cache settings a command may change are exactly the fields of
:class:`~edgefleet.profiles.CacheSettings`, validated by :func:`agent.cache.resolve_cache`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cache import resolve_cache
from agent.service.reporting import state_payload
from edgefleet.commands import CommandRejected
from edgefleet.errors import ConfigError, EdgefleetError
from edgefleet.profiles import CacheSettings, Profile

if TYPE_CHECKING:
    from agent.service.core import AgentService

__all__ = ["HANDLERS", "CacheSetting", "config", "initial_cache", "rollback", "status", "update"]

CacheSetting = bool | dict[str, Any]
"""What the service asks its engines for: False (off), True (the profile's) or overrides."""

_MIN_INTERVAL_S, _MAX_INTERVAL_S = 0.1, 86_400


def initial_cache(profile: Profile, overrides: dict[str, Any]) -> CacheSetting:
    """The start-up cache setting: agent.yaml's ``cache:`` overrides (None values dropped) on the profile."""
    settings = dict(overrides)
    enabled = settings.pop("enabled", profile.cache.enabled)
    if not enabled:
        return False
    return settings or True


def status(svc: AgentService, cmd: dict[str, Any]) -> dict[str, Any]:
    assert svc.outbox is not None
    return {"state": state_payload(svc, True), "uptime_s": round(time.time() - svc.started_at, 1),
            "host": svc.host.stats() if svc.host is not None else None,
            "ota": svc.ota.status() if svc.ota is not None else None,
            "outbox": {"pending": svc.outbox.pending(), "dropped": svc.outbox.dropped()},
            "telemetry": {"interval_s": svc.telemetry_interval_s},
            "cache": svc.cache_setting,
            "mqtt": {"protocol": svc.link.protocol if svc.link else None}}


def _ota(svc: AgentService, what: str) -> Any:
    if svc.ota is None:
        raise CommandRejected(f"{what} not available: this agent has no OTA manager")
    return svc.ota


def update(svc: AgentService, cmd: dict[str, Any]) -> dict[str, Any]:
    return dict(_ota(svc, "update").handle_update(cmd) or {})


def rollback(svc: AgentService, cmd: dict[str, Any]) -> dict[str, Any]:
    return dict(_ota(svc, "rollback").handle_rollback(cmd) or {})


def config(svc: AgentService, cmd: dict[str, Any]) -> dict[str, Any]:
    """Change the telemetry interval and the cache at run time (not persisted: agent.yaml wins).

    Everything is checked before anything is applied, so a bad key changes nothing.
    """
    extra = sorted(set(cmd) - {"id", "ts", "ttl_s", "telemetry", "cache"})
    if extra:
        raise CommandRejected(f"config: unknown keys {extra}; expected 'telemetry' and/or 'cache'")
    interval = _parse_interval(cmd.get("telemetry"))
    cache = cmd.get("cache")
    new_cache = _parse_cache(svc.cache_setting, svc.profile, cache) if cache is not None else None
    applied: dict[str, Any] = {}
    if interval is not None:
        svc.set_telemetry_interval(interval)
        applied["telemetry"] = {"interval_s": interval}
    if new_cache is not None:
        _apply_cache(svc, new_cache)
        applied["cache"] = new_cache
    return {"applied": applied}


def _parse_interval(telemetry: Any) -> float | None:
    if telemetry is None:
        return None
    if not isinstance(telemetry, dict) or set(telemetry) - {"interval_s"}:
        raise CommandRejected("config.telemetry: expected {\"interval_s\": seconds}")
    interval = telemetry.get("interval_s")
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) \
            or not _MIN_INTERVAL_S <= interval <= _MAX_INTERVAL_S:
        raise CommandRejected(f"config.telemetry.interval_s: expected {_MIN_INTERVAL_S}..{_MAX_INTERVAL_S} "
                              f"seconds, got {interval!r}")
    return float(interval)


def _parse_cache(current: CacheSetting, profile: Profile, cache: Any) -> CacheSetting:
    """The new cache setting: ``cache`` merged over the current overrides, validated whole."""
    if not isinstance(cache, dict):
        raise CommandRejected("config.cache: expected an object such as {\"enabled\": false}")
    allowed = set(CacheSettings.model_fields)
    extra = sorted(set(cache) - allowed)
    if extra:
        raise CommandRejected(f"config.cache: unknown keys {extra}; expected some of {sorted(allowed)}")
    enabled = cache.get("enabled", current is not False)
    if not isinstance(enabled, bool):
        raise CommandRejected("config.cache.enabled: expected true or false")
    if not enabled:
        return False
    overrides = dict(current) if isinstance(current, dict) else {}
    overrides.update({k: v for k, v in cache.items() if k != "enabled"})
    try:
        resolve_cache(overrides, profile)
    except ConfigError as exc:
        raise CommandRejected(f"config.cache: {exc}") from exc
    return overrides or True


def _apply_cache(svc: AgentService, setting: CacheSetting) -> None:
    """Rebuild the active engine with the new cache setting (a hot swap: no request fails).

    Refused while an update or rollback is in flight: probation keeps the previous engine
    loaded, and a reload now would drop it.
    """
    if svc.ota is not None and svc.ota.status().get("pending") is not None:
        raise CommandRejected("config.cache: busy: an update or rollback is in flight, retry when it is done")
    host = svc.host
    host.set_cache(setting)
    svc.cache_setting = setting
    engine = svc.engine()
    if engine is not None and getattr(engine, "source", None) and Path(engine.source).exists():
        try:
            host.activate(engine.source, host.manifest)
        except EdgefleetError as exc:
            raise CommandRejected(f"config.cache: cannot reload the model: {exc}") from exc


HANDLERS: dict[str, Callable[[AgentService, dict[str, Any]], dict[str, Any]]] = {
    "status": status, "update": update, "rollback": rollback, "config": config,
}
"""Command name -> handler; the service binds each to itself for the CommandProcessor."""
