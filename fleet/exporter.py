"""Fleet metrics for Prometheus, from the devices' MQTT state and telemetry (``edge-fleet exporter``).

A :class:`FleetIndex` keeps a few numbers per device (never whole payloads), fed one message at
a time; :class:`FleetCollector` turns it into metric families when Prometheus scrapes, so a
device that goes away simply stops being listed (after ``stale_s`` without a message) and no
label set outlives it. Labels are bounded: ``device``, ``group``, ``model`` (the model's name);
the version and sha256 are only on ``edgefleet_device_model_info``. Rollout series carry
``rollout`` for the rollouts a ``rollouts`` source lists (the newest few).

Telemetry reports latency as p50/p95/p99 per window, not as buckets, so the latency histogram
is built from them: of a window's n inferences, n/2 count at p50, 0.45 n at p95, 0.05 n at p99.
``histogram_quantile`` over it is as coarse as those three points, which is what the agent measures.
Inference and error counters add up each window's counts (repeated ``seq`` numbers are skipped).

Rendering 10,000 devices (about 200,000 samples) takes prometheus_client a few seconds, longer
than a scrape should: :class:`MetricsServer` renders in the background every ``refresh_s`` and
answers each scrape with the newest render, so a scrape takes milliseconds at any fleet size and
values are at most ``refresh_s`` old (``edgefleet_exporter_render_seconds`` shows the cost).
"""

from __future__ import annotations

import bisect
import queue
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from edgefleet.messages import decode
from edgefleet.mqtt import Message
from edgefleet.topics import all_devices, parse_device_topic

__all__ = ["BUCKETS_S", "EXPORTER_TOPICS", "FleetCollector", "FleetIndex", "MetricsServer", "RolloutSource", "consume"]

EXPORTER_TOPICS = (all_devices("state"), all_devices("telemetry"))
BUCKETS_S = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_SHARES = (0.5, 0.45, 0.05)  # of a window's inferences, at p50, p95, p99
RolloutSource = Callable[[], list[dict[str, Any]]]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class _Device:
    __slots__ = ("buckets", "drift", "errors", "group", "hit_ratio", "inferences", "last_seen", "lat_count",
                 "lat_sum", "model", "online", "rate", "seq", "sha256", "temp", "version")

    def __init__(self) -> None:
        self.group = ""
        self.model = ""
        self.version = ""
        self.sha256 = ""
        self.online = False
        self.last_seen = 0.0
        self.seq = 0
        self.rate: float | None = None
        self.inferences = 0.0
        self.errors = 0.0
        self.hit_ratio: float | None = None
        self.drift: float | None = None
        self.temp: float | None = None
        self.buckets = [0.0] * (len(BUCKETS_S) + 1)  # per bucket (not cumulative); the last is +Inf
        self.lat_sum = 0.0
        self.lat_count = 0.0


