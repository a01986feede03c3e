"""What the agent says about itself: the retained state, telemetry, and the Prometheus page.

Telemetry and ``/metrics`` read the same :class:`~agent.telemetry.Metrics` (the service's count
of what it served, which outlives model swaps); only the cache figures come from the active
engine, because they belong to that model. Built on the caller's thread from a snapshot; nothing
here touches the inference path.

``/metrics`` follows Prometheus' conventions (prometheus_client renders it): base units
(seconds, bytes), ``_total`` counters, latency as a histogram, and what identifies the device
and the model in two ``*_info`` series instead of labels on every metric, so an OTA update does
not start new series. A fresh registry per scrape reads the service and holds no state.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from agent.http import serving_version
from edgefleet import __version__

if TYPE_CHECKING:
    from agent.service.core import AgentService

__all__ = ["cache_summary", "metric_families", "metrics_text", "state_payload", "telemetry_payload"]

_CACHE_KEYS = ("enabled", "hit_rate", "exact_hits", "near_hits", "misses", "disagreement_rate",
               "disagreement_upper", "answer_disagreement_upper", "expected_disagreements", "verifications",
               "threshold", "reason")


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
            "signed_updates": bool(svc.cfg.trusted_keys), **_link_state(svc)}


def _link_state(svc: AgentService) -> dict[str, Any]:
    """Which broker node and MQTT version the device is on, and any subscription it lacks."""
    link = svc.link
    if link is None:
        return {}
    return {"broker": link.url.display(), "mqtt": link.protocol,
            "refused_subscriptions": sorted(link.refused_subscriptions)}


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
        "health": svc.health(),
        **({"refused_subscriptions": sorted(svc.link.refused_subscriptions)}
           if svc.link is not None and svc.link.refused_subscriptions else {}),
        "outbox": {"pending": svc.outbox.pending(), "dropped": svc.outbox.dropped() + svc.emit_dropped},
    }


def _gauge(name: str, doc: str, value: float | None, labels: dict[str, str] | None = None) -> Metric | None:
    if value is None or math.isnan(value):  # absent or NaN: leave the series out
        return None
    family = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    family.add_metric(list((labels or {}).values()), float(value))
    return family


def _counter(name: str, doc: str, value: float | None) -> Metric | None:
    return CounterMetricFamily(name, doc, value=float(value)) if value is not None else None


def _latency_families(svc: AgentService) -> list[Metric | None]:
    hist = svc.metrics.latency_histogram()
    latency = HistogramMetricFamily(
        "edgefleet_inference_duration_seconds", "Engine time per inference call (a batch is one call)",
        buckets=[*((repr(le), n) for le, n in hist.buckets), ("+Inf", hist.count)], sum_value=hist.sum_s)
    window = svc.metrics.last_window
    percentiles = [(p, getattr(window, f"p{p}_ms") if window is not None else None) for p in (50, 95, 99)]
    return [latency, *(_gauge(f"edgefleet_window_latency_p{p}_seconds",
                              f"{p}th percentile latency of the last telemetry window (what MQTT carried)",
                              ms / 1000.0 if ms is not None else None) for p, ms in percentiles)]


def metric_families(svc: AgentService) -> list[Metric]:
    """Every ``edgefleet_*`` family, read now from the service (the same Metrics as telemetry)."""
    m, cfg = svc.metrics, svc.cfg
    info = svc.model_info()
    manifest = svc.host.manifest if svc.host is not None else None
    drift = m.drift(manifest.baseline if manifest is not None else None)
    cache = _engine_stats(svc).get("cache") or {}
    outbox, link, system, http = svc.outbox, svc.link, getattr(svc, "system", None), svc.http
    families: list[Metric | None] = [
        _gauge("edgefleet_agent_info", "This agent (value 1)", 1, {
            "device_id": cfg.device_id, "group": cfg.group, "profile": svc.profile.name,
            "agent_version": __version__}),
        _gauge("edgefleet_model_info", "The model being served (value 1; absent without a model)", 1, {
            "name": info["name"], "version": info["version"],
            "serving_version": str(serving_version(info["version"]) or 0), "sha256": info.get("sha256", "")})
        if info else None,
        _counter("edgefleet_inferences", "Inferences served since start (across model swaps)", m.total_inferences),
        _counter("edgefleet_inference_errors", "Failed inferences since start", m.total_errors),
        *_latency_families(svc),
        _gauge("edgefleet_cache_hit_ratio", "Cache hit ratio of the active model, 0..1", cache.get("hit_rate")),
        _gauge("edgefleet_stuck_workers", "Inference calls running past their deadline now",
               svc.health().get("stuck_workers")),
        _gauge("edgefleet_drift_tvd", "Top-1 class distribution vs the manifest baseline (total variation, 0..1)",
               drift["tvd"]),
        _gauge("edgefleet_drift_confidence_delta", "Mean top-1 confidence minus the baseline's",
               drift["confidence_delta"]),
        _gauge("edgefleet_drift_mean_confidence", "Mean top-1 confidence of the recent results",
               drift["mean_confidence"]),
        _gauge("edgefleet_drift_samples", "Recent results the drift figures are computed over", drift["samples"]),
        _gauge("edgefleet_temperature_celsius", "Board temperature (first thermal zone)",
               system.temperature_c() if system is not None else None),
        _gauge("edgefleet_disk_free_bytes", "Free space where the state directory lives",
               system.disk_free_bytes() if system is not None else None),
        _gauge("edgefleet_outbox_pending", "Messages waiting for the broker", outbox.pending() if outbox else None),
        _counter("edgefleet_outbox_dropped", "Messages dropped because the outbox or emit queue was full",
                 outbox.dropped() + svc.emit_dropped if outbox else None),
        _gauge("edgefleet_mqtt_connected", "1 when connected to the broker", 1 if link is not None and link.connected
               else 0),
        _counter("edgefleet_http_evicted_connections", "Connections closed to make room (slow or idle clients)",
                 http.evicted if http is not None else None),
        _gauge("edgefleet_boot", "Boot counter", svc.boot),
    ]
    return [f for f in families if f is not None]


class _ServiceCollector:
    def __init__(self, svc: AgentService) -> None:
        self._svc = svc

    def describe(self) -> list[Metric]:
        return []  # names are only known at scrape time; nothing to check at registration

    def collect(self) -> list[Metric]:
        return metric_families(self._svc)


def metrics_text(svc: AgentService) -> str:
    """The ``/metrics`` page: the agent's families and the process collector (CPU, memory, fds)."""
    registry = CollectorRegistry()
    registry.register(_ServiceCollector(svc))  # type: ignore[arg-type]
    ProcessCollector(registry=registry)
    return generate_latest(registry).decode()
