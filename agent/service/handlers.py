"""The device commands (``status``, ``update``, ``rollback``, ``cancel``, ``config``), one function each.

Each takes the running service and the validated command body and returns the reply's
``result``; :class:`~edgefleet.commands.CommandRejected` becomes ``ok: false`` with its message.
Dedup, TTL and rate limits are the :class:`~edgefleet.commands.CommandProcessor`'s job, before
these run. The cache settings a command may change are exactly the fields of
:class:`~edgefleet.profiles.CacheSettings`.

Who may change what: anyone who can publish a command may make the cache *stricter*
(:func:`edgefleet.profiles.loosened_cache_fields` is the one definition) or move the telemetry
period within bounds. Making the cache looser than both the device's approved settings (profile
+ agent.yaml) and the settings in use needs a statement signed by a trusted key that names the
loosened values; its nonce is burnt, so it works once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from agent.service.reporting import state_payload
from edgefleet.commands import CommandRejected
from edgefleet.errors import ConfigError, EdgefleetError
from edgefleet.profiles import CacheSettings, Profile, format_validation_error, loosened_cache_fields
from edgefleet.statements import Kind, Statement, verify_statement

if TYPE_CHECKING:
    from agent.service.core import AgentService

__all__ = ["HANDLERS", "approved_cache", "cancel", "config", "rollback", "signed_statement", "status", "update"]

_MIN_INTERVAL_S, _MAX_INTERVAL_S = 0.1, 3600.0
"""Telemetry period an unsigned command may set, s: an hour at most, so one command cannot silence a device."""
_CONFIG_KEYS = {"id", "ts", "ttl_s", "telemetry", "cache", "statement", "statement_signature"}


def approved_cache(profile: Profile, overrides: dict[str, Any]) -> CacheSettings:
    """The device's approved cache settings: agent.yaml's ``cache:`` overrides (None dropped) on the profile's.

    Raises:
        ConfigError: an override is out of bounds.
    """
    try:
        return CacheSettings.model_validate({**profile.cache.model_dump(), **overrides})
    except ValidationError as exc:
        raise ConfigError(format_validation_error("cache", exc)) from exc


def status(svc: AgentService, cmd: dict[str, Any]) -> dict[str, Any]:
    assert svc.outbox is not None
    return {"state": state_payload(svc, True), "uptime_s": round(time.time() - svc.started_at, 1),
            "host": svc.host.stats() if svc.host is not None else None,
            "health": svc.health(),
            "ota": svc.ota.status() if svc.ota is not None else None,
            "outbox": {"pending": svc.outbox.pending(), "dropped": svc.outbox.dropped()},
            "telemetry": {"interval_s": svc.telemetry_interval_s},
            "cache": svc.cache.model_dump(),
            "statements": {"accepted": svc.nonces is not None, "reason": svc.nonces_error}}


def _ota(svc: AgentService, what: str) -> Any:
    if svc.ota is None:
        raise CommandRejected(f"{what} not available: this agent has no OTA manager")
    return svc.ota


def update(svc: AgentService, cmd: dict[str, Any]) -> dict[str, Any]:
    return dict(_ota(svc, "update").handle_update(cmd) or {})


def rollback(svc: AgentService, cmd: dict[str, Any]) -> dict[str, Any]:
    return dict(_ota(svc, "rollback").handle_rollback(cmd) or {})


def cancel(svc: AgentService, cmd: dict[str, Any]) -> dict[str, Any]:
    """Stop the update in flight (before it installs); it ends ``failed``, "canceled by command"."""
    return dict(_ota(svc, "cancel").handle_cancel(cmd) or {})


def config(svc: AgentService, cmd: dict[str, Any]) -> dict[str, Any]:
    """Change the telemetry interval and the cache at run time (not persisted: agent.yaml wins).

    Everything is checked before anything is applied, so a refused command changes nothing. A
    ``statement`` given is always verified and spent, even when nothing needed it.
    """
    extra = sorted(set(cmd) - _CONFIG_KEYS)
    if extra:
        raise CommandRejected(f"config: unknown keys {extra}; expected 'telemetry' and/or 'cache' "
                              "(and 'statement' + 'statement_signature' to loosen the cache)")
    now = time.time()
    interval = _parse_interval(cmd.get("telemetry"))
    cache = cmd.get("cache")
    new_cache = _parse_cache(svc.cache, cache) if cache is not None else None
    loosened = _loosened(svc, new_cache) if new_cache is not None else []
    statement = signed_statement(svc, cmd, "config", now)
    if loosened:
        _check_allows(statement, loosened, new_cache)
    if new_cache is not None:
        _refuse_if_busy(svc)
    if statement is not None:
        _spend(svc, statement, now)
    applied: dict[str, Any] = {}
    if interval is not None:
        svc.set_telemetry_interval(interval)
        applied["telemetry"] = {"interval_s": interval}
    if new_cache is not None:
        _apply_cache(svc, new_cache)
        applied["cache"] = new_cache.model_dump()
    return {"applied": applied, "loosened": loosened}


def _parse_interval(telemetry: Any) -> float | None:
    if telemetry is None:
        return None
    if not isinstance(telemetry, dict) or set(telemetry) - {"interval_s"}:
        raise CommandRejected("config.telemetry: expected {\"interval_s\": seconds}")
    interval = telemetry.get("interval_s")
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) \
            or not _MIN_INTERVAL_S <= interval <= _MAX_INTERVAL_S:
        raise CommandRejected(f"config.telemetry.interval_s: expected {_MIN_INTERVAL_S:g}..{_MAX_INTERVAL_S:g} "
                              f"seconds, got {interval!r}")
    return float(interval)


def _parse_cache(current: CacheSettings, cache: Any) -> CacheSettings:
    """The new cache settings: ``cache`` merged over the settings in use, validated whole."""
    if not isinstance(cache, dict):
        raise CommandRejected("config.cache: expected an object such as {\"enabled\": false}")
    allowed = set(CacheSettings.model_fields)
    extra = sorted(set(cache) - allowed)
    if extra:
        raise CommandRejected(f"config.cache: unknown keys {extra}; expected some of {sorted(allowed)}")
    try:
        return CacheSettings.model_validate({**current.model_dump(), **cache})
    except ValidationError as exc:
        raise CommandRejected(format_validation_error("config.cache", exc)) from exc


def _loosened(svc: AgentService, proposed: CacheSettings) -> list[str]:
    """Fields ``proposed`` loosens beyond both the approved settings and the ones in use.

    Moving back toward the approved settings, or keeping what a statement allowed, needs no signature.
    """
    beyond_in_use = set(loosened_cache_fields(svc.cache, proposed))
    return [f for f in loosened_cache_fields(svc.approved_cache, proposed) if f in beyond_in_use]


def signed_statement(svc: AgentService, cmd: dict[str, Any], kind: Kind, now: float) -> Statement | None:
    """The command's verified ``statement`` (None when it carries none); its nonce is not spent yet.

    Raises:
        CommandRejected: a statement is given but does not verify, or the nonce ledger is unusable.
    """
    if cmd.get("statement") is None and cmd.get("statement_signature") is None:
        return None
    try:
        statement = verify_statement(cmd.get("statement"), cmd.get("statement_signature"), svc.trusted_keys,
                                     kind=kind, device_id=svc.cfg.device_id, group=svc.cfg.group, now=now)
    except EdgefleetError as exc:
        raise CommandRejected(f"{kind}: statement refused: {exc}") from exc
    try:
        svc.ledger()
    except EdgefleetError as exc:
        raise CommandRejected(f"{kind}: {exc}") from exc
    return statement


def _check_allows(statement: Statement | None, loosened: list[str], proposed: CacheSettings) -> None:
    wanted = {name: getattr(proposed, name) for name in loosened}
    if statement is None:
        raise CommandRejected(f"config.cache: {wanted} is looser than this device's approved settings; "
                              "that needs a signed config statement ('statement', 'statement_signature')")
    allowed = statement.settings or {}
    missing = {k: v for k, v in wanted.items() if k not in allowed or allowed[k] != v}
    if missing:
        raise CommandRejected(f"config.cache: the statement does not allow {missing} "
                              f"(it allows {dict(allowed)})")


def _spend(svc: AgentService, statement: Statement, now: float) -> None:
    try:
        svc.ledger().consume(statement, now)
    except EdgefleetError as exc:
        raise CommandRejected(f"{statement.kind}: statement refused: {exc}") from exc


def _refuse_if_busy(svc: AgentService) -> None:
    """Probation keeps the previous engine loaded, and a reload now would drop it."""
    if svc.ota is not None and svc.ota.status().get("pending") is not None:
        raise CommandRejected("config.cache: busy: an update or rollback is in flight, retry when it is done")


def _apply_cache(svc: AgentService, settings: CacheSettings) -> None:
    """Rebuild the active engine with the new cache settings (a hot swap: no request fails)."""
    host = svc.host
    host.set_cache(settings)
    svc.cache = settings
    engine = svc.engine()
    if engine is not None and getattr(engine, "source", None) and Path(engine.source).exists():
        try:
            host.activate(engine.source, host.manifest)
        except EdgefleetError as exc:
            raise CommandRejected(f"config.cache: cannot reload the model: {exc}") from exc


HANDLERS: dict[str, Callable[[AgentService, dict[str, Any]], dict[str, Any]]] = {
    "status": status, "update": update, "rollback": rollback, "cancel": cancel, "config": config,
}
"""Command name -> handler; the service binds each to itself for the CommandProcessor."""