class FleetIndex:
    """The numbers Prometheus sees, per device; one writer (the MQTT loop), readers under the lock."""

    def __init__(self, stale_s: float = 600.0, max_devices: int = 100_000) -> None:
        self.stale_s = stale_s
        self.max_devices = max_devices  # bound: devices beyond it are not tracked (counted in refused)
        self.devices: dict[str, _Device] = {}
        self.lock = threading.Lock()
        self.messages = 0
        self.ignored = 0
        self.refused = 0
        self.dropped = 0
        self.render_s = 0.0  # how long the last render took (set by MetricsServer)

    def ingest(self, msg: Message, now: float | None = None) -> None:
        parsed = parse_device_topic(msg.topic)
        if parsed is None or parsed[1] not in ("state", "telemetry"):
            return
        device_id, kind = parsed
        now = time.time() if now is None else now
        with self.lock:
            self.messages += 1
            if not msg.payload:
                if kind == "state" and self.devices.pop(device_id, None) is not None:
                    self.dropped += 1  # a cleared retained state: the device was removed
                return
            try:
                payload = decode(msg.payload)
            except (ValueError, UnicodeDecodeError):
                self.ignored += 1
                return
            dev = self.devices.get(device_id)
            if dev is None:
                if len(self.devices) >= self.max_devices:
                    self.refused += 1
                    return
                dev = self.devices[device_id] = _Device()
            dev.last_seen = now
            model = payload.get("model")
            if isinstance(model, dict):
                dev.model = str(model.get("name") or "")
                dev.version = str(model.get("version") or "")
                dev.sha256 = str(model.get("sha256") or "")
            if kind == "state":
                dev.online = bool(payload.get("online", False))
                dev.group = str(payload.get("group") or dev.group)
                return
            if not msg.retain:
                dev.online = True
            self._telemetry(dev, payload)

    @staticmethod
    def _telemetry(dev: _Device, t: dict[str, Any]) -> None:
        seq = t.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            if 0 < seq <= dev.seq:
                return  # a repeat (QoS 1 is at least once): counted already
            dev.seq = seq
        dev.rate = _number(t.get("throughput"))
        n = _number(t.get("inferences")) or 0.0
        dev.inferences += max(0.0, n)
        dev.errors += max(0.0, _number(t.get("errors")) or 0.0)
        cache = t.get("cache") if isinstance(t.get("cache"), dict) else {}
        dev.hit_ratio = _number(cache.get("hit_rate")) if cache.get("enabled", True) else None
        drift = t.get("drift") if isinstance(t.get("drift"), dict) else {}
        dev.drift = _number(drift.get("tvd"))
        dev.temp = _number(t.get("temp_c"))
        lat = t.get("latency_ms") if isinstance(t.get("latency_ms"), dict) else {}
        points = [_number(lat.get(k)) for k in ("p50", "p95", "p99")]
        if n > 0 and all(p is not None for p in points):
            for share, ms in zip(_SHARES, points):
                seconds = float(ms) / 1000.0  # type: ignore[arg-type]
                dev.buckets[bisect.bisect_left(BUCKETS_S, seconds)] += share * n
                dev.lat_sum += share * n * seconds
            dev.lat_count += n

    def prune(self, now: float) -> int:
        """Forget devices not heard from for ``stale_s``; returns how many went."""
        with self.lock:
            gone = [d for d, dev in self.devices.items() if now - dev.last_seen > self.stale_s]
            for d in gone:
                del self.devices[d]
            self.dropped += len(gone)
        return len(gone)


