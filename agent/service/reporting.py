"""What the agent says about itself: the retained state, telemetry, and the Prometheus page.

Telemetry and ``/metrics`` read the same :class:`~agent.telemetry.Metrics` (the service's count
of what it served, which outlives model swaps); only the cache figures come from the active
engine, because they belong to that model. Built on the caller's thread from a snapshot; nothing
here touches the inference path.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from agent.http import prometheus_lines
from edgefleet import __version__

if TYPE_CHECKING:
    from agent.service.core import AgentService

__all__ = ["cache_summary", "metrics_text", "state_payload", "telemetry_payload"]

_CACHE_KEYS = ("enabled", "hit_rate", "exact_hits", "near_hits", "misses", "disagreement_rate", "threshold",
               "reason")


def cache_summary(stats: dict[str, Any] | None) -> dict[str, Any]:
    """The cache figures telemetry carries (the engine's full stats are in the status command)."""
    if not stats:
        return {"enabled": False}
    return {k: stats[k] for k in _CACHE_KEYS if k in stats}


def _engine_stats(svc: AgentService) -> dict[str, Any]:
    return (svc.host.stats().get("engine") or {}) if svc.host is not None else {}


def state_payload(svc: AgentService, online: bool) -> dict[str, Any]:
    """The retained ``state`` message (also the Last Will, with ``online`` false)."""
    engine = svc.engine()
    accelerator = getattr(engine, "accelerator", None) or svc.profile.runtime.accelerator
    return {"online": online, "device_id": svc.cfg.device_id, "group": svc.cfg.group,
            "profile": svc.profile.name, "agent_version": __version__, "model": svc.model_info(),
            "accelerator": accelerator, "boot": svc.boot, "ts": round(time.time(), 3),
            "signed_updates": bool(svc.cfg.trusted_keys)}


def telemetry_payload(svc: AgentService) -> dict[str, Any]:
    """Close the current Metrics window and describe it with the machine, drift and outbox figures."""
    window = svc.metrics.take_window()
    manifest = svc.host.manifest if svc.host is not None else None
    assert svc.outbox is not None
    return {
        "ts": round(time.time(), 3), **window.to_json(),
        "cache": cache_summary(_engine_stats(svc).get("cache")),
        **svc.system.sample(),
        "model": svc.model_info(),
        "drift": svc.metrics.drift(manifest.baseline if manifest is not None else None),
        "outbox": {"pending": svc.outbox.pending(), "dropped": svc.outbox.dropped() + svc.emit_dropped},
    }


def metrics_text(svc: AgentService) -> str:
    """The ``/metrics`` page: counters since start, latency of the last telemetry window."""
    m = svc.metrics
    window = m.last_window
    info = svc.model_info() or {}
    labels = f'{{device_id="{svc.cfg.device_id}",model="{info.get("name", "")}",' \
             f'version="{info.get("version", "")}"}}'
    cache = _engine_stats(svc).get("cache") or {}
    outbox, link = svc.outbox, svc.link
    return prometheus_lines({
        "edgefleet_inferences_total": ("counter", "Inferences served since start (across model swaps)",
                                       m.total_inferences),
        "edgefleet_inference_errors_total": ("counter", "Failed inferences", m.total_errors),
        "edgefleet_latency_p50_ms": ("gauge", "Median latency in the last telemetry window, ms",
                                     window.p50_ms if window else None),
        "edgefleet_latency_p95_ms": ("gauge", "95th percentile latency in the last telemetry window, ms",
                                     window.p95_ms if window else None),
        "edgefleet_latency_p99_ms": ("gauge", "99th percentile latency in the last telemetry window, ms",
                                     window.p99_ms if window else None),
        "edgefleet_cache_hit_rate": ("gauge", "Cache hit rate of the active model, 0..1", cache.get("hit_rate")),
        "edgefleet_outbox_pending": ("gauge", "Messages waiting for the broker",
                                     outbox.pending() if outbox else None),
        "edgefleet_outbox_dropped_total": ("counter", "Messages dropped because the outbox was full",
                                           outbox.dropped() if outbox else None),
        "edgefleet_mqtt_connected": ("gauge", "1 when connected to the broker",
                                     1 if link is not None and link.connected else 0),
        "edgefleet_boot": ("gauge", "Boot counter", svc.boot),
    }, labels)
