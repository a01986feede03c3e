"""Telemetry: what the device did in the last window, how the machine is, and output drift.

The inference path only calls :meth:`Metrics.record` (one ``deque.append`` of a tuple and one
counter step, no lock: both are atomic under the GIL). The telemetry thread and the ``/metrics``
scrape swap the samples out and do all the arithmetic (percentiles, the latency histogram, the
top-1 of each output), so a histogram costs the hot path nothing. System figures come from psutil; the temperature from ``/sys/class/thermal``
when the board has a sensor, else ``null``.

Drift compares the recent top-1 class histogram and mean confidence with the ``baseline`` the
converter wrote into the manifest: total variation distance (0 = same distribution, 1 =
disjoint) and the confidence delta (recent - baseline).
"""

from __future__ import annotations

import collections
import itertools
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edgefleet.manifest import Baseline
from edgefleet.quant import first_output, top1

__all__ = [
    "LATENCY_BUCKETS_S",
    "HistogramSnapshot",
    "LatencyHistogram",
    "Metrics",
    "SystemStats",
    "WindowStats",
    "drift_report",
    "read_temperature_c",
    "summarize_output",
]

THERMAL_ROOT = Path("/sys/class/thermal")
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
"""Upper bounds of the latency histogram, seconds: an Edge TPU call (~0.5 ms) to a slow CPU model (2 s)."""


def summarize_output(output: Any) -> tuple[int | None, float | None]:
    """(top-1 class, its score) for a classifier's first output; (None, None) when not a vector."""
    arr = first_output(output)
    if arr.ndim == 0 or arr.size < 2 or arr.dtype.kind not in "fiu":
        return None, None
    flat = arr.reshape(-1, arr.shape[-1])[0]
    idx = int(top1(flat))
    return idx, float(flat[idx])


@dataclass(frozen=True)
class WindowStats:
    window_s: float
    inferences: int
    errors: int
    throughput: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None

    def to_json(self) -> dict[str, Any]:
        return {"window_s": round(self.window_s, 3), "inferences": self.inferences, "errors": self.errors,
                "throughput": round(self.throughput, 3),
                "latency_ms": {"p50": self.p50_ms, "p95": self.p95_ms, "p99": self.p99_ms}}


class HistogramSnapshot(NamedTuple):
    buckets: tuple[tuple[float, int], ...]
    """(upper bound in seconds, cumulative count), ascending, without +Inf."""
    count: int
    sum_s: float


class LatencyHistogram:
    """Cumulative latency buckets in seconds, filled in bulk (one ``searchsorted`` per drain).

    Not thread-safe on its own: :class:`Metrics` feeds it under its drain lock.
    """

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = tuple(bounds)
        self._edges = np.asarray(self.bounds, dtype=np.float64)
        self._counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)  # the last one is above every bound
        self._sum = 0.0

    def observe(self, samples_s: np.ndarray) -> None:
        if samples_s.size:
            # side="left": a sample equal to a bound falls in that bucket (Prometheus' le is <=)
            index = np.searchsorted(self._edges, samples_s, side="left")
            self._counts += np.bincount(index, minlength=len(self._counts))
            self._sum += float(samples_s.sum())

    def snapshot(self) -> HistogramSnapshot:
        cumulative = np.cumsum(self._counts)
        return HistogramSnapshot(tuple(zip(self.bounds, (int(c) for c in cumulative[:-1]))), int(cumulative[-1]),
                                 self._sum)