class FleetCollector(Collector):
    """Metric families built at scrape time from a :class:`FleetIndex` (and optional rollout source)."""

    def __init__(self, index: FleetIndex, rollouts: RolloutSource | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.index = index
        self.rollouts = rollouts
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        index = self.index
        index.prune(self.clock())
        labels = ["device", "group", "model"]
        online = GaugeMetricFamily("edgefleet_device_online", "1 while the device's state says online", labels=labels)
        seen = GaugeMetricFamily("edgefleet_device_last_seen_timestamp_seconds", "last message from the device",
                                 labels=labels)
        rate = GaugeMetricFamily("edgefleet_device_inference_rate", "inferences per second in the last telemetry window",
                                 labels=labels)
        infer = CounterMetricFamily("edgefleet_device_inferences", "successful inferences reported", labels=labels)
        errors = CounterMetricFamily("edgefleet_device_errors", "failed inferences reported", labels=labels)
        hits = GaugeMetricFamily("edgefleet_device_cache_hit_ratio", "cache hits / lookups, last window",
                                 labels=labels)
        drift = GaugeMetricFamily("edgefleet_device_drift_tvd",
                                  "top-1 class histogram vs the manifest baseline (0 same .. 1 disjoint)", labels=labels)
        temp = GaugeMetricFamily("edgefleet_device_temperature_celsius", "SoC temperature", labels=labels)
        latency = HistogramMetricFamily("edgefleet_device_latency_seconds",
                                        "per-call latency, from the reported p50/p95/p99", labels=labels)
        info = InfoMetricFamily("edgefleet_device_model", "the model a device runs",
                                labels=["device", "group", "model"])
        bounds = [str(b) for b in BUCKETS_S] + ["+Inf"]
        with index.lock:
            for device_id, d in index.devices.items():
                values = [device_id, d.group, d.model]
                online.add_metric(values, 1.0 if d.online else 0.0)
                seen.add_metric(values, d.last_seen)
                info.add_metric(values, {"version": d.version, "sha256": d.sha256})
                if d.lat_count or d.rate is not None:
                    infer.add_metric(values, d.inferences)
                    errors.add_metric(values, d.errors)
                if d.rate is not None:
                    rate.add_metric(values, d.rate)
                if d.hit_ratio is not None:
                    hits.add_metric(values, d.hit_ratio)
                if d.drift is not None:
                    drift.add_metric(values, d.drift)
                if d.temp is not None:
                    temp.add_metric(values, d.temp)
                if d.lat_count:
                    acc, cumulative = 0.0, []
                    for bound, n in zip(bounds, d.buckets):
                        acc += n
                        cumulative.append((bound, acc))
                    latency.add_metric(values, cumulative, d.lat_sum)
            devices = len(index.devices)
            stats = (index.messages, index.ignored, index.dropped, index.refused)
        yield from (online, seen, rate, infer, errors, hits, drift, temp, latency, info)
        yield GaugeMetricFamily("edgefleet_exporter_devices", "devices tracked", value=devices)
        yield GaugeMetricFamily("edgefleet_exporter_render_seconds", "time the last render of these metrics took",
                                value=index.render_s)
        yield CounterMetricFamily("edgefleet_exporter_messages", "MQTT messages read", value=stats[0])
        yield CounterMetricFamily("edgefleet_exporter_ignored", "messages that were not valid JSON objects",
                                  value=stats[1])
        yield CounterMetricFamily("edgefleet_exporter_dropped_devices", "devices dropped (stale or removed)",
                                  value=stats[2])
        yield CounterMetricFamily("edgefleet_exporter_refused_devices", "messages from devices above the bound",
                                  value=stats[3])
        if self.rollouts is not None:
            try:
                listed, up = self.rollouts(), 1.0
            except Exception:  # noqa: BLE001 (the state database is away: device metrics still count)
                listed, up = [], 0.0
            yield GaugeMetricFamily("edgefleet_exporter_state_up", "1 when the rollout state could be read",
                                    value=up)
            yield from _rollout_metrics(listed)


def _rollout_metrics(rollouts: list[dict[str, Any]]) -> Iterator[Metric]:
    """Per-rollout progress from the store's listing (see :func:`fleet.views.listing`)."""
    devices = GaugeMetricFamily("edgefleet_rollout_devices", "executions per state", labels=["rollout", "state"])
    progress = GaugeMetricFamily("edgefleet_rollout_progress_ratio", "executions in a final state / all",
                                 labels=["rollout"])
    updated = GaugeMetricFamily("edgefleet_rollout_updated_timestamp_seconds", "last recorded change",
                                labels=["rollout"])
    info = InfoMetricFamily("edgefleet_rollout", "a rollout's kind, model, version and state",
                            labels=["rollout"])
    from edgefleet.messages import ExecState

    for r in rollouts:
        rid, counts = r["rollout_id"], r["counts"]
        for state, n in counts.items():
            devices.add_metric([rid, state], n)
        final = sum(n for state, n in counts.items() if ExecState(state).terminal)
        progress.add_metric([rid], final / max(1, sum(counts.values())))
        updated.add_metric([rid], r["updated"])
        info.add_metric([rid], {"kind": r["kind"], "model": r["name"] or "", "version": r["version"] or "",
                                "state": r["state"]})
    yield from (devices, progress, updated, info)


def consume(index: FleetIndex, messages: queue.SimpleQueue[Message], stop: threading.Event) -> None:
    """Feed the index from an MQTT client's queue until ``stop`` (run it in a thread)."""
    while not stop.is_set():
        try:
            msg = messages.get(timeout=0.5)
        except queue.Empty:
            continue
        index.ingest(msg)


class MetricsServer:
    """``/metrics`` from the newest background render (see the module docstring for why)."""

    def __init__(self, listen: str, index: FleetIndex, rollouts: RolloutSource | None = None,
                 refresh_s: float = 5.0) -> None:
        """Raises TransportError when ``listen`` cannot be bound; ConfigError for a bad address."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from edgefleet.addresses import parse_host_port
        from edgefleet.errors import TransportError

        host, port = parse_host_port(listen, "--listen", default_host="0.0.0.0")
        self.index = index
        self.refresh_s = refresh_s
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetCollector(index, rollouts))
        self._generate = generate_latest
        self._stop = threading.Event()
        self.body = b""
        self.render()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path != "/metrics":
                    body, status, ctype = b"edgefleet exporter: see /metrics\n", 404 if path != "/" else 200, "text/plain"
                else:
                    body, status, ctype = owner.body, 200, CONTENT_TYPE_LATEST
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise TransportError(f"exporter cannot listen on {listen}: {exc}") from exc
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{self.port}/metrics"
        for target in (self._server.serve_forever, self._loop):
            threading.Thread(target=target, daemon=True, name="exporter").start()

    def render(self) -> None:
        start = time.perf_counter()
        body = self._generate(self.registry)
        self.index.render_s = time.perf_counter() - start
        self.body = body

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.render()
            except Exception:  # a rollout source whose database is away: keep the last render
                import logging

                logging.getLogger(__name__).warning("metrics render failed", exc_info=True)

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