class Metrics:
    """Per-window counts and latency percentiles, plus a bounded sample of outputs for drift.

    The service's one record of what it served: MQTT telemetry (:meth:`take_window`) and the
    Prometheus page (:attr:`total_inferences`, :attr:`last_window`) both read it, and it outlives
    every model swap (the engines' own counters start again with each model).

    Hot path (:meth:`record`): two ``deque.append`` and one counter step, no lock (each is
    atomic under the GIL). Whoever reads next -- the telemetry thread or a scrape -- drains the
    latencies into the cumulative :class:`LatencyHistogram` (one observation per engine call,
    a batch being one call) and keeps them for the window's percentiles; the two readers share
    a lock the hot path never takes. Latencies keep at most ``max_window`` per window;
    only the last ``drift_per_window`` outputs of a window are summarized for drift, so a window
    of 20 000 inferences costs the telemetry thread about as much as one of 200. The inference
    count itself is exact.
    """

    def __init__(self, drift_window: int = 1000, max_window: int = 100_000, drift_per_window: int = 256) -> None:
        self._max_window = max_window
        self._drift_per_window = drift_per_window
        self._latencies: collections.deque[float] = collections.deque(maxlen=max_window)
        self._outputs: collections.deque[Any] = collections.deque(maxlen=drift_per_window)
        self._recent: collections.deque[tuple[int, float]] = collections.deque(maxlen=drift_window)
        self._calls = itertools.count()
        self._errors = itertools.count()
        self._calls_seen = 0
        self._errors_seen = 0
        self._started = time.monotonic()
        self._drain_lock = threading.Lock()
        self._window_latencies: list[np.ndarray] = []
        self.histogram = LatencyHistogram()
        self.last_window: WindowStats | None = None
        """The window :meth:`take_window` closed last (what the last telemetry message carried)."""

    @property
    def total_inferences(self) -> int:
        """Inferences served since start, exact and live (any thread may read it)."""
        return _peek(self._calls)

    @property
    def total_errors(self) -> int:
        """Failed inferences since start."""
        return _peek(self._errors)

    def record(self, latency_s: float, output: Any = None, error: bool = False, samples: int = 1) -> None:
        """Hot path: note one call (its output is summarized later, off this thread).

        ``samples`` > 1 for a batch call: counted as that many inferences, one latency entry.
        """
        counter = self._errors if error else self._calls
        next(counter)
        if samples > 1:
            for _ in range(samples - 1):
                next(counter)
        if not error:
            self._latencies.append(latency_s)
            self._outputs.append(output)

    def _drain(self) -> None:
        """Move the new latency samples into the histogram and the open window (drain lock held)."""
        latencies, self._latencies = self._latencies, collections.deque(maxlen=self._max_window)
        if not latencies:
            return
        arr = np.fromiter(latencies, dtype=np.float64, count=len(latencies))
        self.histogram.observe(arr)
        self._window_latencies.append(arr)
        if sum(a.size for a in self._window_latencies) > self._max_window:
            self._window_latencies = [np.concatenate(self._window_latencies)[-self._max_window:]]

    def latency_histogram(self) -> HistogramSnapshot:
        """The latency histogram since start, up to this moment (any thread; a scrape)."""
        with self._drain_lock:
            self._drain()
            return self.histogram.snapshot()

    def take_window(self, now: float | None = None) -> WindowStats:
        """Close the current window and summarize it (telemetry thread only)."""
        now = time.monotonic() if now is None else now
        with self._drain_lock:
            self._drain()
            chunks, self._window_latencies = self._window_latencies, []
        latencies = np.concatenate(chunks) if chunks else np.empty(0)
        outputs, self._outputs = self._outputs, collections.deque(maxlen=self._drift_per_window)
        calls, errors = _peek(self._calls), _peek(self._errors)
        count, n_errors = calls - self._calls_seen, errors - self._errors_seen
        self._calls_seen, self._errors_seen = calls, errors
        span = max(now - self._started, 1e-9)
        self._started = now
        for output in list(outputs):
            if output is not None:
                top1, conf = summarize_output(output)
                if top1 is not None and conf is not None:
                    self._recent.append((top1, conf))
        if latencies.size:
            p50, p95, p99 = (round(float(v) * 1000.0, 3) for v in np.percentile(latencies, [50, 95, 99]))
        else:
            p50 = p95 = p99 = None
        self.last_window = WindowStats(span, count, n_errors, count / span, p50, p95, p99)
        return self.last_window

    def drift(self, baseline: Baseline | None) -> dict[str, Any]:
        return drift_report(list(self._recent), baseline)


def _peek(counter: itertools.count) -> int:
    """The next value of ``counter`` without advancing it (repr is ``count(N)``)."""
    return int(repr(counter)[6:-1])


def drift_report(recent: list[tuple[int, float]], baseline: Baseline | None) -> dict[str, Any]:
    """TVD of the top-1 histogram and mean-confidence delta vs the manifest baseline.

    Values are null when there is no baseline or no recent result to compare.
    """
    out: dict[str, Any] = {"samples": len(recent), "tvd": None, "confidence_delta": None,
                           "mean_confidence": None}
    if not recent:
        return out
    classes = np.fromiter((c for c, _ in recent), dtype=np.int64, count=len(recent))
    confs = np.fromiter((s for _, s in recent), dtype=np.float64, count=len(recent))
    out["mean_confidence"] = round(float(confs.mean()), 5)
    if baseline is None:
        return out
    if baseline.class_histogram:
        ref = np.asarray(baseline.class_histogram, dtype=np.float64)
        ref = ref / ref.sum() if ref.sum() > 0 else ref
        size = max(len(ref), int(classes.max()) + 1)
        cur = np.bincount(classes, minlength=size).astype(np.float64) / len(recent)
        ref = np.pad(ref, (0, size - len(ref)))
        out["tvd"] = round(float(0.5 * np.abs(cur - ref).sum()), 5)
    if baseline.mean_confidence is not None:
        out["confidence_delta"] = round(float(confs.mean()) - float(baseline.mean_confidence), 5)
    return out


def read_temperature_c(root: Path = THERMAL_ROOT) -> float | None:
    """The first thermal zone's temperature in degrees C, or None without a sensor."""
    try:
        zones = sorted(root.glob("thermal_zone*/temp"))
    except OSError:
        return None
    for zone in zones:
        try:
            return round(int(zone.read_text().strip()) / 1000.0, 1)
        except (OSError, ValueError):
            continue
    return None


class SystemStats:
    """CPU (of this process, % of one core), RSS, temperature and free disk of the state dir."""

    def __init__(self, disk_path: Path, thermal_root: Path = THERMAL_ROOT) -> None:
        import psutil  # agent extra; imported here so the module loads in tools without it

        self._proc = psutil.Process(os.getpid())
        self._proc.cpu_percent(None)  # prime: the first call always returns 0
        self.disk_path = Path(disk_path)
        self.thermal_root = thermal_root

    def disk_free_bytes(self) -> int | None:
        try:
            return int(shutil.disk_usage(self.disk_path).free)
        except OSError:
            return None

    def temperature_c(self) -> float | None:
        return read_temperature_c(self.thermal_root)

    def sample(self) -> dict[str, Any]:
        """The telemetry figures. Telemetry thread only: ``cpu_percent`` is since the previous call."""
        disk_free = self.disk_free_bytes()
        return {
            "cpu_percent": round(float(self._proc.cpu_percent(None)), 1),
            "rss_mb": round(self._proc.memory_info().rss / 2**20, 1),
            "temp_c": self.temperature_c(),
            "disk_free_mb": round(disk_free / 2**20, 1) if disk_free is not None else None,
        }
